//! One integration binary: real sockets on loopback, real TLS, real clients.

mod support;

mod config;
mod demo;
mod dns;
mod early;
mod edge;
mod h3;
mod pool;
mod probe;
