//! Fuzzes the DNS query path: any bytes from any source address must give either no answer
//! or a well-formed one, never a panic. The map has nested IPv4/IPv6 regions, a truncating
//! PoP, the default and in-zone nameservers with glue, static records (a CNAME, a TXT at a
//! geo name, records below an empty non-terminal, wildcards) and a rate limit that drops and slips, so
//! every branch of the answer code is reachable.

#![no_main]

use edgepop::dns::map::{standalone_with, Map};
use edgepop::dns::query::{handle, handle_udp, Transport};
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;

const CONFIG: &str = r#"
[pop]
name = "fuzz"
[dns]
listen = "127.0.0.1:0"
zone = "edgepop.test"
names = ["www.edgepop.test", "edgepop.test", "a.b.edgepop.test"]
regions = "unused.toml"
nameservers = ["ns1.edgepop.test", "ns2.sub.edgepop.test", "ns.example.net"]
glue = { "ns1.edgepop.test" = ["192.0.2.53", "2001:db8::53"], "ns2.sub.edgepop.test" = ["192.0.2.54"] }
nsid = "fuzz"
max_nocookie_response = 300
rate_limit = { responses = 50, per = "1s", slip = 2, exempt = ["10.1.2.0/24"] }
"#;

const ZONE: &str = r#"
@          MX     10 mail
@          TXT    "v=spf1 -all" "second"
www        TXT    "geo and static"
mail       A      192.0.2.25
alias      CNAME  www
x.y.z      AAAA   2001:db8::25
_sip._udp  SRV    0 1 5060 mail
*.w        TXT    "wild"
*.w        A      192.0.2.40
*.cdn      CNAME  www
"#;

const REGIONS: &str = r#"
[[pops]]
name = "a"
ipv4 = ["192.0.2.1"]
ipv6 = ["2001:db8::1"]
[[pops]]
name = "big"
ipv4 = ["192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.13", "192.0.2.14", "192.0.2.15", "192.0.2.16", "192.0.2.17", "192.0.2.18", "192.0.2.19", "192.0.2.20", "192.0.2.21", "192.0.2.22", "192.0.2.23", "192.0.2.24", "192.0.2.25", "192.0.2.26", "192.0.2.27", "192.0.2.28", "192.0.2.29", "192.0.2.30", "192.0.2.31", "192.0.2.32", "192.0.2.33", "192.0.2.34", "192.0.2.35", "192.0.2.36", "192.0.2.37", "192.0.2.38", "192.0.2.39"]
[[pops]]
name = "d"
ipv4 = ["192.0.2.99"]
[[regions]]
name = "r1"
networks = ["10.0.0.0/8", "2001:db8:1::/48"]
pops = ["a", "d"]
[[regions]]
name = "r2"
networks = ["10.1.0.0/16", "2001:db8:1:2::/64"]
pops = ["big"]
[[regions]]
name = "r3"
networks = ["10.1.2.0/24"]
pops = ["d"]
[default]
pops = ["d"]
"#;

fn map() -> &'static Map {
    static MAP: OnceLock<Map> = OnceLock::new();
    MAP.get_or_init(|| {
        let cfg = edgepop::config::parse(Path::new("fuzz.toml"), CONFIG)
            .ok()
            .and_then(|c| c.dns)
            .expect("fuzz config");
        let file = edgepop::config::regions::parse(Path::new("fuzz-regions.toml"), REGIONS)
            .expect("fuzz regions");
        let statics = edgepop::dns::records::parse(Path::new("fuzz.zone"), ZONE, &cfg)
            .expect("fuzz zone file");
        standalone_with(&cfg, file, statics).expect("fuzz map")
    })
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the source address family (bit 0), so both lookups get
    // exercised, the transport (bit 1): TCP has no size limit and takes the keepalive, and
    // over UDP whether the rate limit applies (bit 2: a source outside its exempt network).
    let first = data.first().copied().unwrap_or(0);
    let src: IpAddr = match (first & 1 == 1, first & 4 == 4) {
        (true, _) => "2001:db8:1:2::7".parse().expect("v6"),
        (false, false) => "10.1.2.3".parse().expect("v4"),
        (false, true) => "10.1.9.3".parse().expect("v4"),
    };
    let (transport, limit) = if first & 2 == 2 {
        (Transport::Tcp, usize::from(u16::MAX))
    } else {
        (Transport::Udp, 1232)
    };
    let query = data.get(1..).unwrap_or(&[]);
    let mut resp = Vec::new();
    let outcome = match transport {
        Transport::Udp => handle_udp(query, src, map(), &mut resp),
        Transport::Tcp => handle(query, src, transport, map(), &mut resp),
    };
    // A rate-limited answer that was dropped leaves nothing to send.
    if outcome.is_some() && !resp.is_empty() {
        assert!(resp.len() >= 12, "an answer has a header");
        assert!(resp.len() <= limit, "answers fit their transport (UDP: 1232 bytes)");
        // Over UDP, within what the query allows, when an independent parser can read it:
        // its EDNS size (512 to 1232), else 512. Every option we add must have been counted.
        if transport == Transport::Udp {
            if let Ok(q) = hickory_proto::op::Message::from_vec(query) {
                let asked = q
                    .extensions()
                    .as_ref()
                    .map_or(512, |e| usize::from(e.max_payload()).clamp(512, 1232));
                assert!(resp.len() <= asked, "{} > the {asked} bytes asked for", resp.len());
            }
        }
        assert_eq!(resp[..2], query[..2], "the id is echoed");
        assert!(resp[2] & 0x80 != 0, "QR is set");
        // Every answer to a QUERY is a well-formed message for an independent parser
        // (hickory-proto's; the query path validates the question with `domain`'s). Other
        // opcodes are echoed in NOTIMP answers, and hickory rejects the ones it does not know.
        if resp[2] & 0x78 == 0 {
            if let Err(e) = hickory_proto::op::Message::from_vec(&resp) {
                panic!("unparseable answer: {e}");
            }
        }
    }
});
