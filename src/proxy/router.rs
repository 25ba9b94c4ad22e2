//! Host -> route: exact names first, then a `*.` wildcard matching one label. Built once per
//! configuration and swapped whole on reload.

use super::rate_limit::RateLimiter;
use crate::config::{HeaderEdits, RouteConfig};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
    routes: Vec<Route>,
}

/// What a request's Host selects.
#[derive(Debug)]
pub struct Route {
    /// Origin indices in failover order.
    pub origins: Vec<usize>,
    /// Largest request body accepted (413 above it); none: no limit.
    pub max_body_size: Option<u64>,
    /// Requests per client (429 beyond); none: no limit.
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// `Strict-Transport-Security` for HTTPS answers without one.
    pub hsts: Option<http::HeaderValue>,
    /// Fields removed and set on requests to the origin (and kept out of client trailers).
    pub request_headers: Arc<HeaderEdits>,
    /// Fields removed and set on the origin's answers.
    pub response_headers: HeaderEdits,
    hosts: Vec<String>,
}

impl Router {
    /// `previous`: the router this one replaces (a reload), whose rate limiters carry on for
    /// routes with the same hosts and limit, so a reload (or a log rotation's SIGHUP) hands
    /// nobody a fresh allowance. `unrecorded` counts what full limiter tables let through.
    pub fn new(
        routes: &[RouteConfig],
        previous: Option<&Router>,
        unrecorded: &Arc<AtomicU64>,
    ) -> Self {
        let mut r = Router::default();
        for (i, route) in routes.iter().enumerate() {
            for host in &route.hosts {
                match host.strip_prefix("*.") {
                    Some(suffix) => r.wildcard.insert(suffix.to_string(), i),
                    None => r.exact.insert(host.clone(), i),
                };
            }
            let rate_limit = route.rate_limit.map(|limit| {
                let same = previous
                    .into_iter()
                    .flat_map(|p| &p.routes)
                    .filter(|old| old.hosts == route.hosts)
                    .find_map(|old| old.rate_limit.as_ref().filter(|l| l.limit() == limit));
                match same {
                    Some(l) => l.clone(),
                    None => Arc::new(RateLimiter::new(limit, unrecorded.clone())),
                }
            });
            r.routes.push(Route {
                origins: route.origins.clone(),
                max_body_size: route.max_body_size,
                rate_limit,
                hsts: route.hsts.clone(),
                request_headers: Arc::new(route.request_headers.clone()),
                response_headers: route.response_headers.clone(),
                hosts: route.hosts.clone(),
            });
        }
        r
    }

    /// The route serving `host`, which must be lower-case without port.
    pub fn route_for(&self, host: &str) -> Option<&Route> {
        let i = self.exact.get(host).or_else(|| {
            let (_, parent) = host.split_once('.')?;
            self.wildcard.get(parent)
        })?;
        self.routes.get(*i)
    }

    /// The origins (failover order) serving `host`.
    pub fn origins_for(&self, host: &str) -> Option<&[usize]> {
        self.route_for(host).map(|r| r.origins.as_slice())
    }

    pub fn routes(&self) -> impl Iterator<Item = &[usize]> {
        self.routes.iter().map(|r| r.origins.as_slice())
    }

    /// The routes' rate limiters.
    pub fn rate_limiters(&self) -> impl Iterator<Item = &Arc<RateLimiter>> {
        self.routes.iter().filter_map(|r| r.rate_limit.as_ref())
    }
}

/// Lower-cases a Host or :authority value and strips the port and a trailing dot. Returns
/// `None` for values that are not a plausible host (so they get 400, not a route lookup).
pub fn normalize_host(authority: &str) -> Option<String> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']')?;
        &authority[..end + 2]
    } else {
        match authority.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        }
    };
    let host = host.trim_end_matches('.');
    if host.is_empty()
        || host
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b == b'@' || b == b'/')
    {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(hosts: &[&str], origins: &[usize]) -> RouteConfig {
        RouteConfig {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            origins: origins.to_vec(),
            max_body_size: None,
            rate_limit: None,
            hsts: None,
            request_headers: HeaderEdits::default(),
            response_headers: HeaderEdits::default(),
        }
    }

    #[test]
    fn exact_names_win_over_wildcards_and_wildcards_match_one_label() {
        let r = Router::new(
            &[
                route(&["*.example.com"], &[0]),
                route(&["www.example.com"], &[1]),
            ],
            None,
            &Arc::default(),
        );
        assert_eq!(r.origins_for("www.example.com"), Some(&[1][..]));
        assert_eq!(r.origins_for("img.example.com"), Some(&[0][..]));
        assert_eq!(r.origins_for("a.b.example.com"), None);
        assert_eq!(r.origins_for("example.com"), None);
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(
            normalize_host("WWW.Example.com:443").as_deref(),
            Some("www.example.com")
        );
        assert_eq!(
            normalize_host("example.com.").as_deref(),
            Some("example.com")
        );
        assert_eq!(normalize_host("[::1]:8443").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("user@evil"), None);
        assert_eq!(normalize_host(""), None);
    }
}
