//! The broker's error type at the client boundary: a stable wire code and a
//! message that says what to do.

use std::path::Path;

use arrowbus_wire::{ErrorCode, ErrorReply};

use crate::ipc::IpcError;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct BrokerError {
    pub code: ErrorCode,
    pub message: String,
    /// For `NotLeader`: the node that leads, when known.
    pub leader_hint: Option<u64>,
}

impl BrokerError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            leader_hint: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn io(op: &str, path: &Path, e: std::io::Error) -> Self {
        let code = if e.raw_os_error() == Some(libc::ENOSPC) {
            ErrorCode::StorageFull
        } else {
            ErrorCode::StorageError
        };
        Self::new(code, format!("{op} {}: {e}", path.display()))
    }

    pub fn reply(&self, request_id: u64) -> ErrorReply {
        let mut r = ErrorReply::new(self.code, self.message.clone());
        r.request_id = request_id;
        r.leader_hint = self.leader_hint;
        r
    }
}

impl From<IpcError> for BrokerError {
    fn from(e: IpcError) -> Self {
        match e {
            IpcError::Invalid(m) => BrokerError::new(ErrorCode::InvalidArrowIpc, m),
            IpcError::Unsupported(m) => BrokerError::new(ErrorCode::UnsupportedArrowType, m),
        }
    }
}
