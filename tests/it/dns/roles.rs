//! `edgepop dns` reads only its own role's sections: a file without `[pop]` or the edge's
//! sections runs, the edge's missing certificate files do not stop it, and a taken admin port
//! says how to give the sidecar its own.

use super::basic_regions;
use super::harness::*;

fn check(cfg: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_edgepop"))
        .args(["check", "--config"])
        .arg(cfg)
        .output()
        .expect("edgepop check runs")
}

/// Waits for the sidecar's start-up line, then asks it for www.
async fn answers_www(log: &std::sync::mpsc::Receiver<String>) -> Vec<(u32, String)> {
    let (port, _) = dns_addrs(log);
    answer_records(&dig_port(port, &["+noall", "+answer", WWW, "A"]).await)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dns_only_file_without_pop_passes_check_and_the_sidecar_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let regions = dir.path().join("regions.toml");
    std::fs::write(&regions, basic_regions()).expect("write");
    let text = config_text(&regions, "").replacen("[pop]\nname = \"test\"\n", "", 1);
    assert!(!text.contains("[pop]"), "{text}");
    let cfg = dir.path().join("dns.toml");
    std::fs::write(&cfg, &text).expect("write");
    let out = check(&cfg);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("dns 127.0.0.1:0 zone edgepop.test"),
        "{stdout}"
    );
    assert!(!stdout.contains("pop "), "no edge role: {stdout}");

    let (_child, log) = spawn_dns_binary(&cfg);
    // Source 127.0.0.1 is in no region: the default PoP answers.
    assert_eq!(answers_www(&log).await, vec![(60, "192.0.2.3".to_string())]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sidecar_runs_although_the_edges_certificate_and_ticket_files_are_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let regions = dir.path().join("regions.toml");
    std::fs::write(&regions, basic_regions()).expect("write");
    // Both roles in one file, as written for the edge host: on this (DNS) host none of the
    // edge's files exist.
    let edge = "[pop]\nname = \"test\"\nticket_keys = \"/nonexistent/ticket.keys\"\n\n\
        [[listeners]]\naddress = \"127.0.0.1:0\"\n\n\
        [[certificates]]\nnames = [\"localhost\"]\ncert = \"/nonexistent/edge.crt\"\nkey = \"/nonexistent/edge.key\"\n\n\
        [[origins]]\nname = \"o\"\naddress = \"127.0.0.1:1\"\nserver_name = \"localhost\"\nca = \"/nonexistent/ca.crt\"\n\n\
        [[routes]]\nhosts = [\"localhost\"]\norigins = [\"o\"]\n\n";
    let dns = config_text(&regions, "").replacen("[pop]\nname = \"test\"\n", "", 1);
    let cfg = dir.path().join("edgepop.toml");
    std::fs::write(&cfg, format!("{edge}{dns}")).expect("write");

    let (mut child, log) = spawn_dns_binary(&cfg);
    assert_eq!(answers_www(&log).await, vec![(60, "192.0.2.3".to_string())]);

    // `check` validates every role the file has: the first missing file, with its place.
    let out = check(&cfg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("{}:3:15: ", cfg.display())),
        "ticket_keys on line 3: {err}"
    );
    assert!(err.contains("/nonexistent/ticket.keys"), "{err}");
    // The sidecar is unaffected.
    assert!(child.0.try_wait().expect("try_wait").is_none());
}

/// `serve` and `dns` from one file without `[dns] admin_listen`: the second to bind
/// `[admin] listen` fails, and says what to set.
#[tokio::test(flavor = "multi_thread")]
async fn a_taken_admin_port_makes_the_sidecar_say_to_set_dns_admin_listen() {
    let (edge_admin, held, _dir, cfg) = config_beside_edge_admin("");
    let (mut child, log) = spawn_dns_binary(&cfg);
    let err = log_after(&log, "error: ");
    assert!(
        err.contains(&format!("cannot bind admin listener on {held}")),
        "{err}"
    );
    assert!(err.contains("set [dns] admin_listen"), "{err}");
    let status = child.0.wait().expect("wait");
    assert_eq!(status.code(), Some(1), "{err}");
    drop(edge_admin);
}
