//! The query path, pure: request bytes + source address + map -> response bytes. Parsing uses
//! hickory-proto's decoder (header fields, question, record framing); the answer is assembled
//! from the question as received and the map's pre-encoded record sets, so a query costs one
//! name parse, one binary search over the map's blocks and a few copies, without locks or heap allocation.
//! EDNS options acted on: Client Subnet (RFC 7871), COOKIE (RFC 7873, see [`super::cookie`]),
//! NSID (RFC 5001) and, over TCP, edns-tcp-keepalive (RFC 7828); others are ignored.

use super::cookie::{CookieIn, CookieState};
use super::geo::ClassId;
use super::geo::Hit;
use super::map::{Map, NameKind, RrSet, SoaAuthority};
use super::rrl::{Kind as RrlKind, Verdict};
use domain::base::name::{ParsedName, ToLabelIter};
use domain::dep::octseq::Parser;
use hickory_proto::rr::Name;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Largest UDP answer we send (RFC 8085 / DNS flag day 2020).
pub const MAX_UDP: u16 = 1232;
const OPT: u16 = 41;
const NSID: u16 = 3;
const ECS: u16 = 8;
const COOKIE: u16 = 10;
const KEEPALIVE: u16 = 11;
const CHAOS: u16 = 3;
/// The header flag "authoritative answer".
const AA: u16 = 0x0400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Response codes we send (extended codes included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
    BadVers = 16,
    BadCookie = 23,
}

impl Rcode {
    pub const ALL: [Rcode; 7] = [
        Rcode::NoError,
        Rcode::FormErr,
        Rcode::NxDomain,
        Rcode::NotImp,
        Rcode::Refused,
        Rcode::BadVers,
        Rcode::BadCookie,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rcode::NoError => "NOERROR",
            Rcode::FormErr => "FORMERR",
            Rcode::NxDomain => "NXDOMAIN",
            Rcode::NotImp => "NOTIMP",
            Rcode::Refused => "REFUSED",
            Rcode::BadVers => "BADVERS",
            Rcode::BadCookie => "BADCOOKIE",
        }
    }
}

/// Query types, bucketed for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qtype {
    A,
    Aaaa,
    Soa,
    Ns,
    Any,
    Other,
    /// No question could be read.
    None,
}

impl Qtype {
    pub const ALL: [Qtype; 7] = [
        Qtype::A,
        Qtype::Aaaa,
        Qtype::Soa,
        Qtype::Ns,
        Qtype::Any,
        Qtype::Other,
        Qtype::None,
    ];

    fn from_u16(t: u16) -> Self {
        match t {
            1 => Qtype::A,
            28 => Qtype::Aaaa,
            6 => Qtype::Soa,
            2 => Qtype::Ns,
            255 => Qtype::Any,
            _ => Qtype::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Qtype::A => "A",
            Qtype::Aaaa => "AAAA",
            Qtype::Soa => "SOA",
            Qtype::Ns => "NS",
            Qtype::Any => "ANY",
            Qtype::Other => "other",
            Qtype::None => "none",
        }
    }
}

/// What happened, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub qtype: Qtype,
    pub rcode: Rcode,
    pub truncated: bool,
    /// The query carried a DNS cookie: what its server cookie was.
    pub cookie: Option<CookieState>,
    /// The question's type (0 without a question).
    pub rtype: u16,
    /// Length of the question name at offset 12 of the answer (0 without a question).
    pub qname_len: u16,
    /// The answer has records (before any truncation).
    pub answered: bool,
    /// A geo answer: its class and the position of the PoP chosen, counted by
    /// [`count_hit`] once the answer is known to go out.
    pub geo_hit: Option<(ClassId, u16)>,
    /// What `[dns] rate_limit` did to this UDP answer, when it acted.
    pub limited: Option<Verdict>,
    /// The question did not exist and a wildcard was looked for (RFC 4592).
    pub synthesized: bool,
}

/// How to answer, beyond what the query asks: set by the transport's loop.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    /// The RFC 7828 TIMEOUT advertised over TCP, in units of 100 ms.
    pub keepalive: u16,
    /// Answer truncated (TC, no records): a rate-limited answer's slip.
    pub truncate: bool,
}

impl Default for Reply {
    fn default() -> Self {
        Reply {
            keepalive: keepalive_units(super::server::TCP_IDLE),
            truncate: false,
        }
    }
}

/// `idle` in RFC 7828's units of 100 ms (in 64 bits: this runs for every query, and
/// `as_millis` would divide in 128).
pub const fn keepalive_units(idle: std::time::Duration) -> u16 {
    let units = idle.as_secs().saturating_mul(10) + (idle.subsec_millis() / 100) as u64;
    if units > u16::MAX as u64 {
        u16::MAX
    } else {
        units as u16
    }
}

/// A validated EDNS Client Subnet option (RFC 7871).
#[derive(Debug, Clone, Copy)]
struct Ecs {
    family: u16,
    source: u8,
    /// The address, zero-padded; echoed truncated to `ceil(source / 8)` octets.
    addr: IpAddr,
}

#[derive(Debug, Clone, Copy)]
struct Edns {
    udp_size: u16,
    version: u8,
    dnssec_ok: bool,
    options: Options,
    /// An option was malformed: FORMERR, answered with the question and an OPT (with what
    /// read fine), as RFC 6891 6.1.1 wants an OPT in every answer to a query that had one.
    malformed: bool,
}

/// The EDNS options we act on; the rest are ignored.
#[derive(Debug, Clone, Copy, Default)]
struct Options {
    ecs: Option<Ecs>,
    cookie: Option<CookieIn>,
    /// NSID asked for (RFC 5001).
    nsid: bool,
    /// edns-tcp-keepalive asked for over TCP (RFC 7828; ignored over UDP).
    keepalive: bool,
}

/// The question: as received (for the echo) and reduced to what the lookup needs. The
/// parsed `Name` is dropped right away; the lower-case wire name sits in a caller's buffer.
#[derive(Debug, Clone, Copy)]
struct Question<'a> {
    raw: &'a [u8],
    qtype: u16,
    qclass: u16,
    /// Length of the lower-case wire name in the caller's buffer.
    wire_len: usize,
}

/// Everything after the header that we need; `Err` means FORMERR.
struct Parsed<'a> {
    question: Option<Question<'a>>,
    edns: Option<Edns>,
}

/// Handles one query; `out` receives the response. `None`: send nothing (not a query, or too
/// short to answer). Never panics on any input.
pub fn handle(
    query: &[u8],
    src: IpAddr,
    transport: Transport,
    map: &Map,
    out: &mut Vec<u8>,
) -> Option<Outcome> {
    let o = respond(query, src, transport, map, out, Reply::default())?;
    count_hit(map, &o);
    Some(o)
}

/// Counts a geo answer in `edgepop_dns_answers_total` (by region and PoP).
#[inline]
pub fn count_hit(map: &Map, o: &Outcome) {
    if let Some((class, pos)) = o.geo_hit {
        let hit = map
            .classes
            .get(class as usize)
            .and_then(|c| c.hits.get(usize::from(pos)));
        if let Some(c) = hit {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A UDP query, under `[dns] rate_limit` when the map has one: an answer over the limit is
/// dropped (`out` left empty) or sent truncated. Queries with a valid server cookie are not
/// limited (their source is proven).
pub fn handle_udp(query: &[u8], src: IpAddr, map: &Map, out: &mut Vec<u8>) -> Option<Outcome> {
    let mut o = respond(query, src, Transport::Udp, map, out, Reply::default())?;
    let limiter = match map.rate_limit.as_deref() {
        Some(l) if o.cookie != Some(CookieState::Valid) && !l.exempt(src) => l,
        _ => {
            count_hit(map, &o);
            return Some(o);
        }
    };
    let mut name = [0u8; 256];
    let (kind, key) = limit_key(map, &o, out, &mut name);
    let verdict = limiter.check(src, kind, key);
    match verdict {
        Verdict::Send => {
            count_hit(map, &o);
            return Some(o);
        }
        Verdict::Drop => out.clear(),
        // An error answer has no records to hold back: it goes out as it is (BIND).
        Verdict::Slip if kind == RrlKind::Error => {}
        Verdict::Slip => {
            let reply = Reply {
                truncate: true,
                ..Reply::default()
            };
            o = respond(query, src, Transport::Udp, map, out, reply)?;
        }
    }
    o.limited = Some(verdict);
    Some(o)
}

/// What a UDP answer (`answer`, its outcome `o`) counts against under `[dns] rate_limit`:
/// its kind, and the lower-case name that keys it (copied into `buf` when it is the
/// question's). Answers made from a wildcard count for the wildcard, not for each name a
/// flood makes up (BIND keys them on the wildcard's owner).
fn limit_key<'a>(
    map: &'a Map,
    o: &Outcome,
    answer: &[u8],
    buf: &'a mut [u8; 256],
) -> (RrlKind, &'a [u8]) {
    let len = usize::from(o.qname_len);
    let qname: &'a [u8] = match answer.get(12..12 + len) {
        Some(wire) => {
            buf[..len].copy_from_slice(wire);
            buf[..len].make_ascii_lowercase();
            &buf[..len]
        }
        None => &[],
    };
    let source = match o.synthesized {
        true => map
            .zone
            .wildcard(qname)
            .map_or(qname, |w| w.wire.as_slice()),
        false => qname,
    };
    match o.rcode {
        Rcode::NoError if o.answered => (RrlKind::Answer(o.rtype), source),
        Rcode::NoError if o.qname_len > 0 => (RrlKind::NoData, source),
        Rcode::NxDomain => (RrlKind::NxDomain, map.zone.apex_wire.as_slice()),
        _ => (RrlKind::Error, &[]),
    }
}

/// [`handle`] with `reply`'s settings.
pub fn respond(
    query: &[u8],
    src: IpAddr,
    transport: Transport,
    map: &Map,
    out: &mut Vec<u8>,
    reply: Reply,
) -> Option<Outcome> {
    out.clear();
    let mut d = BinDecoder::new(query);
    // The fixed 12-octet header in one bounds-checked read: ID, flags, four counts.
    let h = d.read_slice(12).ok()?.unverified();
    let field = |i: usize| u16::from_be_bytes([h[2 * i], h[2 * i + 1]]);
    let (id, flags) = (field(0), field(1));
    let counts = [field(2), field(3), field(4), field(5)];
    if flags & 0x8000 != 0 {
        return None; // a response: never answer it (reflection loops)
    }
    let opcode = (flags >> 11) & 0xF;
    // Echoed: opcode, RD, CD. Set: QR; AA only on answers from the zone (and the CHAOS
    // identity), not on REFUSED/FORMERR/NOTIMP/BADVERS, as BIND, Knot and gdnsd.
    let base_flags = 0x8000 | (flags & 0x7800) | (flags & 0x0100) | (flags & 0x0010);
    let mut r = Response {
        out,
        id,
        flags: base_flags,
        question: None,
        edns: None,
        limit: 512,
        answers: [None, None],
        authority: None,
        additional: None,
        scope: 0,
        extra: Extra::default(),
        truncate: reply.truncate,
        rtype: 0,
        geo_hit: None,
        synthesized: false,
    };
    let mut qwire = [0u8; 256];
    let parsed = parse(query, &mut d, counts, transport, &mut qwire);
    let qtype_of = |p: &Parsed| {
        p.question
            .as_ref()
            .map_or(Qtype::None, |q| Qtype::from_u16(q.qtype))
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(_) => {
            let rcode = if opcode == 0 {
                Rcode::FormErr
            } else {
                Rcode::NotImp
            };
            return Some(r.finish(rcode, transport, Qtype::None));
        }
    };
    let qtype = qtype_of(&parsed);
    r.rtype = parsed.question.as_ref().map_or(0, |q| q.qtype);
    r.question = parsed.question.as_ref().map(|q| q.raw);
    r.edns = parsed.edns;
    if let Some(e) = parsed.edns {
        r.extra = extra(&e.options, src, transport, map, reply.keepalive);
        if reply.truncate {
            // A slipped answer carries nothing a forger could amplify with: no NSID (the
            // cookie stays, so a real client comes back proven).
            r.extra.nsid = None;
        }
    }
    r.limit = match (transport, parsed.edns) {
        (Transport::Tcp, _) => u16::MAX,
        (Transport::Udp, Some(e)) => e.udp_size.clamp(512, MAX_UDP),
        (Transport::Udp, None) => 512,
    };
    // gdnsd's `max_nocookie_response`: a UDP source that has not proven itself with a valid
    // server cookie gets large answers truncated, so it comes back over TCP (no spoofing).
    if let Some(max) = map.max_nocookie_response {
        let proven = matches!(r.extra.cookie, Some((_, CookieState::Valid)));
        if transport == Transport::Udp && !proven {
            r.limit = r.limit.min(max);
        }
    }
    // EDNS first, then the opcode, as BIND and Knot check them.
    if let Some(e) = parsed.edns {
        if e.version > 0 {
            return Some(r.finish(Rcode::BadVers, transport, qtype));
        }
        if e.malformed {
            return Some(r.finish(Rcode::FormErr, transport, qtype));
        }
    }
    if opcode != 0 {
        return Some(r.finish(Rcode::NotImp, transport, qtype));
    }
    let Some(q) = parsed.question else {
        // RFC 7873 5.4: no question but a cookie asks for a server cookie alone.
        let rcode = match r.extra.cookie {
            Some((_, CookieState::Invalid)) => Rcode::BadCookie,
            Some(_) => Rcode::NoError,
            None => Rcode::FormErr,
        };
        return Some(r.finish(rcode, transport, qtype));
    };
    let (rtype, rclass) = (q.qtype, q.qclass);
    if rtype == OPT {
        return Some(r.finish(Rcode::FormErr, transport, qtype));
    }
    let qwire = &qwire[..q.wire_len];
    if rclass == CHAOS {
        return Some(match chaos_identity(qwire, rtype, map) {
            Some(set) => {
                r.answers[0] = Some(set);
                r.flags |= AA;
                r.finish(Rcode::NoError, transport, qtype)
            }
            None => r.finish(Rcode::Refused, transport, qtype),
        });
    }
    if rclass != 1 || matches!(rtype, 251 | 252) {
        // Only class IN; no zone transfers.
        return Some(r.finish(Rcode::Refused, transport, qtype));
    }
    let zone = &map.zone;
    if !in_zone(qwire, &zone.apex_wire) {
        return Some(r.finish(Rcode::Refused, transport, qtype));
    }
    r.flags |= AA;
    // A name that does not exist may be answered by a wildcard (`*.` + its closest
    // encloser): its records, with the question as their owner (pointers to it already).
    let found = match zone.find(qwire) {
        None if zone.wildcards => {
            r.synthesized = true;
            zone.wildcard(qwire)
        }
        found => found,
    };
    let Some(name) = found else {
        r.authority = Some(&zone.soa_authority);
        return Some(r.finish(Rcode::NxDomain, transport, qtype));
    };
    let kind = name.kind;
    let apex = matches!(kind, NameKind::Apex { .. });
    let geo = matches!(kind, NameKind::Geo | NameKind::Apex { geo: true });
    match rtype {
        6 if apex => r.answers[0] = Some(&zone.soa_answer),
        2 if apex => {
            r.answers[0] = Some(&zone.ns_answer);
            r.additional = glue(zone);
        }
        1 | 28 | 255 if geo => {
            let (hit, at) = locate(map, src, parsed.edns.and_then(|e| e.options.ecs));
            let (pos, class) = map.choose(hit.class);
            let pop = &map.pops[usize::from(class.pops[pos])];
            let set = match rtype {
                1 => &pop.a,
                28 => &pop.aaaa,
                // ANY (RFC 8482): one RRset is enough.
                _ if pop.a.count > 0 => &pop.a,
                _ => &pop.aaaa,
            };
            // The scope goes with an empty answer too (a PoP without addresses of the
            // family): NODATA here holds for this client's networks only, and scope 0 would
            // have resolvers cache it for everyone (RFC 7871 7.2.1).
            if at.is_some() {
                r.scope = hit.scope;
            }
            if set.count > 0 {
                r.answers[0] = Some(set);
                r.geo_hit = Some((hit.class, pos as u16));
            }
        }
        255 if apex => {
            r.answers[0] = Some(&zone.soa_answer);
            r.answers[1] = Some(&zone.ns_answer);
            r.additional = glue(zone);
        }
        1 | 28 | 255 => {
            if let NameKind::Host(i) = kind {
                if let Some(h) = zone.hosts.get(usize::from(i)) {
                    let set = match rtype {
                        1 => &h.a,
                        28 => &h.aaaa,
                        _ if h.a.count > 0 => &h.a,
                        _ => &h.aaaa,
                    };
                    if set.count > 0 {
                        r.answers[0] = Some(set);
                    }
                }
            }
        }
        _ => {}
    }
    if r.answers[0].is_none() {
        if let Some(st) = name.statics.and_then(|i| zone.statics.get(usize::from(i))) {
            // An alias answers every type but its own with its CNAME, not followed (the
            // resolver asks for the target, as with tinydns and gdnsd).
            r.answers[0] = st.set(rtype).or_else(|| st.cname());
        }
    }
    if r.answers[0].is_none() {
        r.authority = Some(&zone.soa_authority);
    }
    Some(r.finish(Rcode::NoError, transport, qtype))
}

/// The order of [`super::map::Zone::names`]: length first (one comparison tells most names
/// apart), then the octets.
pub fn by_length(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// What the answer's OPT carries besides ECS, from the query's options: the cookie (its
/// server cookie made for the packet's source), NSID when configured, the TCP keepalive.
fn extra<'m>(
    o: &Options,
    src: IpAddr,
    transport: Transport,
    map: &'m Map,
    keepalive: u16,
) -> Extra<'m> {
    let cookie = o.cookie.map(|c| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32);
        c.answer(canonical(src), &map.cookie_secret, now)
    });
    Extra {
        cookie,
        nsid: if o.nsid { map.nsid.as_deref() } else { None },
        keepalive: (o.keepalive && transport == Transport::Tcp).then_some(keepalive),
    }
}

/// `id.server` and `hostname.bind` in class CHAOS (RFC 4892), TXT or ANY: the NSID, when
/// one is configured, for operators who ask `dig CH TXT id.server` which instance answered.
/// Everything else in CHAOS (`version.bind` too) is refused.
fn chaos_identity<'m>(qwire: &[u8], rtype: u16, map: &'m Map) -> Option<&'m RrSet> {
    const ID_SERVER: &[u8] = b"\x02id\x06server\x00";
    const HOSTNAME_BIND: &[u8] = b"\x08hostname\x04bind\x00";
    let asked = matches!(rtype, 16 | 255) && (qwire == ID_SERVER || qwire == HOSTNAME_BIND);
    map.chaos_id.as_ref().filter(|_| asked)
}

fn glue(zone: &super::map::Zone) -> Option<&RrSet> {
    Some(&zone.ns_glue).filter(|g| g.count > 0)
}

/// Which address locates the client: the ECS subnet when it has a non-zero SOURCE, else the
/// packet's source. Returns the hit and, when ECS decided, the ECS (so SCOPE is set).
fn locate(map: &Map, src: IpAddr, ecs: Option<Ecs>) -> (Hit, Option<Ecs>) {
    match ecs {
        Some(e) if e.source > 0 => match e.addr {
            // An IPv4 client written as IPv6 (`::ffff:a.b.c.d`, at least /96) is located as
            // IPv4, as its packets would be; the scope is given back in IPv6 bits.
            // Exactly /96 says nothing of the IPv4 address: as SOURCE 0, the packet decides.
            IpAddr::V6(v6) if e.source == 96 && v6.to_ipv4_mapped().is_some() => {
                (map.geo.lookup(canonical(src)), None)
            }
            IpAddr::V6(v6) if e.source > 96 && v6.to_ipv4_mapped().is_some() => {
                let mut hit = map.geo.lookup(canonical(e.addr));
                hit.scope = hit.scope.saturating_add(96).min(128);
                (hit, Some(e))
            }
            addr => (map.geo.lookup(addr), Some(e)),
        },
        _ => (map.geo.lookup(canonical(src)), None),
    }
}

fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// Reads the question name: validated by `domain`'s zero-copy parser (label types and
/// lengths, at most 255 octets, no pointer loops) without building a name, then copied in
/// lower case into `buf`. Returns its wire length. A compressed question name is an error: it
/// would point into our header once echoed. Lower-casing the whole wire form is safe because
/// label length octets (0..=63) are never ASCII letters.
fn question_name(query: &[u8], d: &mut BinDecoder<'_>, buf: &mut [u8; 256]) -> Result<usize, ()> {
    let rest = query.get(d.index()..).ok_or(())?;
    let mut p = Parser::from_ref(rest);
    let name = ParsedName::parse_ref(&mut p).map_err(|_| ())?;
    let len = p.pos();
    if len != usize::from(name.compose_len()) {
        return Err(());
    }
    let wire = d.read_slice(len).map_err(|_| ())?.unverified();
    let dst = buf.get_mut(..len).ok_or(())?;
    dst.copy_from_slice(wire);
    dst.make_ascii_lowercase();
    Ok(len)
}

/// Whether wire name `q` is `apex` or below it (on a label boundary).
#[inline]
fn in_zone(q: &[u8], apex: &[u8]) -> bool {
    super::map::below(q, apex).is_some()
}

/// Reads the question and the OPT record (for every opcode, so that even NOTIMP echoes
/// EDNS and ECS). `Err`: FORMERR, or for an unknown opcode a bare NOTIMP.
fn parse<'a>(
    query: &'a [u8],
    d: &mut BinDecoder<'a>,
    [qd, an, ns, ar]: [u16; 4],
    transport: Transport,
    qwire: &mut [u8; 256],
) -> Result<Parsed<'a>, ()> {
    let mut parsed = Parsed {
        question: None,
        edns: None,
    };
    if qd > 1 {
        return Err(());
    }
    if qd == 1 {
        let start = d.index();
        let wire_len = question_name(query, d, qwire)?;
        let qtype = read_u16(d)?;
        let qclass = read_u16(d)?;
        let raw = d.slice_from(start).map_err(|_| ())?;
        parsed.question = Some(Question {
            raw,
            qtype,
            qclass,
            wire_len,
        });
    }
    for _ in 0..(u32::from(an) + u32::from(ns)) {
        skip_record(d)?;
    }
    for _ in 0..ar {
        let owner_root = d.peek().map(|b| b.unverified()) == Some(0);
        if owner_root {
            d.read_u8().map_err(|_| ())?; // the root name: one zero octet
        } else {
            Name::read(d).map_err(|_| ())?;
        }
        let rtype = read_u16(d)?;
        let class = read_u16(d)?;
        let ttl = d.read_u32().map_err(|_| ())?.unverified();
        let len = read_u16(d)?;
        let data = d.read_slice(usize::from(len)).map_err(|_| ())?.unverified();
        if rtype != OPT {
            continue;
        }
        if parsed.edns.is_some() || !owner_root {
            // RFC 6891 6.1.1: one OPT, owned by the root. FORMERR, but still with the
            // question and an OPT (the first one's options), as for a malformed option.
            let e = parsed.edns.get_or_insert(Edns {
                udp_size: 512,
                version: 0,
                dnssec_ok: false,
                options: Options::default(),
                malformed: true,
            });
            e.malformed = true;
            continue;
        }
        let version = (ttl >> 16) as u8;
        // The options of a later EDNS version mean nothing to us: BADVERS gets a bare OPT.
        let (options, malformed) = match version {
            0 => options(data, transport),
            _ => (Options::default(), false),
        };
        parsed.edns = Some(Edns {
            udp_size: class,
            version,
            dnssec_ok: ttl & 0x8000 != 0,
            options,
            malformed,
        });
    }
    Ok(parsed)
}

fn read_u16(d: &mut BinDecoder<'_>) -> Result<u16, ()> {
    Ok(d.read_u16().map_err(|_| ())?.unverified())
}

fn skip_record(d: &mut BinDecoder<'_>) -> Result<(), ()> {
    Name::read(d).map_err(|_| ())?;
    d.read_slice(8).map_err(|_| ())?; // type, class, ttl
    let len = read_u16(d)?;
    d.read_slice(usize::from(len)).map_err(|_| ())?;
    Ok(())
}

/// Walks the OPT options, keeping the ones we act on; unknown ones are ignored. The flag
/// (FORMERR) marks a bad or repeated ECS (RFC 7871 6), a COOKIE of a wrong length (RFC 7873
/// 5.2.2; only the first COOKIE counts, 5.2), a TCP keepalive carrying a TIMEOUT, which only
/// servers send (RFC 7828 3.2.1), or options overrunning the OPT. What read fine is kept, so
/// even a FORMERR echoes the client's cookie.
fn options(data: &[u8], transport: Transport) -> (Options, bool) {
    let mut d = BinDecoder::new(data);
    let mut o = Options::default();
    let mut malformed = false;
    let mut cookie_seen = false;
    while !d.is_empty() {
        let Ok((code, value)) = next_option(&mut d) else {
            return (o, true);
        };
        match code {
            ECS if o.ecs.is_some() => malformed = true,
            ECS => match client_subnet(value) {
                Ok(e) => o.ecs = Some(e),
                Err(()) => malformed = true,
            },
            COOKIE if cookie_seen => {}
            COOKIE => {
                cookie_seen = true;
                o.cookie = CookieIn::parse(value);
                malformed |= o.cookie.is_none();
            }
            // Whatever a query's NSID holds is ignored (RFC 5001 2.3).
            NSID => o.nsid = true,
            KEEPALIVE if transport == Transport::Tcp => {
                o.keepalive = value.is_empty();
                malformed |= !o.keepalive;
            }
            _ => {}
        }
    }
    (o, malformed)
}

fn next_option<'a>(d: &mut BinDecoder<'a>) -> Result<(u16, &'a [u8]), ()> {
    let code = read_u16(d)?;
    let len = read_u16(d)?;
    let value = d.read_slice(usize::from(len)).map_err(|_| ())?.unverified();
    Ok((code, value))
}

fn client_subnet(value: &[u8]) -> Result<Ecs, ()> {
    let mut d = BinDecoder::new(value);
    let family = read_u16(&mut d)?;
    let source = d.read_u8().map_err(|_| ())?.unverified();
    let scope = d.read_u8().map_err(|_| ())?.unverified();
    let octets = d.read_slice(d.len()).map_err(|_| ())?.unverified();
    let max = match family {
        1 => 32,
        2 => 128,
        _ => return Err(()),
    };
    if source > max || scope != 0 || octets.len() != usize::from(source).div_ceil(8) {
        return Err(());
    }
    let mut full = [0u8; 16];
    full[..octets.len()].copy_from_slice(octets);
    let bits = u128::from_be_bytes(full);
    let mask = u128::MAX.checked_shr(u32::from(source)).unwrap_or(0);
    if bits & mask != 0 {
        return Err(()); // address bits set beyond SOURCE PREFIX-LENGTH
    }
    let addr = if family == 1 {
        IpAddr::V4(Ipv4Addr::new(full[0], full[1], full[2], full[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(full))
    };
    Ok(Ecs {
        family,
        source,
        addr,
    })
}

/// The response being assembled; sections are borrowed from the map.
struct Response<'q, 'm> {
    out: &'q mut Vec<u8>,
    id: u16,
    flags: u16,
    question: Option<&'q [u8]>,
    edns: Option<Edns>,
    limit: u16,
    answers: [Option<&'m RrSet>; 2],
    /// The SOA of a negative answer.
    authority: Option<&'m SoaAuthority>,
    /// Glue; with the OPT record in the additional section.
    additional: Option<&'m RrSet>,
    scope: u8,
    extra: Extra<'m>,
    /// Send no records, with TC set, whatever fits.
    truncate: bool,
    /// The question's type, for the outcome.
    rtype: u16,
    /// For the outcome: see [`Outcome::geo_hit`].
    geo_hit: Option<(ClassId, u16)>,
    /// For the outcome: see [`Outcome::synthesized`].
    synthesized: bool,
}

/// Options of the answer's OPT besides ECS.
#[derive(Debug, Default, Clone, Copy)]
struct Extra<'m> {
    cookie: Option<([u8; super::cookie::ANSWER_LEN], CookieState)>,
    nsid: Option<&'m [u8]>,
    /// The TIMEOUT to advertise (RFC 7828), when asked over TCP.
    keepalive: Option<u16>,
}

impl Extra<'_> {
    fn wire_len(&self) -> usize {
        self.cookie.map_or(0, |(c, _)| 4 + c.len())
            + self.nsid.map_or(0, |n| 4 + n.len())
            + if self.keepalive.is_some() { 6 } else { 0 }
    }

    fn write(&self, out: &mut Vec<u8>) {
        let mut option = |code: u16, value: &[u8]| {
            out.extend_from_slice(&code.to_be_bytes());
            out.extend_from_slice(&(value.len() as u16).to_be_bytes());
            out.extend_from_slice(value);
        };
        if let Some((c, _)) = &self.cookie {
            option(COOKIE, c);
        }
        if let Some(n) = self.nsid {
            option(NSID, n);
        }
        if let Some(units) = self.keepalive {
            option(KEEPALIVE, &units.to_be_bytes());
        }
    }
}

impl Response<'_, '_> {
    fn finish(self, rcode: Rcode, _transport: Transport, qtype: Qtype) -> Outcome {
        let out = self.out;
        let code = rcode as u16;
        let ecs_len = |e: Edns| {
            e.options
                .ecs
                .map_or(0, |c| 8 + usize::from(c.source).div_ceil(8))
        };
        let opt_len = self
            .edns
            .map_or(0, |e| 11 + ecs_len(e) + self.extra.wire_len());
        let q_len = self.question.map_or(0, <[u8]>::len);
        let qname_len = q_len.saturating_sub(4);
        let body: usize = self
            .answers
            .iter()
            .chain([&self.additional])
            .flatten()
            .map(|s| s.bytes.len())
            .sum::<usize>()
            + self.authority.map_or(0, |a| a.len_for(qname_len));
        // Only records are ever dropped: an answer without any is not marked truncated,
        // unless the rate limit asks for it.
        let truncated =
            self.truncate || (body > 0 && 12 + q_len + body + opt_len > usize::from(self.limit));
        let mut flags = self.flags | (code & 0xF);
        if truncated {
            flags |= 0x0200;
        }
        let (an, ns, ar) = if truncated {
            (0, 0, 0)
        } else {
            (
                self.answers.iter().flatten().map(|s| s.count).sum::<u16>(),
                u16::from(self.authority.is_some()),
                self.additional.map_or(0, |s| s.count),
            )
        };
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&u16::from(self.question.is_some()).to_be_bytes());
        out.extend_from_slice(&an.to_be_bytes());
        out.extend_from_slice(&ns.to_be_bytes());
        out.extend_from_slice(&(ar + u16::from(self.edns.is_some())).to_be_bytes());
        if let Some(q) = self.question {
            out.extend_from_slice(q);
        }
        if !truncated {
            for s in self.answers.iter().flatten() {
                out.extend_from_slice(&s.bytes);
            }
            if let Some(a) = self.authority {
                a.write(out, qname_len);
            }
            if let Some(s) = self.additional {
                out.extend_from_slice(&s.bytes);
            }
        }
        if let Some(e) = self.edns {
            // OPT: root owner, our UDP size, extended rcode, version 0, DO echoed.
            out.push(0);
            out.extend_from_slice(&OPT.to_be_bytes());
            out.extend_from_slice(&MAX_UDP.to_be_bytes());
            let ttl = (u32::from(code >> 4) << 24) | if e.dnssec_ok { 0x8000 } else { 0 };
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&((ecs_len(e) + self.extra.wire_len()) as u16).to_be_bytes());
            if let Some(c) = e.options.ecs {
                let n = usize::from(c.source).div_ceil(8);
                out.extend_from_slice(&ECS.to_be_bytes());
                out.extend_from_slice(&((4 + n) as u16).to_be_bytes());
                out.extend_from_slice(&c.family.to_be_bytes());
                out.push(c.source);
                out.push(if c.source == 0 { 0 } else { self.scope });
                match c.addr {
                    IpAddr::V4(a) => out.extend_from_slice(&a.octets()[..n]),
                    IpAddr::V6(a) => out.extend_from_slice(&a.octets()[..n]),
                }
            }
            self.extra.write(out);
        }
        Outcome {
            qtype,
            rcode,
            truncated,
            cookie: self.extra.cookie.map(|(_, s)| s),
            rtype: self.rtype,
            qname_len: qname_len as u16,
            answered: self.answers.iter().flatten().any(|s| s.count > 0),
            geo_hit: self.geo_hit,
            synthesized: self.synthesized,
            limited: None,
        }
    }
}
