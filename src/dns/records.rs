//! `[dns] zone_file`: the zone's static records, for what a domain needs besides its
//! geo-steered names (MX and TXT at the apex, CAA, SRV, HTTPS, CNAMEs, the addresses of
//! other hosts), in RFC 1035 master-file syntax read with `domain`'s zone-file scanner. It is
//! read with the region file at every rebuild, so a broken edit keeps the map in service.
//! The sidecar makes SOA, NS, glue and the geo answers itself: records that would contradict
//! them are refused with file:line, as is what an unsigned zone without delegations cannot
//! serve (DNSSEC records, NS below the apex). `$INCLUDE` reads another file (relative to the
//! including one) in place. Wildcards (`*.label`, RFC 4592)
//! answer for the names below their parent that do not exist.

use super::map::RrSet;
use crate::config::{ConfigError, DnsConfig, Location};
use bytes::Bytes;
use domain::base::iana::{Class, Rtype};
use domain::base::name::{Name, ToName};
use domain::base::rdata::{ComposeRecordData, RecordData};
use domain::zonefile::inplace::{Entry, ScannedRecord, Zonefile};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// More would make a map rebuild slow and is not what this file is for.
const MAX_RECORDS: usize = 10_000;
/// The largest set that fits a TCP answer with room to spare: the header, a question of
/// the longest name, the SOA and an OPT with every option we send must fit in 65,535.
const MAX_SET_BYTES: usize = 64_000;

/// The static records of one name, by type (ascending), each set pre-encoded with its owner
/// as a pointer to the question name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticName {
    /// Lower-case wire form.
    pub wire: Vec<u8>,
    pub sets: Vec<(u16, RrSet)>,
}

impl StaticName {
    /// The set of type `rtype`; for ANY (RFC 8482) the first set.
    pub fn set(&self, rtype: u16) -> Option<&RrSet> {
        if rtype == 255 {
            return self.sets.first().map(|(_, s)| s);
        }
        self.sets.iter().find(|(t, _)| *t == rtype).map(|(_, s)| s)
    }

    /// The CNAME, when the name is an alias.
    pub fn cname(&self) -> Option<&RrSet> {
        self.set(Rtype::CNAME.to_int())
    }

    pub fn record_count(&self) -> usize {
        self.sets.iter().map(|(_, s)| usize::from(s.count)).sum()
    }
}

/// Reads `path` for the zone of `cfg`, with the files it `$INCLUDE`s.
pub fn load(path: &Path, cfg: &DnsConfig) -> Result<Vec<StaticName>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_with(path, &text, cfg, Some(&mut |p| std::fs::read_to_string(p)))
}

/// One record as read: where (an index into the files read, the line), in which order, its
/// TTL and its encoded data.
struct Read {
    seq: usize,
    file: usize,
    line: usize,
    ttl: u32,
    data: Vec<u8>,
}

/// Parses master-file text as if read from `path`, which includes no other file. Names are
/// relative to the zone (`@` is the apex) unless `$ORIGIN` says otherwise; records without a
/// TTL take `$TTL` or `[dns] ttl`.
pub fn parse(path: &Path, text: &str, cfg: &DnsConfig) -> Result<Vec<StaticName>, ConfigError> {
    parse_with(path, text, cfg, None)
}

/// Reads a file `$INCLUDE` names.
type ReadFile<'a> = dyn FnMut(&Path) -> std::io::Result<String> + 'a;

/// Nesting deeper than this is a mistake (NSD allows 10; a loop is caught before).
const MAX_INCLUDE_DEPTH: usize = 8;
/// Files read in all: empty files cost no records, and 8 levels of 10 includes each would
/// otherwise be 10^8 reads.
const MAX_FILES: usize = 1_000;

/// The files of one zone file being read: what its records must not contradict, the sets
/// so far, and the `$INCLUDE` chain.
struct ZoneReader<'a, 'r, 'f> {
    zone: ZoneNames<'a>,
    default_ttl: u32,
    sets: BTreeMap<(Vec<u8>, u16), Vec<Read>>,
    records: usize,
    files: Vec<PathBuf>,
    /// The files being read, outermost first (as found, and canonical when that succeeds).
    chain: Vec<PathBuf>,
    /// Reads an included file; `None`: the text did not come from disk, and includes nothing.
    read: Option<&'r mut ReadFile<'f>>,
}

fn parse_with(
    path: &Path,
    text: &str,
    cfg: &DnsConfig,
    read: Option<&mut ReadFile<'_>>,
) -> Result<Vec<StaticName>, ConfigError> {
    let apex: Name<Bytes> = cfg
        .zone
        .parse()
        .map_err(|_| ConfigError::invalid(Location::file(path), "bad zone name"))?;
    let mut reader = ZoneReader {
        zone: ZoneNames {
            name: &cfg.zone,
            apex: lower(apex.as_slice()),
            geo: wires(&cfg.names),
            hosts: wires(cfg.glue.iter().map(|g| &g.name)),
        },
        default_ttl: u32::try_from(cfg.ttl.as_secs()).unwrap_or(u32::MAX >> 1),
        sets: BTreeMap::new(),
        records: 0,
        files: Vec::new(),
        chain: Vec::new(),
        read,
    };
    let ttl = reader.default_ttl;
    reader.scan(path, text, apex, ttl)?;
    build(reader.sets, &reader.files)
}

impl ZoneReader<'_, '_, '_> {
    /// Reads the entries of `text` (the file `path`) with `origin` as its first origin and
    /// `ttl` as its first `$TTL`.
    fn scan(
        &mut self,
        path: &Path,
        text: &str,
        origin: Name<Bytes>,
        ttl: u32,
    ) -> Result<(), ConfigError> {
        let file = self.files.len();
        self.files.push(path.to_path_buf());
        let canonical = self.canonical(path);
        self.chain.push(canonical);
        let lines = entry_lines(text);
        let seconds = with_ttl_units(text, &lines);
        let mut scanner = Zonefile::from(with_default_ttl(&seconds, ttl).as_str());
        scanner.set_origin(origin);
        scanner.set_default_class(Class::IN);
        let mut index = 0usize;
        loop {
            let entry = scanner
                .next_entry()
                .map_err(|e| scan_error(&e.to_string(), lines.get(index).copied(), path))?;
            let Some(entry) = entry else { break };
            let line = lines.get(index).copied().unwrap_or(1);
            index += 1;
            let err = |reason: String| ConfigError::invalid(at(path, line), reason);
            let record = match entry {
                Entry::Include { path: name, origin } => {
                    let origin = match origin {
                        Some(o) => o,
                        None => scanner.origin().map_err(|e| err(e.to_string()))?,
                    };
                    let ttl = dollar_ttl(&seconds, line).unwrap_or(ttl);
                    self.include(path, line, name.as_str(), origin, ttl)?;
                    continue;
                }
                Entry::Record(r) => r,
            };
            self.records += 1;
            if self.records > MAX_RECORDS {
                return Err(err(format!("more than {MAX_RECORDS} records")));
            }
            let (owner, rtype, ttl, data) = self.zone.check(&record).map_err(err)?;
            let seq = self.records;
            self.sets.entry((owner, rtype)).or_default().push(Read {
                seq,
                file,
                line,
                ttl,
                data,
            });
        }
        self.chain.pop();
        Ok(())
    }

    /// `$INCLUDE name` at `path:line`: the file `name` (relative to `path`'s directory), read
    /// from `origin` and the `$TTL` in effect (`ttl`), as Knot does; the including file's
    /// origin and `$TTL` are its own again after it (RFC 1035 5.1).
    fn include(
        &mut self,
        path: &Path,
        line: usize,
        name: &str,
        origin: Name<Bytes>,
        ttl: u32,
    ) -> Result<(), ConfigError> {
        let err = |reason: String| ConfigError::invalid(at(path, line), reason);
        let target = path.parent().unwrap_or(Path::new("")).join(name);
        let from_disk = "only a zone file read from disk can include others";
        if self.read.is_none() {
            return Err(err(format!("$INCLUDE {name}: {from_disk}")));
        }
        if self.files.len() >= MAX_FILES {
            return Err(err(format!(
                "$INCLUDE {name}: more than {MAX_FILES} files in all"
            )));
        }
        if self.chain.len() > MAX_INCLUDE_DEPTH {
            return Err(err(format!(
                "$INCLUDE {name}: nested more than {MAX_INCLUDE_DEPTH} deep"
            )));
        }
        let canonical = self.canonical(&target);
        if self.chain.contains(&canonical) {
            return Err(err(format!(
                "$INCLUDE {name}: {} is already being read (an include loop)",
                target.display()
            )));
        }
        let text = match self.read.as_mut() {
            Some(read) => read(&target)
                .map_err(|e| err(format!("$INCLUDE {name}: {}: {e}", target.display())))?,
            None => return Err(err(format!("$INCLUDE {name}: {from_disk}"))),
        };
        self.scan(&target, &text, origin, ttl)
    }
}

impl ZoneReader<'_, '_, '_> {
    /// `path` as the `$INCLUDE` chain compares it: canonical when the files come from disk
    /// (so `./a` and a link to it are one file), as given otherwise (nothing is looked up).
    fn canonical(&self, path: &Path) -> PathBuf {
        match self.read {
            Some(_) => std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            None => path.to_path_buf(),
        }
    }
}

/// The value of the last `$TTL` line before `line` of `text` (TTLs already in seconds).
fn dollar_ttl(text: &str, line: usize) -> Option<u32> {
    text.lines()
        .take(line.saturating_sub(1))
        .filter_map(|l| {
            let mut words = l.split(';').next()?.split_whitespace();
            let directive = words.next()?;
            directive.eq_ignore_ascii_case("$TTL").then_some(())?;
            words.next()?.parse::<u32>().ok()
        })
        .last()
}

fn at(path: &Path, line: usize) -> Location {
    Location {
        path: path.to_path_buf(),
        line,
        column: 1,
    }
}

/// The scanner's error `s` ("line:column: reason", with the position it had read to: often
/// the next line, and counting the `$TTL` put in front), placed at `entry`'s first line, the
/// entry it was reading as the walk of the text has it.
fn scan_error(s: &str, entry: Option<usize>, path: &Path) -> ConfigError {
    let reason = s.splitn(3, ':').nth(2).unwrap_or(s).trim();
    let after = s
        .split(':')
        .next()
        .and_then(|l| l.trim().parse::<usize>().ok())
        .map_or(1, |l| l.saturating_sub(1).max(1));
    let line = entry.unwrap_or(after).min(after);
    ConfigError::Syntax {
        at: Location {
            path: path.to_path_buf(),
            line,
            column: 1,
        },
        reason: format!("zone file: {reason}"),
    }
}

/// The names a record must not contradict.
struct ZoneNames<'a> {
    name: &'a str,
    /// Lower-case wire forms.
    apex: Vec<u8>,
    geo: Vec<Vec<u8>>,
    hosts: Vec<Vec<u8>>,
}

impl ZoneNames<'_> {
    /// A record's owner (lower-case wire form), type, TTL and encoded data, unless the zone
    /// cannot serve it; the reason otherwise.
    fn check(&self, record: &ScannedRecord) -> Result<(Vec<u8>, u16, u32, Vec<u8>), String> {
        if record.class() != Class::IN {
            return Err(format!(
                "class {}: only IN records are served",
                record.class()
            ));
        }
        let owner = lower(record.owner().to_vec().as_slice());
        let shown = record.owner().to_vec().to_string();
        if super::map::below(&owner, &self.apex).is_none() {
            return Err(format!("{shown} is not inside zone {}", self.name));
        }
        let rtype = record.data().rtype();
        refuse_type(rtype, owner == self.apex, &shown)?;
        let is_addr = matches!(rtype, Rtype::A | Rtype::AAAA | Rtype::CNAME);
        if is_addr && self.geo.contains(&owner) {
            return Err(format!(
                "{shown} is one of [dns] names: its addresses come from the region map"
            ));
        }
        if is_addr && self.hosts.contains(&owner) {
            return Err(format!("{shown}: its addresses come from [dns] glue"));
        }
        let mut data = Vec::new();
        record
            .data()
            .compose_rdata(&mut data)
            .map_err(|_| "record data too long".to_string())?;
        if data.len() > usize::from(u16::MAX) {
            return Err("record data too long".into());
        }
        let ttl = record.ttl().as_secs().min(u32::MAX >> 1);
        Ok((owner, rtype.to_int(), ttl, data))
    }
}

/// Refusals by type: what the sidecar makes itself, and what it cannot serve.
fn refuse_type(rtype: Rtype, at_apex: bool, shown: &str) -> Result<(), String> {
    match rtype {
        Rtype::SOA => Err(format!(
            "{shown} SOA: the SOA is made from [dns] (nameservers, hostmaster; serial per rebuild)"
        )),
        Rtype::NS if at_apex => Err(format!(
            "{shown} NS: the apex's NS come from [dns] nameservers"
        )),
        Rtype::NS => Err(format!(
            "{shown} NS: delegations below the apex are not supported"
        )),
        Rtype::CNAME if at_apex => Err(format!(
            "{shown} CNAME: the apex cannot be an alias (it has SOA and NS)"
        )),
        Rtype::DNAME => Err(format!("{shown} DNAME is not supported")),
        // RFC 6895 3.1: 0, OPT and the meta/query types (TSIG, TKEY, IXFR, AXFR, ANY...) are
        // never zone data.
        t if t.to_int() == 0 || t == Rtype::OPT || (128..=255).contains(&t.to_int()) => Err(
            format!("{shown} {rtype}: not a type of zone data (RFC 6895)"),
        ),
        Rtype::DNSKEY
        | Rtype::RRSIG
        | Rtype::NSEC
        | Rtype::NSEC3
        | Rtype::NSEC3PARAM
        | Rtype::DS
        | Rtype::CDS
        | Rtype::CDNSKEY => Err(format!(
            "{shown} {rtype}: the zone is not signed (no DNSSEC)"
        )),
        _ => Ok(()),
    }
}

/// Groups the records into sets: duplicates dropped, one TTL per set (the first's, as BIND
/// does; RFC 2181 5.2 wants one), a CNAME alone at its name.
fn build(
    sets: BTreeMap<(Vec<u8>, u16), Vec<Read>>,
    files: &[PathBuf],
) -> Result<Vec<StaticName>, ConfigError> {
    let place = |r: &Read| at(files.get(r.file).map_or(Path::new(""), |p| p), r.line);
    let cname = Rtype::CNAME.to_int();
    let mut names: Vec<StaticName> = Vec::new();
    let mut cnames: BTreeMap<&[u8], &Read> = BTreeMap::new();
    let mut first_other: BTreeMap<&[u8], &Read> = BTreeMap::new();
    for ((owner, rtype), reads) in &sets {
        let Some(first) = reads.iter().min_by_key(|r| r.seq) else {
            continue;
        };
        if *rtype == cname {
            if let Some(second) = distinct(reads).nth(1) {
                return Err(ConfigError::invalid(
                    place(second),
                    "a second CNAME for the same name (a name is an alias of one name)",
                ));
            }
            cnames.insert(owner, first);
        } else {
            let e = first_other.entry(owner).or_insert(first);
            if first.seq < e.seq {
                *e = first;
            }
        }
    }
    for (owner, c) in &cnames {
        if let Some(o) = first_other.get(owner) {
            let later = if c.seq > o.seq { c } else { o };
            return Err(ConfigError::invalid(
                place(later),
                "a CNAME cannot share its name with other records (RFC 1034 3.6.2)",
            ));
        }
    }
    for ((owner, rtype), reads) in sets {
        let ttl = reads.iter().min_by_key(|r| r.seq).map_or(0, |r| r.ttl);
        let mut set = RrSet::default();
        for r in distinct(&reads) {
            super::map::push_raw(&mut set, rtype, ttl, &r.data);
            if set.bytes.len() > MAX_SET_BYTES {
                return Err(ConfigError::invalid(
                    place(r),
                    format!("the records of this name and type pass {MAX_SET_BYTES} bytes: no answer could carry them, even over TCP"),
                ));
            }
        }
        match names.last_mut() {
            Some(n) if n.wire == owner => n.sets.push((rtype, set)),
            _ => names.push(StaticName {
                wire: owner,
                sets: vec![(rtype, set)],
            }),
        }
    }
    Ok(names)
}

/// The records of a set without repeats, in file order.
fn distinct(reads: &[Read]) -> impl Iterator<Item = &Read> {
    reads
        .iter()
        .enumerate()
        .filter(|(i, r)| !reads[..*i].iter().any(|p| p.data == r.data))
        .map(|(_, r)| r)
}

/// `$TTL` from `[dns] ttl` in front of the text: records without a TTL and before the file's
/// own `$TTL` take it (the scanner would otherwise use the previous record's, or an hour).
fn with_default_ttl(text: &str, ttl: u32) -> String {
    format!("$TTL {ttl}\n{text}")
}

/// The line where each entry (record or `$INCLUDE`) of `text` begins, in order: the
/// scanner's entries carry no position, so the text is walked once more for the start of
/// every logical line (quotes, escapes, comments and parentheses followed as RFC 1035 5.1
/// has them), skipping blank lines and the other `$` directives.
fn entry_lines(text: &str) -> Vec<usize> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let (mut line, mut depth, mut i) = (1usize, 0usize, 0usize);
    let mut entry: Option<(usize, bool)> = None; // (first line, is a directive)
    while i < b.len() {
        match b[i] {
            b'\n' => {
                line += 1;
                if depth == 0 {
                    if let Some((l, false)) = entry.take() {
                        out.push(l);
                    }
                    entry = None;
                }
            }
            b';' => {
                while i + 1 < b.len() && b[i + 1] != b'\n' {
                    i += 1;
                }
            }
            b' ' | b'\t' | b'\r' => {}
            c => {
                if entry.is_none() {
                    let rest = &b[i..];
                    let directive = c == b'$'
                        && !rest
                            .get(..8)
                            .is_some_and(|d| d.eq_ignore_ascii_case(b"$INCLUDE"));
                    entry = Some((line, directive));
                }
                match c {
                    b'(' => depth += 1,
                    b')' => depth = depth.saturating_sub(1),
                    b'\\' => {
                        i += 1;
                        if b.get(i) == Some(&b'\n') {
                            line += 1;
                        }
                    }
                    b'"' => {
                        i += 1;
                        while i < b.len() && b[i] != b'"' {
                            if b[i] == b'\\' {
                                i += 1;
                            }
                            if b.get(i) == Some(&b'\n') {
                                line += 1;
                            }
                            i += 1;
                        }
                    }
                    _ => {}
                }
            }
        }
        i += 1;
    }
    if let Some((l, false)) = entry {
        out.push(l);
    }
    out
}

/// A TTL written with BIND's units (`1h`, `1d12h`, `2W`: s, m, h, d, w in any case) in
/// seconds; `None` for anything else, plain numbers included.
fn ttl_with_units(token: &str) -> Option<u64> {
    let (mut total, mut number, mut units) = (0u64, None::<u64>, false);
    for c in token.chars() {
        if let Some(d) = c.to_digit(10) {
            number = Some(
                number
                    .unwrap_or(0)
                    .checked_mul(10)?
                    .checked_add(u64::from(d))?,
            );
            continue;
        }
        let unit = match c.to_ascii_lowercase() {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return None,
        };
        total = total.checked_add(number.take()?.checked_mul(unit)?)?;
        units = true;
    }
    (units && number.is_none()).then_some(total)
}

/// `text` with TTLs written with units turned into seconds, which is all `domain`'s scanner
/// takes: in `$TTL` lines and in the fields before the type on the first line of each entry
/// (`entries`, from [`entry_lines`]), never in record data (a host may be named `1h`). Lines
/// keep their places, so positions still hold.
fn with_ttl_units(text: &str, entries: &[usize]) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let code = line.split(';').next().unwrap_or("");
        let directive = code
            .trim_start()
            .get(..4)
            .is_some_and(|d| d.eq_ignore_ascii_case("$TTL"));
        if !directive && code.trim_start().starts_with('$') {
            out.push_str(line); // $INCLUDE, $ORIGIN: a file or a name, never a TTL
            continue;
        }
        // The first field that may hold a TTL: after `$TTL`, or after the owner when the line
        // has one; the fields up to the type follow.
        let first = match (directive, entries.binary_search(&(i + 1)).is_ok()) {
            (true, _) => 1,
            (false, true) if code.starts_with([' ', '\t']) => 0,
            (false, true) => 1,
            (false, false) => {
                out.push_str(line);
                continue;
            }
        };
        let mut rest = line;
        for (k, token) in code.split_whitespace().enumerate() {
            let at = rest.find(token).unwrap_or(0);
            out.push_str(&rest[..at]);
            rest = &rest[at + token.len()..];
            let seconds = ttl_with_units(token);
            match seconds {
                Some(s) if k >= first => out.push_str(&s.to_string()),
                _ => out.push_str(token),
            }
            let class = ["IN", "CH", "HS", "CS"]
                .iter()
                .any(|c| token.eq_ignore_ascii_case(c));
            let field = class || seconds.is_some() || token.bytes().all(|b| b.is_ascii_digit());
            if k >= first && !field {
                break; // the type: what follows is data
            }
        }
        out.push_str(rest);
    }
    out
}

fn lower(wire: &[u8]) -> Vec<u8> {
    wire.to_ascii_lowercase()
}

fn wires<'a>(names: impl IntoIterator<Item = &'a String>) -> Vec<Vec<u8>> {
    names
        .into_iter()
        .filter_map(|n| n.parse::<Name<Bytes>>().ok())
        .map(|n| lower(n.as_slice()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;

    fn cfg() -> DnsConfig {
        let text = "[dns]\nlisten = \"127.0.0.1:53\"\nzone = \"example.com\"\nnames = [\"www.example.com\"]\nregions = \"r.toml\"\nttl = \"60s\"\nnameservers = [\"ns1.example.com\"]\nglue = { \"ns1.example.com\" = [\"192.0.2.53\"] }\n";
        crate::config::parse_role(Path::new("t.toml"), text, Role::Dns)
            .map(|c| c.dns)
            .expect("valid")
            .expect("[dns]")
    }

    fn parse_text(text: &str) -> Result<Vec<StaticName>, ConfigError> {
        parse(Path::new("z.zone"), text, &cfg())
    }

    fn wire(name: &str) -> Vec<u8> {
        lower(name.parse::<Name<Bytes>>().expect("name").as_slice())
    }

    /// The TTL of the first record of a set.
    fn ttl(set: &RrSet) -> u32 {
        u32::from_be_bytes([set.bytes[6], set.bytes[7], set.bytes[8], set.bytes[9]])
    }

    const GOOD: &str = r#"; the domain's other records
@       MX    10 mail
@       TXT   "v=spf1 mx -all" "second string"
@       CAA   0 issue "letsencrypt.org"
mail    3600 A 192.0.2.25
mail    AAAA  2001:db8::25
MAIL    A     192.0.2.25      ; a repeat, in other case
www     TXT   ( "a text at a geo name"
                "over two lines" )
cdn     CNAME www
_sip._tcp SRV 0 5 5060 mail.example.com.
svc     HTTPS 1 . alpn=h2
ns1     TXT   "nameserver"
*.wild  TXT   "any name below wild"
$TTL 300
blob    TYPE65534 \# 2 abcd
$ORIGIN sub.example.com.
deep    A     192.0.2.26
"#;

    #[test]
    fn a_master_file_gives_sets_by_name_and_type() {
        let names = parse_text(GOOD).expect("valid");
        let find = |n: &str| names.iter().find(|s| s.wire == wire(n)).expect(n);
        let apex = find("example.com");
        assert_eq!(apex.sets.len(), 3, "{apex:?}");
        let mx = apex.set(Rtype::MX.to_int()).expect("MX");
        assert_eq!((mx.count, ttl(mx)), (1, 60), "[dns] ttl is the default");
        assert_eq!(apex.set(Rtype::TXT.to_int()).map(|s| s.count), Some(1));
        assert!(apex.set(255).is_some(), "ANY: one set");
        let mail = find("mail.example.com");
        let a = mail.set(Rtype::A.to_int()).expect("A");
        assert_eq!(
            (a.count, ttl(a)),
            (1, 3600),
            "duplicates dropped, case folded"
        );
        assert!(a.bytes.ends_with(&[192, 0, 2, 25]));
        assert!(mail.set(Rtype::AAAA.to_int()).is_some());
        assert_eq!(find("www.example.com").record_count(), 1);
        let cdn = find("cdn.example.com");
        assert!(cdn.cname().is_some() && cdn.set(Rtype::A.to_int()).is_none());
        find("_sip._tcp.example.com");
        find("svc.example.com");
        find("ns1.example.com");
        find("*.wild.example.com");
        assert_eq!(
            ttl(find("blob.example.com").set(65534).expect("unknown type")),
            300
        );
        find("deep.sub.example.com");
        // Every record starts with a pointer to the question name.
        assert!(names
            .iter()
            .flat_map(|n| &n.sets)
            .all(|(_, s)| s.bytes.starts_with(&[0xc0, 0x0c])));
    }

    /// `text` as `zones/main.zone`, which may include the files of `others` (by path).
    fn parse_files(text: &str, others: &[(&str, &str)]) -> Result<Vec<StaticName>, ConfigError> {
        let mut read = |p: &Path| {
            others
                .iter()
                .find(|(name, _)| Path::new(name) == p)
                .map(|(_, t)| t.to_string())
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        };
        parse_with(Path::new("zones/main.zone"), text, &cfg(), Some(&mut read))
    }

    #[test]
    fn include_reads_a_file_in_place_from_its_own_origin() {
        let main = "$TTL 120\n\
                    mail A 192.0.2.25\n\
                    $INCLUDE sub.zone sub.example.com.\n\
                    after TXT \"origin and TTL are the parent's again\"\n\
                    $ORIGIN lab.example.com.\n\
                    $INCLUDE inc/lab.zone\n";
        let files = [
            ("zones/sub.zone", "$TTL 30\n@ TXT sub\nhost A 192.0.2.26\n"),
            ("zones/inc/lab.zone", "box A 192.0.2.27\n"),
        ];
        let names = parse_files(main, &files).expect("valid");
        let find = |n: &str| names.iter().find(|s| s.wire == wire(n)).expect(n);
        let a = Rtype::A.to_int();
        let txt = Rtype::TXT.to_int();
        assert_eq!(find("mail.example.com").set(a).map(ttl), Some(120));
        assert_eq!(find("sub.example.com").set(txt).map(ttl), Some(30));
        assert_eq!(find("host.sub.example.com").set(a).map(ttl), Some(30));
        let after = find("after.example.com").set(txt).expect("TXT");
        assert_eq!(ttl(after), 120, "the parent's $TTL after the include");
        let lab = find("box.lab.example.com").set(a).expect("A");
        assert_eq!(
            ttl(lab),
            120,
            "an included file starts from the $TTL in effect"
        );
    }

    #[test]
    fn nested_includes_inherit_the_ttl_in_effect_and_resolve_from_their_own_directory() {
        let main = "$TTL 120\n$INCLUDE a/mid.zone\n$INCLUDE 1d\n";
        let files = [
            // No $TTL here: what it inherited (120) passes on, not [dns] ttl.
            ("zones/a/mid.zone", "m A 192.0.2.1\n$INCLUDE b/leaf.zone\n"),
            ("zones/a/b/leaf.zone", "x A 192.0.2.2\n"),
            // A file named like a TTL is a file name, not 86400.
            ("zones/1d", "d A 192.0.2.3\n"),
        ];
        let names = parse_files(main, &files).expect("valid");
        let find = |n: &str| names.iter().find(|s| s.wire == wire(n)).expect(n);
        let a = Rtype::A.to_int();
        assert_eq!(find("m.example.com").set(a).map(ttl), Some(120));
        assert_eq!(find("x.example.com").set(a).map(ttl), Some(120));
        assert_eq!(find("d.example.com").set(a).map(ttl), Some(120));
    }

    #[test]
    fn includes_are_limited_in_number_as_well_as_depth() {
        // Seven levels of ten includes each (and no records) would be 10^7 reads.
        let fan: String = (0..10).map(|_| "$INCLUDE f.zone\n").collect();
        let files: Vec<(String, String)> = (0..8)
            .map(|d| {
                let dir = "d/".repeat(d);
                let text = if d < 7 {
                    fan.replace("f.zone", "d/f.zone")
                } else {
                    String::new()
                };
                (format!("zones/{dir}f.zone"), text)
            })
            .collect();
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let e = parse_files(&fan, &files).expect_err("too many").to_string();
        assert!(e.contains("more than 1000 files in all"), "{e}");
    }

    #[test]
    fn include_errors_name_the_file_and_line_where_they_are() {
        let bad_inside = [("zones/b.zone", "ok A 192.0.2.1\nwww A 192.0.2.2\n")];
        let e = parse_files("x A 192.0.2.9\n$INCLUDE b.zone\n", &bad_inside)
            .expect_err("geo name")
            .to_string();
        assert!(e.starts_with("zones/b.zone:2:"), "{e}");
        assert!(e.contains("region map"), "{e}");

        let e = parse_files("\n$INCLUDE missing.zone\n", &[])
            .expect_err("missing")
            .to_string();
        assert!(e.starts_with("zones/main.zone:2:"), "{e}");
        assert!(e.contains("zones/missing.zone"), "{e}");

        let looped = [
            ("zones/a.zone", "a A 192.0.2.1\n$INCLUDE b.zone\n"),
            ("zones/b.zone", "$INCLUDE a.zone\n"),
        ];
        let e = parse_files("$INCLUDE a.zone\n", &looped)
            .expect_err("loop")
            .to_string();
        assert!(e.starts_with("zones/b.zone:1:"), "{e}");
        assert!(e.contains("include loop"), "{e}");

        let chain: Vec<(String, String)> = (0..12)
            .map(|i| {
                (
                    format!("zones/{i}.zone"),
                    format!("$INCLUDE {}.zone\n", i + 1),
                )
            })
            .collect();
        let chain: Vec<(&str, &str)> = chain
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let e = parse_files("$INCLUDE 0.zone\n", &chain)
            .expect_err("deep")
            .to_string();
        assert!(e.contains("nested more than 8 deep"), "{e}");

        let split = [("zones/c.zone", "\n\nc TXT x\n")];
        let e = parse_files("c CNAME mail\n$INCLUDE c.zone\n", &split)
            .expect_err("CNAME and other data")
            .to_string();
        assert!(e.starts_with("zones/c.zone:3:"), "{e}");
        assert!(e.contains("CNAME cannot share"), "{e}");
    }

    #[test]
    fn records_that_contradict_the_sidecar_or_cannot_be_served_are_refused_at_their_line() {
        let cases = [
            (
                "x A 192.0.2.1\nother.example.org. A 192.0.2.1\n",
                2,
                "not inside zone",
            ),
            (
                "@ SOA ns1 hostmaster 1 2 3 4 5\n",
                1,
                "SOA is made from [dns]",
            ),
            ("\n@ NS ns2.example.net.\n", 2, "[dns] nameservers"),
            ("sub NS ns.example.net.\n", 1, "delegations"),
            ("@ CNAME other.example.net.\n", 1, "apex cannot be an alias"),
            ("www A 192.0.2.1\n", 1, "region map"),
            ("; c\n\nns1 AAAA 2001:db8::1\n", 3, "[dns] glue"),
            ("a TXT x\na CNAME b\n", 2, "CNAME cannot share"),
            ("a CNAME b\na CNAME c\n", 2, "second CNAME"),
            (
                "$INCLUDE other.zone\n",
                1,
                "only a zone file read from disk",
            ),
            ("a CH TXT x\n", 1, "different class"),
            (
                "a TXT ( \"x\"\n \"y\" )\n@ DNSKEY 257 3 13 AAAA\n",
                3,
                "not signed",
            ),
            ("a A 192.0.2.1\nb A not-an-address\n", 2, "zone file"),
            (
                "a A 192.0.2.1\nx TYPE41 \\# 0\n",
                2,
                "not a type of zone data",
            ),
            ("x TYPE250 \\# 0\n", 1, "not a type of zone data"),
            ("mail MX ten mx\n", 1, "zone file"),
        ];
        for (text, line, why) in cases {
            let e = parse_text(text).expect_err(text).to_string();
            assert!(e.starts_with(&format!("z.zone:{line}:")), "{text:?}: {e}");
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_set_no_answer_could_carry_is_refused() {
        let strings = format!("\"{}\"", "x".repeat(250));
        let mut text = String::new();
        for i in 0..300 {
            text.push_str(&format!("big TXT {strings} \"{i}\"\n"));
        }
        let e = parse_text(&text).expect_err("too big").to_string();
        assert!(e.contains("even over TCP"), "{e}");
        assert!(e.starts_with("z.zone:241:"), "{e}");
    }

    #[test]
    fn ttls_take_binds_units_where_a_ttl_stands_and_nowhere_else() {
        let text = "$TTL 1h\na A 192.0.2.1\nb 1d A 192.0.2.2\nc IN 1h30m TXT \"1h\"\n  2W TXT y\n1h A 192.0.2.9\nd CNAME 1h\n";
        let names = parse_text(text).expect("valid");
        let find = |n: &str| names.iter().find(|s| s.wire == wire(n)).expect(n);
        let t = |n: &str, rtype: Rtype| ttl(find(n).set(rtype.to_int()).expect("set"));
        assert_eq!(t("a.example.com", Rtype::A), 3_600);
        assert_eq!(t("b.example.com", Rtype::A), 86_400);
        // c's TXT set takes its first record's TTL; the second line (no owner) is c's too.
        assert_eq!(t("c.example.com", Rtype::TXT), 5_400);
        assert_eq!(find("c.example.com").record_count(), 2);
        // A host named 1h, and a CNAME to it: names, not TTLs.
        assert_eq!(t("1h.example.com", Rtype::A), 3_600);
        let cname = find("d.example.com").cname().expect("CNAME");
        assert!(cname.bytes.ends_with(b"\x021h\x07example\x03com\x00"));
        assert_eq!(ttl_with_units("90"), None);
        assert_eq!(ttl_with_units("1h5"), None);
        assert_eq!(ttl_with_units("2w"), Some(1_209_600));
    }

    #[test]
    fn entry_lines_follow_comments_quotes_and_parentheses() {
        let text =
            "$TTL 5\n; c\n\na TXT \"x;(\" ; y\n  TXT ( \"1\"\n \"2\" ) \n$ORIGIN x.\nb A 1.2.3.4";
        assert_eq!(entry_lines(text), vec![4, 5, 8]);
    }
}
