//! The client side of the edge: `listener` accepts TCP and runs the TLS handshake under a
//! timeout; `conn` serves h1 and h2 on the result with hyper-util's auto builder, idle timeout
//! and graceful drain.

pub mod conn;
pub mod listener;

pub use listener::{bind, Listener};
