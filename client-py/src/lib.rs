//! `arrowbus._arrowbus`: the native half of the `arrowbus` Python package.
//!
//! It wraps the Rust client (`arrowbus-client`); it never speaks the
//! protocol itself. What this crate owns:
//!
//! - moving Arrow data across the Python boundary without copying, through
//!   the Arrow PyCapsule interface (C Data / C Stream interfaces, [`arrow_io`]);
//! - one tokio runtime for the whole process ([`rt`]): sync calls block on it
//!   with the GIL released, asyncio calls get an `asyncio.Future` completed
//!   from it;
//! - mapping client errors to the Python exception hierarchy that
//!   `arrowbus/_errors.py` defines ([`errors`]).
//!
//! Coalescing small publishes (`linger_ms`) is the Rust producer's own
//! (`ProducerConfig::linger`).
//!
//! It must never hold the GIL while waiting for the network or encoding, and
//! never queue without a bound.

mod arrow_io;
mod client;
mod errors;
mod producer;
mod rt;
mod subscriber;

use pyo3::prelude::*;

#[pymodule]
fn _arrowbus(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(client::connect, m)?)?;
    m.add_function(wrap_pyfunction!(client::connect_async, m)?)?;
    m.add_function(wrap_pyfunction!(arrow_io::imported_buffer_addresses, m)?)?;
    m.add_class::<client::Client>()?;
    m.add_class::<client::Admin>()?;
    m.add_class::<client::TopicInfo>()?;
    m.add_class::<client::PartitionInfo>()?;
    m.add_class::<producer::Producer>()?;
    m.add_class::<producer::Ack>()?;
    m.add_class::<producer::PendingAck>()?;
    m.add_class::<subscriber::Subscription>()?;
    m.add_class::<subscriber::Batch>()?;
    m.add_class::<arrow_io::ArrowSchema>()?;
    m.add("MAX_BATCH_BYTES", arrowbus_wire::limits::MAX_BATCH_BYTES)?;
    // Registered at import, so it runs after the atexit hooks of code that
    // imported arrowbus (atexit is last in, first out): those may still use
    // the client.
    let gate = wrap_pyfunction!(rt::close_python_gate, m)?;
    m.py().import("atexit")?.call_method1("register", (gate,))?;
    Ok(())
}
