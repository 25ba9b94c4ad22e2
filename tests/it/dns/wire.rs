//! Packet-level behaviour: EDNS and ECS error codes, malformed and random input over UDP
//! and TCP, and the seed corpus of the fuzz target replayed through the pure query path.

use super::basic_regions;
use super::harness::*;
use edgepop::dns::query::Transport;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// A query for WWW/A as bytes, with `opt` appended as the additional section.
pub(super) fn with_opt(opt: &[u8]) -> Vec<u8> {
    let mut q = query(WWW, RecordType::A, None).to_vec().expect("encode");
    q[11] = 1; // ARCOUNT
    q.extend_from_slice(opt);
    q
}

/// An OPT record: root owner, type 41, payload, ext-rcode/version/flags, options.
pub(super) fn opt_record(version: u8, options: &[u8]) -> Vec<u8> {
    let mut o = vec![0, 0, 41, 0x04, 0xd0, 0, version, 0, 0];
    o.extend_from_slice(&(options.len() as u16).to_be_bytes());
    o.extend_from_slice(options);
    o
}

fn ecs_option(family: u16, source: u8, scope: u8, addr: &[u8]) -> Vec<u8> {
    let mut o = vec![0, 8];
    o.extend_from_slice(&((4 + addr.len()) as u16).to_be_bytes());
    o.extend_from_slice(&family.to_be_bytes());
    o.extend_from_slice(&[source, scope]);
    o.extend_from_slice(addr);
    o
}

pub(super) fn rcode(resp: &[u8]) -> u8 {
    resp[3] & 0x0f
}

#[tokio::test(flavor = "multi_thread")]
async fn edns_and_ecs_errors_get_the_rcodes_the_rfcs_ask_for() {
    let dns = Dns::start(&basic_regions()).await;
    let wait = Duration::from_secs(2);
    let send = |b: Vec<u8>| {
        let addr = dns.addr();
        async move { Dns::probe_raw(addr, &b, wait).await }
    };
    // Well-formed ECS plus an unknown option: answered, unknown option ignored.
    let mut opts = vec![0xfd, 0xe9, 0, 2, 0xaa, 0xbb];
    opts.extend(ecs_option(1, 24, 0, &[198, 51, 100]));
    let ok = send(with_opt(&opt_record(0, &opts))).await.expect("answer");
    let m = hickory_proto::op::Message::from_vec(&ok).expect("parse");
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert_eq!(addrs(&m), vec!["192.0.2.1"]);
    assert_eq!(ecs_of(&m), Some((1, 24, 24, vec![198, 51, 100])));
    assert_eq!(m.extensions().as_ref().map(|e| e.max_payload()), Some(1232));
    // FORMERR: unknown family, SOURCE too long, wrong octet count, bits beyond SOURCE,
    // non-zero SCOPE in a query.
    for (what, ecs) in [
        ("family 3", ecs_option(3, 8, 0, &[1])),
        ("v4 source 33", ecs_option(1, 33, 0, &[1, 2, 3, 4, 0])),
        ("v6 source 129", ecs_option(2, 129, 0, &[0; 17])),
        ("too few octets", ecs_option(1, 24, 0, &[198, 51])),
        ("too many octets", ecs_option(1, 16, 0, &[198, 51, 100])),
        ("bits beyond source", ecs_option(1, 23, 0, &[198, 51, 101])),
        ("scope set", ecs_option(1, 24, 24, &[198, 51, 100])),
    ] {
        let r = send(with_opt(&opt_record(0, &ecs))).await.expect(what);
        assert_eq!(rcode(&r), 1, "{what}: FORMERR");
    }
    // EDNS version 1: BADVERS (extended rcode 16 = 1 in the OPT TTL's high byte).
    let r = send(with_opt(&opt_record(1, &[]))).await.expect("badvers");
    let m = hickory_proto::op::Message::from_vec(&r).expect("parse");
    // hickory names extended rcode 16 BADSIG (TSIG) as well as BADVERS (EDNS): same value.
    assert_eq!(u16::from(m.response_code()), 16);
    assert_eq!(m.extensions().as_ref().map(|e| e.version()), Some(0));
    // Two OPT records: FORMERR.
    let mut two = with_opt(&opt_record(0, &[]));
    two[11] = 2;
    two.extend_from_slice(&opt_record(0, &[]));
    assert_eq!(rcode(&send(two).await.expect("two opts")), 1);
    // Unknown opcode: NOTIMP. UPDATE too (we are not a primary for updates).
    let mut q = query(WWW, RecordType::A, None).to_vec().expect("encode");
    q[2] = (q[2] & 0x87) | (3 << 3);
    assert_eq!(rcode(&send(q.clone()).await.expect("opcode 3")), 4);
    q[2] = (q[2] & 0x87) | (5 << 3);
    assert_eq!(rcode(&send(q).await.expect("update")), 4);
    // NOTIMP still echoes EDNS and the ECS option (SCOPE 0).
    let mut q = with_opt(&opt_record(0, &ecs_option(1, 24, 0, &[198, 51, 100])));
    q[2] = (q[2] & 0x87) | (3 << 3);
    let r = send(q).await.expect("notimp with ecs");
    assert_eq!(rcode(&r), 4);
    assert!(
        r.ends_with(&[0, 1, 24, 0, 198, 51, 100]),
        "ECS echoed: {r:?}"
    );
    // Two questions: FORMERR. No question: FORMERR.
    let mut q = query(WWW, RecordType::A, None).to_vec().expect("encode");
    let question = q[12..].to_vec();
    q[5] = 2;
    q.extend_from_slice(&question);
    assert_eq!(rcode(&send(q).await.expect("qdcount 2")), 1);
    let mut q = query(WWW, RecordType::A, None).to_vec().expect("encode");
    q[5] = 0;
    q.truncate(12);
    assert_eq!(rcode(&send(q).await.expect("qdcount 0")), 1);
    // A response (QR=1) is never answered.
    let mut q = query(WWW, RecordType::A, None).to_vec().expect("encode");
    q[2] |= 0x80;
    assert!(send(q).await.is_none(), "no answer to a response");
    // Class CH: REFUSED.
    let out = dns.dig(&["version.bind", "TXT", "CH"]).await;
    assert!(out.contains("status: REFUSED"), "{out}");
}

/// The header's AA flag, question count and additional count of an answer.
fn aa_qd_ar(resp: &[u8]) -> (bool, u16, u16) {
    (
        resp[2] & 0x04 != 0,
        u16::from_be_bytes([resp[4], resp[5]]),
        u16::from_be_bytes([resp[10], resp[11]]),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn aa_marks_only_answers_from_the_zone_and_a_formerr_for_opt_keeps_question_and_opt() {
    let dns = Dns::start_with(&basic_regions(), "nsid = \"dns1\"").await;
    let wait = Duration::from_secs(2);
    let send = |b: Vec<u8>| {
        let addr = dns.addr();
        async move { Dns::probe_raw(addr, &b, wait).await.expect("an answer") }
    };
    let bytes = |name: &str, t: RecordType| query(name, t, None).to_vec().expect("encode");
    // From the zone: NOERROR, NODATA and NXDOMAIN are authoritative.
    for (name, t, code) in [
        (WWW, RecordType::A, 0),
        (WWW, RecordType::MX, 0),
        ("nope.edgepop.test", RecordType::A, 3),
    ] {
        let r = send(bytes(name, t)).await;
        assert_eq!((rcode(&r), aa_qd_ar(&r).0), (code, true), "{name} {t}");
    }
    // Not about the zone: REFUSED, NOTIMP, FORMERR and BADVERS are not.
    let mut notimp = bytes(WWW, RecordType::A);
    notimp[2] = (notimp[2] & 0x87) | (3 << 3);
    let mut two_questions = bytes(WWW, RecordType::A);
    let question = two_questions[12..].to_vec();
    two_questions[5] = 2;
    two_questions.extend_from_slice(&question);
    for (what, q, code) in [
        ("out of zone", bytes("example.com", RecordType::A), 5),
        ("opcode 3", notimp, 4),
        ("two questions", two_questions, 1),
    ] {
        let r = send(q).await;
        assert_eq!((rcode(&r), aa_qd_ar(&r).0), (code, false), "{what}");
    }
    let r = send(with_opt(&opt_record(1, &[]))).await;
    assert!(!aa_qd_ar(&r).0, "BADVERS");
    // The CHAOS identity is ours to answer.
    let out = dns.dig(&["id.server", "TXT", "CH"]).await;
    assert!(
        out.contains("flags: qr aa rd;") && out.contains("dns1"),
        "{out}"
    );
    // Two OPT records, or an OPT not owned by the root: FORMERR that still echoes the
    // question and carries an OPT (RFC 6891 6.1.1), so resolvers keep using EDNS.
    let mut two = with_opt(&opt_record(0, &[]));
    two[11] = 2;
    two.extend_from_slice(&opt_record(0, &[]));
    let mut not_root = with_opt(&[]);
    not_root.extend_from_slice(&[3, b'w', b'w', b'w', 0xc0, 12]);
    not_root.extend_from_slice(&opt_record(0, &[])[1..]);
    for (what, q) in [("two OPTs", two), ("OPT owned by a name", not_root)] {
        let r = send(q).await;
        assert_eq!(rcode(&r), 1, "{what}");
        assert_eq!(aa_qd_ar(&r), (false, 1, 1), "{what}: question and OPT");
        let m = hickory_proto::op::Message::from_vec(&r).expect("parse");
        assert!(m.extensions().is_some(), "{what}: OPT");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_packets_never_crash_the_server_and_it_keeps_answering() {
    // On both kinds of UDP I/O ("auto" is io_uring where the kernel allows it).
    for io in ["auto", "recvmmsg"] {
        malformed_packets_on(io).await;
    }
}

async fn malformed_packets_on(io: &str) {
    let dns = Dns::start_with(&basic_regions(), &format!("udp_io = \"{io}\"")).await;
    let addr = dns.addr();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let valid = query(WWW, RecordType::A, None).to_vec().expect("encode");
    let mut packets: Vec<Vec<u8>> = Vec::new();
    // Truncated headers and questions.
    for n in 0..valid.len() {
        packets.push(valid[..n].to_vec());
    }
    // A compression-pointer loop in the question name, and one pointing forward.
    let mut looped = valid[..12].to_vec();
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    packets.push(looped);
    let mut forward = valid[..12].to_vec();
    forward.extend_from_slice(&[0xc0, 14, 0xc0, 12, 0, 1, 0, 1]);
    packets.push(forward);
    // A loop in an additional record's owner name.
    let mut add = valid.clone();
    add[11] = 1;
    let at = add.len() as u8;
    add.extend_from_slice(&[0xc0, at, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
    packets.push(add);
    // Empty datagrams (they end an io_uring multishot receive, which is armed again), and
    // queries with junk behind them past the 4,096 bytes a worker reads of a datagram.
    packets.push(Vec::new());
    packets.push(Vec::new());
    for n in [4_096usize, 5_000, 65_000] {
        let mut p = valid.clone();
        p.resize(n, 0xab);
        packets.push(p);
    }
    // Huge counts with no data behind them.
    for idx in [5usize, 7, 9, 11] {
        let mut p = valid.clone();
        p[idx - 1] = 0xff;
        p[idx] = 0xff;
        packets.push(p);
    }
    // An OPT whose length runs past the end, and an option that does.
    let mut p = with_opt(&opt_record(0, &[]));
    let l = p.len();
    p[l - 1] = 0x40;
    packets.push(p);
    packets.push(with_opt(&opt_record(0, &[0, 8, 0, 40, 0, 1])));
    // Random bytes, and random mutations of a valid query.
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for _ in 0..2000 {
        let n = rng.gen_range(0..600);
        packets.push((0..n).map(|_| rng.gen()).collect());
    }
    let base = with_opt(&opt_record(0, &ecs_option(1, 24, 0, &[198, 51, 100])));
    for _ in 0..3000 {
        let mut p = base.clone();
        for _ in 0..rng.gen_range(1..6) {
            let i = rng.gen_range(0..p.len());
            p[i] = rng.gen();
        }
        if rng.gen_bool(0.2) {
            p.truncate(rng.gen_range(0..p.len()));
        }
        packets.push(p);
    }
    for p in &packets {
        sock.send_to(p, addr).await.expect("send");
    }
    // Still alive and correct, over UDP and TCP.
    eventually(
        Duration::from_secs(5),
        "the server still answers",
        || async { dns.short(&[WWW, "A", "+subnet=198.51.100.0/24"]).await == vec!["192.0.2.1"] },
    )
    .await;
    for p in packets.iter().step_by(50) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("tcp");
        use tokio::io::AsyncWriteExt;
        let mut framed = (p.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(p);
        let _ = s.write_all(&framed).await;
    }
    assert_eq!(
        dns.short(&[WWW, "A", "+tcp"]).await,
        vec!["192.0.2.3"],
        "{io}"
    );
}

#[test]
fn the_fuzz_seed_corpus_and_random_mutations_never_panic_the_query_path() {
    let cfg = edgepop::config::parse(
        std::path::Path::new("t.toml"),
        &config_text(std::path::Path::new("unused.toml"), "nsid = \"t\""),
    )
    .expect("config")
    .dns
    .expect("[dns]");
    let file = edgepop::config::regions::parse(std::path::Path::new("r.toml"), &basic_regions())
        .expect("regions");
    let map = edgepop::dns::map::standalone(&cfg, file).expect("map");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/dns_query");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("seed corpus")
        .map(|e| std::fs::read(e.expect("entry").path()).expect("seed"))
        .collect();
    assert!(seeds.len() >= 20, "seed corpus in {}", dir.display());
    seeds.sort();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let srcs: [std::net::IpAddr; 2] = [
        "198.51.100.7".parse().expect("v4"),
        "2001:db8:2::1".parse().expect("v6"),
    ];
    let mut answered = 0;
    for seed in &seeds {
        for round in 0..60 {
            let mut p = seed[1..].to_vec();
            if round > 0 && !p.is_empty() {
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..p.len());
                    p[i] = rng.gen();
                }
            }
            // As in the fuzz target, bit 1 of the first byte picks TCP.
            let (transport, limit) = if seed.first().is_some_and(|b| b & 2 == 2) {
                (Transport::Tcp, usize::from(u16::MAX))
            } else {
                (Transport::Udp, 1232)
            };
            let mut r = Vec::new();
            if edgepop::dns::query::handle(&p, srcs[round % 2], transport, &map, &mut r).is_some() {
                assert!(r.len() >= 12 && r.len() <= limit && r[..2] == p[..2]);
                // As in the fuzz target: within the UDP size the query asks for.
                if let (Transport::Udp, Ok(q)) =
                    (transport, hickory_proto::op::Message::from_vec(&p))
                {
                    let asked = q
                        .extensions()
                        .as_ref()
                        .map_or(512, |e| usize::from(e.max_payload()).clamp(512, 1232));
                    assert!(r.len() <= asked, "{} > {asked}", r.len());
                }
                answered += 1;
            }
        }
    }
    assert!(answered > 1000, "{answered}");
}
