//! Client errors as Python exceptions. The classes live in
//! `arrowbus/_errors.py` (plain Python, so they can also inherit from
//! builtins such as `TimeoutError`); this side only hands over what the Rust
//! client knows: a kind, the stable wire code, its name, the broker's
//! message and the leader hint.

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// A client error in a form that can be kept, cloned (a `PendingAck` may be
/// asked for its result twice) and sent between threads.
#[derive(Debug, Clone)]
pub struct BusError {
    /// Which class family: "broker" (has a wire code), "config", "connect",
    /// "transport", "protocol", "arrow", "closed".
    pub kind: &'static str,
    pub code: Option<u16>,
    pub name: String,
    pub message: String,
    pub leader_hint: Option<u64>,
}

impl BusError {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code: None,
            name: String::new(),
            message: message.into(),
            leader_hint: None,
        }
    }

    pub fn arrow(e: arrow_schema::ArrowError) -> Self {
        Self::new("arrow", e.to_string())
    }

    /// The Python exception object for this error.
    pub fn to_pyerr(&self, py: Python<'_>) -> PyErr {
        static MAKE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let made = MAKE
            .import(py, "arrowbus._errors", "_make")
            .and_then(|make| {
                make.call1((
                    self.kind,
                    self.code,
                    self.name.as_str(),
                    self.message.as_str(),
                    self.leader_hint,
                ))
            });
        match made {
            Ok(exc) => PyErr::from_value(exc),
            // Only when the Python half of the package is broken; still not
            // a RuntimeError, and the message is kept.
            Err(e) => PyException::new_err(format!(
                "{} (and arrowbus._errors failed: {e})",
                self.message
            )),
        }
    }
}

impl From<arrowbus::Error> for BusError {
    fn from(e: arrowbus::Error) -> Self {
        use arrowbus::Error as E;
        let message = e.to_string();
        let code = e.code().map(|c| c.as_u16());
        let name = e.code().map(|c| c.name().to_owned()).unwrap_or_default();
        let (kind, message, leader_hint) = match e {
            E::Broker {
                code,
                message,
                leader_hint,
                ..
            } => {
                return Self {
                    kind: "broker",
                    code: Some(code),
                    name: arrowbus::ErrorCode::from_u16(code)
                        .map_or_else(|| format!("Unknown{code}"), |c| c.name().to_owned()),
                    message,
                    leader_hint,
                }
            }
            E::SchemaMismatch(m) | E::BatchTooLarge(m) => ("broker", m, None),
            E::Timeout(_) => ("broker", message, None),
            E::Config(_) => ("config", message, None),
            E::Connect { .. } => ("connect", message, None),
            E::Transport(_) => ("transport", message, None),
            E::Protocol(_) => ("protocol", message, None),
            E::Arrow(_) => ("arrow", message, None),
            // A variant added to the Rust client later: still an arrowbus.Error.
            _ => ("other", message, None),
        };
        Self {
            kind,
            code,
            name,
            message,
            leader_hint,
        }
    }
}

impl From<BusError> for PyErr {
    fn from(e: BusError) -> PyErr {
        Python::attach(|py| e.to_pyerr(py))
    }
}
