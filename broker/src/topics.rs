//! Topics and their partitions on this node. Owns topic metadata on disk
//! (`data_dir/topics/<name>/topic.toml` and `schema.arrows`) and the
//! partition logs below it (`p-<n>/`). Metadata changes are atomic: written
//! to a temporary file or directory, fsynced, renamed, and the parent
//! directory fsynced, so a crash leaves either the old or the new state.
//!
//! With replication (a later issue) topic metadata moves to the controller
//! group; partitions stay as they are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use arrowbus_raft::log::{AppendTicket, Entry, LogConfig, LogError, PartitionLog};
use arrowbus_wire::limits::{MAX_PARTITIONS_PER_TOPIC, MAX_TOPICS, MAX_TOPIC_NAME_BYTES};
use arrowbus_wire::{BatchHeader, ErrorCode, LogId, PartitionInfo, TopicInfo};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::BrokerError;
use crate::ipc::{self, TopicSchema};

/// A single node leads all its partitions in term 1; Raft assigns real terms
/// once partitions are replicated.
const SINGLE_NODE_TERM: u64 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopicMeta {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub created_ms: i64,
    /// 0 until the topic has a schema.
    pub schema_id: u32,
}

pub struct Topic {
    pub meta: TopicMeta,
    dir: PathBuf,
    schema: RwLock<Option<Arc<TopicSchema>>>,
    pub partitions: Vec<Arc<Partition>>,
}

pub struct Partition {
    pub topic: String,
    pub id: u32,
    pub log: Arc<PartitionLog>,
    node_id: u64,
    /// Last assigned append time: timestamps never go backwards within a
    /// partition, so seeking by time can binary-search the log. Held only
    /// while an append is enqueued (no I/O under it).
    last_ts: Mutex<i64>,
}

impl Partition {
    fn open(
        topic: &str,
        id: u32,
        dir: &Path,
        node_id: u64,
        cfg: LogConfig,
    ) -> Result<Self, BrokerError> {
        let (log, report) = PartitionLog::open(dir, cfg)?;
        if report.truncated_bytes > 0 {
            tracing::warn!(
                topic,
                partition = id,
                bytes = report.truncated_bytes,
                "removed torn tail of partition log"
            );
        }
        let last = log.last_enqueued();
        let last_ts = match last.last_log_id {
            Some(id) => log
                .entry(id.index)?
                .map(|b| b.header.timestamp_ms)
                .unwrap_or(0),
            None => 0,
        };
        Ok(Self {
            topic: topic.to_owned(),
            id,
            log,
            node_id,
            last_ts: Mutex::new(last_ts),
        })
    }

    /// Assign log id and append time and enqueue the batch; the ticket
    /// completes once the batch is durable.
    pub fn enqueue(
        &self,
        mut header: BatchHeader,
        body: Bytes,
    ) -> Result<AppendTicket, BrokerError> {
        let mut last_ts = self
            .last_ts
            .lock()
            .map_err(|_| BrokerError::internal("partition sequencer lock poisoned"))?;
        let pos = self.log.last_enqueued();
        header.log_id = LogId {
            term: SINGLE_NODE_TERM,
            leader: self.node_id,
            index: pos.last_index + 1,
        };
        let ts = now_ms().max(*last_ts);
        header.timestamp_ms = ts;
        let ticket = self.log.append(vec![Entry { header, body }])?;
        *last_ts = ts;
        Ok(ticket)
    }

    pub fn info(&self) -> PartitionInfo {
        let s = self.log.stats();
        PartitionInfo {
            partition: self.id,
            leader: self.node_id,
            replicas: vec![self.node_id],
            earliest_offset: s.start_offset,
            latest_offset: s.next_offset,
            bytes: s.bytes,
            batches: s.batches,
        }
    }
}

impl Topic {
    pub fn schema(&self) -> Option<Arc<TopicSchema>> {
        self.schema.read().ok().and_then(|s| s.clone())
    }

    pub fn partition(&self, p: u32) -> Result<&Arc<Partition>, BrokerError> {
        self.partitions.get(p as usize).ok_or_else(|| {
            BrokerError::new(
                ErrorCode::PartitionNotFound,
                format!(
                    "topic '{}' has partitions 0..{}; partition {p} does not exist",
                    self.meta.name, self.meta.partitions
                ),
            )
        })
    }

    pub fn info(&self) -> TopicInfo {
        let schema = self.schema();
        TopicInfo {
            name: self.meta.name.clone(),
            replication_factor: self.meta.replication_factor,
            retention_ms: self.meta.retention_ms,
            retention_bytes: self.meta.retention_bytes,
            schema_id: schema.as_ref().map_or(0, |s| s.id),
            schema_ipc: schema.map(|s| s.ipc.to_vec()).unwrap_or_default(),
            created_ms: self.meta.created_ms,
            partitions: self.partitions.iter().map(|p| p.info()).collect(),
        }
    }

    fn close(&self) {
        for p in &self.partitions {
            p.log.close();
        }
    }
}

pub struct NewTopic {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub schema_ipc: Option<Vec<u8>>,
}

/// All topics of this node.
pub struct Topics {
    dir: PathBuf,
    node_id: u64,
    log_cfg: LogConfig,
    map: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serializes metadata changes (create, delete, set schema): they do file
    /// I/O and must not interleave.
    admin: Mutex<()>,
}

impl Topics {
    /// Open every topic under `data_dir/topics` (blocking: recovers logs).
    pub fn open(data_dir: &Path, node_id: u64, log_cfg: LogConfig) -> Result<Self, BrokerError> {
        let dir = data_dir.join("topics");
        std::fs::create_dir_all(&dir).map_err(|e| BrokerError::io("creating", &dir, e))?;
        let mut map = BTreeMap::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| BrokerError::io("listing", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| BrokerError::io("listing", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') {
                // Leftovers of an interrupted create or delete: never visible.
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            let topic = load_topic(&path, node_id, &log_cfg)?;
            map.insert(topic.meta.name.clone(), Arc::new(topic));
        }
        sync_dir(&dir)?;
        Ok(Self {
            dir,
            node_id,
            log_cfg,
            map: RwLock::new(map),
            admin: Mutex::new(()),
        })
    }

    pub fn get(&self, name: &str) -> Result<Arc<Topic>, BrokerError> {
        self.map
            .read()
            .map_err(|_| BrokerError::internal("topic map lock poisoned"))?
            .get(name)
            .cloned()
            .ok_or_else(|| {
                BrokerError::new(
                    ErrorCode::TopicNotFound,
                    format!("topic '{name}' does not exist; create it with `busctl topics create {name}`"),
                )
            })
    }

    pub fn list(&self) -> Vec<Arc<Topic>> {
        self.map
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Create a topic (blocking: creates files and partition logs).
    pub fn create(
        &self,
        req: NewTopic,
        default_retention: (Option<u64>, Option<u64>),
    ) -> Result<Arc<Topic>, BrokerError> {
        validate_topic_name(&req.name)?;
        if req.partitions == 0 || req.partitions > MAX_PARTITIONS_PER_TOPIC {
            return Err(BrokerError::new(
                ErrorCode::TooManyPartitions,
                format!(
                    "partitions = {}: a topic has 1 to {MAX_PARTITIONS_PER_TOPIC} partitions",
                    req.partitions
                ),
            ));
        }
        if req.replication_factor != 1 {
            return Err(BrokerError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "replication factor {} is not available: this node runs without replication (factor 1)",
                    req.replication_factor
                ),
            ));
        }
        let schema = match &req.schema_ipc {
            Some(bytes) => Some(Arc::new(ipc::canonical_schema(1, bytes)?)),
            None => None,
        };
        let _guard = self.admin();
        {
            let map = self
                .map
                .read()
                .map_err(|_| BrokerError::internal("topic map lock poisoned"))?;
            if map.contains_key(&req.name) {
                return Err(BrokerError::new(
                    ErrorCode::TopicAlreadyExists,
                    format!("topic '{}' already exists", req.name),
                ));
            }
            if map.len() >= MAX_TOPICS {
                return Err(BrokerError::new(
                    ErrorCode::TooManyTopics,
                    format!("this cluster already has the maximum of {MAX_TOPICS} topics; delete unused ones"),
                ));
            }
        }
        let meta = TopicMeta {
            name: req.name.clone(),
            partitions: req.partitions,
            replication_factor: req.replication_factor,
            retention_ms: req.retention_ms.or(default_retention.0),
            retention_bytes: req.retention_bytes.or(default_retention.1),
            created_ms: now_ms(),
            schema_id: schema.as_ref().map_or(0, |s| s.id),
        };
        let tmp = self.dir.join(format!(".tmp-{}", req.name));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| BrokerError::io("creating", &tmp, e))?;
        write_durable(&tmp.join("topic.toml"), meta_toml(&meta)?.as_bytes())?;
        if let Some(s) = &schema {
            write_durable(&tmp.join("schema.arrows"), &s.ipc)?;
        }
        sync_dir(&tmp)?;
        let final_dir = self.dir.join(&req.name);
        std::fs::rename(&tmp, &final_dir).map_err(|e| BrokerError::io("renaming", &tmp, e))?;
        sync_dir(&self.dir)?;
        let topic = Arc::new(load_topic(&final_dir, self.node_id, &self.log_cfg)?);
        self.map
            .write()
            .map_err(|_| BrokerError::internal("topic map lock poisoned"))?
            .insert(req.name, topic.clone());
        Ok(topic)
    }

    /// Delete a topic: it disappears at once; its files are removed after.
    pub fn delete(&self, name: &str) -> Result<(), BrokerError> {
        let _guard = self.admin();
        let topic = self.get(name)?;
        let trash = self.dir.join(format!(".deleted-{}-{}", name, now_ms()));
        std::fs::rename(&topic.dir, &trash)
            .map_err(|e| BrokerError::io("renaming", &topic.dir, e))?;
        sync_dir(&self.dir)?;
        self.map
            .write()
            .map_err(|_| BrokerError::internal("topic map lock poisoned"))?
            .remove(name);
        topic.close();
        if let Err(e) = std::fs::remove_dir_all(&trash) {
            // Harmless: the next start removes leftovers.
            tracing::warn!(path = %trash.display(), error = %e, "could not remove deleted topic files");
        }
        Ok(())
    }

    /// Fix the schema of a topic that has none; return the topic's schema.
    pub fn set_schema_if_absent(
        &self,
        name: &str,
        schema_ipc: &[u8],
    ) -> Result<Arc<TopicSchema>, BrokerError> {
        let topic = self.get(name)?;
        if let Some(s) = topic.schema() {
            return Ok(s);
        }
        let _guard = self.admin();
        if let Some(s) = topic.schema() {
            return Ok(s);
        }
        let schema = Arc::new(ipc::canonical_schema(1, schema_ipc)?);
        let mut meta = topic.meta.clone();
        meta.schema_id = schema.id;
        // Schema first, then the metadata that points at it: a crash in
        // between leaves a topic without schema and an unused file.
        write_durable(&topic.dir.join("schema.arrows"), &schema.ipc)?;
        write_durable(&topic.dir.join("topic.toml"), meta_toml(&meta)?.as_bytes())?;
        sync_dir(&topic.dir)?;
        *topic
            .schema
            .write()
            .map_err(|_| BrokerError::internal("schema lock poisoned"))? = Some(schema.clone());
        Ok(schema)
    }

    /// The admin lock guards no data (only the order of file operations),
    /// so a panic while it was held leaves nothing inconsistent: poisoning
    /// is ignored rather than turned into a permanent failure.
    fn admin(&self) -> std::sync::MutexGuard<'_, ()> {
        self.admin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn close_all(&self) {
        for t in self.list() {
            t.close();
        }
    }
}

fn load_topic(dir: &Path, node_id: u64, cfg: &LogConfig) -> Result<Topic, BrokerError> {
    let meta_path = dir.join("topic.toml");
    let text = std::fs::read_to_string(&meta_path)
        .map_err(|e| BrokerError::io("reading", &meta_path, e))?;
    let meta: TopicMeta = toml::from_str(&text).map_err(|e| {
        BrokerError::new(
            ErrorCode::StorageError,
            format!(
                "{} is corrupt ({e}); restore it from a backup or delete the topic directory",
                meta_path.display()
            ),
        )
    })?;
    let schema = if meta.schema_id != 0 {
        let p = dir.join("schema.arrows");
        let bytes = std::fs::read(&p).map_err(|e| BrokerError::io("reading", &p, e))?;
        Some(Arc::new(
            ipc::canonical_schema(meta.schema_id, &bytes).map_err(|e| {
                BrokerError::new(
                    ErrorCode::StorageError,
                    format!("{} is corrupt: {e}", p.display()),
                )
            })?,
        ))
    } else {
        None
    };
    let mut partitions = Vec::with_capacity(meta.partitions as usize);
    for p in 0..meta.partitions {
        let pdir = dir.join(format!("p-{p}"));
        partitions.push(Arc::new(Partition::open(
            &meta.name,
            p,
            &pdir,
            node_id,
            cfg.clone(),
        )?));
    }
    Ok(Topic {
        meta,
        dir: dir.to_owned(),
        schema: RwLock::new(schema),
        partitions,
    })
}

fn meta_toml(meta: &TopicMeta) -> Result<String, BrokerError> {
    toml::to_string(meta)
        .map_err(|e| BrokerError::internal(format!("encoding topic metadata: {e}")))
}

/// Topic names become directory names: keep them to a safe alphabet.
pub fn validate_topic_name(name: &str) -> Result<(), BrokerError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME_BYTES
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(BrokerError::new(
            ErrorCode::InvalidTopicName,
            format!(
                "invalid topic name {name:?}: use 1 to {MAX_TOPIC_NAME_BYTES} characters of A-Z a-z 0-9 . _ -, not starting with '.'"
            ),
        ))
    }
}

/// Write a file and fsync it (replacing it atomically if it exists).
fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), BrokerError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| BrokerError::io("creating", &tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| BrokerError::io("writing", &tmp, e))?;
    f.sync_all()
        .map_err(|e| BrokerError::io("syncing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| BrokerError::io("renaming", &tmp, e))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), BrokerError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| BrokerError::io("syncing directory", dir, e))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl From<LogError> for BrokerError {
    fn from(e: LogError) -> Self {
        let code = match &e {
            LogError::DiskFull { .. } => ErrorCode::StorageFull,
            LogError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            LogError::Closed => ErrorCode::TopicNotFound,
            LogError::Busy { .. } => ErrorCode::Busy,
            // The broker built an entry the log refuses: our bug, not the client's.
            LogError::InvalidEntry { .. } | LogError::NonContiguous { .. } => ErrorCode::Internal,
            _ => ErrorCode::StorageError,
        };
        let msg = match &e {
            LogError::DiskFull { path } => format!(
                "the broker's disk is full ({}); nothing was stored. Free space and retry",
                path.display()
            ),
            LogError::Closed => {
                "the partition was closed (topic deleted or broker shutting down)".to_owned()
            }
            other => other.to_string(),
        };
        BrokerError::new(code, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_are_checked() {
        for good in ["ticks", "a", "trades.v2", "x_y-z", &"a".repeat(249)] {
            validate_topic_name(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "ünï",
            &"a".repeat(250),
        ] {
            let e = validate_topic_name(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidTopicName, "{bad:?}");
        }
    }
}
