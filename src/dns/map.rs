//! Building the immutable map that queries read: the geo index, the answer classes (regions
//! with their PoP lists), the pre-encoded record sets of every PoP and the zone's SOA and NS.
//! A map is built off the query path and swapped in whole; only health flags and hit counters
//! inside it change afterwards (atomics).

use super::cookie::CookieSecret;
use super::geo::{ClassId, GeoIndex, DEFAULT_CLASS};
use super::health::{Health, HealthBook};
use super::records::StaticName;
use super::rrl::RateLimiter;
use crate::config::regions::Force;
use crate::config::regions::RegionFile;
use crate::config::DnsConfig;
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, TXT};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// Errors while turning a validated region file and `[dns]` into a map.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("{name:?} is not a valid DNS name")]
    Name {
        name: String,
        #[source]
        source: hickory_proto::error::ProtoError,
    },
    #[error("cannot encode the {what} record")]
    Encode {
        what: &'static str,
        #[source]
        source: hickory_proto::error::ProtoError,
    },
    #[error("too many PoPs or regions ({0}); at most 65535")]
    TooMany(usize),
    #[error("{0} has no PoP, or names a PoP that does not exist")]
    BadPops(String),
}

/// Pre-encoded resource records whose owner is a compression pointer to the question name
/// (offset 12), ready to be appended after the echoed question.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RrSet {
    pub bytes: Vec<u8>,
    pub count: u16,
}

/// What a name in the zone is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// The zone apex; `geo` when it is also one of `names`.
    Apex { geo: bool },
    /// One of `[dns] names`: A/AAAA from the region map.
    Geo,
    /// An in-zone nameserver with glue: A/AAAA from [`Zone::hosts`] at this index.
    Host(u8),
    /// Exists only because a name below it does (empty non-terminal): NODATA.
    Empty,
    /// Has records from `[dns] zone_file` only.
    Static,
}

/// A name of the zone: what it is and, when `[dns] zone_file` gives it records, where they
/// are in [`Zone::statics`].
#[derive(Debug, Clone)]
pub struct ZoneName {
    /// Lower-case wire form.
    pub wire: Vec<u8>,
    pub kind: NameKind,
    pub statics: Option<u16>,
}

/// The addresses of one in-zone nameserver, owner = question name.
#[derive(Debug, Default)]
pub struct HostAnswer {
    pub a: RrSet,
    pub aaaa: RrSet,
}

#[derive(Debug)]
pub struct PopAnswer {
    pub name: String,
    pub health: Arc<Health>,
    /// The region file's override of `health`: part of the map, so it changes with it.
    pub force: Force,
    pub a: RrSet,
    pub aaaa: RrSet,
}

/// Regions that answer alike (same PoP list) share a class; class 0 is the default.
#[derive(Debug)]
pub struct Class {
    /// "default", a region name, or region names joined by '+'.
    pub label: String,
    /// Indices into [`Map::pops`], preference order; never empty.
    pub pops: Vec<u16>,
    /// Answers given, per position in `pops`; shared with later maps of the same label.
    pub hits: Vec<Arc<AtomicU64>>,
}

/// The SOA of negative answers, in two forms: `full` with every name written out, and
/// `compressed`, whose owner and (when they are in the zone) MNAME and RNAME end in a pointer
/// to the apex inside the question name, patched per answer at `patches` (RFC 1035 4.1.4):
/// 36 octets less in every NXDOMAIN and NODATA of a zone like `edgepop.test`.
#[derive(Debug, Default)]
pub struct SoaAuthority {
    pub full: RrSet,
    pub compressed: Vec<u8>,
    /// Offsets in `compressed` of the 2-octet pointers to the apex.
    pub patches: Vec<usize>,
    /// Length of the apex's wire form.
    pub apex_len: usize,
}

impl SoaAuthority {
    /// Its size in an answer whose question name is `qname_len` octets long.
    #[inline]
    pub fn len_for(&self, qname_len: usize) -> usize {
        if qname_len >= self.apex_len {
            self.compressed.len()
        } else {
            self.full.bytes.len()
        }
    }

    /// Appends it to `out`, an answer whose question name (`qname_len` octets, inside the
    /// zone) starts at offset 12.
    #[inline]
    pub fn write(&self, out: &mut Vec<u8>, qname_len: usize) {
        if qname_len < self.apex_len {
            out.extend_from_slice(&self.full.bytes);
            return;
        }
        let base = out.len();
        out.extend_from_slice(&self.compressed);
        // At most 12 + 255: always within a pointer's 14 bits.
        let ptr = (0xC000 | (12 + qname_len - self.apex_len)) as u16;
        for &p in &self.patches {
            out[base + p..base + p + 2].copy_from_slice(&ptr.to_be_bytes());
        }
    }

    /// Of `soa`, the zone's SOA at `apex` with `ttl`; `full` is its uncompressed form.
    fn build(apex: &[u8], soa: &SOA, ttl: u32, full: RrSet) -> Self {
        let mut b = vec![0xC0, 0];
        let mut patches = vec![0];
        b.extend_from_slice(&6u16.to_be_bytes());
        b.extend_from_slice(&IN.to_be_bytes());
        b.extend_from_slice(&ttl.to_be_bytes());
        b.extend_from_slice(&[0, 0]); // RDLENGTH, set below
        let (mname, rname) = (wire(soa.mname()), wire(soa.rname()));
        for n in [&mname, &rname] {
            match below(n, apex) {
                Some(prefix) => {
                    b.extend_from_slice(prefix);
                    patches.push(b.len());
                    b.extend_from_slice(&[0xC0, 0]);
                }
                None => b.extend_from_slice(n),
            }
        }
        // hickory keeps the times as i32 and writes their bits: so do we.
        let times = [soa.refresh(), soa.retry(), soa.expire()].map(|t| t as u32);
        for v in [soa.serial(), times[0], times[1], times[2], soa.minimum()] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        let rdlen = (b.len() - 12) as u16;
        b[10..12].copy_from_slice(&rdlen.to_be_bytes());
        SoaAuthority {
            full,
            compressed: b,
            patches,
            apex_len: apex.len(),
        }
    }
}

/// The labels of wire name `n` before `apex` (without the root), when `n` is `apex` or
/// below it on a label boundary; `None` otherwise. Both in lower-case wire form.
#[inline]
pub(super) fn below<'a>(n: &'a [u8], apex: &[u8]) -> Option<&'a [u8]> {
    let mut i = 0usize;
    while i < n.len() {
        if n.len() - i == apex.len() {
            return (n[i..] == *apex).then(|| &n[..i]);
        }
        i += usize::from(n[i]) + 1;
    }
    None
}

/// The zone's fixed records, pre-encoded.
#[derive(Debug)]
pub struct Zone {
    /// Lower-case wire form of the apex.
    pub apex_wire: Vec<u8>,
    /// Every name that exists, sorted by [`super::query::by_length`]: the apex, geo names, in-zone nameservers,
    /// names with static records and the empty non-terminals above them.
    pub names: Vec<ZoneName>,
    /// Records from `[dns] zone_file`, by name.
    pub statics: Vec<StaticName>,
    /// Some static name is a wildcard (`*.label`): names that do not exist look for one.
    pub wildcards: bool,
    /// SOA with owner = question name (for SOA queries at the apex).
    pub soa_answer: RrSet,
    /// NS records with owner = question name.
    pub ns_answer: RrSet,
    /// A/AAAA of the in-zone nameservers, owners written out: the additional section of NS.
    pub ns_glue: RrSet,
    /// Answers for the in-zone nameservers' names.
    pub hosts: Vec<HostAnswer>,
    /// The SOA for the authority section of negative answers.
    pub soa_authority: SoaAuthority,
}

/// One generation of the region map. Immutable apart from atomics.
#[derive(Debug)]
pub struct Map {
    pub generation: u64,
    pub serial: u32,
    pub built_at: SystemTime,
    pub geo: GeoIndex,
    pub classes: Vec<Class>,
    pub pops: Vec<PopAnswer>,
    pub zone: Zone,
    /// The region file this map was built from (for /map and change detection).
    pub source: RegionFile,
    /// `[dns] nsid`: answered to queries that ask for it (RFC 5001).
    pub nsid: Option<Box<[u8]>>,
    /// The NSID as a CHAOS TXT record, owner = question name, for `id.server` and
    /// `hostname.bind` (RFC 4892).
    pub chaos_id: Option<RrSet>,
    /// Server cookies' key; the same in every map of one process.
    pub cookie_secret: CookieSecret,
    /// `[dns] max_nocookie_response`.
    pub max_nocookie_response: Option<u16>,
    /// `[dns] rate_limit`; kept from map to map while its settings stay.
    pub rate_limit: Option<Arc<RateLimiter>>,
}

impl Zone {
    /// The wildcard that answers for `wire`, a name of the zone that does not exist (RFC
    /// 4592 3.3.1): `*.` + its closest encloser (the longest ancestor that exists), if that
    /// wildcard exists (with records, or empty: then NODATA, 4.9). Only when the zone has
    /// wildcards.
    pub fn wildcard(&self, wire: &[u8]) -> Option<&ZoneName> {
        if !self.wildcards {
            return None;
        }
        let mut star = [0u8; 256];
        star[..2].copy_from_slice(&[1, b'*']);
        let mut rest = wire;
        while let Some(&l) = rest.first() {
            rest = rest.get(usize::from(l) + 1..)?;
            if rest.len() < self.apex_wire.len() {
                return None;
            }
            if self.find(rest).is_some() {
                // `rest` is a proper suffix of a name of at most 255 octets: room for `*.`.
                let name = star.get_mut(..2 + rest.len())?;
                name[2..].copy_from_slice(rest);
                return self.find(name);
            }
        }
        None
    }

    /// The name whose lower-case wire form is `wire`. A zone of a few names (the apex, the
    /// geo names, nameservers: the usual case) is scanned, which beats a binary search at
    /// that size; a zone file's thousands of names are searched.
    #[inline]
    pub fn find(&self, wire: &[u8]) -> Option<&ZoneName> {
        if self.names.len() <= 16 {
            return self.names.iter().find(|n| n.wire == wire);
        }
        let i = self
            .names
            .binary_search_by(|n| super::query::by_length(&n.wire, wire))
            .ok()?;
        self.names.get(i)
    }
}

impl PopAnswer {
    /// Whether it gets answers: forced up, or not forced down and passing its checks.
    #[inline]
    pub fn serves(&self) -> bool {
        match self.force {
            Force::No => self.health.is_up(),
            Force::Up => true,
            Force::Down => false,
        }
    }
}

impl Map {
    /// The PoP that answers for `class` now: its first PoP that [serves](PopAnswer::serves);
    /// when none does, its first not forced down (failing checks may be wrong, an operator's
    /// "down" is not), else its first: there is always an answer.
    #[inline]
    pub fn choose(&self, class: ClassId) -> (usize, &Class) {
        let c = &self.classes[class as usize];
        let pos = c
            .pops
            .iter()
            .position(|&p| self.pops[usize::from(p)].serves())
            .unwrap_or_else(|| self.fallback(c));
        (pos, c)
    }

    #[cold]
    fn fallback(&self, c: &Class) -> usize {
        c.pops
            .iter()
            .position(|&p| self.pops[usize::from(p)].force != Force::Down)
            .unwrap_or(0)
    }
}

/// Counters shared between map generations, keyed by class label and PoP name.
#[derive(Debug, Default)]
pub struct HitBook {
    counters: dashmap::DashMap<(String, String), Arc<AtomicU64>>,
}

impl HitBook {
    fn counter(&self, class: &str, pop: &str) -> Arc<AtomicU64> {
        self.counters
            .entry((class.to_string(), pop.to_string()))
            .or_default()
            .clone()
    }

    /// (class label, PoP name, answers) for every pair seen so far.
    pub fn snapshot(&self) -> Vec<(String, String, u64)> {
        let mut v: Vec<_> = self
            .counters
            .iter()
            .map(|e| {
                let (c, p) = e.key();
                (c.clone(), p.clone(), e.value().load(Ordering::Relaxed))
            })
            .collect();
        v.sort();
        v
    }
}

/// Everything a build needs besides the region file.
pub struct BuildContext<'a> {
    /// The rate limiter to keep (the previous map's, when its settings are unchanged).
    pub rate_limit: Option<Arc<RateLimiter>>,
    pub cfg: &'a DnsConfig,
    pub health: &'a HealthBook,
    pub hits: &'a HitBook,
    pub generation: u64,
    pub serial: u32,
    pub cookie_secret: CookieSecret,
}

/// Builds a map. Pure apart from registering health and hit entries in the shared books.
pub fn build(
    file: RegionFile,
    statics: Vec<StaticName>,
    cx: &BuildContext<'_>,
) -> Result<Map, MapError> {
    if file.pops.len() > usize::from(u16::MAX) || file.regions.len() > usize::from(u16::MAX) {
        return Err(MapError::TooMany(file.pops.len().max(file.regions.len())));
    }
    // The region file is validated when loaded, but its fields are public: re-check what
    // the query path indexes with, so no query can ever index out of bounds.
    let bad = |list: &[usize]| list.is_empty() || list.iter().any(|&i| i >= file.pops.len());
    if bad(&file.default) {
        return Err(MapError::BadPops("[default]".into()));
    }
    if let Some(r) = file.regions.iter().find(|r| bad(&r.pops)) {
        return Err(MapError::BadPops(format!("region {:?}", r.name)));
    }
    let ttl = u32::try_from(cx.cfg.ttl.as_secs()).unwrap_or(u32::MAX >> 1);
    let pops = file
        .pops
        .iter()
        .map(|p| {
            let mut a = RrSet::default();
            for addr in &p.ipv4 {
                push_rr(&mut a, RData::A(A(*addr)), ttl)?;
            }
            let mut aaaa = RrSet::default();
            for addr in &p.ipv6 {
                push_rr(&mut aaaa, RData::AAAA(AAAA(*addr)), ttl)?;
            }
            Ok(PopAnswer {
                name: p.name.clone(),
                health: cx.health.entry(&p.name, p.health.as_ref()),
                force: p.force,
                a,
                aaaa,
            })
        })
        .collect::<Result<Vec<_>, MapError>>()?;

    // Classes: the default first, then one per distinct PoP list.
    let as_u16 = |v: &[usize]| v.iter().map(|&i| i as u16).collect::<Vec<u16>>();
    let mut by_list: HashMap<Vec<u16>, ClassId> = HashMap::new();
    let mut labels: Vec<Vec<String>> = vec![vec!["default".to_string()]];
    let mut lists: Vec<Vec<u16>> = vec![as_u16(&file.default)];
    by_list.insert(lists[0].clone(), DEFAULT_CLASS);
    let mut networks = Vec::new();
    for r in &file.regions {
        let list = as_u16(&r.pops);
        let class = *by_list.entry(list.clone()).or_insert_with(|| {
            lists.push(list);
            labels.push(Vec::new());
            (lists.len() - 1) as ClassId
        });
        labels[class as usize].push(r.name.clone());
        // Networks answered like the default still matter: they carve holes in the
        // networks around them.
        networks.extend(r.networks.iter().map(|n| (*n, class)));
    }
    let classes = lists
        .into_iter()
        .zip(labels)
        .map(|(pops_of, names)| {
            let label = names.join("+");
            let hits = pops_of
                .iter()
                .map(|&p| cx.hits.counter(&label, &pops[usize::from(p)].name))
                .collect();
            Class {
                label,
                pops: pops_of,
                hits,
            }
        })
        .collect();

    Ok(Map {
        generation: cx.generation,
        serial: cx.serial,
        built_at: SystemTime::now(),
        geo: GeoIndex::build(&networks),
        classes,
        pops,
        zone: zone(cx.cfg, cx.serial, statics)?,
        source: file,
        nsid: cx.cfg.nsid.as_ref().map(|n| n.bytes().into()),
        chaos_id: cx
            .cfg
            .nsid
            .as_ref()
            .map(|n| chaos_txt(&n.to_string()))
            .transpose()?,
        cookie_secret: cx.cookie_secret.clone(),
        max_nocookie_response: cx.cfg.max_nocookie_response,
        rate_limit: cx.rate_limit.clone(),
    })
}

fn name(s: &str) -> Result<Name, MapError> {
    let fqdn = format!("{}.", s.trim_end_matches('.'));
    Name::from_str(&fqdn).map_err(|source| MapError::Name {
        name: s.to_string(),
        source,
    })
}

/// Lower-case wire form of a name (labels, then the root).
pub fn wire(n: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(n.len() + 2);
    for label in n.iter() {
        out.push(label.len() as u8);
        out.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out
}

fn zone(cfg: &DnsConfig, serial: u32, statics: Vec<StaticName>) -> Result<Zone, MapError> {
    let apex = name(&cfg.zone)?;
    let apex_wire = wire(&apex);
    let geo: Vec<Vec<u8>> = cfg
        .names
        .iter()
        .map(|n| name(n).map(|n| wire(&n)))
        .collect::<Result<_, _>>()?;
    // By wire name, the first kind given to a name wins; sorted for the query's binary search.
    let mut names: BTreeMap<Vec<u8>, ZoneName> = BTreeMap::new();
    let add = |names: &mut BTreeMap<Vec<u8>, ZoneName>, wire: &[u8], kind| {
        names.entry(wire.to_vec()).or_insert_with(|| ZoneName {
            wire: wire.to_vec(),
            kind,
            statics: None,
        });
    };
    let apex_kind = NameKind::Apex {
        geo: geo.contains(&apex_wire),
    };
    add(&mut names, &apex_wire, apex_kind);
    for g in &geo {
        add(&mut names, g, NameKind::Geo);
    }
    let ttl = u32::try_from(cfg.ttl.as_secs()).unwrap_or(u32::MAX >> 1);
    let mut hosts = Vec::new();
    let mut ns_glue = RrSet::default();
    let mut leaves = geo.clone();
    for g in cfg.glue.iter().take(usize::from(u8::MAX)) {
        let owner = wire(&name(&g.name)?);
        let mut host = HostAnswer::default();
        for a in &g.addresses {
            let (rdata, set) = match *a {
                IpAddr::V4(v4) => (RData::A(A(v4)), &mut host.a),
                IpAddr::V6(v6) => (RData::AAAA(AAAA(v6)), &mut host.aaaa),
            };
            push_rr(set, rdata.clone(), ttl)?;
            ns_glue.bytes.extend_from_slice(&owner);
            emit_rest(&mut ns_glue, rdata, ttl, IN)?;
        }
        let index = u8::try_from(hosts.len()).unwrap_or(u8::MAX);
        hosts.push(host);
        add(&mut names, &owner, NameKind::Host(index));
        leaves.push(owner);
    }
    if statics.len() > usize::from(u16::MAX) {
        return Err(MapError::TooMany(statics.len()));
    }
    for (i, st) in statics.iter().enumerate() {
        if !names.contains_key(&st.wire) {
            leaves.push(st.wire.clone());
        }
        add(&mut names, &st.wire, NameKind::Static);
        if let Some(n) = names.get_mut(&st.wire) {
            n.statics = Some(i as u16);
        }
    }
    // Empty non-terminals: every ancestor of a leaf name strictly below the apex.
    for g in &leaves {
        let mut rest = g.as_slice();
        while let Some(&l) = rest.first() {
            rest = &rest[usize::from(l) + 1..];
            if rest.len() <= apex_wire.len() {
                break;
            }
            add(&mut names, rest, NameKind::Empty);
        }
    }
    let soa = SOA::new(
        name(cfg.nameservers.first().map_or(cfg.zone.as_str(), |s| s))?,
        name(&cfg.hostmaster)?,
        serial,
        3600,
        600,
        86400,
        ttl,
    );
    let mut soa_answer = RrSet::default();
    push_rr(&mut soa_answer, RData::SOA(soa.clone()), ttl)?;
    let mut ns_answer = RrSet::default();
    for ns in &cfg.nameservers {
        push_rr(&mut ns_answer, RData::NS(NS(name(ns)?)), ttl)?;
    }
    let mut full = RrSet::default();
    full.bytes.extend_from_slice(&apex_wire);
    emit_rest(&mut full, RData::SOA(soa.clone()), ttl, IN)?;
    let soa_authority = SoaAuthority::build(&apex_wire, &soa, ttl, full);
    // Any name of the zone, empty non-terminals included (`*.w` above `a.*.w` makes names
    // below `w` NODATA), and a geo name written `*.label` too.
    let wildcards = names.keys().any(|w| w.starts_with(&[1, b'*']));
    let mut names: Vec<ZoneName> = names.into_values().collect();
    names.sort_by(|a, b| super::query::by_length(&a.wire, &b.wire));
    Ok(Zone {
        apex_wire,
        names,
        soa_answer,
        ns_answer,
        ns_glue,
        hosts,
        soa_authority,
        statics,
        wildcards,
    })
}

/// Appends one record whose owner is the question name (pointer to offset 12).
fn push_rr(set: &mut RrSet, rdata: RData, ttl: u32) -> Result<(), MapError> {
    push_rr_in(set, rdata, ttl, IN)
}

/// Appends one record of type `rtype`, class IN, owner = the question name, with encoded
/// data `data` (at most 65,535 octets, checked by the caller).
pub fn push_raw(set: &mut RrSet, rtype: u16, ttl: u32, data: &[u8]) {
    set.bytes.extend_from_slice(&0xC00Cu16.to_be_bytes());
    set.bytes.extend_from_slice(&rtype.to_be_bytes());
    set.bytes.extend_from_slice(&IN.to_be_bytes());
    set.bytes.extend_from_slice(&ttl.to_be_bytes());
    set.bytes
        .extend_from_slice(&(data.len() as u16).to_be_bytes());
    set.bytes.extend_from_slice(data);
    set.count = set.count.saturating_add(1);
}

/// `text` (ASCII) as a CHAOS TXT record with TTL 0 (identities are not for caching), in
/// character-strings of at most 255 octets: a 128-octet NSID shown in hex takes 258.
fn chaos_txt(text: &str) -> Result<RrSet, MapError> {
    let strings = text
        .as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    let mut set = RrSet::default();
    push_rr_in(&mut set, RData::TXT(TXT::new(strings)), 0, CH)?;
    Ok(set)
}

/// [`push_rr`] in another class (CHAOS).
fn push_rr_in(set: &mut RrSet, rdata: RData, ttl: u32, class: u16) -> Result<(), MapError> {
    set.bytes.extend_from_slice(&0xC00Cu16.to_be_bytes());
    emit_rest(set, rdata, ttl, class)
}

const IN: u16 = 1;
const CH: u16 = 3;

/// Type, class, TTL, length and data, names in the data uncompressed (the bytes are reused
/// at different offsets, so they must not point into this buffer).
fn emit_rest(set: &mut RrSet, rdata: RData, ttl: u32, class: u16) -> Result<(), MapError> {
    let rtype: RecordType = rdata.record_type();
    let mut data = Vec::with_capacity(32);
    {
        let mut enc = BinEncoder::new(&mut data);
        enc.set_canonical_names(true);
        rdata.emit(&mut enc).map_err(|source| MapError::Encode {
            what: rtype_name(rtype),
            source,
        })?;
    }
    let mut rest = Vec::with_capacity(data.len() + 10);
    {
        let mut enc = BinEncoder::new(&mut rest);
        let res = (|| {
            enc.emit_u16(u16::from(rtype))?;
            enc.emit_u16(class)?;
            enc.emit_u32(ttl)?;
            enc.emit_u16(data.len() as u16)?;
            enc.emit_vec(&data)
        })();
        res.map_err(|source| MapError::Encode {
            what: rtype_name(rtype),
            source,
        })?;
    }
    set.bytes.extend_from_slice(&rest);
    set.count += 1;
    Ok(())
}

fn rtype_name(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::NS => "NS",
        RecordType::SOA => "SOA",
        _ => "other",
    }
}

/// Builds a map outside a running sidecar (its own health and hit books, every PoP passing
/// its checks): for fuzzing, benches and tests of the query path.
pub fn standalone(cfg: &DnsConfig, file: RegionFile) -> Result<Map, MapError> {
    standalone_with(cfg, file, Vec::new())
}

/// [`standalone`] with static records (from [`super::records::parse`]).
pub fn standalone_with(
    cfg: &DnsConfig,
    file: RegionFile,
    statics: Vec<StaticName>,
) -> Result<Map, MapError> {
    let cx = BuildContext {
        cfg,
        health: &HealthBook::default(),
        hits: &HitBook::default(),
        generation: 1,
        serial: 1,
        cookie_secret: CookieSecret::random(),
        rate_limit: cfg
            .rate_limit
            .clone()
            .map(|l| Arc::new(RateLimiter::new(l))),
    };
    build(file, statics, &cx)
}
