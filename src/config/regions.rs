//! The region file (what operators edit): PoPs with addresses and health URL, regions mapping
//! networks to PoPs in preference order, and a default. Parsed and validated here; the DNS
//! sidecar builds its lookup map from the typed result.

use super::error::{ConfigError, Location};
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use toml::Spanned;

/// A validated region file: every name referred to exists, every network is written in its
/// canonical form (no host bits) and belongs to exactly one region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionFile {
    pub pops: Vec<Pop>,
    pub regions: Vec<Region>,
    /// Indices into `pops`, in preference order; never empty.
    pub default: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pop {
    pub name: String,
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
    /// `http://` or `https://` URL of the PoP's admin `/healthz`; without one the PoP is
    /// always considered healthy.
    pub health: Option<http::Uri>,
    /// The operator's override of the health checks (gdnsd's `admin_state`).
    pub force: Force,
}

/// `force = "up" | "down"` on a PoP: taken out of (or kept in) the answers whatever its
/// health checks say, which go on running and show in `/map`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Force {
    /// Health checks decide.
    #[default]
    No,
    Up,
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    pub networks: Vec<IpNet>,
    /// Indices into [`RegionFile::pops`], in preference order; never empty.
    pub pops: Vec<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegionFile {
    #[serde(default)]
    pops: Vec<Spanned<RawPop>>,
    #[serde(default)]
    regions: Vec<Spanned<RawRegion>>,
    default: Option<Spanned<RawDefault>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPop {
    name: Spanned<String>,
    #[serde(default)]
    ipv4: Vec<Spanned<String>>,
    #[serde(default)]
    ipv6: Vec<Spanned<String>>,
    health: Option<Spanned<String>>,
    force: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    name: Spanned<String>,
    networks: Spanned<Vec<Spanned<String>>>,
    pops: Spanned<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefault {
    pops: Spanned<Vec<Spanned<String>>>,
}

/// Reads and validates a region file.
pub fn load(path: &Path) -> Result<RegionFile, ConfigError> {
    let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &source)
}

/// Validates region-file text as if it had been read from `path`.
pub fn parse(path: &Path, source: &str) -> Result<RegionFile, ConfigError> {
    let raw: RawRegionFile = ConfigError::parse_toml(path, source)?;
    let at = |s: std::ops::Range<usize>| Location::from_offset(path, source, s.start);
    let err = |span: std::ops::Range<usize>, reason: String| ConfigError::invalid(at(span), reason);

    let mut pops = Vec::with_capacity(raw.pops.len());
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for p in &raw.pops {
        let p = p.get_ref();
        let name = p.name.get_ref().trim().to_string();
        if name.is_empty() {
            return Err(err(p.name.span(), "pop name must not be empty".into()));
        }
        if by_name.insert(name.clone(), pops.len()).is_some() {
            return Err(err(p.name.span(), format!("pop {name:?} is defined twice")));
        }
        let ipv4 = p
            .ipv4
            .iter()
            .map(|a| {
                a.get_ref().parse::<Ipv4Addr>().map_err(|e| {
                    ConfigError::invalid_because(
                        at(a.span()),
                        format!("{:?} is not an IPv4 address", a.get_ref()),
                        e,
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ipv6 = p
            .ipv6
            .iter()
            .map(|a| {
                a.get_ref().parse::<Ipv6Addr>().map_err(|e| {
                    ConfigError::invalid_because(
                        at(a.span()),
                        format!("{:?} is not an IPv6 address", a.get_ref()),
                        e,
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if ipv4.is_empty() && ipv6.is_empty() {
            return Err(err(
                p.name.span(),
                format!("pop {name:?} needs at least one address in ipv4 or ipv6"),
            ));
        }
        let health = match &p.health {
            Some(h) => Some(health_url(h).map_err(|reason| err(h.span(), reason))?),
            None => None,
        };
        let force = match p.force.as_ref().map(|f| (f, f.get_ref().as_str())) {
            None => Force::No,
            Some((_, "up")) => Force::Up,
            Some((_, "down")) => Force::Down,
            Some((f, other)) => {
                return Err(err(
                    f.span(),
                    format!("pop {name:?}: force must be \"up\" or \"down\", not {other:?}"),
                ))
            }
        };
        pops.push(Pop {
            name,
            ipv4,
            ipv6,
            health,
            force,
        });
    }

    let pop_list = |list: &Spanned<Vec<Spanned<String>>>, what: &str| {
        if list.get_ref().is_empty() {
            return Err(err(
                list.span(),
                format!("{what} must list at least one pop"),
            ));
        }
        let mut out = Vec::with_capacity(list.get_ref().len());
        for n in list.get_ref() {
            let Some(&i) = by_name.get(n.get_ref().trim()) else {
                return Err(err(
                    n.span(),
                    format!(
                        "{what} names pop {:?}, which is not defined in [[pops]]",
                        n.get_ref()
                    ),
                ));
            };
            if out.contains(&i) {
                return Err(err(
                    n.span(),
                    format!("pop {:?} is listed twice", n.get_ref()),
                ));
            }
            out.push(i);
        }
        Ok(out)
    };

    let mut regions = Vec::with_capacity(raw.regions.len());
    let mut region_names: HashMap<String, ()> = HashMap::new();
    let mut owner: HashMap<IpNet, String> = HashMap::new();
    for r in &raw.regions {
        let r = r.get_ref();
        let name = r.name.get_ref().trim().to_string();
        if name.is_empty() || name == "default" {
            return Err(err(
                r.name.span(),
                format!("region name {name:?} is empty or reserved"),
            ));
        }
        if region_names.insert(name.clone(), ()).is_some() {
            return Err(err(
                r.name.span(),
                format!("region {name:?} is defined twice"),
            ));
        }
        let mut networks = Vec::with_capacity(r.networks.get_ref().len());
        for n in r.networks.get_ref() {
            let net: IpNet = n.get_ref().trim().parse().map_err(|e| {
                ConfigError::invalid_because(
                    at(n.span()),
                    format!("{:?} is not a network (address/length)", n.get_ref()),
                    e,
                )
            })?;
            if net.trunc() != net {
                return Err(err(
                    n.span(),
                    format!(
                        "network {net} has host bits set; did you mean {}?",
                        net.trunc()
                    ),
                ));
            }
            if let Some(other) = owner.insert(net, name.clone()) {
                return Err(err(
                    n.span(),
                    format!("network {net} is already listed in region {other:?}"),
                ));
            }
            networks.push(net);
        }
        let region_pops = pop_list(&r.pops, &format!("region {name:?}"))?;
        regions.push(Region {
            name,
            networks,
            pops: region_pops,
        });
    }

    let default = match &raw.default {
        Some(d) => pop_list(&d.get_ref().pops, "[default]")?,
        None => {
            return Err(ConfigError::invalid(
                Location::file(path),
                "missing [default] section (pops for clients outside every region)",
            ))
        }
    };
    Ok(RegionFile {
        pops,
        regions,
        default,
    })
}

fn health_url(h: &Spanned<String>) -> Result<http::Uri, String> {
    let uri: http::Uri = h
        .get_ref()
        .parse()
        .map_err(|e| format!("health {:?} is not a URL: {e}", h.get_ref()))?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.host().is_some() => Ok(uri),
        _ => Err(format!(
            "health {:?} must be an http:// or https:// URL with a host",
            h.get_ref()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(src: &str) -> Result<RegionFile, ConfigError> {
        parse(Path::new("regions.toml"), src)
    }

    const GOOD: &str = r#"
[[pops]]
name = "a"
ipv4 = ["192.0.2.1"]
health = "http://127.0.0.1:1/healthz"

[[regions]]
name = "r"
networks = ["198.51.100.0/24"]
pops = ["a"]

[default]
pops = ["a"]
"#;

    #[test]
    fn a_valid_file_becomes_typed() {
        let f = p(GOOD).expect("valid");
        assert_eq!(f.pops.len(), 1);
        assert_eq!(f.regions[0].pops, vec![0]);
        assert_eq!(f.default, vec![0]);
    }

    #[test]
    fn an_unknown_pop_is_reported_with_its_line() {
        let src = GOOD.replace(
            "pops = [\"a\"]\n\n[default]",
            "pops = [\"zz\"]\n\n[default]",
        );
        let e = p(&src).expect_err("invalid").to_string();
        assert!(e.starts_with("regions.toml:10:9"), "{e}");
        assert!(e.contains("\"zz\""), "{e}");
    }

    #[test]
    fn host_bits_and_unknown_keys_are_errors() {
        let e = p(&GOOD.replace("198.51.100.0/24", "198.51.100.1/24"))
            .expect_err("host bits")
            .to_string();
        assert!(e.contains("host bits"), "{e}");
        let e = p(&GOOD.replace("name = \"r\"", "name = \"r\"\ncolour = 1"))
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn a_pop_may_be_forced_up_or_down_and_nothing_else() {
        let forced =
            |v: &str| GOOD.replace("name = \"a\"\n", &format!("name = \"a\"\nforce = {v:?}\n"));
        assert_eq!(p(GOOD).expect("valid").pops[0].force, Force::No);
        assert_eq!(p(&forced("up")).expect("up").pops[0].force, Force::Up);
        assert_eq!(p(&forced("down")).expect("down").pops[0].force, Force::Down);
        let e = p(&forced("off")).expect_err("off").to_string();
        assert!(e.starts_with("regions.toml:4:9"), "{e}");
        assert!(
            e.contains("force must be \"up\" or \"down\", not \"off\""),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_region_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/regions.toml");
        load(&path).expect("config/regions.toml");
    }
}
