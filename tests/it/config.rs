//! Integration tests: configuration files and `edgepop check`.

use crate::support::*;
use std::process::Command;

fn check(path: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(bin())
        .current_dir(root())
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .expect("edgepop check runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_shipped_config_file_passes_check_unchanged() {
    let (ok, stdout, stderr) = check(&root().join("config/edgepop.toml"));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("origin origin-a 127.0.0.1:9443"),
        "{stdout}"
    );
    assert!(
        stdout.contains("route localhost,www.edgepop.test,*.edgepop.test -> origin-a"),
        "{stdout}"
    );
}

/// Table headers of config/edgepop.toml; a junk key after each must be rejected by name.
#[test]
fn an_unknown_key_in_any_table_is_an_error_with_its_location() {
    let original = std::fs::read_to_string(root().join("config/edgepop.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let headers: Vec<(usize, String)> = original
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with('['))
        .map(|(i, l)| (i, l.to_string()))
        .collect();
    assert!(headers.len() >= 7, "{headers:?}");
    for (i, header) in headers {
        let mut lines: Vec<String> = original.lines().map(String::from).collect();
        lines.insert(i + 1, "junk_key = 1".into());
        let path = write_file(dir.path(), "bad.toml", &lines.join("\n"));
        let (ok, _, stderr) = check(&path);
        assert!(!ok, "junk key after {header} accepted");
        assert!(
            stderr.contains("unknown field `junk_key`"),
            "after {header}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("bad.toml:{}:", i + 2)),
            "after {header} (line {}): {stderr}",
            i + 2
        );
    }
}

#[test]
fn a_route_naming_a_missing_origin_fails_check_at_the_route_line() {
    let original = std::fs::read_to_string(root().join("config/edgepop.toml")).unwrap();
    let broken = original.replace(
        "origins = [\"origin-a\"]",
        "origins = [\"origin-a\", \"nowhere\"]",
    );
    assert_ne!(broken, original);
    let line = broken
        .lines()
        .position(|l| l.contains("\"nowhere\""))
        .unwrap()
        + 1;
    let col = broken
        .lines()
        .nth(line - 1)
        .unwrap()
        .find("\"nowhere\"")
        .unwrap()
        + 1;
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "edgepop.toml", &broken);
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    assert_eq!(
        stderr.trim(),
        format!(
            "{}:{line}:{col}: route names origin \"nowhere\", which is not defined in [[origins]]",
            path.display()
        )
    );
}

fn check_text(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "e.toml", text);
    let (ok, _, stderr) = check(&path);
    assert!(!ok, "accepted: {text}");
    stderr.replace(&path.display().to_string(), "e.toml")
}

fn edge_text(origin_extra: &str, cert: &str, key: &str) -> String {
    format!(
        "[pop]\nname = \"p\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[[certificates]]\nnames = [\"localhost\"]\ncert = \"{cert}\"\nkey = \"{key}\"\n[[origins]]\nname = \"o\"\naddress = \"127.0.0.1:1\"\nserver_name = \"localhost\"\n{origin_extra}\n[[routes]]\nhosts = [\"localhost\"]\norigins = [\"o\"]\n"
    )
}

#[test]
fn bad_values_are_reported_with_file_line_and_reason() {
    let c = certs();
    let (crt, key) = (c.join("edge.crt"), c.join("edge.key"));
    let (crt, key) = (crt.display().to_string(), key.display().to_string());
    assert_eq!(
        check_text(&edge_text(
            "warm_connections = 0\nmax_connections = 0",
            &crt,
            &key
        ))
        .trim(),
        "e.toml:14:19: max_connections must be at least 1"
    );
    assert_eq!(
        check_text(&edge_text(
            "warm_connections = 9\nmax_connections = 4",
            &crt,
            &key
        ))
        .trim(),
        "e.toml:13:20: warm_connections (9) exceeds max_connections (4)"
    );
    assert_eq!(
        check_text(&edge_text("connect_timeout = \"soon\"", &crt, &key)).trim(),
        "e.toml:13:19: invalid value: string \"soon\", expected a duration"
    );
    assert_eq!(
        check_text(&edge_text("origin_idle_timeout = \"500ms\"", &crt, &key)).trim(),
        "e.toml:13:23: origin_idle_timeout must be at least 1s (leave it out to learn it)"
    );
    let mismatch = check_text(&edge_text(
        "",
        &crt,
        &c.join("origin.key").display().to_string(),
    ));
    assert!(mismatch.starts_with("e.toml:8:7: key "), "{mismatch}");
    assert!(mismatch.contains("does not fit certificate"), "{mismatch}");
    let missing = check_text(&edge_text("", "/nonexistent/x.crt", &key));
    assert!(
        missing.starts_with("e.toml:7:8: certificate file /nonexistent/x.crt"),
        "{missing}"
    );
    let log = check_text(&edge_text("", &crt, &key).replacen(
        "name = \"p\"\n",
        "name = \"p\"\naccess_log = \"/nonexistent/dir/access.log\"\n",
        1,
    ));
    assert_eq!(
        log.trim(),
        "e.toml:3:14: access_log \"/nonexistent/dir/access.log\": not \"stdout\" nor a file in an existing directory"
    );
    let limit = check_text(&edge_text("", &crt, &key).replacen(
        "address = \"127.0.0.1:0\"\n",
        "address = \"127.0.0.1:0\"\nmax_connections = 0\n",
        1,
    ));
    assert_eq!(
        limit.trim(),
        "e.toml:5:19: max_connections must be between 1 and 16777216"
    );
    let per_client = check_text(&edge_text("", &crt, &key).replacen(
        "address = \"127.0.0.1:0\"\n",
        "address = \"127.0.0.1:0\"\nmax_connections_per_client = -1\n",
        1,
    ));
    assert_eq!(
        per_client.trim(),
        "e.toml:5:30: max_connections_per_client must be between 1 and 16777216"
    );
    let listener = |lines: &str| {
        check_text(&edge_text("", &crt, &key).replacen(
            "address = \"127.0.0.1:0\"\n",
            &format!("address = \"127.0.0.1:0\"\n{lines}\n"),
            1,
        ))
    };
    for (lines, want) in [
        (
            "https_port = 8443",
            "e.toml:5:14: https_port applies only with redirect_to_https = true",
        ),
        (
            "redirect_to_https = true\nhttps_port = 0",
            "e.toml:6:14: https_port must be between 1 and 65535",
        ),
        (
            "redirect_to_https = true\nhttps_port = 65536",
            "e.toml:6:14: https_port must be between 1 and 65535",
        ),
        (
            "redirect_to_https = true\nhttp3 = true",
            "e.toml:5:21: a redirect_to_https listener speaks plain HTTP and cannot also serve HTTP/3 (http3)",
        ),
    ] {
        assert_eq!(listener(lines).trim(), want, "{lines}");
    }
    let rate = |limit: &str| {
        check_text(&edge_text("", &crt, &key).replacen(
            "origins = [\"o\"]\n",
            &format!("origins = [\"o\"]\nrate_limit = {limit}\n"),
            1,
        ))
    };
    for (limit, want) in [
        (
            "{ requests = 1, per = \"366d\", burst = 2 }",
            "e.toml:17:14: rate_limit burst x per / requests must be at most a year",
        ),
        (
            "{ requests = 1, max_clients = 0 }",
            "e.toml:17:44: rate_limit max_clients must be between 1 and 10000000",
        ),
        (
            "{ requests = 0 }",
            "e.toml:17:27: rate_limit requests must be between 1 and 1000000",
        ),
        (
            "{ requests = 10, burst = 0 }",
            "e.toml:17:39: rate_limit burst must be between 1 and 1000000",
        ),
        (
            "{ requests = 10, per = \"0s\" }",
            "e.toml:17:37: rate_limit per must be greater than zero",
        ),
        (
            "{ requests = 5000, per = \"1s\" }",
            "e.toml:17:14: rate_limit allows more than one request per millisecond per client: use a longer per or fewer requests",
        ),
        (
            "{ requests = 10, every = \"1s\" }",
            "e.toml:17:31: unknown field `every`, expected one of `requests`, `per`, `burst`, `max_clients`",
        ),
    ] {
        assert_eq!(rate(limit).trim(), want, "{limit}");
    }
    let dir = tempfile::tempdir().unwrap();
    let limited = edge_text("", &crt, &key).replacen(
        "origins = [\"o\"]\n",
        "origins = [\"o\"]\nrate_limit = { requests = 600, per = \"1m\" }\n",
        1,
    );
    let (ok, stdout, stderr) = check(&write_file(dir.path(), "limited.toml", &limited));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(
            "  route localhost -> o, 600 requests per 1m per client, bursts of 600, 100000 clients remembered"
        ),
        "{stdout}"
    );
    let hsts = |value: &str| {
        check_text(&edge_text("", &crt, &key).replacen(
            "origins = [\"o\"]\n",
            &format!("origins = [\"o\"]\nhsts = {value:?}\n"),
            1,
        ))
    };
    let dir = tempfile::tempdir().unwrap();
    let with_hsts = edge_text("", &crt, &key).replacen(
        "origins = [\"o\"]\n",
        "origins = [\"o\"]\nhsts = \"max-age=600\"\n",
        1,
    );
    let (ok, stdout, stderr) = check(&write_file(dir.path(), "hsts.toml", &with_hsts));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("  route localhost -> o, Strict-Transport-Security: max-age=600"),
        "{stdout}"
    );
    for value in ["includeSubDomains", "max-age=", "max-age=1y"] {
        assert_eq!(
            hsts(value).trim(),
            "e.toml:17:8: hsts needs a max-age in seconds, e.g. \"max-age=31536000; includeSubDomains\"",
            "{value}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let with_edits = edge_text("", &crt, &key).replacen(
        "origins = [\"o\"]\n",
        "origins = [\"o\"]\nrequest_headers = { \"X-Edge\" = \"tyo1\" }\nremove_response_headers = [\"Server\", \"X-Powered-By\"]\n",
        1,
    );
    let (ok, stdout, stderr) = check(&write_file(dir.path(), "edits.toml", &with_edits));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("  route localhost -> o, request headers: set x-edge, response headers: remove server, x-powered-by"),
        "{stdout}"
    );
    let edits = |line: &str| {
        check_text(&edge_text("", &crt, &key).replacen(
            "origins = [\"o\"]\n",
            &format!("origins = [\"o\"]\n{line}\n"),
            1,
        ))
    };
    for (line, error) in [
        (
            r#"request_headers = { "Host" = "a.test" }"#,
            r#"e.toml:17:30: request_headers: "Host" is set by the edge; it cannot be changed here"#,
        ),
        (
            r#"remove_request_headers = ["X-Forwarded-For"]"#,
            r#"e.toml:17:27: remove_request_headers: "X-Forwarded-For" is set by the edge; it cannot be changed here"#,
        ),
        (
            r#"remove_response_headers = ["Content-Length"]"#,
            r#"e.toml:17:28: remove_response_headers: "Content-Length" belongs to the connection's framing; it cannot be changed here"#,
        ),
        (
            r#"response_headers = { "X Y" = "1" }"#,
            r#"e.toml:17:30: response_headers: "X Y" is not a valid header name"#,
        ),
        (
            r#"response_headers = { "X-Y" = "café" }"#,
            r#"e.toml:17:30: response_headers: the value of "X-Y" is not a valid header value (visible ASCII, spaces and tabs)"#,
        ),
        (
            "response_headers = { \"X-Y\" = \"1\" }\nremove_response_headers = [\"x-y\"]",
            r#"e.toml:17:30: "x-y" is both in response_headers and in remove_response_headers"#,
        ),
        (
            r#"response_headers = { "X-Y" = "1", "x-y" = "2" }"#,
            r#"e.toml:17:43: response_headers: "x-y" is given twice"#,
        ),
        (
            r#"response_headers = { "X-Y" = "" }"#,
            r#"e.toml:17:30: response_headers: "X-Y" has an empty value (to take a field out, name it in remove_response_headers)"#,
        ),
        (
            r#"request_headers = { "X-Y" = "a " }"#,
            r#"e.toml:17:29: request_headers: the value of "X-Y" starts or ends with white space (h2 and HTTP/3 peers refuse such a field)"#,
        ),
        (
            r#"response_headers = { "Set-Cookie" = "a=b" }"#,
            r#"e.toml:17:37: response_headers: "Set-Cookie" would replace every cookie the origin sets"#,
        ),
        (
            r#"remove_response_headers = ["Sec-WebSocket-Accept"]"#,
            r#"e.toml:17:28: remove_response_headers: "Sec-WebSocket-Accept" belongs to WebSocket handshakes; it cannot be changed here"#,
        ),
        (
            r#"response_headers = { "Alt-Svc" = "clear" }"#,
            r#"e.toml:17:34: response_headers: "Alt-Svc" is set by the edge; it cannot be changed here"#,
        ),
        (
            r#"remove_request_headers = ["Proxy-Authorization"]"#,
            r#"e.toml:17:27: remove_request_headers: "Proxy-Authorization" belongs to the connection's framing; it cannot be changed here"#,
        ),
    ] {
        assert_eq!(edits(line).trim(), error, "{line}");
    }
    let long = format!("request_headers = {{ \"X-Y\" = \"{}\" }}", "a".repeat(4097));
    assert_eq!(
        edits(&long).trim(),
        r#"e.toml:17:29: request_headers: the value of "X-Y" is longer than 4096 bytes"#
    );
    // Origin client certificates: both halves, and a key that belongs to the certificate.
    let c = certs();
    let (ocrt, okey) = (c.join("origin.crt"), c.join("origin.key"));
    assert_eq!(
        check_text(&edge_text(
            &format!("client_cert = \"{}\"", ocrt.display()),
            &crt,
            &key
        ))
        .trim(),
        "e.toml:13:15: client_cert needs client_key"
    );
    let mismatched = check_text(&edge_text(
        &format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"",
            ocrt.display(),
            c.join("edge.key").display()
        ),
        &crt,
        &key,
    ));
    assert!(mismatched.starts_with("e.toml:14:14: "), "{mismatched}");
    let dir = tempfile::tempdir().unwrap();
    let encrypted = write_file(
        dir.path(),
        "enc.key",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n",
    );
    assert_eq!(
        check_text(&edge_text(
            &format!(
                "client_cert = \"{}\"\nclient_key = \"{}\"",
                ocrt.display(),
                encrypted.display()
            ),
            &crt,
            &key,
        ))
        .trim(),
        format!(
            "e.toml:14:14: key file {} holds an encrypted key, which is not supported (decrypt it with `openssl pkey -in KEY -out PLAIN`)",
            encrypted.display()
        )
    );
    let with_client_cert = edge_text(
        &format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"",
            ocrt.display(),
            okey.display()
        ),
        &crt,
        &key,
    );
    let (ok, stdout, stderr) = check(&write_file(dir.path(), "mtls.toml", &with_client_cert));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("client_cert={}", ocrt.display())),
        "{stdout}"
    );
    // One address twice (SO_REUSEPORT would split its connections between them).
    let twice = check_text(&edge_text("", &crt, &key).replacen(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n",
        "[[listeners]]\naddress = \"127.0.0.1:8443\"\n[[listeners]]\naddress = \"127.0.0.1:8443\"\nredirect_to_https = true\n",
        1,
    ));
    assert_eq!(
        twice.trim(),
        "e.toml:6:11: listener address 127.0.0.1:8443 is given twice"
    );
    let dir = tempfile::tempdir().unwrap();
    let plain = edge_text("", &crt, &key).replacen(
        "address = \"127.0.0.1:0\"\n",
        "address = \"127.0.0.1:0\"\nredirect_to_https = true\n",
        1,
    );
    let (ok, stdout, stderr) = check(&write_file(dir.path(), "plain.toml", &plain));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("  listener 127.0.0.1:0 (plain HTTP, redirected to HTTPS on port 443)"),
        "{stdout}"
    );
    // Durations are bounded, so no timer deadline can overflow the clock.
    let long = check_text(&edge_text("tunnel_idle_timeout = \"500years\"", &crt, &key));
    assert!(
        long.trim()
            .ends_with("tunnel_idle_timeout must be at most a year"),
        "{long}"
    );
    assert!(long.starts_with("e.toml:"), "{long}");
    let proto = check_text(&edge_text("protocol = \"h3\"", &crt, &key));
    assert_eq!(
        proto.trim(),
        "e.toml:13:12: protocol \"h3\" is not one of \"h2\", \"http1\""
    );
    let size = check_text(&format!(
        "{}max_body_size = \"lots\"\n",
        edge_text("", &crt, &key)
    ));
    assert!(size.starts_with("e.toml:17:17: max_body_size: "), "{size}");
    let negative = check_text(&format!(
        "{}max_body_size = -1\n",
        edge_text("", &crt, &key)
    ));
    assert_eq!(
        negative.trim(),
        "e.toml:17:17: max_body_size must not be negative"
    );
    let zero = check_text(&format!(
        "{}max_body_size = \"0\"\n",
        edge_text("", &crt, &key)
    ));
    assert_eq!(
        zero.trim(),
        "e.toml:17:17: max_body_size must be at least 1 byte (leave it out for no limit)"
    );
}

#[test]
fn glue_is_checked_and_an_in_zone_nameserver_without_it_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let regions = root().join("config/regions.toml");
    let dns = |extra: &str| {
        format!(
            "[pop]\nname = \"p\"\n[dns]\nlisten = \"127.0.0.1:0\"\nzone = \"edgepop.test\"\nnames = [\"www.edgepop.test\"]\nregions = \"{}\"\nnameservers = [\"ns1.edgepop.test\", \"ns.example.net\"]\n{extra}\n",
            regions.display()
        )
    };
    // No glue for the in-zone ns1: valid, with a warning naming it.
    let (ok, stdout, stderr) = check(&write_file(dir.path(), "warn.toml", &dns("")));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("warning: nameserver ns1.edgepop.test is inside zone edgepop.test but has no [dns] glue"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("nameserver ns.example.net is inside"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = check(&write_file(
        dir.path(),
        "glued.toml",
        &dns("glue = { \"ns1.edgepop.test\" = [\"192.0.2.53\"] }"),
    ));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ns1.edgepop.test (192.0.2.53)"), "{stdout}");
    assert!(!stdout.contains("warning"), "{stdout}");
    let twice = check_text(&dns(
        "glue = { \"ns1.edgepop.test\" = [\"192.0.2.53\"], \"NS1.edgepop.test.\" = [\"192.0.2.54\"] }",
    ));
    assert!(
        twice.starts_with("e.toml:9:")
            && twice.contains("glue for \"ns1.edgepop.test\" is given twice"),
        "{twice}"
    );
    for (extra, want) in [
        (
            "glue = { \"ns9.edgepop.test\" = [\"192.0.2.53\"] }",
            "e.toml:9:31: glue for \"ns9.edgepop.test\", which is not one of [dns] nameservers",
        ),
        (
            "glue = { \"ns.example.net\" = [\"192.0.2.53\"] }",
            "e.toml:9:29: glue for \"ns.example.net\": only nameservers inside zone \"edgepop.test\" need glue",
        ),
        (
            "glue = { \"ns1.edgepop.test\" = [\"192.0.2.530\"] }",
            "e.toml:9:32: \"192.0.2.530\" is not an IP address",
        ),
        (
            "glue = { \"ns1.edgepop.test\" = [] }",
            "e.toml:9:31: glue for \"ns1.edgepop.test\" lists no address",
        ),
    ] {
        assert_eq!(check_text(&dns(extra)).trim(), want, "{extra}");
    }
}

#[test]
fn nsid_and_the_other_dns_wire_keys_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let regions = root().join("config/regions.toml");
    let dns = |nsid: &str| {
        format!(
            "[dns]\nlisten = \"127.0.0.1:0\"\nzone = \"edgepop.test\"\nnames = [\"www.edgepop.test\"]\nregions = \"{}\"\nnameservers = [\"ns.example.net\"]\nnsid = {nsid}\n",
            regions.display()
        )
    };
    let (ok, stdout, stderr) = check(&write_file(dir.path(), "ok.toml", &dns("\"dns1 tyo1\"")));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("  nsid \"dns1 tyo1\""), "{stdout}");
    // Hex after 0x: any octets, shown as hex unless they are printable ASCII.
    // Octets whose text starts with 0x are shown in hex, so the shown form reads back.
    for (nsid, shown) in [
        ("\"0x00ff10\"", "0x00ff10"),
        ("\"0X646E7331\"", "dns1"),
        ("\"0x30786162\"", "0x30786162"),
    ] {
        let (ok, stdout, stderr) = check(&write_file(dir.path(), "hex.toml", &dns(nsid)));
        assert!(ok, "{stderr}");
        assert!(stdout.contains(&format!("  nsid \"{shown}\"")), "{stdout}");
    }
    for (nsid, want) in [
        ("\"\"", "e.toml:7:8: nsid must be 1 to 128 characters"),
        (
            &format!("\"{}\"", "a".repeat(129)),
            "e.toml:7:8: nsid must be 1 to 128 characters",
        ),
        (
            "\"dns1\\u00e9\"",
            "e.toml:7:8: nsid must be printable ASCII (or 0x and hex digits)",
        ),
        (
            "\"a\\tb\"",
            "e.toml:7:8: nsid must be printable ASCII (or 0x and hex digits)",
        ),
        (
            "\"0x\"",
            "e.toml:7:8: nsid must be 1 to 128 octets (2 to 256 hex digits after 0x)",
        ),
        (
            &format!("\"0x{}\"", "ab".repeat(129)),
            "e.toml:7:8: nsid must be 1 to 128 octets (2 to 256 hex digits after 0x)",
        ),
        (
            "\"0xabc\"",
            "e.toml:7:8: nsid after 0x must be an even number of hex digits",
        ),
        (
            "\"0x0g\"",
            "e.toml:7:8: nsid after 0x must be hex digits, not 'g'",
        ),
    ] {
        assert_eq!(check_text(&dns(nsid)).trim(), want, "{nsid}");
    }
    let uring = check(&write_file(
        dir.path(),
        "uring.toml",
        &dns("\"x\"\nudp_io = \"recvmmsg\""),
    ));
    assert!(uring.0, "{}", uring.2);
    assert!(uring.1.contains("  dns udp_io recvmmsg"), "{}", uring.1);
    assert_eq!(
        check_text(&dns("\"x\"\nudp_io = \"epoll\"")).trim(),
        "e.toml:8:10: udp_io must be \"auto\", \"io_uring\" or \"recvmmsg\", not \"epoll\""
    );
    let coalesce = check(&write_file(
        dir.path(),
        "coalesce.toml",
        &dns("\"x\"\nudp_coalesce = \"300us\""),
    ));
    assert!(coalesce.0, "{}", coalesce.2);
    assert!(
        coalesce.1.contains("  dns udp_coalesce 300us"),
        "{}",
        coalesce.1
    );
    for (extra, want) in [
        (
            "udp_coalesce = \"2ms\"",
            "e.toml:8:16: udp_coalesce must be at most 1ms",
        ),
        (
            "udp_coalesce = \"1500ns\"",
            "e.toml:8:16: udp_coalesce must be whole microseconds",
        ),
        (
            "udp_coalesce = \"soon\"",
            "e.toml:8:16: invalid value: string \"soon\", expected a duration",
        ),
        (
            "udp_io = \"recvmmsg\"\nudp_coalesce = \"100us\"",
            "e.toml:9:16: udp_coalesce needs io_uring; udp_io = \"recvmmsg\" answers every wake-up at once",
        ),
    ] {
        assert_eq!(check_text(&dns(&format!("\"x\"\n{extra}"))).trim(), want);
    }
    let off = check(&write_file(
        dir.path(),
        "off.toml",
        &dns("\"x\"\nudp_io = \"recvmmsg\"\nudp_coalesce = \"0s\""),
    ));
    assert!(off.0, "{}", off.2);
    let small = check_text(&dns("\"x\"\nmax_nocookie_response = 100"));
    assert_eq!(
        small.trim(),
        "e.toml:8:25: max_nocookie_response must be between 128 and 1232 (leave it out for no limit)"
    );
}

#[test]
fn a_dns_rate_limit_is_checked_and_shown() {
    let regions = root().join("config/regions.toml");
    let dns = |limit: &str| {
        format!(
            "[dns]\nlisten = \"127.0.0.1:0\"\nzone = \"edgepop.test\"\nnames = [\"www.edgepop.test\"]\nregions = \"{}\"\nnameservers = [\"ns.example.net\"]\nrate_limit = {limit}\n",
            regions.display()
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = check(&write_file(
        dir.path(),
        "ok.toml",
        &dns("{ responses = 20, slip = 0, ipv6_prefix = 48, exempt = [\"10.1.2.3/8\", \"2001:db8::/32\"] }"),
    ));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("  rate limit 20 responses per 1s, burst 20, slip 0, networks /24 and /48, exempt 10.0.0.0/8 2001:db8::/32"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = check(&write_file(
        dir.path(),
        "kinds.toml",
        &dns("{ responses = 20, nodata = 20, nxdomains = 5, errors = 0 }"),
    ));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(
            "  rate limit 20 responses per 1s, burst 20, nxdomains 5, errors not limited, slip 2,"
        ),
        "{stdout}"
    );
    for (limit, want) in [
        ("{ responses = 0 }", "e.toml:7:28: rate_limit responses must be between 1 and 1000000"),
        ("{ responses = 5, slip = 11 }", "e.toml:7:38: rate_limit slip must be between 0 and 10"),
        ("{ responses = 5, ipv4_prefix = 33 }", "e.toml:7:45: rate_limit ipv4_prefix must be between 8 and 32"),
        ("{ responses = 5000, per = \"1s\" }", "e.toml:7:14: rate_limit allows more than one response per millisecond per client network: use a longer per or fewer responses"),
        ("{ per = \"1s\" }", "e.toml:7:14: missing field `responses`"),
        ("{ responses = 5, nxdomains = -1 }", "e.toml:7:43: rate_limit nxdomains must be between 0 and 1000000"),
        ("{ responses = 500, nodata = 5000, per = \"1s\" }", "e.toml:7:42: rate_limit nodata with this per and burst allows more than one response per millisecond or a burst longer than a year"),
        ("{ responses = 5, exempt = [\"x\"] }", "e.toml:7:41: rate_limit exempt: \"x\" is not a network (192.0.2.0/24, 2001:db8::/32)"),
    ] {
        assert_eq!(check_text(&dns(limit)).trim(), want, "{limit}");
    }
}

#[test]
fn a_cookie_key_file_is_loaded_by_check_and_a_bad_one_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let regions = root().join("config/regions.toml");
    let keys = dir.path().join("cookie.keys");
    let dns = format!(
        "[dns]\nlisten = \"127.0.0.1:0\"\nzone = \"edgepop.test\"\nnames = [\"www.edgepop.test\"]\nregions = \"{}\"\nnameservers = [\"ns.example.net\"]\ncookie_keys = \"{}\"\n",
        regions.display(),
        keys.display()
    );
    std::fs::write(
        &keys,
        "00112233445566778899aabbccddeeff\nffeeddccbbaa99887766554433221100\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = check(&write_file(dir.path(), "ok.toml", &dns));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!(
            "  cookie keys {} (CookieSecret(2 keys))",
            keys.display()
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("00112233"), "no key material: {stdout}");
    std::fs::write(&keys, "# new key first\n0011223344\n").unwrap();
    assert_eq!(
        check_text(&dns).trim(),
        format!(
            "e.toml:7:15: cookie key file {}:2: expected 32 hex digits (a 16-byte SipHash key)",
            keys.display()
        )
    );
    std::fs::remove_file(&keys).unwrap();
    assert!(
        check_text(&dns).starts_with("e.toml:7:15: cookie key file "),
        "a missing file is named at its key"
    );
}

#[test]
fn a_file_with_only_one_roles_sections_is_valid_for_that_role() {
    let dir = tempfile::tempdir().unwrap();
    let regions = root().join("config/regions.toml");
    let dns_only = format!(
        "[pop]\nname = \"p\"\n[dns]\nlisten = \"127.0.0.1:0\"\nzone = \"edgepop.test\"\nnames = [\"www.edgepop.test\"]\nregions = \"{}\"\n",
        regions.display()
    );
    let (ok, _, stderr) = check(&write_file(dir.path(), "dns.toml", &dns_only));
    assert!(ok, "{stderr}");
    let c = certs();
    let edge_only = edge_text(
        "",
        &c.join("edge.crt").display().to_string(),
        &c.join("edge.key").display().to_string(),
    );
    let (ok, _, stderr) = check(&write_file(dir.path(), "edge.toml", &edge_only));
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = check(&write_file(
        dir.path(),
        "none.toml",
        "[pop]\nname = \"p\"\n",
    ));
    assert!(!ok);
    assert!(stderr.contains("nothing to run"), "{stderr}");
}

/// (line, column) of `needle` in `text`, 1-based.
fn position(text: &str, needle: &str) -> (usize, usize) {
    text.lines()
        .enumerate()
        .find_map(|(i, l)| l.find(needle).map(|c| (i + 1, c + 1)))
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"))
}

/// A `[dns]` section using the shipped region file, with `extra` keys.
fn dns_text(extra: &str) -> String {
    format!(
        "\n[dns]\nlisten = \"127.0.0.1:0\"\nzone = \"edgepop.test\"\nnames = [\"www.edgepop.test\"]\nregions = \"{}\"\n{extra}\n",
        root().join("config/regions.toml").display()
    )
}

fn dev_cert_and_key() -> (String, String) {
    let c = certs();
    (
        c.join("edge.crt").display().to_string(),
        c.join("edge.key").display().to_string(),
    )
}

#[test]
fn check_validates_every_role_in_the_file_and_points_at_the_first_error() {
    let (crt, key) = dev_cert_and_key();
    // A valid edge, a [dns] value that is wrong.
    let text = format!(
        "{}{}",
        edge_text("", &crt, &key),
        dns_text("ttl = \"soon\"")
    );
    let (line, col) = position(&text, "\"soon\"");
    assert_eq!(
        check_text(&text).trim(),
        format!("e.toml:{line}:{col}: invalid value: string \"soon\", expected a duration")
    );
    // A valid [dns], an edge certificate file that is missing.
    let text = format!(
        "{}{}",
        edge_text("", "/nonexistent/x.crt", &key),
        dns_text("")
    );
    let err = check_text(&text);
    assert!(
        err.starts_with("e.toml:7:8: certificate file /nonexistent/x.crt"),
        "{err}"
    );
    // Some edge sections but not all: still an error, whatever [dns] says.
    let partial = format!(
        "[pop]\nname = \"p\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n{}",
        dns_text("")
    );
    assert_eq!(
        check_text(&partial).trim(),
        "e.toml:1:1: the edge role needs at least one [[certificates]] entry"
    );
    // The edge role needs [pop].
    let no_pop = edge_text("", &crt, &key).replacen("[pop]\nname = \"p\"\n", "", 1);
    assert_eq!(
        check_text(&no_pop).trim(),
        "e.toml:1:1: missing [pop] section (the edge role needs it)"
    );
    // Neither role.
    let none = check_text("[admin]\nlisten = \"127.0.0.1:0\"\n");
    assert!(none.starts_with("e.toml:1:1: nothing to run: "), "{none}");
}

#[test]
fn a_dns_only_file_needs_no_pop_section() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("dns.toml", dns_text("")),
        (
            "dns-admin.toml",
            format!("[admin]\nlisten = \"127.0.0.1:9953\"\n{}", dns_text("")),
        ),
    ] {
        let (ok, stdout, stderr) = check(&write_file(dir.path(), name, &text));
        assert!(ok, "{name}: {stderr}");
        assert!(
            stdout.contains("dns 127.0.0.1:0 zone edgepop.test"),
            "{stdout}"
        );
    }
}

#[test]
fn a_bad_health_ca_fails_check_at_its_key() {
    let missing = check_text(&dns_text("health_ca = \"/nonexistent/ca.crt\""));
    let (line, col) = position(&dns_text(""), "regions =");
    // health_ca is the line after regions, its value after "health_ca = ".
    assert_eq!(col, 1);
    assert!(
        missing.starts_with(&format!(
            "e.toml:{}:13: CA file /nonexistent/ca.crt: ",
            line + 1
        )),
        "{missing}"
    );
    let key = certs().join("edge.key");
    let not_a_ca = check_text(&dns_text(&format!("health_ca = \"{}\"", key.display())));
    assert_eq!(
        not_a_ca.trim(),
        format!(
            "e.toml:{}:13: CA file {} holds no usable certificate",
            line + 1,
            key.display()
        )
    );
}

/// Runs the binary to completion (it must exit within 30 s).
async fn run_to_exit(args: &[&str], config: &std::path::Path) -> std::process::Output {
    let out = tokio::process::Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env("EDGEPOP_LOG", "warn")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(std::time::Duration::from_secs(30), out)
        .await
        .expect("exits")
        .expect("runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_ignores_the_dns_section_but_not_an_unknown_key_in_it() {
    let o = origin().start().await.unwrap();
    let edge = edge_config(&[("o1", o.addr(), "")], &["localhost"]);
    // Every [dns] value is wrong and every file it names is missing: not serve's business.
    let bad_dns = "\n[dns]\nlisten = \"not-an-address\"\nzone = \"edgepop.test\"\nnames = [\"www.edgepop.test\"]\nttl = \"soon\"\nregions = \"/nonexistent/regions.toml\"\nhealth_ca = \"/nonexistent/ca.crt\"\n";
    let text = format!("{edge}{bad_dns}");
    let e = spawn_edge(&text).await;
    let mut client = Client::connect(e.addr, "localhost", false).await;
    assert_eq!(client.get("localhost", "/").await.0, 200);

    let dir = tempfile::tempdir().unwrap();
    // check validates both roles and stops at the [dns] error.
    let (ok, _, stderr) = check(&write_file(dir.path(), "both.toml", &text));
    assert!(!ok);
    assert!(
        stderr.contains("invalid value: string \"soon\""),
        "{stderr}"
    );
    // The shape of the whole file is still checked.
    let junk = write_file(
        dir.path(),
        "junk.toml",
        &format!("{edge}{}", dns_text("junk_key = 1")),
    );
    let out = run_to_exit(&["serve"], &junk).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("unknown field `junk_key`"), "{err}");
    // A file without the edge role gives serve nothing to run.
    let dns_only = write_file(dir.path(), "dns.toml", &dns_text(""));
    let out = run_to_exit(&["serve"], &dns_only).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}:1:1: nothing for `edgepop serve` to run",
            dns_only.display()
        )),
        "{err}"
    );
    // And a file without [dns] gives dns nothing to run.
    let (crt, key) = dev_cert_and_key();
    let edge_only = write_file(dir.path(), "edge.toml", &edge_text("", &crt, &key));
    let out = run_to_exit(&["dns"], &edge_only).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}:1:1: no [dns] section: nothing for `edgepop dns` to run",
            edge_only.display()
        )),
        "{err}"
    );
}

/// The civil date (year, month, day) `days` after 1970-01-01 (H. Hinnant's algorithm), for
/// certificates that expire relative to today.
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8, d as u8)
}

/// A self-signed certificate for localhost valid until `days` from today (negative: in the
/// past), with these extended key usages; written as (cert, key) files in `dir`.
fn cert_until(
    dir: &std::path::Path,
    name: &str,
    days: i64,
    usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
) -> (String, String) {
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 86_400;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let (y, m, d) = civil(today - 400);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil(today + days);
    params.not_after = rcgen::date_time_ymd(y, m, d);
    params.extended_key_usages = usages;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (
        write_file(dir, &format!("{name}.crt"), &cert.pem())
            .display()
            .to_string(),
        write_file(dir, &format!("{name}.key"), &key.serialize_pem())
            .display()
            .to_string(),
    )
}

#[test]
fn check_shows_when_certificates_expire_and_warns_before_they_do() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let dir = tempfile::tempdir().unwrap();
    // A server certificate with days to go, a client certificate only for servers.
    let (crt, key) = cert_until(dir.path(), "soon", 3, vec![ServerAuth]);
    let (ccrt, ckey) = cert_until(dir.path(), "client", 300, vec![ServerAuth]);
    let text = edge_text(
        &format!("client_cert = \"{ccrt}\"\nclient_key = \"{ckey}\""),
        &crt,
        &key,
    );
    let (ok, stdout, stderr) = check(&write_file(dir.path(), "a.toml", &text));
    assert!(ok, "check warns, it does not refuse: {stderr}");
    assert!(
        stdout.contains(&format!("  certificate localhost ({crt}) expires ")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("  warning: certificate {crt} expires "))
            && stdout.contains(" days): renew it"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("  warning: origin o client_cert {ccrt}: its extended key usage lacks clientAuth, so origins that check it will refuse it")),
        "{stdout}"
    );
    // Expired; and certificates for their use, far from expiry, get no warning.
    let (old, old_key) = cert_until(dir.path(), "old", -2, vec![]);
    let (good, good_key) = cert_until(dir.path(), "good", 300, vec![ServerAuth, ClientAuth]);
    let text = edge_text(
        &format!("client_cert = \"{good}\"\nclient_key = \"{good_key}\""),
        &old,
        &old_key,
    );
    let (ok, stdout, _) = check(&write_file(dir.path(), "b.toml", &text));
    assert!(ok);
    assert!(
        stdout.contains(&format!(
            "  warning: certificate {old} has expired: expired "
        )),
        "{stdout}"
    );
    assert_eq!(stdout.matches("warning:").count(), 1, "{stdout}");
    // anyExtendedKeyUsage is not serverAuth to rustls or OpenSSL.
    let (any, any_key) = cert_until(
        dir.path(),
        "any",
        300,
        vec![rcgen::ExtendedKeyUsagePurpose::Any],
    );
    let (ok, stdout, _) = check(&write_file(
        dir.path(),
        "c.toml",
        &edge_text("", &any, &any_key),
    ));
    assert!(ok);
    assert!(
        stdout.contains(&format!("  warning: certificate {any}: its extended key usage lacks serverAuth, so clients will refuse it")),
        "{stdout}"
    );
}
