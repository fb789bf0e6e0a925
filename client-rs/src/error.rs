//! The client's error type. Broker errors keep their stable wire code so
//! callers (and the Python exception hierarchy) can match on it.

use arrowbus_wire::ErrorCode;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker refused the request.
    #[error("{name} ({code}): {message}")]
    Broker {
        /// Stable numeric code (see `arrowbus_wire::ErrorCode`).
        code: u16,
        name: &'static str,
        message: String,
        leader_hint: Option<u64>,
    },
    /// The batch's schema does not match the topic's; names the fields.
    #[error("SchemaMismatch (20): {0}")]
    SchemaMismatch(String),
    /// No broker address, bad CA file, unreadable profile.
    #[error("configuration: {0}")]
    Config(String),
    /// Could not reach any broker.
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The connection or stream failed mid-request. For a publish this is
    /// indeterminate: the batch may or may not have been stored.
    #[error("connection lost: {0}")]
    Transport(String),
    /// The broker sent something that does not decode.
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("request timed out after {0} ms")]
    Timeout(u64),
    /// Arrow encoding or decoding failed on this side.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    /// The batch is larger than the broker accepts.
    #[error("BatchTooLarge (23): {0}")]
    BatchTooLarge(String),
}

impl Error {
    /// The same error for another caller (one failed coalesced batch fails
    /// every publish in it). An Arrow error keeps its message.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Error::Broker {
                code,
                name,
                message,
                leader_hint,
            } => Error::Broker {
                code: *code,
                name,
                message: message.clone(),
                leader_hint: *leader_hint,
            },
            Error::SchemaMismatch(m) => Error::SchemaMismatch(m.clone()),
            Error::Config(m) => Error::Config(m.clone()),
            Error::Connect { addr, reason } => Error::Connect {
                addr: addr.clone(),
                reason: reason.clone(),
            },
            Error::Transport(m) => Error::Transport(m.clone()),
            Error::Protocol(m) => Error::Protocol(m.clone()),
            Error::Timeout(ms) => Error::Timeout(*ms),
            Error::Arrow(e) => Error::Arrow(arrow_schema::ArrowError::ExternalError(
                e.to_string().into(),
            )),
            Error::BatchTooLarge(m) => Error::BatchTooLarge(m.clone()),
        }
    }

    /// The stable wire code of this error, when it has one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Broker { code, .. } => ErrorCode::from_u16(*code),
            Error::SchemaMismatch(_) => Some(ErrorCode::SchemaMismatch),
            Error::Timeout(_) => Some(ErrorCode::Timeout),
            Error::BatchTooLarge(_) => Some(ErrorCode::BatchTooLarge),
            _ => None,
        }
    }

    pub(crate) fn from_reply(r: &arrowbus_wire::ErrorReply) -> Self {
        Error::Broker {
            code: r.code,
            name: ErrorCode::from_u16(r.code).map_or("Unknown", |c| c.name()),
            message: r.message.clone(),
            leader_hint: r.leader_hint,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
