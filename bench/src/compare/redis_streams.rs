//! Redis Streams through redis-rs: `XADD` per batch on a multiplexed
//! (pipelining) connection, the reply being the ack; a subscriber reading
//! with blocking `XREAD` on its own connection.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use crate::bus::{body_of, AckFut, BoxFut, Bus, Deliveries, PeerDecoder, Publisher, Window};

/// Longest wait for a reply. redis-rs's default (500 ms) is shorter than an
/// XADD can take behind a full window of 1 MiB entries with
/// `appendfsync always` on a busy machine.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Entries one XREAD returns at most (64 MiB of 1 MiB entries), and how
/// long it blocks when there are none (short, so the subscriber notices
/// the end of a phase).
const XREAD_COUNT: usize = 64;
const XREAD_BLOCK_MS: usize = 100;
/// The stream entry's one field, holding the Arrow IPC body.
const FIELD: &str = "d";

pub struct Redis {
    client: redis::Client,
    conn: MultiplexedConnection,
    window: usize,
}

fn config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT))
}

impl Redis {
    pub async fn connect(addrs: &[String], window: usize) -> anyhow::Result<Self> {
        let addr = addrs.first().context("no Redis address")?;
        let client = redis::Client::open(format!("redis://{addr}/")).context("Redis address")?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&config())
            .await
            .context("connecting to redis-server")?;
        Ok(Self {
            client,
            conn,
            window,
        })
    }
}

impl Bus for Redis {
    fn create<'a>(
        &'a self,
        topic: &'a str,
        _schema: &'a SchemaRef,
        _partitions: u32,
    ) -> BoxFut<'a, anyhow::Result<()>> {
        // A stream exists from its first XADD; make sure no old one is there.
        self.delete(topic)
    }

    fn delete<'a>(&'a self, topic: &'a str) -> BoxFut<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let _: i64 = redis::cmd("DEL")
                .arg(topic)
                .query_async(&mut c)
                .await
                .with_context(|| format!("DEL {topic}"))?;
            Ok(())
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        schema: &'a SchemaRef,
    ) -> BoxFut<'a, anyhow::Result<Box<dyn Deliveries>>> {
        Box::pin(async move {
            // Its own connection: a blocking XREAD must not hold up XADDs.
            let conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config())
                .await
                .context("connecting the Redis subscriber")?;
            Ok(Box::new(RedisDeliveries {
                conn,
                key: topic.to_owned(),
                last_id: "0-0".into(),
                buffered: VecDeque::new(),
                decoder: PeerDecoder::new(schema)?,
            }) as Box<dyn Deliveries>)
        })
    }

    fn publisher<'a>(&'a self, topic: &'a str) -> BoxFut<'a, anyhow::Result<Arc<dyn Publisher>>> {
        Box::pin(async move {
            Ok(Arc::new(RedisPublisher {
                conn: self.conn.clone(),
                key: topic.to_owned(),
                window: Window::new(self.window),
            }) as Arc<dyn Publisher>)
        })
    }
}

struct RedisPublisher {
    conn: MultiplexedConnection,
    key: String,
    window: Window,
}

impl Publisher for RedisPublisher {
    fn send<'a>(&'a self, batch: &'a RecordBatch) -> BoxFut<'a, anyhow::Result<AckFut>> {
        Box::pin(async move {
            let body = body_of(batch)?;
            let permit = self.window.acquire(body.len()).await?;
            let mut conn = self.conn.clone();
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&self.key).arg("*").arg(FIELD).arg(&body[..]);
            // redis-rs sends a command when its future is first polled: a
            // task puts it on the connection now, not when the ack is awaited.
            let task = tokio::spawn(async move {
                let r: redis::RedisResult<String> = cmd.query_async(&mut conn).await;
                drop(permit);
                r
            });
            Ok(Box::pin(async move {
                match task.await {
                    Ok(Ok(_id)) => Ok(()),
                    Ok(Err(e)) => Err(anyhow!("XADD: {e}")),
                    Err(e) => Err(anyhow!("XADD task: {e}")),
                }
            }) as AckFut)
        })
    }
}

struct RedisDeliveries {
    conn: MultiplexedConnection,
    key: String,
    last_id: String,
    buffered: VecDeque<Bytes>,
    decoder: PeerDecoder,
}

impl RedisDeliveries {
    async fn fill(&mut self) -> anyhow::Result<()> {
        while self.buffered.is_empty() {
            // Read as a raw reply and take the bodies out of it: redis-rs's
            // typed stream reply clones the whole reply while parsing.
            let reply: Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(XREAD_COUNT)
                .arg("BLOCK")
                .arg(XREAD_BLOCK_MS)
                .arg("STREAMS")
                .arg(&self.key)
                .arg(&self.last_id)
                .query_async(&mut self.conn)
                .await
                .context("XREAD")?;
            if let Some(last) = take_entries(reply, &mut self.buffered)? {
                self.last_id = last;
            }
        }
        Ok(())
    }
}

/// Move the bodies of an XREAD reply (one stream) into `out`; returns the
/// last entry id. RESP2: `[[key, [[id, [field, value, ...]], ...]]]`;
/// RESP3 replies a map `{key: [[id, [field, value]], ...]}`; a timeout is nil.
fn take_entries(reply: Value, out: &mut VecDeque<Bytes>) -> anyhow::Result<Option<String>> {
    let entries = match reply {
        Value::Nil => return Ok(None),
        Value::Array(streams) => match streams.into_iter().next() {
            Some(Value::Array(kv)) => kv.into_iter().nth(1),
            None => return Ok(None),
            Some(other) => bail!("unexpected XREAD stream reply: {other:?}"),
        },
        Value::Map(m) => m.into_iter().next().map(|(_, v)| v),
        other => bail!("unexpected XREAD reply: {other:?}"),
    };
    let Some(Value::Array(entries)) = entries else {
        bail!("XREAD reply without entries");
    };
    let mut last = None;
    for e in entries {
        let Value::Array(parts) = e else {
            bail!("XREAD entry is not an array");
        };
        let mut parts = parts.into_iter();
        let id = match parts.next() {
            Some(Value::BulkString(b)) => String::from_utf8(b).context("XREAD entry id")?,
            _ => bail!("XREAD entry without id"),
        };
        let Some(Value::Array(fields)) = parts.next() else {
            bail!("XREAD entry {id} without fields");
        };
        let mut fields = fields.into_iter();
        match (fields.next(), fields.next()) {
            (Some(Value::BulkString(f)), Some(Value::BulkString(body)))
                if f == FIELD.as_bytes() =>
            {
                out.push_back(Bytes::from(body));
            }
            _ => bail!("stream entry {id} has no binary field {FIELD:?}"),
        }
        last = Some(id);
    }
    Ok(last)
}

impl Deliveries for RedisDeliveries {
    fn next(&mut self) -> BoxFut<'_, Option<anyhow::Result<RecordBatch>>> {
        Box::pin(async move {
            if let Err(e) = self.fill().await {
                return Some(Err(e));
            }
            let body = self.buffered.pop_front()?;
            Some(self.decoder.decode(body))
        })
    }
}
