//! EDNS options besides ECS, with dig, kdig and hand-made options: DNS cookies (RFC 7873 with
//! RFC 9018 server cookies), NSID (RFC 5001) and the TCP keepalive (RFC 7828).

use super::basic_regions;
use super::harness::*;
use super::wire::{opt_record, rcode, with_opt};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const CLIENT: [u8; 8] = [0x24, 0x64, 0xc4, 0xab, 0xcf, 0x10, 0xc9, 0x57];

fn option(code: u16, value: &[u8]) -> Vec<u8> {
    let mut o = code.to_be_bytes().to_vec();
    o.extend_from_slice(&(value.len() as u16).to_be_bytes());
    o.extend_from_slice(value);
    o
}

/// WWW/A with an OPT holding these options.
fn query_with(options: &[u8]) -> Vec<u8> {
    with_opt(&opt_record(0, options))
}

fn parse(resp: &[u8]) -> Message {
    Message::from_vec(resp).expect("a parseable answer")
}

fn option_of(m: &Message, code: EdnsCode) -> Option<Vec<u8>> {
    let o = m.extensions().as_ref()?.option(code)?;
    o.try_into().ok()
}

async fn udp(dns: &Dns, q: &[u8]) -> Message {
    let r = Dns::probe_raw(dns.addr(), q, Duration::from_secs(2))
        .await
        .expect("an answer");
    parse(&r)
}

/// `edgepop_dns_cookies_total` by server cookie: client_only, valid, invalid.
async fn cookie_counts(dns: &Dns) -> [u64; 3] {
    let (_, metrics) = dns.admin_get("/metrics").await;
    ["client_only", "valid", "invalid"].map(|s| {
        let key = format!("edgepop_dns_cookies_total{{server_cookie=\"{s}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {metrics}"))
    })
}

/// The answer's cookie: the client cookie echoed and an RFC 9018 server cookie made now.
fn assert_fresh_cookie(m: &Message, client: &[u8]) -> Vec<u8> {
    let c = option_of(m, EdnsCode::Cookie).expect("a COOKIE option");
    assert_eq!(c.len(), 24, "{c:?}");
    assert_eq!(&c[..8], client);
    assert_eq!(&c[8..12], &[1, 0, 0, 0], "version 1, reserved zero");
    let made = u64::from(u32::from_be_bytes([c[12], c[13], c[14], c[15]]));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(made.abs_diff(now) <= 60, "timestamp {made} vs now {now}");
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_cookie_gets_a_server_cookie_that_is_valid_when_it_comes_back() {
    let dns = Dns::start(&basic_regions()).await;
    let first = udp(&dns, &query_with(&option(10, &CLIENT))).await;
    assert_eq!(first.response_code(), ResponseCode::NoError);
    assert_eq!(addrs(&first), vec!["192.0.2.3"]);
    let cookie = assert_fresh_cookie(&first, &CLIENT);
    assert_eq!(cookie_counts(&dns).await, [1, 0, 0]);
    // Sent back: valid, answered, and a fresh server cookie again.
    let again = udp(&dns, &query_with(&option(10, &cookie))).await;
    assert_eq!(addrs(&again), vec!["192.0.2.3"]);
    assert_fresh_cookie(&again, &CLIENT);
    assert_eq!(cookie_counts(&dns).await, [1, 1, 0]);
    // Tampered with: invalid, but still answered (nothing is refused for its cookie).
    let mut forged = cookie.clone();
    forged[23] ^= 1;
    let r = udp(&dns, &query_with(&option(10, &forged))).await;
    assert_eq!(addrs(&r), vec!["192.0.2.3"]);
    assert_fresh_cookie(&r, &CLIENT);
    assert_eq!(cookie_counts(&dns).await, [1, 1, 1]);
    // Over TCP too, next to ECS.
    let mut opts = option(10, &cookie);
    opts.extend(option(8, &[0, 1, 24, 0, 198, 51, 100]));
    let r = parse(&dns.raw_tcp(&query_with(&opts)).await);
    assert_eq!(addrs(&r), vec!["192.0.2.1"]);
    assert_eq!(ecs_of(&r), Some((1, 24, 24, vec![198, 51, 100])));
    assert_fresh_cookie(&r, &CLIENT);
    assert_eq!(cookie_counts(&dns).await, [1, 2, 1]);
    // dig sends a cookie by default and checks the echo.
    let out = dns.dig(&[WWW, "A"]).await;
    assert!(
        out.contains("; COOKIE: ") && out.contains("(good)"),
        "{out}"
    );
    let out = dns.dig(&[WWW, "A", "+nocookie"]).await;
    assert!(!out.contains("COOKIE"), "{out}");
    let out = dns.kdig(&[WWW, "A", "+cookie"]).await;
    assert!(out.contains(";; COOKIE: "), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_cookie_is_a_formerr_that_still_carries_the_question_and_an_opt() {
    let dns = Dns::start(&basic_regions()).await;
    for (what, opts) in [
        ("7 octets", option(10, &CLIENT[..7])),
        ("9 octets", option(10, &[1; 9])),
        ("15 octets", option(10, &[1; 15])),
        ("41 octets", option(10, &[1; 41])),
    ] {
        let m = udp(&dns, &query_with(&opts)).await;
        assert_eq!(m.response_code(), ResponseCode::FormErr, "{what}");
        assert_eq!(m.queries().len(), 1, "{what}: question echoed");
        let opt = m.extensions().as_ref().expect("an OPT");
        assert_eq!(opt.max_payload(), 1232, "{what}");
        assert!(option_of(&m, EdnsCode::Cookie).is_none(), "{what}");
    }
    // Only the first cookie counts (RFC 7873 5.2): a second one, even a broken one, is ignored.
    let mut two = option(10, &CLIENT);
    two.extend(option(10, &[1; 9]));
    let m = udp(&dns, &query_with(&two)).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert_fresh_cookie(&m, &CLIENT);
    // A malformed ECS: FORMERR, which used to lose its OPT, now with the cookie echoed.
    let mut opts = option(8, &[0, 3, 8, 0, 1]);
    opts.extend(option(10, &CLIENT));
    let m = udp(&dns, &query_with(&opts)).await;
    assert_eq!(m.response_code(), ResponseCode::FormErr);
    assert_fresh_cookie(&m, &CLIENT);
    // EDNS version 1: BADVERS with a bare OPT, its options not read.
    let m = udp(&dns, &with_opt(&opt_record(1, &option(10, &CLIENT)))).await;
    assert_eq!(u16::from(m.response_code()), 16);
    assert!(option_of(&m, EdnsCode::Cookie).is_none());
    let out = dns.dig(&[WWW, "A", "+cookie=2464c4abcf"]).await;
    assert!(out.contains("status: FORMERR"), "{out}");
    assert!(!out.contains("retry with '+noedns'"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nsid_and_chaos_id_server_are_answered_only_when_configured_and_asked_for() {
    let dns = Dns::start_with(&basic_regions(), "nsid = \"dns1.tyo1\"").await;
    let out = dns.dig(&[WWW, "A", "+nsid"]).await;
    assert!(
        out.contains("; NSID: 64 6e 73 31 2e 74 79 6f 31 (\"dns1.tyo1\")"),
        "{out}"
    );
    assert!(out.contains("192.0.2.3"), "{out}");
    let out = dns.kdig(&[WWW, "A", "+nsid"]).await;
    assert!(out.contains("\"dns1.tyo1\""), "{out}");
    // Whatever a query's NSID holds is ignored; negative answers carry it too.
    let m = udp(&dns, &query_with(&option(3, b"junk"))).await;
    assert_eq!(
        option_of(&m, EdnsCode::NSID).as_deref(),
        Some(&b"dns1.tyo1"[..])
    );
    let out = dns.dig(&["nope.edgepop.test", "A", "+nsid"]).await;
    assert!(
        out.contains("status: NXDOMAIN") && out.contains("(\"dns1.tyo1\")"),
        "{out}"
    );
    let out = dns.dig(&[WWW, "A"]).await;
    assert!(!out.contains("NSID"), "not asked: {out}");
    // The same identity over CHAOS TXT (RFC 4892), for tools that ask that way.
    for name in ["id.server", "HOSTNAME.bind"] {
        assert_eq!(
            dns.short(&[name, "TXT", "CH"]).await,
            vec!["\"dns1.tyo1\""],
            "{name}"
        );
    }
    let out = dns.kdig(&["-c", "CH", "-t", "TXT", "id.server"]).await;
    assert!(
        out.contains("id.server.") && out.contains("CH") && out.contains("\"dns1.tyo1\""),
        "{out}"
    );
    for (name, rtype) in [
        ("version.bind", "TXT"),
        ("id.server", "A"),
        ("x.server", "TXT"),
    ] {
        let out = dns.dig(&[name, rtype, "CH"]).await;
        assert!(out.contains("status: REFUSED"), "{name} {rtype}: {out}");
    }
    let plain = Dns::start(&basic_regions()).await;
    let out = plain.dig(&[WWW, "A", "+nsid"]).await;
    assert!(!out.contains("NSID"), "not configured: {out}");
    let out = plain.dig(&["id.server", "TXT", "CH"]).await;
    assert!(out.contains("status: REFUSED"), "not configured: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hex_nsid_is_sent_as_its_octets_and_answers_chaos_in_hex() {
    let dns = Dns::start_with(&basic_regions(), "nsid = \"0x00ff10\"").await;
    let out = dns.dig(&[WWW, "A", "+nsid"]).await;
    assert!(out.contains("; NSID: 00 ff 10 "), "{out}");
    let m = udp(&dns, &query_with(&option(3, b""))).await;
    assert_eq!(
        option_of(&m, EdnsCode::NSID).as_deref(),
        Some(&[0x00, 0xff, 0x10][..])
    );
    assert_eq!(
        dns.short(&["id.server", "TXT", "CH"]).await,
        vec!["\"0x00ff10\""]
    );
    // 128 octets: 258 characters of hex, two character-strings in the CHAOS answer.
    let long = format!("0x{}", "00".repeat(128));
    let dns = Dns::start_with(&basic_regions(), &format!("nsid = {long:?}")).await;
    let m = udp(&dns, &query_with(&option(3, b""))).await;
    assert_eq!(option_of(&m, EdnsCode::NSID), Some(vec![0; 128]));
    let chaos = dns.short(&["id.server", "TXT", "CH"]).await.join("");
    assert_eq!(chaos.replace(['"', ' '], ""), long);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tcp_keepalive_is_announced_over_tcp_only() {
    let dns = Dns::start(&basic_regions()).await;
    let out = dns.dig(&[WWW, "A", "+tcp", "+keepalive"]).await;
    assert!(out.contains("; TCP KEEPALIVE: 10.0 secs"), "{out}");
    let out = dns.dig(&[WWW, "A", "+tcp"]).await;
    assert!(!out.contains("KEEPALIVE"), "not asked: {out}");
    // Over UDP the option is ignored, whatever it holds (RFC 7828 3.3.1).
    let out = dns.dig(&[WWW, "A", "+keepalive"]).await;
    assert!(
        !out.contains("KEEPALIVE") && out.contains("192.0.2.3"),
        "{out}"
    );
    let m = udp(&dns, &query_with(&option(11, &[0, 100]))).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(option_of(&m, EdnsCode::Keepalive).is_none());
    // Over TCP a query must not carry a TIMEOUT: FORMERR.
    let r = dns.raw_tcp(&query_with(&option(11, &[0, 100]))).await;
    assert_eq!(rcode(&r), 1);
    let m = parse(&dns.raw_tcp(&query_with(&option(11, &[]))).await);
    assert_eq!(
        option_of(&m, EdnsCode::Keepalive).as_deref(),
        Some(&[0u8, 100][..])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecars_sharing_a_cookie_key_file_accept_each_others_cookies_across_a_rotation() {
    let keys_dir = tempfile::tempdir().expect("tempdir");
    let keys = keys_dir.path().join("cookie.keys");
    let old_key = "00112233445566778899aabbccddeeff";
    std::fs::write(&keys, format!("{old_key}\n")).expect("write keys");
    let extra = format!("cookie_keys = {:?}", keys.display().to_string());
    let a = Dns::start_with(&basic_regions(), &extra).await;
    let b = Dns::start_with(&basic_regions(), &extra).await;
    let from_a = assert_fresh_cookie(&udp(&a, &query_with(&option(10, &CLIENT))).await, &CLIENT);
    udp(&b, &query_with(&option(10, &from_a))).await;
    assert_eq!(cookie_counts(&b).await, [0, 1, 0], "b takes a's cookie");
    // One with its own random secret does not.
    let lone = Dns::start(&basic_regions()).await;
    udp(&lone, &query_with(&option(10, &from_a))).await;
    assert_eq!(cookie_counts(&lone).await, [0, 0, 1]);

    // Rotation on a: a new first key signs, the old one still checks.
    std::fs::write(
        &keys,
        format!("ffeeddccbbaa99887766554433221100 # new\n{old_key}\n"),
    )
    .expect("write keys");
    a.reload_config(&config_text(&a.regions, &extra));
    eventually(
        Duration::from_secs(10),
        "a signs with the new key, which b (not reloaded) does not know",
        || async {
            let c = assert_fresh_cookie(&udp(&a, &query_with(&option(10, &CLIENT))).await, &CLIENT);
            let before = cookie_counts(&b).await[2];
            udp(&b, &query_with(&option(10, &c))).await;
            cookie_counts(&b).await[2] == before + 1
        },
    )
    .await;
    let valid = cookie_counts(&a).await[1];
    udp(&a, &query_with(&option(10, &from_a))).await;
    assert_eq!(
        cookie_counts(&a).await[1],
        valid + 1,
        "the old key still checks"
    );
}

/// A region file whose one PoP (the default) has `n` IPv4 addresses.
fn wide_pop(n: u8) -> String {
    let addresses: Vec<String> = (1..=n).map(|i| format!("\"192.0.2.{i}\"")).collect();
    format!(
        "[[pops]]\nname = \"wide\"\nipv4 = [{}]\n\n[default]\npops = [\"wide\"]\n",
        addresses.join(", ")
    )
}

/// A query without a question, only an OPT with `options` (RFC 7873 5.4).
fn cookie_only_query(options: &[u8]) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 1];
    q.extend_from_slice(&opt_record(0, options));
    q
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_with_only_a_cookie_gets_a_server_cookie_or_badcookie() {
    let dns = Dns::start(&basic_regions()).await;
    let m = udp(&dns, &cookie_only_query(&option(10, &CLIENT))).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.queries().is_empty() && m.answers().is_empty());
    let cookie = assert_fresh_cookie(&m, &CLIENT);
    let m = udp(&dns, &cookie_only_query(&option(10, &cookie))).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert_fresh_cookie(&m, &CLIENT);
    let mut forged = cookie.clone();
    forged[20] ^= 0x40;
    let r = Dns::probe_raw(
        dns.addr(),
        &cookie_only_query(&option(10, &forged)),
        Duration::from_secs(2),
    )
    .await
    .expect("an answer");
    // BADCOOKIE is 23: 7 in the header, 1 in the OPT's extended rcode.
    assert_eq!(rcode(&r), 7);
    let m = parse(&r);
    assert_eq!(u16::from(m.response_code()), 23);
    assert_fresh_cookie(&m, &CLIENT);
    let (_, metrics) = dns.admin_get("/metrics").await;
    assert!(metrics.contains("rcode=\"BADCOOKIE\"} 1"), "{metrics}");
    // No question and no cookie: FORMERR, as before.
    let m = udp(&dns, &cookie_only_query(&[])).await;
    assert_eq!(m.response_code(), ResponseCode::FormErr);
}

#[tokio::test(flavor = "multi_thread")]
async fn options_count_toward_the_udp_size_an_answer_must_fit() {
    // 29 addresses: header 12 + question 22 + 29 x 16 + OPT 11 = 509 octets, 3 under 512;
    // the answer's cookie (28 octets) takes it over.
    let dns = Dns::start(&wide_pop(29)).await;
    let at_512 = |options: &[u8]| {
        let mut q = query_with(options);
        let opt = q.len() - options.len() - 11;
        q[opt + 3..opt + 5].copy_from_slice(&512u16.to_be_bytes());
        q
    };
    let r = Dns::probe_raw(dns.addr(), &at_512(&[]), Duration::from_secs(2))
        .await
        .expect("an answer");
    assert_eq!(r.len(), 509);
    assert_eq!(addrs(&parse(&r)).len(), 29);
    let r = Dns::probe_raw(
        dns.addr(),
        &at_512(&option(10, &CLIENT)),
        Duration::from_secs(2),
    )
    .await
    .expect("an answer");
    let m = parse(&r);
    assert!(m.truncated() && m.answers().is_empty(), "{m:?}");
    assert!(r.len() <= 512);
    assert_fresh_cookie(&m, &CLIENT);
    // Over TCP the same query is answered whole, cookie included.
    let m = parse(&dns.raw_tcp(&at_512(&option(10, &CLIENT))).await);
    assert_eq!(addrs(&m).len(), 29);
    assert_fresh_cookie(&m, &CLIENT);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_max_nocookie_response_large_udp_answers_need_a_valid_cookie() {
    // 20 addresses: header 12 + question 22 + 20 x 16 + OPT 11 = 365 octets.
    let nsid = "n".repeat(100);
    let dns = Dns::start_with(
        &wide_pop(20),
        &format!("max_nocookie_response = 256\nnsid = {nsid:?}"),
    )
    .await;
    // No cookie, or only a client cookie: truncated (the second gets its server cookie).
    let m = udp(&dns, &query_with(&[])).await;
    assert!(m.truncated() && m.answers().is_empty(), "{m:?}");
    let m = udp(&dns, &query_with(&option(10, &CLIENT))).await;
    assert!(m.truncated() && m.answers().is_empty(), "{m:?}");
    let cookie = assert_fresh_cookie(&m, &CLIENT);
    // A valid server cookie proves the source: the whole answer over UDP.
    let m = udp(&dns, &query_with(&option(10, &cookie))).await;
    assert!(!m.truncated(), "{m:?}");
    assert_eq!(addrs(&m).len(), 20);
    // Small answers fit anyway; TCP is never limited.
    let out = dns.dig(&["nope.edgepop.test", "A", "+nocookie"]).await;
    assert!(
        out.contains("status: NXDOMAIN") && !out.contains(" tc"),
        "{out}"
    );
    let m = parse(&dns.raw_tcp(&query_with(&[])).await);
    assert_eq!(addrs(&m).len(), 20);
    // dig with its own cookies retries over TCP after the truncated answer and gets it all.
    assert_eq!(dns.short(&[WWW, "A", "+nocookie"]).await.len(), 20);
    // An answer with no records is never marked truncated, even over the cap (a long name
    // and a 100-byte NSID: nothing to drop, nothing to retry for).
    let long = format!("{}.{}.example.org", "a".repeat(60), "b".repeat(60));
    let out = dns.dig(&[&long, "A", "+nocookie", "+nsid"]).await;
    assert!(
        out.contains("status: REFUSED") && !out.contains(" tc"),
        "{out}"
    );
    assert!(out.contains(&nsid), "{out}");
}

/// The next answer on `sock`.
async fn recv_msg(sock: &tokio::net::UdpSocket, buf: &mut [u8]) -> Message {
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(buf))
        .await
        .expect("an answer")
        .expect("recv");
    parse(&buf[..n])
}

/// `edgepop_dns_rate_limited_total` by action: drop, slip.
async fn rate_limited(dns: &Dns) -> [u64; 2] {
    let (_, metrics) = dns.admin_get("/metrics").await;
    ["drop", "slip"].map(|a| {
        let key = format!("edgepop_dns_rate_limited_total{{action=\"{a}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {metrics}"))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn over_the_rate_limit_udp_answers_are_dropped_or_slip_out_truncated() {
    let dns = Dns::start_with(
        &basic_regions(),
        "rate_limit = { responses = 5, per = \"1m\", slip = 2 }",
    )
    .await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    // 25 queries for the same answer at once: 5 answered, then of the 20 over the limit
    // every second one truncated (TC, no records) and the others dropped.
    for i in 0..25u16 {
        let mut q = query(WWW, hickory_proto::rr::RecordType::A, None);
        q.set_id(i);
        sock.send_to(&q.to_vec().expect("encode"), dns.addr())
            .await
            .expect("send");
    }
    let mut buf = vec![0u8; 2048];
    let (mut full, mut truncated) = (0, 0);
    for _ in 0..15 {
        let m = recv_msg(&sock, &mut buf).await;
        if m.truncated() {
            assert!(m.answers().is_empty() && m.name_servers().is_empty());
            truncated += 1;
        } else {
            assert_eq!(addrs(&m), vec!["192.0.2.3"]);
            full += 1;
        }
    }
    assert_eq!((full, truncated), (5, 10));
    // Nothing more was sent: the next packet on the socket answers a later query (another
    // kind of answer, NXDOMAIN, has an allowance of its own).
    let mut q = query("nope.edgepop.test", hickory_proto::rr::RecordType::A, None);
    q.set_id(999);
    sock.send_to(&q.to_vec().expect("encode"), dns.addr())
        .await
        .expect("send");
    let m = recv_msg(&sock, &mut buf).await;
    assert_eq!((m.id(), m.response_code()), (999, ResponseCode::NXDomain));
    assert_eq!(rate_limited(&dns).await, [10, 10]);
    let (_, map) = dns.admin_get("/map").await;
    let map: serde_json::Value = serde_json::from_str(&map).expect("/map is JSON");
    assert_eq!(
        (&map["rate_limit"]["responses"], &map["rate_limit"]["slip"]),
        (&serde_json::json!(5), &serde_json::json!(2)),
        "{map}"
    );
    // TCP is never limited.
    assert_eq!(dns.short(&[WWW, "A", "+tcp"]).await, vec!["192.0.2.3"]);
    // A source proven by a valid server cookie is not limited: the cookie comes with a
    // question-less query (an allowance of its own), then ten queries bring it back.
    let m = udp(&dns, &cookie_only_query(&option(10, &CLIENT))).await;
    let cookie = assert_fresh_cookie(&m, &CLIENT);
    for _ in 0..10 {
        let m = udp(&dns, &query_with(&option(10, &cookie))).await;
        assert!(!m.truncated());
        assert_eq!(addrs(&m), vec!["192.0.2.3"]);
    }
    // Another /24 has an allowance of its own.
    let other = tokio::net::UdpSocket::bind("127.0.1.1:0")
        .await
        .expect("bind");
    let q = query(WWW, hickory_proto::rr::RecordType::A, None);
    other
        .send_to(&q.to_vec().expect("encode"), dns.addr())
        .await
        .expect("send");
    assert_eq!(addrs(&recv_msg(&other, &mut buf).await), vec!["192.0.2.3"]);
}

/// A map built outside a sidecar from `extra` `[dns]` keys and the basic regions.
fn standalone_map(extra: &str) -> edgepop::dns::map::Map {
    let cfg = edgepop::config::parse(
        std::path::Path::new("t.toml"),
        &config_text(std::path::Path::new("unused.toml"), extra),
    )
    .expect("config")
    .dns
    .expect("[dns]");
    let file = edgepop::config::regions::parse(std::path::Path::new("r.toml"), &basic_regions())
        .expect("regions");
    edgepop::dns::map::standalone(&cfg, file).expect("map")
}

#[test]
fn the_rate_limit_keys_by_name_in_any_case_nxdomain_by_zone_and_errors_together() {
    use edgepop::dns::query::handle_udp;
    use edgepop::dns::rrl::Verdict;
    use hickory_proto::rr::rdata::opt::EdnsOption;
    use hickory_proto::rr::RecordType;
    let map = standalone_map(
        "nsid = \"dns1\"\nrate_limit = { responses = 2, per = \"1m\", slip = 1, exempt = [\"198.51.100.0/24\"] }",
    );
    let src: std::net::IpAddr = "203.0.113.9".parse().expect("ip");
    let mut out = Vec::new();
    let mut ask = |name: &str, nsid: bool, src: std::net::IpAddr| {
        let mut q = query(name, RecordType::A, None);
        if nsid {
            let mut e = hickory_proto::op::Edns::new();
            e.options_mut().insert(EdnsOption::Unknown(3, Vec::new()));
            q.set_edns(e);
        }
        let o = handle_udp(&q.to_vec().expect("encode"), src, &map, &mut out).expect("answered");
        (o.limited, parse(&out))
    };
    // One allowance for www in any case; the slipped answer keeps its question and OPT but
    // no records and no NSID.
    assert_eq!(ask("www.edgepop.test", true, src).0, None);
    let (limited, m) = ask("WWW.EdgePop.TEST", true, src);
    assert_eq!(limited, None);
    assert_eq!(option_of(&m, EdnsCode::NSID), Some(b"dns1".to_vec()));
    let (limited, m) = ask("wWw.edgepop.test", true, src);
    assert_eq!(limited, Some(Verdict::Slip));
    assert!(m.truncated() && m.answers().is_empty() && m.queries().len() == 1);
    assert!(m.extensions().is_some() && option_of(&m, EdnsCode::NSID).is_none());
    // Only the two answers sent are counted for their PoP.
    let hits: u64 = map
        .classes
        .iter()
        .flat_map(|c| &c.hits)
        .map(|h| h.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert_eq!(hits, 2);
    // NXDOMAIN for any name draws on the zone's allowance.
    assert_eq!(ask("a.edgepop.test", false, src).0, None);
    assert_eq!(ask("b.edgepop.test", false, src).0, None);
    let (limited, m) = ask("c.edgepop.test", false, src);
    assert_eq!((limited, m.truncated()), (Some(Verdict::Slip), true));
    // Errors share one allowance, and over it go out unchanged (no records to hold back).
    assert_eq!(ask("example.com", false, src).0, None);
    assert_eq!(ask("example.org", false, src).0, None);
    let (limited, m) = ask("example.net", false, src);
    assert_eq!(limited, Some(Verdict::Slip));
    assert_eq!(
        (m.response_code(), m.truncated()),
        (ResponseCode::Refused, false)
    );
    // An exempt network is never limited.
    let exempt: std::net::IpAddr = "198.51.100.1".parse().expect("ip");
    for _ in 0..5 {
        assert_eq!(ask("www.edgepop.test", false, exempt).0, None);
    }
}

#[test]
fn nxdomain_nodata_and_error_answers_may_have_rates_of_their_own() {
    use edgepop::dns::query::handle_udp;
    use edgepop::dns::rrl::Verdict;
    use hickory_proto::rr::RecordType;
    let map = standalone_map(
        "rate_limit = { responses = 2, per = \"1m\", nxdomains = 1, nodata = 3, errors = 0, slip = 0 }",
    );
    let src: std::net::IpAddr = "203.0.113.9".parse().expect("ip");
    let mut out = Vec::new();
    let mut limited = |name: &str, t: RecordType| {
        let q = query(name, t, None);
        handle_udp(&q.to_vec().expect("encode"), src, &map, &mut out)
            .expect("answered")
            .limited
    };
    let over = |verdicts: Vec<Option<Verdict>>| verdicts.iter().position(Option::is_some);
    let www: Vec<_> = (0..5).map(|_| limited(WWW, RecordType::A)).collect();
    assert_eq!(over(www), Some(2), "responses = 2");
    let nx: Vec<_> = (0..5)
        .map(|i| limited(&format!("n{i}.edgepop.test"), RecordType::A))
        .collect();
    assert_eq!(over(nx), Some(1), "nxdomains = 1");
    let nodata: Vec<_> = (0..5).map(|_| limited(WWW, RecordType::MX)).collect();
    assert_eq!(over(nodata), Some(3), "nodata = 3");
    let errors: Vec<_> = (0..20)
        .map(|_| limited("example.com", RecordType::A))
        .collect();
    assert_eq!(over(errors), None, "errors = 0: not limited");
    assert_eq!(limited(WWW, RecordType::A), Some(Verdict::Drop), "slip = 0");
}
