//! `[dns] zone_file`: static records beside the geo answers, against `dig` and `kdig`;
//! edits picked up at the next rebuild, a broken file keeping the map in service, and
//! `edgepop check` naming file:line.

use super::basic_regions;
use super::harness::*;
use std::time::Duration;

const ZONE_FILE: &str = r#"; the domain's other records
@        MX    10 mail
@        TXT   "v=spf1 mx -all"
@        CAA   0 issue "letsencrypt.org"
mail     A     192.0.2.25
cdn      CNAME www
www      TXT   "geo-steered"
deep.sub TXT   "below an empty non-terminal"
"#;

/// A sidecar whose zone file is `zone` (written beside the region file), rebuilt every 100 ms.
async fn with_zone_file(zone: &str) -> (Dns, std::path::PathBuf) {
    with_zone_files(zone, &[]).await
}

/// [`with_zone_file`], with `others` (path relative to the zone file, text) written too.
async fn with_zone_files(zone: &str, others: &[(&str, &str)]) -> (Dns, std::path::PathBuf) {
    let zone = zone.to_string();
    let others: Vec<(String, String)> = others
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect();
    let dns = Dns::start_config(&basic_regions(), move |regions| {
        let path = regions.with_file_name("zone.db");
        std::fs::write(&path, &zone).expect("write zone file");
        for (name, text) in &others {
            let other = regions.with_file_name(name);
            std::fs::create_dir_all(other.parent().expect("dir")).expect("mkdir");
            std::fs::write(other, text).expect("write included file");
        }
        config_text(
            regions,
            &format!(
                "zone_file = {:?}\nregenerate_every = \"100ms\"",
                path.display().to_string()
            ),
        )
    })
    .await;
    let path = dns.dir.path().join("zone.db");
    (dns, path)
}

/// Replaces a file by rename, so a rebuild never reads half of it.
fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread")]
async fn static_records_are_served_beside_the_geo_answers() {
    let (dns, _) = with_zone_file(ZONE_FILE).await;
    let out = dns.dig(&[ZONE, "MX"]).await;
    assert!(
        out.contains("flags: qr aa rd;") && out.contains("MX\t10 mail.edgepop.test."),
        "{out}"
    );
    assert_eq!(dns.short(&[ZONE, "TXT"]).await, vec!["\"v=spf1 mx -all\""]);
    assert_eq!(
        dns.short(&["mail.edgepop.test", "A"]).await,
        vec!["192.0.2.25"]
    );
    let caa = dns.kdig(&[ZONE, "CAA", "+short"]).await;
    assert!(caa.contains("0 issue \"letsencrypt.org\""), "{caa}");
    // The apex keeps its SOA and NS; a geo name keeps its geo answer and gains a TXT.
    assert!(dns.dig(&[ZONE, "SOA"]).await.contains("ANSWER: 1"));
    assert_eq!(dns.short(&[WWW, "A"]).await, vec!["192.0.2.3"]);
    assert_eq!(dns.short(&[WWW, "TXT"]).await, vec!["\"geo-steered\""]);
    // An alias answers with its CNAME, for every type, not followed.
    for t in ["A", "AAAA", "CNAME"] {
        let out = dns.dig(&["cdn.edgepop.test", t]).await;
        assert!(
            out.contains("status: NOERROR")
                && out.contains("ANSWER: 1")
                && out.contains("CNAME\twww.edgepop.test."),
            "{t}: {out}"
        );
    }
    // Another type at a name with records: NODATA with the SOA; below it: NXDOMAIN; the empty
    // non-terminal above a static name: NODATA.
    let out = dns.dig(&["mail.edgepop.test", "AAAA"]).await;
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0") && out.contains("SOA"),
        "{out}"
    );
    assert!(dns
        .dig(&["x.mail.edgepop.test", "A"])
        .await
        .contains("status: NXDOMAIN"));
    let out = dns.dig(&["sub.edgepop.test", "TXT"]).await;
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "{out}"
    );
    assert!(dns
        .dig(&["deep.sub.edgepop.test", "TXT"])
        .await
        .contains("below an empty"));
    // Static answers hold for every client: ECS scope 0.
    let out = dns.dig(&[ZONE, "MX", "+subnet=198.51.100.0/24"]).await;
    assert!(out.contains("CLIENT-SUBNET: 198.51.100.0/24/0"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_static_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let strings: Vec<String> = (0..8)
        .map(|i| format!("\"{}\"", char::from(b'a' + i).to_string().repeat(200)))
        .collect();
    let zone = format!("big TXT ( {} )\n", strings.join("\n  "));
    let (dns, _) = with_zone_file(&zone).await;
    let udp = dns.dig(&["big.edgepop.test", "TXT", "+ignore"]).await;
    assert!(udp.contains(" tc ") || udp.contains(" tc;"), "{udp}");
    assert!(udp.contains("ANSWER: 0"), "{udp}");
    let retried = dns.dig(&["big.edgepop.test", "TXT"]).await;
    assert!(
        retried.contains("Truncated, retrying in TCP mode"),
        "{retried}"
    );
    assert!(retried.contains(&"h".repeat(200)), "{retried}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edited_zone_file_is_picked_up_and_a_broken_one_keeps_the_old_records() {
    let (dns, path) = with_zone_file(ZONE_FILE).await;
    let serial = |dns: &Dns| dns.sidecar.state().map().serial;
    let first = serial(&dns);
    replace(&path, &ZONE_FILE.replace("192.0.2.25", "192.0.2.26"));
    eventually(Duration::from_secs(5), "the new address", || async {
        dns.short(&["mail.edgepop.test", "A"]).await == vec!["192.0.2.26"]
    })
    .await;
    assert!(
        serial(&dns) > first,
        "the SOA serial moves with the records"
    );
    // A broken edit (a second record at the alias, line 3) changes nothing and is reported.
    replace(&path, "mail A 192.0.2.27\ncdn CNAME www\ncdn TXT \"no\"\n");
    let msg = dns.load_error().await;
    assert!(
        msg.contains("zone.db:3:") && msg.contains("CNAME cannot share"),
        "{msg}"
    );
    assert_eq!(
        dns.short(&["mail.edgepop.test", "A"]).await,
        vec!["192.0.2.26"]
    );
    let (_, map) = dns.admin_get("/map").await;
    assert!(map.contains("zone.db:3:"), "{map}");
    let map: serde_json::Value = serde_json::from_str(&map).expect("/map is JSON");
    assert_eq!(
        map["static_records"]["names"], 5,
        "the running records: {map}"
    );
    assert_eq!(map["static_records"]["records"], 7, "{map}");
    assert!(map["static_records"]["file"]
        .as_str()
        .is_some_and(|f| f.ends_with("zone.db")));
    // Fixed: served, and the error is history.
    replace(&path, ZONE_FILE);
    eventually(
        Duration::from_secs(5),
        "the fixed file is served",
        || async { dns.short(&["mail.edgepop.test", "A"]).await == vec!["192.0.2.25"] },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_included_file_is_served_and_its_edits_and_errors_are_its_own() {
    let (dns, path) = with_zone_files(
        "@ MX 10 mail\n$INCLUDE hosts/mail.inc\n",
        &[("hosts/mail.inc", "mail A 192.0.2.25\n")],
    )
    .await;
    let inc = path.with_file_name("hosts").join("mail.inc");
    assert_eq!(
        dns.short(&["mail.edgepop.test", "A"]).await,
        vec!["192.0.2.25"]
    );
    assert_eq!(
        dns.short(&[ZONE, "MX"]).await,
        vec!["10 mail.edgepop.test."]
    );
    let serial = dns.sidecar.state().map().serial;
    replace(&inc, "mail A 192.0.2.26\n");
    eventually(Duration::from_secs(5), "the edited include", || async {
        dns.short(&["mail.edgepop.test", "A"]).await == vec!["192.0.2.26"]
    })
    .await;
    assert!(dns.sidecar.state().map().serial > serial);
    replace(&inc, "mail A 192.0.2.27\nmail A not-an-address\n");
    let msg = dns.load_error().await;
    assert!(msg.contains("mail.inc:2:"), "{msg}");
    assert_eq!(
        dns.short(&["mail.edgepop.test", "A"]).await,
        vec!["192.0.2.26"],
        "the last good records keep serving"
    );
}

#[test]
fn check_reports_the_zone_file_or_its_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let regions = dir.path().join("regions.toml");
    std::fs::write(&regions, basic_regions()).expect("write");
    let zone = dir.path().join("zone.db");
    let cfg = dir.path().join("edgepop.toml");
    std::fs::write(
        &cfg,
        config_text(
            &regions,
            &format!("zone_file = {:?}", zone.display().to_string()),
        ),
    )
    .expect("write");
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_edgepop"))
            .args(["check", "--config"])
            .arg(&cfg)
            .output()
            .expect("check")
    };
    std::fs::write(&zone, ZONE_FILE).expect("write");
    let ok = check();
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}");
    assert!(out.contains("zone.db: 7 records at 5 names"), "{out}");
    std::fs::write(&zone, "; two lines\n\n@ SOA a b 1 2 3 4 5\n").expect("write");
    let bad = check();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("zone.db:3:") && err.contains("SOA is made from [dns]"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zone_of_many_names_is_searched_not_scanned_and_answers_alike() {
    // 300 names of several lengths: more than a scan is used for.
    let zone: String = (0..300)
        .map(|i| format!("host{i} A 192.0.2.{}\n", i % 250 + 1))
        .collect();
    let (dns, _) = with_zone_file(&zone).await;
    for i in [0, 7, 42, 99, 100, 250, 299] {
        let want = format!("192.0.2.{}", i % 250 + 1);
        assert_eq!(
            dns.short(&[&format!("host{i}.edgepop.test"), "A"]).await,
            vec![want]
        );
    }
    assert_eq!(dns.short(&[WWW, "A"]).await, vec!["192.0.2.3"]);
    assert!(dns
        .dig(&["host300.edgepop.test", "A"])
        .await
        .contains("status: NXDOMAIN"));
    assert!(dns
        .dig(&["host1.edgepop.test", "TXT"])
        .await
        .contains("ANSWER: 0"));
    assert!(dns.dig(&[ZONE, "SOA"]).await.contains("ANSWER: 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn wildcards_answer_for_names_below_their_parent_that_do_not_exist() {
    let zone = "*.w        TXT   \"wild\"\n*.w        A     192.0.2.40\nreal.w     TXT   \"real\"\nleaf.ent.w TXT   \"leaf\"\n*.cdn      CNAME www\nmail       A     192.0.2.25\n*.www      TXT   \"below a geo name\"\na.*.v      TXT   \"under an empty wildcard\"\n";
    let (dns, _) = with_zone_file(zone).await;
    // Synthesised with the question as owner, at any depth below the closest encloser.
    for name in ["a.w.edgepop.test", "A.b.W.edgepop.test"] {
        let out = dns.dig(&[name, "TXT"]).await;
        assert!(
            out.contains("status: NOERROR")
                && out.contains(&format!("{name}.\t60\tIN\tTXT\t\"wild\"")),
            "{name}: {out}"
        );
    }
    assert_eq!(
        dns.short(&["x.w.edgepop.test", "A"]).await,
        vec!["192.0.2.40"]
    );
    // A name that exists is never a wildcard's: its own records, or NODATA.
    assert_eq!(
        dns.short(&["real.w.edgepop.test", "TXT"]).await,
        vec!["\"real\""]
    );
    let out = dns.dig(&["real.w.edgepop.test", "A"]).await;
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "{out}"
    );
    // The wildcard's parent exists (an empty non-terminal): NODATA.
    let out = dns.dig(&["w.edgepop.test", "TXT"]).await;
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "{out}"
    );
    // A synthesised name, another type: NODATA with the SOA (RFC 2308).
    let out = dns.dig(&["x.w.edgepop.test", "MX"]).await;
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0") && out.contains("IN\tSOA"),
        "{out}"
    );
    // An empty non-terminal (ent.w, above leaf.ent.w) exists, so it blocks the wildcard:
    // itself NODATA, a name below it NXDOMAIN (its closest encloser ent.w has no `*`).
    let out = dns.dig(&["ent.w.edgepop.test", "TXT"]).await;
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "{out}"
    );
    assert!(dns
        .dig(&["x.ent.w.edgepop.test", "TXT"])
        .await
        .contains("status: NXDOMAIN"));
    // An empty wildcard (`*.v`, there because of a.*.v) makes names below v exist: NODATA.
    let out = dns.dig(&["b.v.edgepop.test", "TXT"]).await;
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "{out}"
    );
    // The literal `*` name answers too; below it there is no wildcard.
    assert_eq!(
        dns.short(&["*.w.edgepop.test", "TXT"]).await,
        vec!["\"wild\""]
    );
    assert!(dns
        .dig(&["a.*.w.edgepop.test", "TXT"])
        .await
        .contains("status: NXDOMAIN"));
    // Below an existing name with no wildcard of its own: NXDOMAIN.
    assert!(dns
        .dig(&["x.mail.edgepop.test", "A"])
        .await
        .contains("status: NXDOMAIN"));
    assert!(dns
        .dig(&["nope.edgepop.test", "A"])
        .await
        .contains("status: NXDOMAIN"));
    // A wildcard CNAME, and a wildcard below a geo name (the geo name keeps its answer).
    let out = dns.dig(&["img.cdn.edgepop.test", "A"]).await;
    assert!(
        out.contains("img.cdn.edgepop.test.\t60\tIN\tCNAME\twww.edgepop.test."),
        "{out}"
    );
    assert_eq!(
        dns.short(&["x.www.edgepop.test", "TXT"]).await,
        vec!["\"below a geo name\""]
    );
    let out = dns.dig(&["x.www.edgepop.test", "A"]).await;
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "no geo answer: {out}"
    );
    assert_eq!(dns.short(&[WWW, "A"]).await, vec!["192.0.2.3"]);
}
