//! Stable error codes. A code is never reused or renumbered: clients (the
//! Python exception hierarchy among them) map on the number.

/// Every error a broker can return to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Broker bug or unexpected state; the request may be retried.
    Internal = 1,
    /// A frame could not be decoded (bad magic, bad lengths, invalid rkyv).
    MalformedFrame = 2,
    /// The frame's protocol version is not spoken by this broker.
    UnsupportedVersion = 3,
    /// A frame section exceeds its limit.
    FrameTooLarge = 4,
    /// A valid message arrived where it makes no sense (e.g. Credit first).
    UnexpectedMessage = 5,
    /// An argument is out of range; the message names it.
    InvalidArgument = 6,

    TopicNotFound = 10,
    TopicAlreadyExists = 11,
    PartitionNotFound = 12,
    InvalidTopicName = 13,
    TooManyTopics = 14,
    TooManyPartitions = 15,

    /// The batch's schema differs from the topic's; the message names the fields.
    SchemaMismatch = 20,
    /// The topic has no schema yet and the request needs one.
    SchemaNotSet = 21,
    /// The Arrow IPC body does not decode or validate.
    InvalidArrowIpc = 22,
    /// The batch exceeds MAX_BATCH_BYTES.
    BatchTooLarge = 23,
    /// Batch header or body CRC mismatch, or inconsistent header fields.
    CorruptBatch = 24,
    /// An Arrow type this build cannot decode; the message names the type.
    UnsupportedArrowType = 25,

    /// The requested offset is outside the partition's retained range.
    OffsetOutOfRange = 30,
    TooManySubscriptions = 31,
    TooManyConnections = 32,
    /// Credit beyond the per-subscription maximum.
    CreditTooLarge = 33,

    /// The data disk is full; nothing was stored. Retry after freeing space.
    StorageFull = 40,
    /// Writing or syncing the log failed; nothing was acknowledged.
    StorageError = 41,

    /// This node does not lead the partition; the reply names the leader.
    NotLeader = 50,
    /// The broker is overloaded; retry after the hinted delay.
    Busy = 51,
    Timeout = 52,
    ShuttingDown = 53,

    Unauthorized = 60,

    /// Reserved for exactly-once (idempotent producers and transactions).
    ProducerFenced = 70,
    OutOfOrderSequence = 71,
    InvalidProducerEpoch = 72,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        Self::Internal,
        Self::MalformedFrame,
        Self::UnsupportedVersion,
        Self::FrameTooLarge,
        Self::UnexpectedMessage,
        Self::InvalidArgument,
        Self::TopicNotFound,
        Self::TopicAlreadyExists,
        Self::PartitionNotFound,
        Self::InvalidTopicName,
        Self::TooManyTopics,
        Self::TooManyPartitions,
        Self::SchemaMismatch,
        Self::SchemaNotSet,
        Self::InvalidArrowIpc,
        Self::BatchTooLarge,
        Self::CorruptBatch,
        Self::UnsupportedArrowType,
        Self::OffsetOutOfRange,
        Self::TooManySubscriptions,
        Self::TooManyConnections,
        Self::CreditTooLarge,
        Self::StorageFull,
        Self::StorageError,
        Self::NotLeader,
        Self::Busy,
        Self::Timeout,
        Self::ShuttingDown,
        Self::Unauthorized,
        Self::ProducerFenced,
        Self::OutOfOrderSequence,
        Self::InvalidProducerEpoch,
    ];

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code for a number received from a peer; unknown numbers (a newer
    /// broker) are kept by the caller as raw numbers.
    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| *c as u16 == v)
    }

    /// Stable name, as shown to users and used by the Python exception classes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Internal => "Internal",
            Self::MalformedFrame => "MalformedFrame",
            Self::UnsupportedVersion => "UnsupportedVersion",
            Self::FrameTooLarge => "FrameTooLarge",
            Self::UnexpectedMessage => "UnexpectedMessage",
            Self::InvalidArgument => "InvalidArgument",
            Self::TopicNotFound => "TopicNotFound",
            Self::TopicAlreadyExists => "TopicAlreadyExists",
            Self::PartitionNotFound => "PartitionNotFound",
            Self::InvalidTopicName => "InvalidTopicName",
            Self::TooManyTopics => "TooManyTopics",
            Self::TooManyPartitions => "TooManyPartitions",
            Self::SchemaMismatch => "SchemaMismatch",
            Self::SchemaNotSet => "SchemaNotSet",
            Self::InvalidArrowIpc => "InvalidArrowIpc",
            Self::BatchTooLarge => "BatchTooLarge",
            Self::CorruptBatch => "CorruptBatch",
            Self::UnsupportedArrowType => "UnsupportedArrowType",
            Self::OffsetOutOfRange => "OffsetOutOfRange",
            Self::TooManySubscriptions => "TooManySubscriptions",
            Self::TooManyConnections => "TooManyConnections",
            Self::CreditTooLarge => "CreditTooLarge",
            Self::StorageFull => "StorageFull",
            Self::StorageError => "StorageError",
            Self::NotLeader => "NotLeader",
            Self::Busy => "Busy",
            Self::Timeout => "Timeout",
            Self::ShuttingDown => "ShuttingDown",
            Self::Unauthorized => "Unauthorized",
            Self::ProducerFenced => "ProducerFenced",
            Self::OutOfOrderSequence => "OutOfOrderSequence",
            Self::InvalidProducerEpoch => "InvalidProducerEpoch",
        }
    }

    /// Whether retrying the same request unchanged can succeed.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            Self::Internal
                | Self::NotLeader
                | Self::Busy
                | Self::Timeout
                | Self::ShuttingDown
                | Self::StorageFull
                | Self::StorageError
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_and_names_are_unique_and_round_trip() {
        let mut nums = HashSet::new();
        let mut names = HashSet::new();
        for c in ErrorCode::ALL {
            assert!(nums.insert(c.as_u16()), "duplicate code {}", c.as_u16());
            assert!(names.insert(c.name()), "duplicate name {}", c.name());
            assert_eq!(ErrorCode::from_u16(c.as_u16()), Some(*c));
        }
        assert_eq!(ErrorCode::from_u16(9999), None);
    }

    #[test]
    fn published_numbers_never_change() {
        // These numbers are part of the protocol: clients in other languages
        // match on them. A failure here means a code was renumbered.
        assert_eq!(ErrorCode::MalformedFrame.as_u16(), 2);
        assert_eq!(ErrorCode::TopicNotFound.as_u16(), 10);
        assert_eq!(ErrorCode::SchemaMismatch.as_u16(), 20);
        assert_eq!(ErrorCode::InvalidArrowIpc.as_u16(), 22);
        assert_eq!(ErrorCode::StorageFull.as_u16(), 40);
        assert_eq!(ErrorCode::NotLeader.as_u16(), 50);
        assert_eq!(ErrorCode::ProducerFenced.as_u16(), 70);
    }
}
