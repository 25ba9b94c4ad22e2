//! SIGHUP re-reads the configuration file: the `[dns]` settings that need no new socket are
//! applied with the map, atomically; a broken file keeps the running settings and is reported
//! like a broken region file; address changes are named in a warning.

use super::harness::*;
use super::{basic_regions, health_regions};
use hickory_proto::rr::RecordType;
use std::time::Duration;

/// `/map` of a sidecar process as JSON.
async fn map_json(admin: std::net::SocketAddr) -> serde_json::Value {
    let (status, body) = http_get(admin, "/map").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("/map is JSON")
}

/// (line, column) of `needle` in `text`, 1-based.
fn position(text: &str, needle: &str) -> (usize, usize) {
    text.lines()
        .enumerate()
        .find_map(|(i, l)| l.find(needle).map(|c| (i + 1, c + 1)))
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_new_dns_settings_and_a_broken_file_keeps_the_running_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let regions = dir.path().join("regions.toml");
    std::fs::write(&regions, basic_regions()).expect("write");
    let cfg = dir.path().join("edgepop.toml");
    // A long regeneration period: only SIGHUP can change anything.
    let first = config_text(
        &regions,
        "regenerate_every = \"1h\"\nadmin_listen = \"127.0.0.1:0\"",
    );
    std::fs::write(&cfg, &first).expect("write");
    let (child, log) = spawn_dns_binary(&cfg);
    let pid = child.0.id();
    let (port, admin) = dns_addrs(&log);
    let admin = admin.expect("admin address");
    let www =
        || async move { answer_records(&dig_port(port, &["+noall", "+answer", WWW, "A"]).await) };
    let new_name = || async move {
        answer_records(&dig_port(port, &["+noall", "+answer", "new.edgepop.test", "A"]).await)
    };
    assert_eq!(www().await, vec![(60, "192.0.2.3".to_string())]);
    assert_eq!(new_name().await, vec![], "not a name yet");
    let serial = map_json(admin).await["serial"].as_u64().expect("serial");

    // New TTL, a new name and an NSID apply; a new listen address cannot without a restart.
    let second = first
        .replace("ttl = \"60s\"", "ttl = \"5s\"\nnsid = \"dns-b\"")
        .replace("names = [", "names = [\"new.edgepop.test\", ")
        .replace(
            "listen = \"127.0.0.1:0\"\nzone",
            "listen = \"127.0.0.1:1\"\nzone",
        );
    assert!(second.contains("ttl = \"5s\"") && second.contains("127.0.0.1:1\"\nzone"));
    std::fs::write(&cfg, &second).expect("write");
    signal(pid, "HUP");
    eventually(Duration::from_secs(10), "the new ttl is served", || async {
        www().await == vec![(5, "192.0.2.3".to_string())]
    })
    .await;
    assert_eq!(new_name().await, vec![(5, "192.0.2.3".to_string())]);
    let out = dig_port(port, &[WWW, "A", "+nsid"]).await;
    assert!(out.contains("(\"dns-b\")"), "{out}");
    let warning = log_after(&log, "not applied until restart");
    assert!(
        warning.contains("[dns] listen 127.0.0.1:0 -> 127.0.0.1:1"),
        "{warning}"
    );
    let map = map_json(admin).await;
    assert!(
        map["serial"].as_u64().expect("serial") > serial,
        "the serial moves with the answers: {map}"
    );
    assert!(map["last_error"].is_null(), "{map}");

    // A broken file: the error is reported with its place, the running settings stay.
    let broken = second.replace("ttl = \"5s\"", "ttl = \"soon\"");
    let (line, column) = position(&broken, "\"soon\"");
    std::fs::write(&cfg, &broken).expect("write");
    signal(pid, "HUP");
    eventually(Duration::from_secs(10), "the error is reported", || async {
        map_json(admin).await["last_error"]["current"] == true
    })
    .await;
    let map = map_json(admin).await;
    let message = map["last_error"]["message"].as_str().expect("message");
    let place = format!("edgepop.toml:{line}:{column}: invalid value: string \"soon\"");
    assert!(message.contains(&place), "{place} in {message}");
    assert_eq!(map["last_error"]["file"], "config", "{map}");
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains(&format!(
            "edgepop_dns_map_last_error{{error=\"configuration file rejected: {}",
            cfg.display()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgepop_dns_map_errors_total 1"),
        "{metrics}"
    );
    assert_eq!(www().await, vec![(5, "192.0.2.3".to_string())]);
    assert_eq!(new_name().await, vec![(5, "192.0.2.3".to_string())]);

    // Fixed: applied, and the error is history.
    std::fs::write(&cfg, broken.replace("ttl = \"soon\"", "ttl = \"7s\"")).expect("write");
    signal(pid, "HUP");
    eventually(
        Duration::from_secs(10),
        "the fixed file is applied",
        || async { www().await == vec![(7, "192.0.2.3".to_string())] },
    )
    .await;
    assert_eq!(map_json(admin).await["last_error"]["current"], false);
}

/// The health settings reload too: probes of an HTTPS health URL fail against the webpki
/// roots, and succeed once a reload names the CA that signed it.
#[tokio::test(flavor = "multi_thread")]
async fn a_health_ca_given_at_reload_is_used_by_the_running_probes() {
    let (first, second) = (FakeHealth::start_tls().await, FakeHealth::start().await);
    let without_ca = |r: &std::path::Path| {
        config_text(r, "")
            .lines()
            .filter(|l| !l.starts_with("health_ca"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let dns = Dns::start_config(&health_regions(&first, &second), without_ca).await;
    let north = |dns: &Dns| {
        let q = query(WWW, RecordType::A, Some(("198.51.100.0", 24)));
        let addr = dns.addr();
        async move { addrs(&Dns::probe_addr(addr, &q).await) }
    };
    eventually(
        Duration::from_secs(5),
        "the first PoP is down: its certificate is not trusted",
        || async { north(&dns).await == vec!["192.0.2.2"] },
    )
    .await;
    let (_, map) = dns.admin_get("/map").await;
    assert!(map.contains("TLS handshake with 127.0.0.1 failed"), "{map}");

    dns.reload_config(&config_text(&dns.regions, ""));
    eventually(
        Duration::from_secs(5),
        "the first PoP is up with health_ca",
        || async { north(&dns).await == vec!["192.0.2.1"] },
    )
    .await;
    let cfg = dns.sidecar.state().config();
    assert!(cfg.health_ca.is_some(), "{cfg:?}");
}
