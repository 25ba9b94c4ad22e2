//! CPU cost of the DNS query path without sockets (parse, lookup, answer) and of building a
//! 100,000-network map. `cargo bench --bench dns_query`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use edgepop::config::regions::{Pop, Region, RegionFile};
use edgepop::dns::map::standalone;
use edgepop::dns::query::{handle, handle_udp, Transport};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

const CONFIG: &str = "[pop]\nname = \"bench\"\n[dns]\nlisten = \"127.0.0.1:0\"\nzone = \"edgepop.test\"\nnames = [\"www.edgepop.test\"]\nregions = \"unused.toml\"\n";

/// `n` networks (/24s and /48s, every tenth nested in a /16) over 8 regions and 4 PoPs.
pub fn region_file(n: usize) -> RegionFile {
    let pops = (0..4u8)
        .map(|i| Pop {
            name: format!("pop{i}"),
            ipv4: vec![Ipv4Addr::new(192, 0, 2, i + 1)],
            ipv6: vec![Ipv6Addr::new(
                0x2001,
                0xdb8,
                0,
                0,
                0,
                0,
                0,
                u16::from(i) + 1,
            )],
            health: None,
            force: Default::default(),
        })
        .collect();
    let mut regions: Vec<Region> = (0..8)
        .map(|i| Region {
            name: format!("r{i}"),
            networks: Vec::new(),
            pops: vec![i % 4, (i + 1) % 4],
        })
        .collect();
    for k in 0..n {
        let x = (k as u32).wrapping_mul(2_654_435_761);
        let net: ipnet::IpNet = if k % 2 == 0 {
            let len = if k % 20 == 0 { 16 } else { 24 };
            ipnet::Ipv4Net::new(Ipv4Addr::from(x), len)
                .expect("v4")
                .trunc()
                .into()
        } else {
            let a = (0x2001_0db8u128 << 96) | (u128::from(x) << 64);
            ipnet::Ipv6Net::new(Ipv6Addr::from(a), 48)
                .expect("v6")
                .trunc()
                .into()
        };
        regions[k % 8].networks.push(net);
    }
    // Drop duplicates (hash collisions), like validation would reject them.
    let mut seen = std::collections::HashSet::new();
    for r in &mut regions {
        r.networks.retain(|n| seen.insert(*n));
    }
    RegionFile {
        pops,
        regions,
        default: vec![0],
    }
}

/// A query for `name` A; with an OPT holding `options` unless they are `None`.
fn query(name: &str, options: Option<&[u8]>) -> Vec<u8> {
    let ar = u8::from(options.is_some());
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, ar];
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if let Some(o) = options {
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0]);
        q.extend_from_slice(&(o.len() as u16).to_be_bytes());
        q.extend_from_slice(o);
    }
    q
}

const ECS: &[u8] = &[0, 8, 0, 7, 0, 1, 24, 0, 198, 51, 100];
/// A resolver's second query: its client cookie and the server cookie it was given.
const COOKIE: &[u8] = &[
    0, 10, 0, 24, 0x24, 0x64, 0xc4, 0xab, 0xcf, 0x10, 0xc9, 0x57, 1, 0, 0, 0, 0x5c, 0xf7, 0x9f,
    0x11, 0x1f, 0x81, 0x30, 0xc3, 0xee, 0xe2, 0x94, 0x80,
];

fn bench(c: &mut Criterion) {
    let cfg = edgepop::config::parse(Path::new("bench.toml"), CONFIG)
        .expect("config")
        .dns
        .expect("[dns]");
    let map = standalone(&cfg, region_file(100_000)).expect("map");
    let src = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
    let mut out = Vec::with_capacity(4096);
    for (label, q) in [
        ("query_a", query("www.edgepop.test", None)),
        ("query_a_ecs", query("www.edgepop.test", Some(ECS))),
        ("query_a_cookie", query("www.edgepop.test", Some(COOKIE))),
        ("query_nxdomain", query("nope.edgepop.test", None)),
    ] {
        c.bench_function(label, |b| {
            b.iter(|| handle(black_box(&q), src, Transport::Udp, &map, &mut out))
        });
    }
    // With `[dns] rate_limit`: the answer, then the limiter's hash and GCRA update. Sources
    // rotate over 65,536 networks so every answer is within its allowance.
    let limited = edgepop::config::parse(
        Path::new("bench.toml"),
        &format!("{CONFIG}rate_limit = {{ responses = 1000, per = \"1s\", burst = 1000000 }}\n"),
    )
    .expect("config")
    .dns
    .expect("[dns]");
    let limited_map = standalone(&limited, region_file(1_000)).expect("map");
    let q = query("www.edgepop.test", None);
    let mut n = 0u32;
    c.bench_function("query_a_rate_limited", |b| {
        b.iter(|| {
            n = n.wrapping_add(256);
            let src = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (n & 0x00ff_ff00)));
            handle_udp(black_box(&q), src, &limited_map, &mut out)
        })
    });
    let mut g = c.benchmark_group("map");
    g.sample_size(10);
    g.bench_function("build_100k_networks", |b| {
        b.iter(|| standalone(&cfg, region_file(100_000)).expect("map"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
