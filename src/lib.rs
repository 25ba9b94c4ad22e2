//! edgepop: an edge proxy for a PoP.
//!
//! A request flows `edge::listener` (accept, TLS by SNI via `tls`) -> `edge::conn` (h1/h2) ->
//! `proxy::handler` (Host -> route, headers) -> `pool` (a pre-opened, verified TLS connection
//! to the origin) -> origin. Beside it: `dns` (the geo-steering sidecar), `probe`
//! (latency-probe), `wan` (the delay relay), `admin` (/healthz, /pools, /metrics), `demo`.

pub mod access_log;
pub mod admin;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dns;
pub mod edge;
pub mod metrics;
pub mod pool;
pub mod probe;
pub mod proxy;
pub mod serve;
pub mod tls;
pub mod wan;
