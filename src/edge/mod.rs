//! The client side of the edge: `listener` accepts TCP and runs the TLS handshake under a
//! timeout; `conn` serves h1 or h2 (by ALPN) on the result with hyper, idle timeout and
//! graceful drain, `streams` running an h2 connection's streams on its own task; `write_deadline` closes connections a client stops reading; `linger`
//! keeps reading from an http/1.1 client still uploading after its answer, so it gets it;
//! `h3` serves HTTP/3 (QUIC) on a listener's port; `proxy_protocol` reads the client's address
//! from a TCP balancer's header and `client_limit` caps the connections of one client.

/// Largest request header section a client may send, over every protocol (http/1.1 with its
/// request line; the h2 and HTTP/3 header lists as they count them): 431 beyond (nginx
/// allows 4 x 8 KiB by default, HAProxy 16 KiB of buffer).
pub const MAX_HEADER_SECTION: usize = 64 * 1024;

/// Where the h2 and h3 crates stop decoding a header list and answer 431 themselves, unseen by
/// the handler (nothing logged or counted): twice the cap, so the handler's own check
/// (`proxy::handler`) refuses the sections between the two with a 431 that is logged with its
/// method and path.
pub const HEADER_LIST_DECODE_LIMIT: usize = 2 * MAX_HEADER_SECTION;

mod activity;
pub mod client_limit;
pub mod conn;
pub mod h3;
pub mod linger;
pub mod listener;
pub mod proxy_protocol;
mod streams;
mod write_deadline;

pub use listener::{bind, Listener, Settings};
