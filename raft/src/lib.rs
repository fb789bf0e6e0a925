//! arrowbus replication: openraft behind this crate's own API, so that a
//! consensus-library upgrade touches only this crate.
//!
//! - [`log`]: the partition log (segment files), which is also the Raft log:
//!   entries are stored once.
//! - [`store`]: openraft's log store over it; the vote in its own fsynced file.
//! - [`sm`]: the state machine driver and the [`sm::Applier`] each kind of
//!   group implements.
//! - [`network`]: Raft RPCs over QUIC, every group multiplexed on one
//!   connection per peer.
//! - [`quiesce`]: idle groups stop their timers; one ping per peer and
//!   interval keeps their leases instead of per-group heartbeats.
//! - [`group`]: opening a group; the partition applier; retention through
//!   snapshots ([`group::Group::compact_to`]).
//! - [`snapshot`]: the snapshot file and a partition's snapshot state.
//! - [`hint`]: restart hints (commit and apply positions), cheap to write.
//!
//! openraft is pinned to an exact 0.10 alpha: the 0.10 line has the storage
//! API this design needs (flush callbacks for group commit, `truncate_after`,
//! pre-vote, leader transfer). Its known pitfalls and how they are handled
//! here: the vote is fsynced before `save_vote` returns and only after
//! earlier appends are durable; the flush callback fires only after fsync;
//! openraft never purges the log by itself: retention decides a cut at a
//! segment boundary, a snapshot is built at that cut, and only then is
//! openraft asked to purge up to it (never past the snapshot, never what is
//! not applied). Snapshots are small state, not data, so a transfer in
//! flight never depends on log entries a purge removes.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod group;
pub mod hint;
pub mod log;
pub mod network;
pub mod quiesce;
pub mod sm;
pub mod snapshot;
pub mod store;
pub mod types;

pub use openraft::impls::BasicNode;
pub use openraft::ServerState;

/// Lock a mutex that guards plain data: a panic while it was held leaves
/// nothing half-updated that matters here, so poisoning is ignored.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
