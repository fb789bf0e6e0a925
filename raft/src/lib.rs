//! arrowbus replication layer. Today it owns the partition log on disk
//! ([`log`]): the segment-file store that is both the topic log subscribers
//! read and (next) the openraft log store. It must never depend on the broker
//! or a client crate, and never let an openraft type leak through its API.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod log;
