//! `busctl consume`: read a topic to its current end (or tail it) and write
//! the rows as a table, JSON lines, or one Arrow IPC stream on stdout. In
//! Arrow mode the stream carries exactly the topic schema: no columns added.

use std::io::{BufWriter, Stdout, Write};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::{ArrayRef, RecordBatch, RecordBatchOptions, UInt32Array, UInt64Array};
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use arrowbus::{Client, Delivery, SubscribeOptions};
use futures::StreamExt;

use crate::cli::{ConsumeArgs, Output};

pub async fn run(client: &Client, args: ConsumeArgs, out: Output) -> Result<()> {
    let topic = args.name.as_str();
    let mut opts = SubscribeOptions::default().from(args.from);
    if let Some(p) = args.partition {
        opts = opts.partitions(vec![p]);
    }
    if !args.follow {
        opts = opts.until_end();
    }
    let mut sub = client.subscribe(topic, opts).await?;
    let mut sink = Sink::new(out, sub.schema(), topic)?;
    let mut remaining = args.max_rows;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    while remaining != Some(0) {
        let next = if args.follow {
            tokio::select! {
                d = sub.next() => d,
                r = &mut ctrl_c => {
                    r.context("cannot listen for Ctrl-C")?;
                    break;
                }
            }
        } else {
            sub.next().await
        };
        let Some(d) = next else { break };
        let mut d = d?;
        if let Some(r) = remaining.as_mut() {
            let n = d.batch.num_rows() as u64;
            if n > *r {
                // `*r < n <= usize::MAX`, so the cast cannot truncate.
                d.batch = d.batch.slice(0, *r as usize);
            }
            *r -= d.batch.num_rows() as u64;
        }
        sink.write(&d)?;
        if args.follow {
            sink.flush()?;
        }
    }
    sink.finish()
}

/// Where delivered batches go; one per output mode.
enum Sink {
    Table {
        out: BufWriter<Stdout>,
        rows: u64,
    },
    Json {
        out: arrow_json::LineDelimitedWriter<BufWriter<Stdout>>,
    },
    Arrow {
        out: StreamWriter<BufWriter<Stdout>>,
        schema: SchemaRef,
    },
}

impl Sink {
    fn new(mode: Output, schema: Option<SchemaRef>, topic: &str) -> Result<Self> {
        let stdout = BufWriter::new(std::io::stdout());
        Ok(match mode {
            Output::Table => Sink::Table {
                out: stdout,
                rows: 0,
            },
            Output::Json => Sink::Json {
                out: arrow_json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow_json::writer::LineDelimited>(stdout),
            },
            Output::Arrow => {
                let schema = schema.ok_or_else(|| {
                    anyhow!("topic '{topic}' has no schema yet (nothing published, none given at create): there is no Arrow stream to write")
                })?;
                Sink::Arrow {
                    out: StreamWriter::try_new(stdout, &schema)
                        .context("cannot start the Arrow IPC stream")?,
                    schema,
                }
            }
        })
    }

    fn write(&mut self, d: &Delivery) -> Result<()> {
        match self {
            Sink::Table { out, rows } => {
                if d.batch.num_rows() == 0 {
                    return Ok(());
                }
                *rows += d.batch.num_rows() as u64;
                let b = with_position(d)?;
                let text = arrow_cast::pretty::pretty_format_batches(&[b]).with_context(|| {
                    format!(
                        "cannot print the batch at partition {} offset {}",
                        d.partition, d.offset
                    )
                })?;
                writeln!(out, "{text}")?;
            }
            Sink::Json { out } => {
                if d.batch.num_rows() == 0 {
                    return Ok(());
                }
                let b = with_position(d)?;
                out.write(&b).with_context(|| {
                    format!(
                        "cannot write the batch at partition {} offset {} as JSON",
                        d.partition, d.offset
                    )
                })?;
            }
            Sink::Arrow { out, schema } => {
                let b = if d.batch.schema() == *schema {
                    d.batch.clone()
                } else {
                    // A batch decoded with a later schema id: keep the stream's
                    // schema if the columns still fit it.
                    RecordBatch::try_new_with_options(
                        schema.clone(),
                        d.batch.columns().to_vec(),
                        &RecordBatchOptions::new().with_row_count(Some(d.batch.num_rows())),
                    )
                    .map_err(|e| {
                        anyhow!(
                            "the topic schema changed at partition {} offset {}: cannot continue one Arrow stream ({e})",
                            d.partition,
                            d.offset
                        )
                    })?
                };
                out.write(&b).context("cannot write the Arrow IPC stream")?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        match self {
            Sink::Table { out, .. } => out.flush()?,
            Sink::Json { out } => out.get_mut().flush()?,
            Sink::Arrow { out, .. } => out.flush()?,
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        match self {
            Sink::Table { mut out, rows } => {
                if rows == 0 {
                    writeln!(out, "(0 rows)")?;
                }
                out.flush()?;
            }
            Sink::Json { mut out } => {
                out.finish()?;
                out.into_inner().flush()?;
            }
            Sink::Arrow { mut out, .. } => {
                out.finish().context("cannot finish the Arrow IPC stream")?;
                out.into_inner()?.flush()?;
            }
        }
        Ok(())
    }
}

/// The batch with `_partition` and `_offset` columns in front (for the table
/// and JSON outputs; never for Arrow output).
fn with_position(d: &Delivery) -> Result<RecordBatch> {
    let n = d.batch.num_rows();
    let schema = d.batch.schema();
    if schema.column_with_name("_partition").is_some()
        || schema.column_with_name("_offset").is_some()
    {
        bail!("the topic has a column named _partition or _offset; use --output arrow");
    }
    let mut fields = vec![
        Arc::new(Field::new("_partition", DataType::UInt32, false)),
        Arc::new(Field::new("_offset", DataType::UInt64, false)),
    ];
    fields.extend(schema.fields().iter().cloned());
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from(vec![d.partition; n])),
        Arc::new(UInt64Array::from_iter_values(d.offset..d.offset + n as u64)),
    ];
    columns.extend(d.batch.columns().iter().cloned());
    for (f, c) in fields.iter_mut().zip(columns.iter_mut()) {
        if let Some(t) = displayable(f.data_type()) {
            *c = arrow_cast::cast(c, &t)
                .with_context(|| format!("cannot render column '{}'", f.name()))?;
            *f = Arc::new(f.as_ref().clone().with_data_type(t));
        }
    }
    let out = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    Ok(out)
}

/// The type to render a column as, when it differs from the stored one.
/// Arrow's formatters accept only offset timezones (`+01:00`) without the
/// tz database, which this binary leaves out to stay lean; timestamps with a
/// named zone (`UTC`, `Europe/Paris`) are shown as the same instants in
/// `+00:00`. Display only: Arrow output keeps the topic's types.
fn displayable(t: &DataType) -> Option<DataType> {
    match t {
        DataType::Timestamp(unit, Some(tz)) if !is_offset(tz) => {
            Some(DataType::Timestamp(*unit, Some("+00:00".into())))
        }
        DataType::List(f) => displayable(f.data_type())
            .map(|t| DataType::List(Arc::new(f.as_ref().clone().with_data_type(t)))),
        DataType::LargeList(f) => displayable(f.data_type())
            .map(|t| DataType::LargeList(Arc::new(f.as_ref().clone().with_data_type(t)))),
        DataType::Struct(fields) => {
            let mut changed = false;
            let new: Vec<Field> = fields
                .iter()
                .map(|f| match displayable(f.data_type()) {
                    Some(t) => {
                        changed = true;
                        f.as_ref().clone().with_data_type(t)
                    }
                    None => f.as_ref().clone(),
                })
                .collect();
            changed.then(|| DataType::Struct(new.into()))
        }
        _ => None,
    }
}

/// `+01:00`, `-0530`, `+05`: what Arrow parses without the tz database.
fn is_offset(tz: &str) -> bool {
    tz.starts_with(['+', '-']) && tz[1..].chars().all(|c| c.is_ascii_digit() || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::TimeUnit;

    #[test]
    fn named_timezones_render_as_utc_offsets() {
        let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let shown = DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into()));
        assert_eq!(displayable(&utc), Some(shown.clone()));
        assert_eq!(displayable(&shown), None);
        assert_eq!(
            displayable(&DataType::Timestamp(TimeUnit::Second, None)),
            None
        );
        let list = DataType::List(Arc::new(Field::new("item", utc, true)));
        assert_eq!(
            displayable(&list),
            Some(DataType::List(Arc::new(Field::new("item", shown, true))))
        );
        assert!(is_offset("-05:30") && is_offset("+01") && !is_offset("Europe/Paris"));
    }
}
