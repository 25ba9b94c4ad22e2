//! Header rewriting: hop-by-hop headers removed in both directions (RFC 9110 7.6.1, plus the
//! names the Connection header lists), X-Forwarded-For/-Proto and Via set, a route's own
//! edits applied. `Trailer` is end to
//! end (RFC 9110 6.6.2) and stays: an http/1.1 hop sends only the trailer fields it declares.

use crate::config::HeaderEdits;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    // h2c's upgrade settings (RFC 9113 3.1 retired h2c; over TLS it never applied).
    HeaderName::from_static("http2-settings"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Gives the request a fresh `X-Request-Id` (128 random bits, hex), replacing any the client
/// sent: as Envoy does at an edge, an ID from outside is not trusted to be unique. The origin
/// receives it and the access log records it, so one request can be followed through both.
pub fn set_request_id(headers: &mut HeaderMap) {
    let mut hex = [0u8; 32];
    if hex::encode_to_slice(rand::random::<[u8; 16]>(), &mut hex).is_ok() {
        if let Ok(mut v) = HeaderValue::from_bytes(&hex) {
            // Unique per request: HPACK would add it to the h2 upstream's dynamic table on
            // every request, pushing out the entries that repeat; never-indexed skips that.
            v.set_sensitive(true);
            headers.insert(&X_REQUEST_ID, v);
        }
    }
}

/// The non-empty elements of a comma-separated list field (RFC 9110 5.6.1), trimmed.
pub fn list_tokens<'a>(values: header::GetAll<'a, HeaderValue>) -> impl Iterator<Item = &'a [u8]> {
    values
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether the list field `name` holds `token` (case-insensitive).
pub fn has_token(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    list_tokens(h.get_all(name)).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The field names a `Connection` header lists (they are hop-by-hop too, RFC 9110 7.6.1).
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    list_tokens(headers.get_all(header::CONNECTION))
        .filter_map(|n| HeaderName::from_bytes(n).ok())
        .collect()
}

/// Removes hop-by-hop headers. `keep_te_trailers` keeps `TE: trailers`: the client takes
/// trailers, so the origin may send them (gRPC needs it over h2).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let listed = connection_listed(headers);
    let te_trailers = keep_te_trailers && has_token(headers, header::TE, "trailers");
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// One field's size as h2 and HTTP/3 count it (RFC 9113 6.5.2): name, value and 32 octets.
pub fn field_size(name: &str, value_len: usize) -> usize {
    name.len() + value_len + 32
}

/// A field section's size, as [`field_size`] counts each field.
pub fn section_size(fields: &HeaderMap) -> usize {
    fields
        .iter()
        .map(|(n, v)| field_size(n.as_str(), v.len()))
        .sum()
}

/// Removes from a client's trailers the fields a trailer must not carry (RFC 9110 6.5.1:
/// framing, routing, authentication, cookies, conditionals and the like) and the ones the
/// edge sets itself, so no origin that merges trailers into the header section can be told a
/// client address, a request ID or credentials that way (Apache's `MergeTrailers`,
/// CVE-2013-5704), and no connection-specific field makes an h2 upstream refuse them.
pub fn strip_trailers(trailers: &mut HeaderMap) {
    let listed = connection_listed(trailers);
    for name in listed
        .iter()
        .chain(HOP_BY_HOP.iter())
        .chain(NOT_IN_TRAILERS.iter())
    {
        trailers.remove(name);
    }
    let conditional: Vec<HeaderName> = trailers
        .keys()
        .filter(|k| k.as_str().starts_with("if-"))
        .cloned()
        .collect();
    for name in conditional {
        trailers.remove(name);
    }
}

static NOT_IN_TRAILERS: [HeaderName; 21] = [
    header::UPGRADE,
    header::TRAILER,
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
    header::CONTENT_TYPE,
    header::HOST,
    header::AUTHORIZATION,
    header::COOKIE,
    header::SET_COOKIE,
    header::CACHE_CONTROL,
    header::EXPECT,
    header::MAX_FORWARDS,
    header::RANGE,
    header::FORWARDED,
    header::VIA,
    header::AGE,
    HeaderName::from_static("early-data"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-request-id"),
];

/// What the edge tells the origin about a client connection, made once per connection:
/// its address for X-Forwarded-For, its scheme and this hop's `Forwarded` element (RFC 7239:
/// `for=192.0.2.1;proto=https`, an IPv6 address quoted and bracketed).
#[derive(Debug, Clone)]
pub struct ClientFields {
    addr: HeaderValue,
    proto: HeaderValue,
    forwarded: HeaderValue,
}

impl ClientFields {
    /// `tls`: the connection is HTTPS (else plain HTTP, a `redirect_to_https` listener's).
    pub fn new(client: IpAddr, tls: bool) -> Self {
        // An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d.
        let client = client.to_canonical();
        let proto = if tls { "https" } else { "http" };
        let element = match client {
            IpAddr::V4(a) => format!("for={a};proto={proto}"),
            IpAddr::V6(a) => format!("for=\"[{a}]\";proto={proto}"),
        };
        // An address and these fixed words are always valid field values.
        let value = |s: String| HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static(""));
        ClientFields {
            addr: value(client.to_string()),
            proto: HeaderValue::from_static(proto),
            forwarded: value(element),
        }
    }
}

/// Appends the client address to X-Forwarded-For, sets X-Forwarded-Proto and appends this
/// hop's element to `Forwarded`, so an origin that reads either finds, in its last entry,
/// what the edge saw rather than what a client wrote.
pub fn set_forwarded(headers: &mut HeaderMap, client: &ClientFields) {
    // Several X-Forwarded-For lines are one list (RFC 9110 5.3): keep every hop, in order.
    let prev: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if prev.is_empty() {
        headers.insert(&X_FORWARDED_FOR, client.addr.clone());
    } else {
        let mut chain = prev.join(", ").into_bytes();
        chain.extend_from_slice(b", ");
        chain.extend_from_slice(client.addr.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&chain) {
            headers.insert(&X_FORWARDED_FOR, v);
        }
    }
    headers.insert(&X_FORWARDED_PROTO, client.proto.clone());
    headers.append(header::FORWARDED, client.forwarded.clone());
}

/// Joins several `Cookie` fields into one, `; `-separated, for an http/1.1 origin (RFC
/// 9113 8.2.3: h2 and HTTP/3 clients split cookies into fields of their own, which an
/// http/1.1 request must not carry as several lines, RFC 6265 5.4).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// A route's own edits: its fields removed, then set (replacing any of that name).
pub fn apply_edits(headers: &mut HeaderMap, edits: &HeaderEdits) {
    for name in &edits.remove {
        headers.remove(name);
    }
    for (name, value) in &edits.set {
        headers.insert(name.clone(), value.clone());
    }
}

/// Takes the fields a route edits out of a client's trailers, so a trailer cannot bring back
/// what the route removes or override what it sets (at an origin that merges trailers into
/// the header section).
pub fn strip_edited(trailers: &mut HeaderMap, edits: &HeaderEdits) {
    for name in edits.remove.iter().chain(edits.set.iter().map(|(n, _)| n)) {
        trailers.remove(name);
    }
}

/// An origin's response head made ready for the client: hop-by-hop fields out, this hop in
/// Via. The route's edits come after whatever else the edge adds.
pub fn from_origin(headers: &mut HeaderMap, version: hyper::Version, via_name: &HeaderValue) {
    // The body was framed by Transfer-Encoding, which overrides any Content-Length beside
    // it (RFC 9112 6.3); that stale length must not reach the client (nginx and HAProxy
    // drop it too).
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(headers, false);
    append_via(headers, version, via_name);
}

/// Appends this hop to Via (`1.1 edgepop-<pop>` or `2 edgepop-<pop>`).
pub fn append_via(headers: &mut HeaderMap, version: hyper::Version, via_name: &HeaderValue) {
    let proto = match version {
        hyper::Version::HTTP_2 => "2",
        hyper::Version::HTTP_3 => "3",
        hyper::Version::HTTP_10 => "1.0",
        _ => "1.1",
    };
    let mut v = Vec::with_capacity(via_name.len() + 4);
    v.extend_from_slice(proto.as_bytes());
    v.push(b' ');
    v.extend_from_slice(via_name.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&v) {
        headers.append(header::VIA, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_listed_and_standard_hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-sum"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.contains_key("x-kept"));
        // End to end (RFC 9110 6.6.2): an http/1.1 hop sends the trailers it declares.
        assert_eq!(h.get(header::TRAILER).unwrap(), "x-sum");
    }

    #[test]
    fn trailers_lose_what_a_trailer_must_not_carry() {
        let mut t = HeaderMap::new();
        for (k, v) in [
            ("x-sum", "7"),
            ("grpc-status", "0"),
            ("connection", "x-private"),
            ("x-private", "1"),
            ("content-length", "9"),
            ("x-forwarded-for", "203.0.113.1"),
            ("authorization", "Basic x"),
            ("if-none-match", "*"),
            ("transfer-encoding", "chunked"),
        ] {
            t.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_trailers(&mut t);
        let mut names: Vec<&str> = t.keys().map(HeaderName::as_str).collect();
        names.sort();
        assert_eq!(names, ["grpc-status", "x-sum"]);
    }

    #[test]
    fn forwarded_for_appends_to_an_existing_chain() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("192.0.2.1"));
        set_forwarded(
            &mut h,
            &ClientFields::new("127.0.0.1".parse().unwrap(), true),
        );
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "192.0.2.1, 127.0.0.1");
        assert_eq!(h.get(&X_FORWARDED_PROTO).unwrap(), "https");
    }

    #[test]
    fn forwarded_gets_this_hops_element_after_whatever_the_client_wrote() {
        let mut h = HeaderMap::new();
        h.insert(
            header::FORWARDED,
            HeaderValue::from_static("for=9.9.9.9;proto=http"),
        );
        set_forwarded(
            &mut h,
            &ClientFields::new("2001:db8::7".parse().unwrap(), true),
        );
        let all: Vec<_> = h.get_all(header::FORWARDED).iter().collect();
        assert_eq!(
            all,
            [
                "for=9.9.9.9;proto=http",
                "for=\"[2001:db8::7]\";proto=https"
            ]
        );
        let mut h = HeaderMap::new();
        set_forwarded(
            &mut h,
            &ClientFields::new("192.0.2.1".parse().unwrap(), false),
        );
        assert_eq!(
            h.get(header::FORWARDED).unwrap(),
            "for=192.0.2.1;proto=http"
        );
    }

    #[test]
    fn split_cookies_are_joined_for_http1_and_one_is_left_alone() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1");
        for c in ["b=2", "c=3"] {
            h.append(header::COOKIE, HeaderValue::from_static(c));
        }
        join_cookies(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
    }

    #[test]
    fn an_origins_content_length_beside_transfer_encoding_is_dropped() {
        let via = HeaderValue::from_static("edgepop-t");
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        from_origin(&mut h, hyper::Version::HTTP_11, &via);
        assert!(
            !h.contains_key(header::CONTENT_LENGTH) && !h.contains_key(header::TRANSFER_ENCODING)
        );
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        from_origin(&mut h, hyper::Version::HTTP_11, &via);
        assert_eq!(h.get(header::CONTENT_LENGTH).unwrap(), "100");
    }

    #[test]
    fn forwarded_for_keeps_every_line_of_a_split_chain() {
        let mut h = HeaderMap::new();
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("192.0.2.1, 192.0.2.2"),
        );
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static(" "));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("192.0.2.3"));
        set_forwarded(
            &mut h,
            &ClientFields::new("127.0.0.1".parse().unwrap(), true),
        );
        let all: Vec<_> = h.get_all(&X_FORWARDED_FOR).iter().collect();
        assert_eq!(all, ["192.0.2.1, 192.0.2.2, 192.0.2.3, 127.0.0.1"]);
    }

    #[test]
    fn each_request_gets_its_own_32_hex_digit_id_replacing_the_clients() {
        let mut a = HeaderMap::new();
        a.insert(&X_REQUEST_ID, HeaderValue::from_static("from-the-client"));
        set_request_id(&mut a);
        let mut b = HeaderMap::new();
        set_request_id(&mut b);
        let (a, b) = (a.get(&X_REQUEST_ID).unwrap(), b.get(&X_REQUEST_ID).unwrap());
        for id in [a, b] {
            assert_eq!(id.len(), 32);
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit), "{id:?}");
        }
        assert_ne!(a, b);
    }
}
