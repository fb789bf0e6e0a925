//! jepsen-like: a fault-injection harness and history checker for arrowbus,
//! modelled on Jepsen's Kafka workload.
//!
//! Pure parts (no I/O): [`history`] (the JSON-lines format), [`checker`]
//! and [`cycles`] (anomalies), [`schedule`] (which fault when, from a seed),
//! [`plot`] and [`png`] (the timeline picture), [`report`] (text and JSON).
//! Parts that touch the world: [`cluster`] (busd processes, network
//! namespaces, signals), [`workload`] (clients), [`disk`] (each node's own
//! log, read after the run), [`run`] (ties them together).

pub mod checker;
pub mod cluster;
pub mod cycles;
pub mod disk;
pub mod history;
pub mod plot;
pub mod png;
pub mod report;
pub mod run;
pub mod schedule;
pub mod workload;
