//! `busctl topics`: list, create, describe, delete. Turns `TopicInfo` from
//! the broker into tables or JSON; never touches data batches.

use anyhow::{Context, Result};
use arrow_schema::SchemaRef;
use arrowbus::{Client, NewTopic, TopicInfo};
use serde_json::{json, Value};

use crate::cli::{CreateArgs, Output, TopicsCmd};
use crate::format;
use crate::output::{human_bytes, print_json, schema_json, schema_summary, table};

pub async fn run(client: &Client, cmd: Option<TopicsCmd>, out: Output) -> Result<()> {
    match cmd.unwrap_or(TopicsCmd::List) {
        TopicsCmd::List => list(client, out).await,
        TopicsCmd::Create(args) => create(client, args, out).await,
        TopicsCmd::Describe { name } => describe(client, &name, out).await,
        TopicsCmd::Delete { name } => delete(client, &name, out).await,
    }
}

/// The topic's schema, `None` when it has none yet.
pub fn topic_schema(info: &TopicInfo) -> Result<Option<SchemaRef>> {
    if info.schema_id == 0 {
        return Ok(None);
    }
    let s = arrowbus::schema::decode_schema(&info.schema_ipc).with_context(|| {
        format!(
            "topic '{}': the broker sent a schema that does not decode",
            info.name
        )
    })?;
    Ok(Some(s))
}

fn rows(info: &TopicInfo) -> u64 {
    info.partitions
        .iter()
        .map(|p| p.latest_offset.saturating_sub(p.earliest_offset))
        .sum()
}

fn bytes(info: &TopicInfo) -> u64 {
    info.partitions.iter().map(|p| p.bytes).sum()
}

fn retention_text(info: &TopicInfo) -> String {
    let ms = info
        .retention_ms
        .map_or("unlimited time".to_owned(), |ms| format!("{ms} ms"));
    let b = info
        .retention_bytes
        .map_or("unlimited bytes".to_owned(), |b| {
            format!("{b} bytes ({})", human_bytes(b))
        });
    format!("{ms}, {b}")
}

fn summary_json(info: &TopicInfo) -> Result<Value> {
    let schema = topic_schema(info)?;
    Ok(json!({
        "name": info.name,
        "partitions": info.partitions.len(),
        "rows": rows(info),
        "bytes": bytes(info),
        "retention_ms": info.retention_ms,
        "retention_bytes": info.retention_bytes,
        "schema": schema_json(schema.as_deref()),
    }))
}

fn detail_json(info: &TopicInfo) -> Result<Value> {
    let schema = topic_schema(info)?;
    let partitions: Vec<Value> = info
        .partitions
        .iter()
        .map(|p| {
            json!({
                "partition": p.partition,
                "leader": p.leader,
                "replicas": p.replicas,
                "moving_to": p.moving_to,
                "in_sync": p.in_sync,
                "earliest_offset": p.earliest_offset,
                "latest_offset": p.latest_offset,
                "rows": p.latest_offset.saturating_sub(p.earliest_offset),
                "bytes": p.bytes,
                "batches": p.batches,
            })
        })
        .collect();
    Ok(json!({
        "name": info.name,
        "replication_factor": info.replication_factor,
        "retention_ms": info.retention_ms,
        "retention_bytes": info.retention_bytes,
        "created_ms": info.created_ms,
        "rows": rows(info),
        "bytes": bytes(info),
        "schema_id": info.schema_id,
        "schema": schema_json(schema.as_deref()),
        "schema_metadata": schema.as_ref().map(|s| {
            s.metadata()
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect::<serde_json::Map<_, _>>()
        }),
        "partitions": partitions,
    }))
}

async fn list(client: &Client, out: Output) -> Result<()> {
    let mut topics = client.admin().list_topics().await?;
    topics.sort_by(|a, b| a.name.cmp(&b.name));
    if out == Output::Json {
        let v = topics
            .iter()
            .map(summary_json)
            .collect::<Result<Vec<_>>>()?;
        return print_json(&Value::Array(v));
    }
    let mut rows_out = Vec::with_capacity(topics.len());
    for t in &topics {
        let schema = topic_schema(t)?;
        rows_out.push(vec![
            t.name.clone(),
            t.partitions.len().to_string(),
            rows(t).to_string(),
            human_bytes(bytes(t)),
            schema_summary(schema.as_deref()),
        ]);
    }
    print!(
        "{}",
        table(
            &["NAME", "PARTITIONS", "ROWS", "BYTES", "SCHEMA"],
            &rows_out
        )
    );
    Ok(())
}

async fn create(client: &Client, args: CreateArgs, out: Output) -> Result<()> {
    let mut t = NewTopic::new(&args.name)
        .partitions(args.partitions)
        .replication_factor(args.replicas);
    if let Some(ms) = args.retention_ms {
        t = t.retention_ms(ms);
    }
    if let Some(b) = args.retention_bytes {
        t = t.retention_bytes(b);
    }
    let mut source = None;
    if let Some(path) = &args.schema_from {
        let p = path.clone();
        let (fmt, schema) = tokio::task::spawn_blocking(move || format::read_schema(&p)).await??;
        source = Some(format!("{} ({})", path.display(), fmt.name()));
        t = t.schema(arrow_schema::Schema::clone(&schema));
    }
    let info = client.admin().create_topic(t).await?;
    if out == Output::Json {
        return print_json(&detail_json(&info)?);
    }
    let schema = topic_schema(&info)?;
    println!(
        "created topic '{}': {} partition(s) x {} replica(s), retention {}",
        info.name,
        info.partitions.len(),
        info.replication_factor,
        retention_text(&info)
    );
    match (&schema, source) {
        (Some(s), Some(src)) => println!("schema from {src}: {}", schema_summary(Some(s))),
        (Some(s), None) => println!("schema: {}", schema_summary(Some(s))),
        (None, _) => println!("schema: (none yet; the first publish sets it)"),
    }
    Ok(())
}

async fn describe(client: &Client, name: &str, out: Output) -> Result<()> {
    let info = client.admin().describe_topic(name).await?;
    if out == Output::Json {
        return print_json(&detail_json(&info)?);
    }
    let schema = topic_schema(&info)?;
    println!("topic:       {}", info.name);
    println!("replication: {}", info.replication_factor);
    println!("retention:   {}", retention_text(&info));
    println!(
        "rows:        {} ({})",
        rows(&info),
        human_bytes(bytes(&info))
    );
    match &schema {
        None => println!("schema:      (none yet)"),
        Some(s) => {
            println!(
                "schema:      id {}, {} field(s)",
                info.schema_id,
                s.fields().len()
            );
            let fields: Vec<Vec<String>> = s
                .fields()
                .iter()
                .map(|f| {
                    vec![
                        format!("  {}", f.name()),
                        f.data_type().to_string(),
                        if f.is_nullable() {
                            "nullable"
                        } else {
                            "not null"
                        }
                        .to_owned(),
                    ]
                })
                .collect();
            print!("{}", table(&["  FIELD", "TYPE", "NULLS"], &fields));
            for (k, v) in s.metadata().iter() {
                println!("  metadata {k} = {v}");
            }
        }
    }
    println!();
    let parts: Vec<Vec<String>> = info
        .partitions
        .iter()
        .map(|p| {
            vec![
                p.partition.to_string(),
                p.leader.to_string(),
                p.replicas
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                if p.leader == 0 {
                    "-".to_owned()
                } else {
                    // The leader always holds what it committed.
                    std::iter::once(p.leader)
                        .chain(p.in_sync.iter().copied().filter(|r| *r != p.leader))
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                },
                if p.moving_to.is_empty() {
                    "-".to_owned()
                } else {
                    p.moving_to
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                },
                p.earliest_offset.to_string(),
                p.latest_offset.to_string(),
                p.latest_offset
                    .saturating_sub(p.earliest_offset)
                    .to_string(),
                human_bytes(p.bytes),
                p.batches.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "PARTITION",
                "LEADER",
                "REPLICAS",
                "IN-SYNC",
                "MOVING-TO",
                "EARLIEST",
                "LATEST",
                "ROWS",
                "BYTES",
                "BATCHES"
            ],
            &parts
        )
    );
    Ok(())
}

async fn delete(client: &Client, name: &str, out: Output) -> Result<()> {
    client.admin().delete_topic(name).await?;
    if out == Output::Json {
        return print_json(&json!({ "deleted": name }));
    }
    println!("deleted topic '{name}'");
    Ok(())
}
