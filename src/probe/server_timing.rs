//! Reads the edge's `Server-Timing` header: `pool;dur=<ms>, upstream;dur=<ms>;desc="warm"`.
//! Tolerant: any order, several headers, unknown metrics and parameters ignored, quoted or
//! bare values, stray whitespace; a malformed metric is skipped, never an error.

use serde::Serialize;
use std::time::Duration;

/// The PoP's own view of one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServerTiming {
    /// Time the edge waited for a pooled upstream connection.
    #[serde(rename = "pool_ms", serialize_with = "super::report::ser_opt_ms")]
    pub pool: Option<Duration>,
    /// Upstream time to first byte, as seen by the edge (the PoP-origin leg).
    #[serde(rename = "upstream_ms", serialize_with = "super::report::ser_opt_ms")]
    pub upstream: Option<Duration>,
    /// How the upstream connection was obtained: `warm`, `fresh` or `resumed`.
    pub upstream_state: Option<String>,
    /// On a connection's first request: the client handshake as the edge timed it (its
    /// first byte to the request being readable).
    #[serde(
        rename = "edge_tls_ms",
        serialize_with = "super::report::ser_opt_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls: Option<Duration>,
    /// That handshake's kind: `full`, `resumed`, `early` or `quic`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_handshake: Option<String>,
}

impl ServerTiming {
    /// Parses every `Server-Timing` value of a response; `None` if no metric we know is there.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<ServerTiming> {
        let mut st = ServerTiming::default();
        for value in headers.get_all("server-timing") {
            if let Ok(text) = value.to_str() {
                st.merge(text);
            }
        }
        (st != ServerTiming::default()).then_some(st)
    }

    /// Parses one header value into `self` (later metrics of the same name win).
    pub fn merge(&mut self, value: &str) {
        for metric in split_outside_quotes(value, ',') {
            let mut parts = split_outside_quotes(metric, ';').into_iter();
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut dur = None;
            let mut desc = None;
            for param in parts {
                let Some((k, v)) = param.split_once('=') else {
                    continue;
                };
                let v = unquote(v.trim());
                match k.trim().to_ascii_lowercase().as_str() {
                    "dur" => dur = parse_ms(&v),
                    "desc" => desc = Some(v),
                    _ => {}
                }
            }
            match name.as_str() {
                "pool" => self.pool = dur.or(self.pool),
                "upstream" => {
                    self.upstream = dur.or(self.upstream);
                    if let Some(d) = desc.filter(|d| !d.is_empty()) {
                        self.upstream_state = Some(d.to_ascii_lowercase());
                    }
                }
                "tls" => {
                    self.tls = dur.or(self.tls);
                    if let Some(d) = desc.filter(|d| !d.is_empty()) {
                        self.tls_handshake = Some(d.to_ascii_lowercase());
                    }
                }
                _ => {}
            }
        }
    }
}

/// Milliseconds as a float, finite and non-negative.
fn parse_ms(v: &str) -> Option<Duration> {
    let ms: f64 = v.parse().ok()?;
    (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0))
}

/// Splits on `sep` except inside a double-quoted string (with backslash escapes).
fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            out.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&s[start..]);
    out
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut escaped = false;
            for c in inner.chars() {
                if !escaped && c == '\\' {
                    escaped = true;
                } else {
                    out.push(c);
                    escaped = false;
                }
            }
            out
        }
        None => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &str) -> ServerTiming {
        let mut st = ServerTiming::default();
        st.merge(v);
        st
    }

    #[test]
    fn reads_the_edge_format() {
        let st = parse(r#"pool;dur=0.25, upstream;dur=80.5;desc="warm""#);
        assert_eq!(st.pool, Some(Duration::from_micros(250)));
        assert_eq!(st.upstream, Some(Duration::from_micros(80_500)));
        assert_eq!(st.upstream_state.as_deref(), Some("warm"));
        assert_eq!(st.tls, None);
        let first = parse(r#"tls;dur=1.5;desc="resumed", pool;dur=0.25, upstream;dur=80.5"#);
        assert_eq!(first.tls, Some(Duration::from_micros(1500)));
        assert_eq!(first.tls_handshake.as_deref(), Some("resumed"));
        assert_eq!(first.pool, Some(Duration::from_micros(250)));
    }

    #[test]
    fn any_order_unknown_metrics_and_bare_values_are_fine() {
        let st = parse(
            r#"cdn-cache; desc="HIT, really", upstream ;desc=Fresh; dur=12 ,db;dur=3,pool;dur=1"#,
        );
        assert_eq!(st.pool, Some(Duration::from_millis(1)));
        assert_eq!(st.upstream, Some(Duration::from_millis(12)));
        assert_eq!(st.upstream_state.as_deref(), Some("fresh"));
    }

    #[test]
    fn malformed_metrics_are_skipped() {
        let st = parse(r#"pool;dur=abc, upstream;dur=-1, ;;, upstream;dur=5;desc="re\"sumed""#);
        assert_eq!(st.pool, None);
        assert_eq!(st.upstream, Some(Duration::from_millis(5)));
        assert_eq!(st.upstream_state.as_deref(), Some("re\"sumed"));
    }

    #[test]
    fn several_headers_merge() {
        let mut h = http::HeaderMap::new();
        h.append(
            "server-timing",
            http::HeaderValue::from_static("pool;dur=2"),
        );
        h.append(
            "Server-Timing",
            http::HeaderValue::from_static("upstream;dur=7;desc=resumed"),
        );
        let st = ServerTiming::from_headers(&h).expect("metrics");
        assert_eq!(st.pool, Some(Duration::from_millis(2)));
        assert_eq!(st.upstream_state.as_deref(), Some("resumed"));
        assert!(ServerTiming::from_headers(&http::HeaderMap::new()).is_none());
    }
}
