//! Every bound of the protocol, with its unit in its name and the reason for
//! its value. Brokers and clients check these before allocating anything.

/// Largest rkyv control section of a frame. Control frames carry names,
/// schemas and topic listings, never data; 4 MiB fits a listing of the
/// maximum number of topics with room to spare.
pub const MAX_CONTROL_BYTES: u32 = 4 * 1024 * 1024;

/// Largest batch (80-byte header plus Arrow IPC body) a topic accepts. Arrow
/// batches are bigger than Kafka records; 16 MiB keeps one batch well inside a
/// segment and bounds what one in-flight publish can pin in broker memory.
/// Clients split larger frames.
pub const MAX_BATCH_BYTES: u32 = 16 * 1024 * 1024;

/// Largest frame body: a body is exactly one batch.
pub const MAX_BODY_BYTES: u32 = MAX_BATCH_BYTES;

/// Largest Arrow IPC schema message accepted for a topic. Wide schemas with
/// metadata are a few KiB; 1 MiB refuses abuse, not real tables.
pub const MAX_SCHEMA_BYTES: u32 = 1024 * 1024;

/// Unacknowledged publishes one producer stream may have in flight. Matches the
/// idempotence window of five batches per producer (Kafka's bound as well):
/// more in flight than the window would make retries undetectable.
pub const MAX_INFLIGHT_BATCHES_PER_PRODUCER: usize = 5;

/// Bytes one producer stream may have in flight, so that five maximal batches
/// cannot all be outstanding at once on a single stream.
pub const MAX_INFLIGHT_BYTES_PER_PRODUCER: u64 = 64 * 1024 * 1024;

/// Subscription streams one connection may hold. Each costs a task and at most
/// its credit in memory.
pub const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 256;

/// Concurrent client connections per broker.
pub const MAX_CONNECTIONS: usize = 1024;

/// Topics per cluster. Each topic costs open files per partition.
pub const MAX_TOPICS: usize = 10_000;

/// Partitions per topic. Each partition is a directory, open segment files and
/// (with replication) a Raft group.
pub const MAX_PARTITIONS_PER_TOPIC: u32 = 1024;

/// Byte credit one subscription may hold: the most a broker will have read and
/// not yet delivered for it. 64 MiB keeps a thousand subscriptions under the
/// memory of a small node even in the worst case.
pub const MAX_CREDIT_BYTES_PER_SUBSCRIPTION: u64 = 64 * 1024 * 1024;

/// Batch credit one subscription may hold.
pub const MAX_CREDIT_BATCHES_PER_SUBSCRIPTION: u32 = 4096;

/// Longest topic name in bytes (Kafka's bound: names become directory names).
pub const MAX_TOPIC_NAME_BYTES: usize = 249;

/// How long a client waits for the answer to a unary request before giving up.
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;

/// Longest error message a broker sends; longer ones are cut.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;
