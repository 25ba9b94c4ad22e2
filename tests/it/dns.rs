//! The DNS sidecar against real clients (`dig`, `kdig`) and hand-made packets: geo answers by
//! source and by ECS, the ECS scope rule, zone semantics, EDNS, truncation and TCP, health
//! failover, regeneration of the map, malformed input, admin endpoints and the binary.

pub mod harness;
mod options;
mod records;
mod reload;
mod roles;
mod wire;

use harness::*;
use hickory_proto::rr::RecordType;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Three PoPs without health URLs (always up), two regions and a default.
pub fn basic_regions() -> String {
    r#"
[[pops]]
name = "north1"
ipv4 = ["192.0.2.1"]
ipv6 = ["2001:db8::1"]

[[pops]]
name = "south1"
ipv4 = ["192.0.2.2", "192.0.2.22"]
ipv6 = ["2001:db8::2"]

[[pops]]
name = "home1"
ipv4 = ["192.0.2.3"]

[[regions]]
name = "north"
networks = ["198.51.100.0/24", "2001:db8:1::/48"]
pops = ["north1", "south1"]

[[regions]]
name = "south"
networks = ["203.0.113.0/24", "2001:db8:2::/48", "10.0.0.0/8"]
pops = ["south1", "north1"]

[[regions]]
name = "nested"
networks = ["10.1.0.0/16"]
pops = ["home1"]

[default]
pops = ["home1"]
"#
    .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_follow_the_region_of_the_ecs_subnet_and_of_the_source() {
    let dns = Dns::start(&basic_regions()).await;
    // 127.0.0.1 is in no region: the default PoP.
    assert_eq!(dns.short(&[WWW, "A"]).await, vec!["192.0.2.3"]);
    assert_eq!(
        dns.short(&[WWW, "A", "+subnet=198.51.100.0/24"]).await,
        vec!["192.0.2.1"]
    );
    assert_eq!(
        dns.short(&[WWW, "A", "+subnet=203.0.113.77/32"]).await,
        vec!["192.0.2.2", "192.0.2.22"]
    );
    assert_eq!(
        dns.short(&[WWW, "AAAA", "+subnet=2001:db8:2:5::/64"]).await,
        vec!["2001:db8::2"]
    );
    assert_eq!(
        dns.short(&[WWW, "AAAA", "+subnet=2001:db8:1::/48"]).await,
        vec!["2001:db8::1"]
    );
    // The default PoP has no IPv6 address: NODATA, not an error.
    let out = dns.dig(&[WWW, "AAAA"]).await;
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "{out}"
    );
    // Case of the question is echoed as sent (0x20 randomisation).
    let out = dns.dig(&["wWw.EdgePop.TEST", "A"]).await;
    assert!(out.contains("wWw.EdgePop.TEST.\t"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_ecs_the_resolver_source_address_picks_the_region() {
    let regions = basic_regions().replace("\"10.0.0.0/8\"]", "\"10.0.0.0/8\", \"127.0.0.0/8\"]");
    let dns = Dns::start(&regions).await;
    assert_eq!(
        dns.short(&[WWW, "A"]).await,
        vec!["192.0.2.2", "192.0.2.22"]
    );
    assert_eq!(
        dns.short(&[WWW, "A", "+tcp"]).await,
        vec!["192.0.2.2", "192.0.2.22"]
    );
    assert_eq!(dns.short(&[WWW, "AAAA"]).await, vec!["2001:db8::2"]);
    let k = dns.kdig(&[WWW, "A"]).await;
    assert!(k.contains("192.0.2.22"), "{k}");
    // ECS, when present, wins over the source address.
    assert_eq!(
        dns.short(&[WWW, "A", "+subnet=198.51.100.0/24"]).await,
        vec!["192.0.2.1"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dig_and_kdig_see_the_ecs_option_echoed_with_its_scope() {
    let dns = Dns::start(&basic_regions()).await;
    let out = dns.dig(&[WWW, "A", "+subnet=198.51.100.0/24"]).await;
    assert!(out.contains("CLIENT-SUBNET: 198.51.100.0/24/24"), "{out}");
    // A /32 inside a /24 region: scope /24 (the whole /24 gets this answer).
    let out = dns.dig(&[WWW, "A", "+subnet=198.51.100.9/32"]).await;
    assert!(out.contains("CLIENT-SUBNET: 198.51.100.9/32/24"), "{out}");
    // 10.1/16 is nested in 10/8 with another answer: 10.2.x gets at most /15.
    let out = dns.dig(&[WWW, "A", "+subnet=10.2.0.0/16"]).await;
    assert!(out.contains("CLIENT-SUBNET: 10.2.0.0/16/15"), "{out}");
    let out = dns.kdig(&[WWW, "A", "+subnet=10.1.2.0/24"]).await;
    assert!(out.contains("192.0.2.3"), "{out}");
    assert!(out.contains("10.1.2.0/24/16"), "{out}");
    // SOURCE 0: the resolver's own address decides, SCOPE 0.
    let out = dns.dig(&[WWW, "A", "+subnet=0.0.0.0/0"]).await;
    assert!(out.contains("CLIENT-SUBNET: 0.0.0.0/0/0"), "{out}");
    assert!(out.contains("192.0.2.3"), "{out}");
    // ECS is echoed on negative answers too, with SCOPE 0.
    let out = dns
        .dig(&["nope.edgepop.test", "A", "+subnet=198.51.100.0/24"])
        .await;
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(out.contains("CLIENT-SUBNET: 198.51.100.0/24/0"), "{out}");
    // No ECS in the query, none in the answer; no EDNS, no OPT.
    let m = dns.ask(&query(WWW, RecordType::A, None)).await;
    assert!(m.extensions().is_none());
    let out = dns.dig(&[WWW, "A"]).await;
    assert!(!out.contains("CLIENT-SUBNET"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_answer_and_an_ipv4_mapped_subnet_carry_the_regions_scope() {
    let dns = Dns::start(&basic_regions()).await;
    // 10.1.0.0/16 ("nested": home1, no IPv6) sits in 10.0.0.0/8 ("south": south1 has
    // IPv6). Its NODATA for AAAA holds for the /16 only: scope 0 would have a resolver
    // cache "no AAAA" for all of its clients, south's included.
    let m = dns
        .ask(&query(WWW, RecordType::AAAA, Some(("10.1.2.0", 24))))
        .await;
    assert_eq!((m.answers().len(), m.name_servers().len()), (0, 1));
    assert_eq!(ecs_of(&m), Some((1, 24, 16, vec![10, 1, 2])));
    let m = dns
        .ask(&query(WWW, RecordType::AAAA, Some(("10.2.0.0", 16))))
        .await;
    assert_eq!(addrs(&m), vec!["2001:db8::2"]);
    // An IPv4 client written as IPv6 is located as IPv4; the scope comes back in IPv6 bits.
    let m = dns
        .ask(&query(WWW, RecordType::A, Some(("::ffff:10.1.2.0", 120))))
        .await;
    assert_eq!(addrs(&m), vec!["192.0.2.3"]);
    let (family, source, scope, _) = ecs_of(&m).expect("ecs");
    assert_eq!((family, source, scope), (2, 120, 96 + 16));
    // Exactly /96 carries no IPv4 bits: located by the packet's source, SCOPE 0.
    let m = dns
        .ask(&query(WWW, RecordType::A, Some(("::ffff:0.0.0.0", 96))))
        .await;
    assert_eq!(addrs(&m), vec!["192.0.2.3"]);
    assert_eq!(ecs_of(&m).map(|(_, s, scope, _)| (s, scope)), Some((96, 0)));
    // dig agrees.
    let out = dns.dig(&[WWW, "AAAA", "+subnet=10.1.2.0/24"]).await;
    assert!(out.contains("CLIENT-SUBNET: 10.1.2.0/24/16"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_apex_has_soa_and_ns_and_negative_answers_carry_the_soa() {
    let dns = Dns::start(&basic_regions()).await;
    let soa = dns.dig(&[ZONE, "SOA"]).await;
    assert!(soa.contains("flags: qr aa rd;"), "AA set, RA clear: {soa}");
    assert!(
        soa.contains("IN\tSOA\tns1.edgepop.test. hostmaster.edgepop.test."),
        "{soa}"
    );
    assert_eq!(
        dns.short(&[ZONE, "NS"]).await,
        vec!["ns1.edgepop.test.", "ns2.edgepop.test."]
    );
    let nx = dns.dig(&["nothing.edgepop.test", "A"]).await;
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(
        nx.contains("AUTHORITY SECTION:") && nx.contains("IN\tSOA"),
        "{nx}"
    );
    assert!(nx.contains("flags: qr aa rd;"), "{nx}");
    // The SOA's owner, MNAME and RNAME point at the apex in the question: header 12 +
    // question 26 + SOA 2 + 10 + (ns1 4 + 2) + (hostmaster 11 + 2) + 20 = 89 octets.
    let small = dns.dig(&["nothing.edgepop.test", "A", "+noedns"]).await;
    assert!(small.contains("MSG SIZE  rcvd: 89"), "{small}");
    let k = dns.kdig(&["NoThing.EDGEPOP.test", "A"]).await;
    assert!(
        k.contains("NXDOMAIN") && k.contains("hostmaster.edgepop.test."),
        "{k}"
    );
    // Below a geo name: NXDOMAIN too.
    let below = dns.dig(&["x.www.edgepop.test", "A"]).await;
    assert!(below.contains("status: NXDOMAIN"), "{below}");
    // An existing name, another type: NODATA with the SOA.
    let nodata = dns.dig(&[WWW, "TXT"]).await;
    assert!(
        nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0"),
        "{nodata}"
    );
    assert!(nodata.contains("IN\tSOA"), "{nodata}");
    // An empty non-terminal (sub.edgepop.test above deep.sub.edgepop.test): NODATA.
    let ent = dns.dig(&["sub.edgepop.test", "A"]).await;
    assert!(
        ent.contains("status: NOERROR") && ent.contains("ANSWER: 0"),
        "{ent}"
    );
    assert_eq!(
        dns.short(&["deep.sub.edgepop.test", "A"]).await,
        vec!["192.0.2.3"]
    );
    // Out of zone, and a zone that merely ends with ours: REFUSED.
    for name in ["example.com", "notedgepop.test", "test"] {
        let out = dns.dig(&[name, "A"]).await;
        assert!(out.contains("status: REFUSED"), "{name}: {out}");
    }
    // The serial is the same in every answer of one map.
    let serial = |s: &str| {
        s.lines()
            .find(|l| l.contains("\tSOA\t"))
            .and_then(|l| l.split_whitespace().nth(6).map(str::to_string))
    };
    assert!(serial(&soa).is_some());
    assert_eq!(serial(&soa), serial(&nx));
}

#[tokio::test(flavor = "multi_thread")]
async fn in_zone_nameservers_have_glue_answered_and_sent_with_ns() {
    let dns = Dns::start_with(
        &basic_regions(),
        "glue = { \"ns1.edgepop.test\" = [\"192.0.2.53\", \"2001:db8::53\"], \"ns2.edgepop.test.\" = [\"192.0.2.54\"] }",
    )
    .await;
    // The nameservers' own names answer with their addresses.
    assert_eq!(
        dns.short(&["ns1.edgepop.test", "A"]).await,
        vec!["192.0.2.53"]
    );
    assert_eq!(
        dns.short(&["NS1.edgepop.test", "AAAA"]).await,
        vec!["2001:db8::53"]
    );
    assert_eq!(
        dns.short(&["ns2.edgepop.test", "A"]).await,
        vec!["192.0.2.54"]
    );
    // ns2 has no IPv6 address, and no name has TXT: NODATA with the SOA.
    for (name, t) in [("ns2.edgepop.test", "AAAA"), ("ns1.edgepop.test", "TXT")] {
        let out = dns.dig(&[name, t]).await;
        assert!(
            out.contains("status: NOERROR") && out.contains("ANSWER: 0") && out.contains("IN\tSOA"),
            "{name} {t}: {out}"
        );
    }
    // NS at the apex carries the glue in the additional section (dig and kdig parse it).
    let ns = dns.dig(&[ZONE, "NS"]).await;
    assert!(
        ns.contains("ANSWER: 2, AUTHORITY: 0, ADDITIONAL: 4"),
        "{ns}"
    );
    let additional = ns
        .split("ADDITIONAL SECTION:")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    for rr in [
        "ns1.edgepop.test.\t60\tIN\tA\t192.0.2.53",
        "ns1.edgepop.test.\t60\tIN\tAAAA\t2001:db8::53",
        "ns2.edgepop.test.\t60\tIN\tA\t192.0.2.54",
    ] {
        assert!(additional.contains(rr), "{rr} in {ns}");
    }
    let k = dns.kdig(&[ZONE, "NS"]).await;
    assert!(
        k.contains("ADDITIONAL SECTION:") && k.contains("192.0.2.54"),
        "{k}"
    );
    // Without EDNS the glue still fits in 512 bytes; over TCP too.
    let plain = dns.dig(&["+noedns", ZONE, "NS"]).await;
    assert!(
        plain.contains("ADDITIONAL: 3") && !plain.contains(" tc"),
        "{plain}"
    );
    let tcp = dns.dig(&["+tcp", ZONE, "NS"]).await;
    assert!(tcp.contains("ADDITIONAL: 4"), "{tcp}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_answers_and_a_truncated_udp_answer_is_retried_over_tcp() {
    // A PoP with 120 addresses: 120 * 16 bytes does not fit in 1232.
    let many: Vec<String> = (1..=120).map(|i| format!("\"192.0.2.{i}\"")).collect();
    let regions = format!(
        "[[pops]]\nname = \"big\"\nipv4 = [{}]\n\n[default]\npops = [\"big\"]\n",
        many.join(", ")
    );
    let dns = Dns::start(&regions).await;
    assert_eq!(dns.short(&[WWW, "A", "+tcp"]).await.len(), 120);
    let udp = dns.dig(&[WWW, "A", "+ignore", "+notcp"]).await;
    assert!(udp.contains(" tc "), "TC set: {udp}");
    assert!(udp.contains("ANSWER: 0"), "{udp}");
    // Without +ignore dig retries over TCP by itself and gets everything.
    let retried = dns.dig(&[WWW, "A"]).await;
    assert!(
        retried.contains("Truncated, retrying in TCP mode"),
        "{retried}"
    );
    assert!(retried.contains("ANSWER: 120"), "{retried}");
    let k = dns.kdig(&[WWW, "A", "+tcp"]).await;
    assert!(k.contains("ANSWER: 120"), "{k}");
    // Without EDNS the limit is 512 bytes.
    let small = dns
        .raw_udp(
            &query(WWW, RecordType::A, None).to_vec().expect("encode"),
            Duration::from_secs(2),
        )
        .await
        .expect("answer");
    assert!(small.len() <= 512 && small[2] & 0x02 != 0, "TC within 512");
    // The same query over a raw TCP connection.
    let tcp = dns
        .raw_tcp(&query(WWW, RecordType::A, None).to_vec().expect("encode"))
        .await;
    let m = hickory_proto::op::Message::from_vec(&tcp).expect("parse");
    assert_eq!(m.answers().len(), 120);
    assert!(!m.truncated());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ecs_scope_never_covers_a_more_specific_network_with_another_answer() {
    // Networks nested five deep with alternating PoPs, plus siblings and IPv6.
    let nets: [(&str, &str); 11] = [
        ("10.0.0.0/8", "a"),
        ("10.128.0.0/9", "b"),
        ("10.160.0.0/11", "a"),
        ("10.160.0.0/16", "b"),
        ("10.160.3.0/24", "a"),
        ("10.160.3.128/25", "b"),
        ("10.160.3.130/31", "a"),
        // Answered like the default, nested inside "a": still carves its hole.
        ("10.160.3.64/26", "d"),
        ("172.16.0.0/12", "b"),
        ("2001:db8::/32", "a"),
        ("2001:db8:ff00::/40", "b"),
    ];
    let mut regions = String::from(
        "[[pops]]\nname = \"pa\"\nipv4 = [\"192.0.2.1\"]\nipv6 = [\"2001:db8::a\"]\n\n[[pops]]\nname = \"pb\"\nipv4 = [\"192.0.2.2\"]\nipv6 = [\"2001:db8::b\"]\n\n[[pops]]\nname = \"pd\"\nipv4 = [\"192.0.2.9\"]\nipv6 = [\"2001:db8::9\"]\n\n",
    );
    for (i, (net, pop)) in nets.iter().enumerate() {
        regions.push_str(&format!(
            "[[regions]]\nname = \"r{i}\"\nnetworks = [\"{net}\"]\npops = [\"p{pop}\"]\n\n"
        ));
    }
    regions.push_str("[default]\npops = [\"pd\"]\n");
    let dns = Dns::start(&regions).await;

    let parsed: Vec<(ipnet::IpNet, &str)> = nets
        .iter()
        .map(|(n, p)| (n.parse().expect("net"), *p))
        .collect();
    let model = |a: std::net::IpAddr| -> &str {
        parsed
            .iter()
            .filter(|(n, _)| n.contains(&a))
            .max_by_key(|(n, _)| n.prefix_len())
            .map_or("d", |(_, p)| *p)
    };
    let pop_of = |addr: &str| match addr {
        "192.0.2.1" | "2001:db8::a" => "a",
        "192.0.2.2" | "2001:db8::b" => "b",
        _ => "d",
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut samples: Vec<std::net::IpAddr> = Vec::new();
    for _ in 0..300 {
        // Mostly inside 10/8 and its neighbours, where the nesting is.
        let a = u32::from_be_bytes([10, 0, 0, 0]) | rng.gen_range(0..1u32 << 24);
        let a = if rng.gen_bool(0.2) {
            a ^ (1 << rng.gen_range(20..32))
        } else {
            a
        };
        samples.push(std::net::Ipv4Addr::from(a).into());
    }
    for s in [
        "10.160.3.130",
        "10.160.3.131",
        "10.160.3.129",
        "10.160.3.132",
        "172.16.0.1",
    ] {
        samples.push(s.parse().expect("addr"));
    }
    for _ in 0..100 {
        let hi = 0x2001_0db8u128 << 96;
        let a = hi | (u128::from(rng.gen::<u64>()) << 32) | u128::from(rng.gen::<u32>());
        samples.push(std::net::Ipv6Addr::from(a).into());
    }
    for addr in samples {
        let (full, rtype) = match addr {
            std::net::IpAddr::V4(_) => (32, RecordType::A),
            std::net::IpAddr::V6(_) => (128, RecordType::AAAA),
        };
        let m = dns
            .ask(&query(WWW, rtype, Some((&addr.to_string(), full))))
            .await;
        let got = addrs(&m);
        assert_eq!(got.len(), 1, "{addr}: {got:?}");
        assert_eq!(pop_of(&got[0]), model(addr), "answer for {addr}");
        let (_, source, scope, _) = ecs_of(&m).expect("ECS echoed");
        assert_eq!(source, full);
        // Every network inside the scope prefix must get the same answer...
        let scope_net = ipnet::IpNet::new(addr, scope).expect("scope").trunc();
        for (n, p) in &parsed {
            if scope_net.contains(&n.network()) && n.prefix_len() >= scope {
                assert_eq!(*p, model(addr), "{addr}: scope /{scope} covers {n} ({p})");
            }
        }
        // ...and so must the edges of the scope prefix.
        assert_eq!(
            model(scope_net.network()),
            model(addr),
            "{addr} /{scope} start"
        );
        assert_eq!(
            model(scope_net.broadcast()),
            model(addr),
            "{addr} /{scope} end"
        );
        // ...and the scope is the shortest: one bit shorter is not uniform.
        if scope > 0 {
            let wider = ipnet::IpNet::new(addr, scope - 1).expect("wider").trunc();
            let uniform = model(wider.network()) == model(addr)
                && model(wider.broadcast()) == model(addr)
                && parsed.iter().all(|(n, p)| {
                    !(wider.contains(&n.network()) && n.prefix_len() >= scope - 1)
                        || *p == model(addr)
                });
            assert!(
                !uniform,
                "{addr}: /{scope} is not the shortest uniform prefix"
            );
        }
    }
}

fn health_regions(first: &FakeHealth, second: &FakeHealth) -> String {
    format!(
        r#"
[[pops]]
name = "first"
ipv4 = ["192.0.2.1"]
health = "{}"

[[pops]]
name = "second"
ipv4 = ["192.0.2.2"]
health = "{}"

[[regions]]
name = "north"
networks = ["198.51.100.0/24"]
pops = ["first", "second"]

[default]
pops = ["second", "first"]
"#,
        first.url(),
        second.url()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pop_answering_503_is_replaced_by_the_next_and_comes_back_when_healthy() {
    // The first PoP's health URL is HTTPS (verified against health_ca), the second's HTTP.
    let (first, second) = (FakeHealth::start_tls().await, FakeHealth::start().await);
    assert!(first.url().starts_with("https://127.0.0.1:"));
    let dns = Dns::start(&health_regions(&first, &second)).await;
    let north = |dns: &Dns| {
        let q = query(WWW, RecordType::A, Some(("198.51.100.0", 24)));
        let dns_addr = dns.addr();
        async move {
            let d = Dns::probe_addr(dns_addr, &q).await;
            addrs(&d)
        }
    };
    assert_eq!(north(&dns).await, vec!["192.0.2.1"]);
    eventually(Duration::from_secs(5), "probes reach the PoP", || async {
        first.hits.load(std::sync::atomic::Ordering::Relaxed) >= 2
    })
    .await;
    first.fail.store(true, std::sync::atomic::Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    eventually(
        Duration::from_secs(5),
        "north fails over to its second PoP",
        || async { north(&dns).await == vec!["192.0.2.2"] },
    )
    .await;
    // health_interval is 50 ms, unhealthy_after 2: a few intervals, not seconds.
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let (_, map) = dns.admin_get("/map").await;
    assert!(map.contains("\"up\": false"), "{map}");
    first
        .fail
        .store(false, std::sync::atomic::Ordering::Relaxed);
    eventually(
        Duration::from_secs(5),
        "north comes back to its first PoP",
        || async { north(&dns).await == vec!["192.0.2.1"] },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pop_forced_down_or_up_in_the_region_file_overrides_its_health_checks() {
    let (first, second) = (FakeHealth::start().await, FakeHealth::start().await);
    let regions = health_regions(&first, &second);
    let forced =
        |how: &str| regions.replacen("health = ", &format!("force = {how:?}\nhealth = "), 1);
    // Started with the PoP down for maintenance: healthy, yet out of the answers from the
    // first query on.
    let dns = Dns::start_with(&forced("down"), "regenerate_every = \"100ms\"").await;
    let north = || dns.short(&[WWW, "A", "+subnet=198.51.100.0/24"]);
    assert_eq!(north().await, vec!["192.0.2.2"]);
    let pop = |map: &serde_json::Value| map["pops"][0].clone();
    let (_, map) = dns.admin_get("/map").await;
    let map: serde_json::Value = serde_json::from_str(&map).expect("/map is JSON");
    assert_eq!(
        (
            &pop(&map)["force"],
            &pop(&map)["up"],
            &pop(&map)["checks_pass"]
        ),
        (
            &serde_json::json!("down"),
            &serde_json::json!(false),
            &serde_json::json!(true)
        ),
        "{map}"
    );
    // Up whatever its checks say (a broken health endpoint): it keeps answering, while the
    // checks go on and see it fail.
    first.fail.store(true, std::sync::atomic::Ordering::Relaxed);
    dns.write_regions(&forced("up"));
    eventually(
        Duration::from_secs(5),
        "checks fail under the override",
        || async {
            let (_, map) = dns.admin_get("/map").await;
            let map: serde_json::Value = serde_json::from_str(&map).expect("/map is JSON");
            pop(&map)["checks_pass"] == serde_json::json!(false)
                && pop(&map)["force"] == serde_json::json!("up")
        },
    )
    .await;
    assert_eq!(north().await, vec!["192.0.2.1"]);
    let (_, metrics) = dns.admin_get("/metrics").await;
    assert!(
        metrics.contains("edgepop_dns_pop_up{pop=\"first\"} 1"),
        "{metrics}"
    );
    // Without the override the checks decide again, at once: they never stopped.
    dns.write_regions(&regions);
    eventually(
        Duration::from_secs(5),
        "north follows the checks",
        || async { north().await == vec!["192.0.2.2"] },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_region_whose_pops_are_forced_down_or_failing_answers_with_the_best_left() {
    let (first, second) = (FakeHealth::start().await, FakeHealth::start().await);
    // north has only "first", forced down; the default prefers "first", then "second",
    // whose checks fail.
    let regions = health_regions(&first, &second)
        .replacen("health = ", "force = \"down\"\nhealth = ", 1)
        .replace("pops = [\"first\", \"second\"]", "pops = [\"first\"]")
        .replace(
            "pops = [\"second\", \"first\"]",
            "pops = [\"first\", \"second\"]",
        );
    second
        .fail
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let dns = Dns::start(&regions).await;
    eventually(
        Duration::from_secs(5),
        "second fails its checks",
        || async {
            let (_, metrics) = dns.admin_get("/metrics").await;
            metrics.contains("edgepop_dns_pop_checks_pass{pop=\"second\"} 0")
        },
    )
    .await;
    // Every PoP of north forced down: there must be an answer, its first.
    assert_eq!(
        dns.short(&[WWW, "A", "+subnet=198.51.100.0/24"]).await,
        vec!["192.0.2.1"]
    );
    // No PoP of the default passes: the first not forced down answers, not the first.
    assert_eq!(dns.short(&[WWW, "A"]).await, vec!["192.0.2.2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_pop_of_a_region_is_down_its_first_pop_answers() {
    let (first, second) = (FakeHealth::start().await, FakeHealth::start().await);
    first.fail.store(true, std::sync::atomic::Ordering::Relaxed);
    second
        .fail
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let dns = Dns::start(&health_regions(&first, &second)).await;
    eventually(Duration::from_secs(5), "both PoPs marked down", || async {
        let (code, _) = dns.admin_get("/healthz").await;
        code == 503
    })
    .await;
    assert_eq!(
        dns.short(&[WWW, "A", "+subnet=198.51.100.0/24"]).await,
        vec!["192.0.2.1"]
    );
    assert_eq!(dns.short(&[WWW, "A"]).await, vec!["192.0.2.2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edited_region_file_is_picked_up_and_a_broken_one_keeps_the_old_map() {
    let dns = Dns::start_with(&basic_regions(), "regenerate_every = \"100ms\"").await;
    let serial = |dns: &Dns| dns.sidecar.state().map().serial;
    let first_serial = serial(&dns);
    assert_eq!(
        dns.short(&[WWW, "A", "+subnet=198.51.100.0/24"]).await,
        vec!["192.0.2.1"]
    );
    // Move 198.51.100.0/24 from north to south.
    let moved = basic_regions()
        .replace("networks = [\"198.51.100.0/24\", ", "networks = [")
        .replace(
            "\"203.0.113.0/24\",",
            "\"203.0.113.0/24\", \"198.51.100.0/24\",",
        );
    dns.write_regions(&moved);
    eventually(
        Duration::from_secs(5),
        "the moved network answers south",
        || async {
            dns.short(&[WWW, "A", "+subnet=198.51.100.0/24"]).await
                == vec!["192.0.2.2", "192.0.2.22"]
        },
    )
    .await;
    assert!(serial(&dns) > first_serial, "serial moves with the map");
    let good_serial = serial(&dns);
    // A broken edit: an unknown PoP on line 3.
    dns.write_regions("[[regions]]\nname = \"x\"\npops = [\"ghost\"]\nnetworks = []\n[default]\npops = [\"ghost\"]\n");
    let msg = dns.load_error().await;
    assert!(msg.contains("regions.toml:3:"), "file:line in {msg}");
    assert!(msg.contains("ghost"), "{msg}");
    let (_, metrics) = dns.admin_get("/metrics").await;
    assert!(metrics.contains("edgepop_dns_map_last_error{"), "{metrics}");
    assert!(metrics.contains("regions.toml:3:"), "{metrics}");
    // The old map is still served, with its serial.
    assert_eq!(
        dns.short(&[WWW, "A", "+subnet=198.51.100.0/24"]).await,
        vec!["192.0.2.2", "192.0.2.22"]
    );
    assert_eq!(serial(&dns), good_serial);
    // Fixing the file clears the error state.
    dns.write_regions(&basic_regions());
    eventually(
        Duration::from_secs(5),
        "the fixed file is served",
        || async { dns.short(&[WWW, "A", "+subnet=198.51.100.0/24"]).await == vec!["192.0.2.1"] },
    )
    .await;
    assert!(!dns.sidecar.state().regen_status().1.expect("kept").current);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_listener_serves_healthz_map_and_metrics() {
    let dns = Dns::start(&basic_regions()).await;
    dns.short(&[WWW, "A", "+subnet=198.51.100.0/24"]).await;
    dns.short(&["nope.edgepop.test", "A"]).await;
    let (code, body) = dns.admin_get("/healthz").await;
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, map) = dns.admin_get("/map").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&map).expect("json");
    assert_eq!(v["generation"], 1);
    let north = v["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .find(|r| r["name"] == "north")
        .expect("north");
    assert_eq!(north["chosen"], "north1");
    let (code, m) = dns.admin_get("/metrics").await;
    assert_eq!(code, 200);
    for needle in [
        "edgepop_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\"}",
        "edgepop_dns_queries_total{qtype=\"A\",rcode=\"NXDOMAIN\"} 1",
        "edgepop_dns_answers_total{region=\"north\",pop=\"north1\"} 1",
        "edgepop_dns_map_age_seconds",
        "edgepop_dns_map_generation 1",
        "edgepop_dns_map_errors_total 0",
        "edgepop_dns_pop_up{pop=\"north1\"} 1",
    ] {
        assert!(m.contains(needle), "{needle} in {m}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_serves_reloads_on_sighup_and_check_reports_a_broken_region_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let regions = dir.path().join("regions.toml");
    std::fs::write(&regions, basic_regions()).expect("write");
    let cfg = dir.path().join("edgepop.toml");
    // A long regeneration period: only SIGHUP can make the edit visible.
    std::fs::write(&cfg, config_text(&regions, "regenerate_every = \"1h\"")).expect("write");
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_edgepop"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("check");
    assert!(check.status.success(), "{check:?}");

    let (mut child, log) = spawn_dns_binary(&cfg);
    let port = log_after(&log, "dns listening on 127.0.0.1:")
        .split_whitespace()
        .next()
        .expect("port")
        .to_string();
    let dig = |extra: &'static str| {
        let port = port.clone();
        async move {
            let out = run(
                "dig",
                &[
                    "@127.0.0.1",
                    "-p",
                    &port,
                    "+short",
                    "+time=2",
                    "+tries=1",
                    WWW,
                    "A",
                    extra,
                ],
            )
            .await;
            out.trim().to_string()
        }
    };
    assert_eq!(dig("+subnet=198.51.100.0/24").await, "192.0.2.1");
    std::fs::write(
        &regions,
        basic_regions().replace("192.0.2.1\"", "192.0.2.111\""),
    )
    .expect("edit");
    let pid = child.0.id().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(kill.success());
    eventually(
        Duration::from_secs(10),
        "SIGHUP reloads the map",
        || async { dig("+subnet=198.51.100.0/24").await == "192.0.2.111" },
    )
    .await;

    std::fs::write(&regions, "[[pops]]\nname = \"a\"\nipv4 = [\"not-an-ip\"]\n").expect("break");
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_edgepop"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("check");
    assert!(!check.status.success());
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(err.contains("regions.toml:3:"), "{err}");
    assert!(err.contains("not an IPv4 address"), "{err}");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(term.success());
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "SIGTERM exits cleanly: {status:?}");
}

/// `serve` and `dns` from one file: the edge holds `[admin] listen`, the sidecar takes
/// `[dns] admin_listen` instead of failing to bind the same port.
#[tokio::test(flavor = "multi_thread")]
async fn the_sidecar_uses_its_own_admin_address_beside_the_edges() {
    let (edge_admin, held, _dir, cfg) = config_beside_edge_admin("admin_listen = \"127.0.0.1:0\"");
    let (_child, log) = spawn_dns_binary(&cfg);
    let admin: std::net::SocketAddr = log_after(&log, "admin=Some(")
        .split(')')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("admin address");
    assert_ne!(admin, held);
    let (status, map) = http_get(admin, "/map").await;
    assert_eq!(status, 200, "{map}");
    assert!(map.contains("\"regions\""), "{map}");
    drop(edge_admin);
}

/// How many UDP sockets of this process are bound to `port` on 127.0.0.1 (from
/// /proc/net/udp, matched by inode against /proc/self/fd). Only ours: another program's
/// client socket that binds port 0 with SO_REUSEPORT may land in the same port's group.
fn udp_sockets_on(port: u16) -> usize {
    let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp")
        .expect("/proc/net/udp")
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.get(1) == Some(&want.as_str()) && f.get(9).is_some_and(|i| ours.contains(*i)))
        .count()
}

/// Whether this kernel lets a process set up io_uring as the UDP workers do.
fn io_uring_allowed() -> bool {
    let ring: std::io::Result<io_uring::IoUring> = io_uring::IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8);
    ring.is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn udp_io_io_uring_is_used_where_the_kernel_allows_it_and_refused_at_start_elsewhere() {
    let started =
        Dns::try_start_with(&basic_regions(), "udp_workers = 2\nudp_io = \"io_uring\"").await;
    match (io_uring_allowed(), started) {
        (true, Ok(dns)) => {
            let (_, metrics) = dns.admin_get("/metrics").await;
            assert!(
                metrics.contains("edgepop_dns_udp_workers{io=\"io_uring\"} 2\n"),
                "{metrics}"
            );
            assert_eq!(dns.short(&[WWW, "A"]).await, ["192.0.2.3"]);
        }
        (false, Err(e)) => assert!(
            e.contains("[dns] udp_io = \"io_uring\", but the kernel refuses io_uring"),
            "{e}"
        ),
        (allowed, Ok(_)) => panic!("started with io_uring allowed = {allowed}"),
        (allowed, Err(e)) => panic!("io_uring allowed = {allowed}, yet: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_udp_worker_has_its_own_reuseport_socket_and_all_stop() {
    // Both kinds of UDP I/O: "auto" (io_uring where the kernel allows it) and recvmmsg.
    let auto = if io_uring_allowed() {
        "io_uring"
    } else {
        "recvmmsg"
    };
    for (setting, io) in [("auto", auto), ("recvmmsg", "recvmmsg")] {
        let extra = format!("udp_workers = 3\nudp_io = \"{setting}\"");
        let dns = Dns::start_with(&basic_regions(), &extra).await;
        let addr = dns.addr();
        // /proc/net/udp is read in pages while other tests open and close sockets, so one
        // reading can miss or repeat a line: look until a reading is exact.
        eventually(Duration::from_secs(5), "one socket per worker", || async {
            udp_sockets_on(addr.port()) == 3
        })
        .await;
        let (_, metrics) = dns.admin_get("/metrics").await;
        let other = if io == "io_uring" {
            "recvmmsg"
        } else {
            "io_uring"
        };
        for (kind, n) in [(io, 3), (other, 0)] {
            let line = format!("edgepop_dns_udp_workers{{io=\"{kind}\"}} {n}\n");
            assert!(metrics.contains(&line), "{io}: {line} in {metrics}");
        }
        // The kernel spreads clients over the sockets by address hash: queries from 48 source
        // ports land on all of them (with 3 sockets, all 48 on one has odds of 3^-47), and each
        // gets its answer.
        for i in 0..48u16 {
            let mut q = query(WWW, RecordType::A, None);
            q.set_id(i);
            let m = dns.ask(&q).await;
            assert_eq!((m.id(), m.answers().len()), (i, 1), "{io}");
        }
        // Many at once from one port: more than the 128 receive buffers an io_uring worker
        // lends the kernel, all answered.
        let s = burst_client();
        send_burst(&s, addr, 200).await;
        assert_eq!(answered(&s, 200, io).await, 200, "{io}");
        drop(dns);
        // Stopping wakes every worker and closes every socket.
        eventually(
            Duration::from_secs(5),
            "no socket left after stop",
            || async { udp_sockets_on(addr.port()) == 0 },
        )
        .await;
    }
}

/// A UDP client for bursts: its answers wait in its receive buffer until read, so it asks for
/// 1 MiB (the kernel caps it at `net.core.rmem_max`, twice 208 KiB by default, room for about
/// 500 answers of about 800 bytes of buffer each).
fn burst_client() -> tokio::net::UdpSocket {
    let client =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    let _ = client.set_recv_buffer_size(1 << 20);
    client
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .expect("addr")
                .into(),
        )
        .expect("bind");
    client.set_nonblocking(true).expect("nonblocking");
    tokio::net::UdpSocket::from_std(client.into()).expect("tokio socket")
}

/// Sends `n` queries for WWW (IDs 0..n) to `to` without waiting for answers.
async fn send_burst(s: &tokio::net::UdpSocket, to: std::net::SocketAddr, n: u16) {
    for i in 0..n {
        let mut q = query(WWW, RecordType::A, None);
        q.set_id(i);
        s.send_to(&q.to_vec().expect("encode"), to)
            .await
            .expect("send");
    }
}

/// How many of the `n` queries got an answer with one record (no more than 5 s between two).
async fn answered(s: &tokio::net::UdpSocket, n: usize, what: &str) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; 2048];
    while seen.len() < n {
        let Ok(got) = tokio::time::timeout(Duration::from_secs(5), s.recv_from(&mut buf)).await
        else {
            break;
        };
        let (len, _) = got.expect("recv");
        let m = hickory_proto::op::Message::from_vec(&buf[..len]).expect("parse");
        assert_eq!(m.answers().len(), 1, "{what}");
        seen.insert(m.id());
    }
    seen.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_that_queue_while_the_worker_is_stopped_are_all_answered() {
    // More queries than an io_uring worker lends the kernel buffers (128) wait in the socket
    // while the process is stopped; once it runs again, every one is answered, however the
    // receive meets them (a run of completions, or out of buffers and armed again).
    // io_uring also with a coalescing wait, which ends early once 32 completions are in.
    for (io, coalesce) in [("auto", "0s"), ("auto", "1ms"), ("recvmmsg", "0s")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let regions = dir.path().join("regions.toml");
        std::fs::write(&regions, basic_regions()).expect("write");
        let cfg = dir.path().join("edgepop.toml");
        let extra = format!("udp_workers = 1\nudp_io = \"{io}\"\nudp_coalesce = \"{coalesce}\"");
        std::fs::write(&cfg, config_text(&regions, &extra)).expect("write");
        let (child, log) = spawn_dns_binary(&cfg);
        // The start-up line says which I/O the workers use.
        let started = log_after(&log, "dns listening on 127.0.0.1:");
        let uses = match io {
            "auto" if io_uring_allowed() => "udp_io=io_uring",
            _ => "udp_io=recvmmsg",
        };
        assert!(started.contains(uses), "{io}: {started}");
        let port: u16 = started
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        assert_eq!(
            dig_port(port, &["+short", WWW, "A"]).await.trim(),
            "192.0.2.3"
        );
        let s = burst_client();
        signal(child.0.id(), "STOP");
        // Stopped for certain before the queries go: every thread in state T.
        let tasks = format!("/proc/{}/task", child.0.id());
        eventually(Duration::from_secs(5), "the process stopped", || async {
            std::fs::read_dir(&tasks).expect("tasks").all(|t| {
                let stat = std::fs::read_to_string(t.expect("task").path().join("stat"))
                    .unwrap_or_default();
                // "pid (comm) S ...": the state follows the command's closing parenthesis.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T'))
            })
        })
        .await;
        send_burst(&s, addr, 300).await;
        signal(child.0.id(), "CONT");
        assert_eq!(answered(&s, 300, io).await, 300, "{io}");
    }
}

/// Whether this kernel's io_uring can wait for a batch with a bounded delay (Linux 6.12),
/// as `[dns] udp_coalesce` needs.
fn io_uring_min_timeout() -> bool {
    let ring: std::io::Result<io_uring::IoUring> = io_uring::IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8);
    ring.is_ok_and(|r| r.params().is_feature_min_timeout())
}

/// Sends `n` queries for WWW to `to` from a fresh socket, `gap` apart whatever the answers
/// (as independent resolvers do), while another thread reads the answers; how many came.
/// Blocking: for a blocking-pool thread.
#[allow(clippy::disallowed_methods)] // sleeps below tokio's timer resolution, on its own thread
fn stream_queries(to: std::net::SocketAddr, n: u16, gap: Duration) -> usize {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    let _ = s.set_recv_buffer_size(4 << 20);
    let local: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    s.bind(&local.into()).expect("bind");
    let s: std::net::UdpSocket = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let reader = s.try_clone().expect("clone");
    // Counted, not parsed: the sidecar answers each query once, and a debug build's parse
    // would fall behind 20k answers a second.
    let answers = std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        let mut got = 0;
        while got < usize::from(n) && reader.recv(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    // Paced against deadlines, so a stalled sender catches up rather than slowing the rate.
    let start = std::time::Instant::now();
    for id in 0..n {
        let mut q = query(WWW, RecordType::A, None);
        q.set_id(id);
        s.send_to(&q.to_vec().expect("encode"), to).expect("send");
        let next = start + gap * (u32::from(id) + 1);
        std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
    }
    answers.join().expect("reader")
}

/// Datagrams per UDP batch for a stream of 6,000 queries 50 µs apart (20k a second at most).
async fn datagrams_per_batch(dns: &Dns) -> f64 {
    let counts = |m: &str| {
        (
            metric(m, "edgepop_dns_udp_datagrams_total"),
            metric(m, "edgepop_dns_udp_batches_total"),
        )
    };
    let (d0, b0) = counts(&dns.admin_get("/metrics").await.1);
    let to = dns.addr();
    let gap = Duration::from_micros(50);
    let got = tokio::task::spawn_blocking(move || stream_queries(to, 6000, gap));
    assert_eq!(got.await.expect("join"), 6000);
    let (d1, b1) = counts(&dns.admin_get("/metrics").await.1);
    assert_eq!(d1 - d0, 6000);
    (d1 - d0) as f64 / (b1 - b0) as f64
}

#[tokio::test(flavor = "multi_thread")]
async fn udp_coalesce_batches_a_steady_stream_and_applies_on_reload() {
    // "auto": where the kernel refuses io_uring, the worker answers on recvmmsg at once.
    let extra = "udp_workers = 1\nudp_io = \"auto\"\nudp_coalesce = \"1ms\"";
    let dns = Dns::start_with(&basic_regions(), extra).await;
    assert_eq!(dns.sidecar.state().udp_coalesce_us(), 1000);
    let (_, metrics) = dns.admin_get("/metrics").await;
    let on_uring = metrics.contains("edgepop_dns_udp_workers{io=\"io_uring\"} 1\n");
    // Every datagram is counted once, in some batch.
    let s = burst_client();
    send_burst(&s, dns.addr(), 200).await;
    assert_eq!(answered(&s, 200, "burst").await, 200);
    let metrics = dns.admin_get("/metrics").await.1;
    assert_eq!(metric(&metrics, "edgepop_dns_udp_datagrams_total"), 200);
    // Queries 50-100 µs apart (the sleeps overshoot) wake a worker that answers at once
    // about once each (it wakes in tens of µs); waiting for 1 ms windows it takes about 10 a
    // wake-up, except in the periods it measures the rate without waiting (the first, then
    // one in eight): about 4 over the stream. A stalled sender slows the rate, and that
    // turns waiting off for a while: the best of three streams counts.
    let mut coalesced = 0.0f64;
    for _ in 0..3 {
        coalesced = coalesced.max(datagrams_per_batch(&dns).await);
        if coalesced >= 3.0 {
            break;
        }
    }
    // Applied by a reload, without a restart.
    let text = config_text(&dns.regions, "udp_workers = 1\nudp_coalesce = \"0s\"");
    dns.reload_config(&text);
    eventually(
        Duration::from_secs(5),
        "udp_coalesce 0 in service",
        || async { dns.sidecar.state().udp_coalesce_us() == 0 },
    )
    .await;
    let at_once = datagrams_per_batch(&dns).await;
    // Unloaded, about 3 against 1.0; on a loaded machine a lagging worker batches on its own
    // (2.3-2.9 answering at once, 4-9 waiting), so the margin asked for is small.
    if on_uring && io_uring_min_timeout() {
        assert!(
            coalesced >= 1.25 * at_once && coalesced >= 2.0,
            "datagrams per batch: {coalesced:.1} waiting, {at_once:.1} at once"
        );
    }
}

/// The value of an unlabelled metric in a /metrics text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {text}"))
}

/// One query over UDP from a fresh socket (a new source port, so the kernel's address hash
/// spreads them over the workers) to `to`; the answer's id and the address it came from.
async fn ask_from_fresh_port(to: std::net::SocketAddr, id: u16) -> (u16, std::net::SocketAddr) {
    let local = if to.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    };
    let s = tokio::net::UdpSocket::bind(local).await.expect("bind");
    let mut q = query(WWW, RecordType::A, None);
    q.set_id(id);
    s.send_to(&q.to_vec().expect("encode"), to)
        .await
        .expect("send");
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no answer to a query sent to {to}"))
        .expect("recv");
    let m = hickory_proto::op::Message::from_vec(&buf[..n]).expect("parse");
    (m.id(), from)
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_wildcard_address_each_answer_comes_from_the_address_asked() {
    // A host's other addresses are 127.0.0.2 and up here (all of 127/8 is local): without
    // the query's destination as the source, the kernel answers from 127.0.0.1 and dig,
    // like any resolver, drops the answer. `[::]` takes IPv4 clients too (mapped).
    for (listen, io) in [
        ("0.0.0.0:0", "auto"),
        ("[::]:0", "auto"),
        ("0.0.0.0:0", "recvmmsg"),
        ("[::]:0", "recvmmsg"),
    ] {
        let extra = format!("udp_workers = 2\nudp_io = \"{}\"", io);
        let dns = Dns::start_config(&basic_regions(), |r| {
            config_text(r, &extra).replace(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"{listen}\""),
            )
        })
        .await;
        let port = dns.port();
        let out = run(
            "dig",
            &["@127.0.0.2", "-p", &port, "+time=2", "+tries=1", WWW, "A"],
        )
        .await;
        assert!(
            out.contains("status: NOERROR")
                && out.contains("192.0.2.3")
                && !out.contains("unexpected source"),
            "{listen} {io}: {out}"
        );
        let mut targets: Vec<std::net::SocketAddr> = (2..7)
            .map(|i| format!("127.0.0.{i}:{port}").parse().expect("addr"))
            .collect();
        if listen.starts_with('[') {
            targets.push(format!("[::1]:{port}").parse().expect("addr"));
        }
        for i in 0..40u16 {
            let to = targets[usize::from(i) % targets.len()];
            assert_eq!(ask_from_fresh_port(to, i).await, (i, to), "{listen} {io}");
        }
        // TCP answers on the connection's own address.
        let out = run(
            "dig",
            &[
                "@127.0.0.3",
                "-p",
                &port,
                "+time=2",
                "+tries=1",
                "+tcp",
                "+short",
                WWW,
                "A",
            ],
        )
        .await;
        assert_eq!(out.trim(), "192.0.2.3", "{listen} {io}");
    }
}

/// A TCP connection to the sidecar from `source` (a loopback address of the test's choice).
async fn tcp_from(source: &str, to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(format!("{source}:0").parse().expect("addr"))
        .expect("bind");
    s.connect(to).await.expect("connect")
}

/// Sends one framed query for WWW/A; the answer's id, or None when the server closed.
async fn tcp_ask(s: &mut tokio::net::TcpStream, id: u16) -> Option<u16> {
    let mut q = query(WWW, RecordType::A, None);
    q.set_id(id);
    tcp_exchange(s, &q).await.map(|m| m.id())
}

/// The edns-tcp-keepalive TIMEOUT (RFC 7828, 100 ms units) of an answer over TCP.
async fn tcp_keepalive(s: &mut tokio::net::TcpStream) -> Option<u16> {
    use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
    let mut q = query(WWW, RecordType::A, None);
    let mut e = hickory_proto::op::Edns::new();
    e.options_mut().insert(EdnsOption::Unknown(11, Vec::new()));
    q.set_edns(e);
    let m = tcp_exchange(s, &q).await?;
    match m.extensions().as_ref()?.option(EdnsCode::from(11))? {
        EdnsOption::Unknown(11, v) if v.len() == 2 => Some(u16::from_be_bytes([v[0], v[1]])),
        _ => None,
    }
}

/// One framed query over `s` and its answer, or None when the server closed.
async fn tcp_exchange(
    s: &mut tokio::net::TcpStream,
    q: &hickory_proto::op::Message,
) -> Option<hickory_proto::op::Message> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bytes = q.to_vec().expect("encode");
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed).await.ok()?;
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len))
        .await
        .expect("an answer or a close")
        .ok()?;
    let mut out = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut out).await.ok()?;
    Some(hickory_proto::op::Message::from_vec(&out).expect("parse"))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_client_cannot_hold_the_tcp_slots_and_busy_slots_shorten_the_idle_wait() {
    use tokio::io::AsyncReadExt;
    let dns = Dns::start(&basic_regions()).await;
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], dns.addr().port()));
    // 32 connections per client; the 33rd is closed unanswered, and counted.
    let mut held = Vec::new();
    for i in 0..32u16 {
        let mut s = tcp_from("127.0.0.3", to).await;
        assert_eq!(tcp_ask(&mut s, i).await, Some(i), "connection {i}");
        held.push(s);
    }
    let mut over = tcp_from("127.0.0.3", to).await;
    assert_eq!(tcp_ask(&mut over, 99).await, None, "the 33rd is refused");
    // Another client is served meanwhile.
    let mut other = tcp_from("127.0.0.4", to).await;
    assert_eq!(tcp_ask(&mut other, 7).await, Some(7));
    assert_eq!(
        tcp_keepalive(&mut other).await,
        Some(100),
        "10 s advertised"
    );
    let (_, metrics) = dns.admin_get("/metrics").await;
    assert!(
        metrics.contains("edgepop_dns_tcp_refused_total 1\n"),
        "{metrics}"
    );
    // More than half of the 1,024 slots taken (by many clients): a connection's wait for
    // its next query drops from 10 s to 1 s.
    // Opened all at once, so none reaches its 10 s idle timeout before the last is open.
    let opening = (10..27).flat_map(|c| {
        (0..31u16).map(move |i| async move {
            let mut s = tcp_from(&format!("127.0.0.{c}"), to).await;
            assert_eq!(tcp_ask(&mut s, i).await, Some(i));
            s
        })
    });
    held.extend(futures_util::future::join_all(opening).await);
    let mut idle = tcp_from("127.0.0.5", to).await;
    assert_eq!(tcp_ask(&mut idle, 5).await, Some(5));
    assert_eq!(
        tcp_keepalive(&mut idle).await,
        Some(10),
        "1 s advertised under load"
    );
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut byte))
        .await
        .expect("closed well before the 10 s idle timeout");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn pops_are_checked_over_https_on_the_edges_admin_port_as_in_design() {
    use crate::support;
    // Edge "up" reaches its origin; edge "down" has none (its /healthz is 503).
    let origin = support::origin().start().await.unwrap();
    let up = support::single_origin_edge(origin.addr(), "warm_connections = 1").await;
    let (_refusing, dead) = support::refusing_addr();
    let down =
        support::single_origin_edge(dead, "warm_connections = 1\nconnect_timeout = \"200ms\"")
            .await;
    let regions = format!(
        r#"
[[pops]]
name = "down"
ipv4 = ["192.0.2.1"]
health = "https://127.0.0.1:{}/healthz"

[[pops]]
name = "up"
ipv4 = ["192.0.2.2"]
health = "https://127.0.0.1:{}/healthz"

[[regions]]
name = "north"
networks = ["198.51.100.0/24"]
pops = ["down", "up"]

[default]
pops = ["up", "down"]
"#,
        down.admin.port(),
        up.admin.port()
    );
    let dns = Dns::start(&regions).await;
    eventually(
        Duration::from_secs(10),
        "the PoP without an origin is marked down",
        || async {
            let (_, map) = dns.admin_get("/map").await;
            let map: serde_json::Value = serde_json::from_str(&map).unwrap();
            let pops = map["pops"].as_array().cloned().unwrap_or_default();
            let pop = |name: &str| {
                pops.iter()
                    .find(|p| p["name"] == name)
                    .cloned()
                    .unwrap_or_default()
            };
            let (down, up) = (pop("down"), pop("up"));
            // "up" answered over TLS (probes, no error); "down" answered too, with a 503.
            down["up"] == false
                && down["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("503"))
                && up["up"] == true
                && up["probes"].as_u64().is_some_and(|n| n >= 2)
                && up["last_error"].is_null()
        },
    )
    .await;
    assert_eq!(
        dns.short(&[WWW, "A", "+subnet=198.51.100.0/24"]).await,
        vec!["192.0.2.2"]
    );
}
