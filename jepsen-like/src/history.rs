//! The history: one JSON object per line, one line per operation event, in
//! the order the harness observed them. This module owns the format and its
//! parsing; it never interprets what the operations mean (that is
//! `checker`'s job).
//!
//! ```text
//! {"index":0,"time":1200,"process":3,"type":"invoke","f":"send","value":[["send",2,17]]}
//! {"index":1,"time":9100,"process":3,"type":"ok","f":"send","value":[["send",2,[40,17]]]}
//! {"index":2,"time":9300,"process":5,"type":"invoke","f":"poll","value":[["poll"]]}
//! {"index":3,"time":9800,"process":5,"type":"ok","f":"poll","value":[["poll",{"2":[[40,17]]}]]}
//! {"index":4,"time":9900,"process":"nemesis","type":"info","f":"kill","value":{"nodes":[1]}}
//! ```
//!
//! - `type`: `invoke` starts an operation; `ok` (it happened), `fail` (it
//!   certainly did not happen) or `info` (unknown) completes it. A process
//!   runs one operation at a time, so a completion pairs with the previous
//!   invoke of the same process. A process that saw `info` is never reused:
//!   its worker continues under a new process number.
//! - `time`: nanoseconds since the run started (monotonic clock).
//! - `f`: `send`, `poll`, `txn` (several micro-ops applied as one, for
//!   transactions) or, for the nemesis, the fault (`kill`, `restart`,
//!   `pause`, `resume`, `partition`, `heal`, `rollback`).
//! - `value` of client operations: a list of micro-ops, Jepsen's model:
//!   `["send", key, value]` completes as `["send", key, [offset, value]]`;
//!   `["poll"]` completes as `["poll", {key: [[offset, value], ...]}]`;
//!   `["commit", {key: offset}]` is a consumer-group offset commit (recorded
//!   now, checked once consumer groups exist). Keys are partitions of the
//!   run's topic; values are unique per key.
//! - optional: `error` (why an operation failed or is unknown), `node` (the
//!   node a client talked to, for per-node final reads), `final` (a final
//!   read after the faults healed).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

pub type Key = u32;
pub type Value = i64;
pub type Offset = u64;

/// What one poll returned: per key, (offset, value) in delivery order.
pub type Reads = BTreeMap<Key, Vec<(Offset, Value)>>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    #[error("line {line}: {reason}")]
    Parse { line: usize, reason: String },
    #[error("reading history: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// Who performed an operation: a client process (a number) or the nemesis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Process {
    Client(u64),
    Nemesis,
}

impl Serialize for Process {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Process::Client(p) => s.serialize_u64(*p),
            Process::Nemesis => s.serialize_str("nemesis"),
        }
    }
}

impl<'de> Deserialize<'de> for Process {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Json::deserialize(d)? {
            Json::Number(n) => n
                .as_u64()
                .map(Process::Client)
                .ok_or_else(|| serde::de::Error::custom("process must be a non-negative integer")),
            Json::String(s) if s == "nemesis" => Ok(Process::Nemesis),
            other => Err(serde::de::Error::custom(format!(
                "process must be an integer or \"nemesis\", not {other}"
            ))),
        }
    }
}

/// One step of a client operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MicroOp {
    /// Append `value` to `key`; `offset` is known once acknowledged.
    Send {
        key: Key,
        value: Value,
        offset: Option<Offset>,
    },
    /// Read what is available; `reads` is filled in on completion.
    Poll { reads: Option<Reads> },
    /// Commit consumer-group offsets (the next offset to read, per key).
    Commit { offsets: BTreeMap<Key, Offset> },
}

impl MicroOp {
    fn to_json(&self) -> Json {
        match self {
            MicroOp::Send {
                key,
                value,
                offset: None,
            } => json!(["send", key, value]),
            MicroOp::Send {
                key,
                value,
                offset: Some(o),
            } => json!(["send", key, [o, value]]),
            MicroOp::Poll { reads: None } => json!(["poll"]),
            MicroOp::Poll { reads: Some(r) } => {
                let m: serde_json::Map<String, Json> = r
                    .iter()
                    .map(|(k, pairs)| {
                        let v: Vec<Json> = pairs.iter().map(|(o, v)| json!([o, v])).collect();
                        (k.to_string(), Json::Array(v))
                    })
                    .collect();
                json!(["poll", m])
            }
            MicroOp::Commit { offsets } => {
                let m: serde_json::Map<String, Json> = offsets
                    .iter()
                    .map(|(k, o)| (k.to_string(), json!(o)))
                    .collect();
                json!(["commit", m])
            }
        }
    }

    fn from_json(j: &Json) -> Result<Self, String> {
        let arr = j.as_array().ok_or("a micro-op is a JSON array")?;
        let name = arr
            .first()
            .and_then(Json::as_str)
            .ok_or("a micro-op starts with its name")?;
        match (name, arr.len()) {
            ("send", 3) => {
                let key = parse_key_num(&arr[1])?;
                match &arr[2] {
                    Json::Array(pair) => {
                        let (o, v) = parse_pair(pair)?;
                        Ok(MicroOp::Send {
                            key,
                            value: v,
                            offset: Some(o),
                        })
                    }
                    other => Ok(MicroOp::Send {
                        key,
                        value: other.as_i64().ok_or("send value must be an integer")?,
                        offset: None,
                    }),
                }
            }
            ("poll", 1) => Ok(MicroOp::Poll { reads: None }),
            ("poll", 2) => {
                let m = arr[1].as_object().ok_or("poll result must be an object")?;
                let mut reads = Reads::new();
                for (k, pairs) in m {
                    let key = parse_key_str(k)?;
                    let pairs = pairs.as_array().ok_or("poll pairs must be an array")?;
                    let mut out = Vec::with_capacity(pairs.len());
                    for p in pairs {
                        out.push(parse_pair(
                            p.as_array().ok_or("a read is [offset, value]")?,
                        )?);
                    }
                    reads.insert(key, out);
                }
                Ok(MicroOp::Poll { reads: Some(reads) })
            }
            ("commit", 2) => {
                let m = arr[1]
                    .as_object()
                    .ok_or("commit offsets must be an object")?;
                let mut offsets = BTreeMap::new();
                for (k, o) in m {
                    offsets.insert(
                        parse_key_str(k)?,
                        o.as_u64()
                            .ok_or("a committed offset is a non-negative integer")?,
                    );
                }
                Ok(MicroOp::Commit { offsets })
            }
            _ => Err(format!("unknown micro-op {j}")),
        }
    }
}

fn parse_key_num(j: &Json) -> Result<Key, String> {
    j.as_u64()
        .and_then(|k| Key::try_from(k).ok())
        .ok_or_else(|| format!("key {j} is not a partition number"))
}

fn parse_key_str(s: &str) -> Result<Key, String> {
    s.parse()
        .map_err(|_| format!("key {s:?} is not a partition number"))
}

fn parse_pair(pair: &[Json]) -> Result<(Offset, Value), String> {
    match pair {
        [o, v] => Ok((
            o.as_u64().ok_or("an offset is a non-negative integer")?,
            v.as_i64().ok_or("a value is an integer")?,
        )),
        _ => Err("a read is [offset, value]".into()),
    }
}

/// The value of an operation: micro-ops for clients, free-form for the nemesis.
#[derive(Clone, Debug, PartialEq)]
pub enum OpValue {
    Mops(Vec<MicroOp>),
    Other(Json),
}

/// One history event.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub index: u64,
    /// Nanoseconds since the run started.
    pub time: u64,
    pub process: Process,
    pub kind: OpType,
    pub f: String,
    pub value: OpValue,
    pub error: Option<String>,
    pub node: Option<u32>,
    pub final_read: bool,
}

impl Op {
    /// The micro-ops of a client operation (empty for nemesis events).
    pub fn mops(&self) -> &[MicroOp] {
        match &self.value {
            OpValue::Mops(m) => m,
            OpValue::Other(_) => &[],
        }
    }

    pub fn to_json(&self) -> Json {
        let mut m = serde_json::Map::new();
        m.insert("index".into(), json!(self.index));
        m.insert("time".into(), json!(self.time));
        m.insert(
            "process".into(),
            match self.process {
                Process::Client(p) => json!(p),
                Process::Nemesis => json!("nemesis"),
            },
        );
        m.insert(
            "type".into(),
            serde_json::to_value(self.kind).unwrap_or(Json::Null),
        );
        m.insert("f".into(), json!(self.f));
        m.insert(
            "value".into(),
            match &self.value {
                OpValue::Mops(ms) => Json::Array(ms.iter().map(MicroOp::to_json).collect()),
                OpValue::Other(j) => j.clone(),
            },
        );
        if let Some(e) = &self.error {
            m.insert("error".into(), json!(e));
        }
        if let Some(n) = self.node {
            m.insert("node".into(), json!(n));
        }
        if self.final_read {
            m.insert("final".into(), json!(true));
        }
        Json::Object(m)
    }

    pub fn from_json(j: &Json) -> Result<Self, String> {
        let o = j.as_object().ok_or("an op is a JSON object")?;
        let get = |name: &str| o.get(name).ok_or(format!("missing field {name:?}"));
        let process: Process =
            serde_json::from_value(get("process")?.clone()).map_err(|e| e.to_string())?;
        let kind: OpType = serde_json::from_value(get("type")?.clone())
            .map_err(|e| format!("type: {e} (invoke, ok, fail or info)"))?;
        let raw_value = get("value")?;
        let value = match process {
            Process::Nemesis => OpValue::Other(raw_value.clone()),
            Process::Client(_) => {
                let arr = raw_value
                    .as_array()
                    .ok_or("a client op's value is a list of micro-ops")?;
                OpValue::Mops(
                    arr.iter()
                        .map(MicroOp::from_json)
                        .collect::<Result<_, _>>()?,
                )
            }
        };
        Ok(Op {
            index: get("index")?.as_u64().ok_or("index must be an integer")?,
            time: get("time")?.as_u64().ok_or("time must be an integer")?,
            process,
            kind,
            f: get("f")?.as_str().ok_or("f must be a string")?.to_owned(),
            value,
            error: o.get("error").and_then(Json::as_str).map(str::to_owned),
            node: o
                .get("node")
                .and_then(Json::as_u64)
                .and_then(|n| u32::try_from(n).ok()),
            final_read: o.get("final").and_then(Json::as_bool).unwrap_or(false),
        })
    }
}

/// Read a JSON-lines history. Blank lines are skipped.
pub fn read_history(r: impl BufRead) -> Result<Vec<Op>, HistoryError> {
    let mut out = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let j: Json = serde_json::from_str(&line).map_err(|e| HistoryError::Parse {
            line: i + 1,
            reason: e.to_string(),
        })?;
        out.push(Op::from_json(&j).map_err(|reason| HistoryError::Parse {
            line: i + 1,
            reason,
        })?);
    }
    Ok(out)
}

/// Write one op as one line.
pub fn write_op(w: &mut impl Write, op: &Op) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, &op.to_json())?;
    w.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_micro_op_and_field() {
        let ops = vec![
            Op {
                index: 0,
                time: 5,
                process: Process::Client(3),
                kind: OpType::Ok,
                f: "txn".into(),
                value: OpValue::Mops(vec![
                    MicroOp::Send {
                        key: 2,
                        value: 17,
                        offset: Some(40),
                    },
                    MicroOp::Send {
                        key: 1,
                        value: -4,
                        offset: None,
                    },
                    MicroOp::Poll {
                        reads: Some(Reads::from([(2, vec![(40, 17), (41, 18)])])),
                    },
                    MicroOp::Poll { reads: None },
                    MicroOp::Commit {
                        offsets: BTreeMap::from([(2, 42)]),
                    },
                ]),
                error: Some("x".into()),
                node: Some(2),
                final_read: true,
            },
            Op {
                index: 1,
                time: 6,
                process: Process::Nemesis,
                kind: OpType::Info,
                f: "kill".into(),
                value: OpValue::Other(json!({"nodes": [1]})),
                error: None,
                node: None,
                final_read: false,
            },
        ];
        let mut buf = Vec::new();
        for op in &ops {
            write_op(&mut buf, op).unwrap();
        }
        let back = read_history(&buf[..]).unwrap();
        assert_eq!(back, ops);
    }

    #[test]
    fn rejects_malformed_lines_with_their_number() {
        let text = "{\"index\":0,\"time\":0,\"process\":1,\"type\":\"invoke\",\"f\":\"send\",\"value\":[[\"send\",1,2]]}\n{\"index\":1,\"time\":0,\"process\":1,\"type\":\"maybe\",\"f\":\"send\",\"value\":[]}\n";
        match read_history(text.as_bytes()) {
            Err(HistoryError::Parse { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected a parse error on line 2, got {other:?}"),
        }
        let bad_key = "{\"index\":0,\"time\":0,\"process\":1,\"type\":\"ok\",\"f\":\"poll\",\"value\":[[\"poll\",{\"x\":[]}]]}";
        assert!(read_history(bad_key.as_bytes()).is_err());
    }
}
