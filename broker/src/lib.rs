//! arrowbus broker node: topics and their partition logs, the write path
//! (validate, sequence, durable append), the read path (credit-based
//! subscriptions), and the QUIC server. The `busd` binary wraps it.
//!
//! It must never trust a client: every frame, batch header and Arrow body is
//! checked before anything is stored, and every limit of `arrowbus_wire::limits`
//! is enforced before allocating.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod controller;
pub mod error;
pub mod framing;
pub mod ipc;
pub mod profile;
pub mod server;
pub mod tls;
pub mod topics;

pub use config::BrokerConfig;
pub use error::BrokerError;
pub use server::Broker;
