//! One measured phase against a bus (arrowbus or a peer, see `bus`): a fresh
//! topic, a subscriber from its start, a paced (or closed-loop) publisher,
//! and the accounting of what was sent, acknowledged and delivered.
//!
//! Threads and tasks of a phase:
//! - the *pacer*, a plain OS thread: it sleeps until each batch's intended
//!   time with `thread::sleep` (sub-100 µs precision; tokio's timer wheel
//!   rounds to 1 ms, which would itself add up to a millisecond to every
//!   latency at 1,000 batches/s) and then drives `Publisher::send` on the
//!   runtime through `Handle::block_on`;
//! - the *ack collector* task: awaits every `PendingAck`;
//! - the *subscriber* task: takes deliveries and records latencies.
//!
//! Every latency is measured from the intended send time (see `latency`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow_array::RecordBatch;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::bus::{AckFut, Bus, Deliveries, Publisher};
use crate::latency::{intended_offset, Clock, Latency, Summary};
use crate::spawn::{group_stats, proc_stats, RssWatch};
use crate::workload::{identify, SizeSpec, Template};

/// Error messages kept per phase; the rest are only counted.
const MAX_KEPT_ERRORS: usize = 10;
/// A phase gives up publishing after this many failed sends: the broker is
/// gone or refusing, and more attempts only repeat the same error.
const MAX_SEND_ERRORS: u64 = 100;
/// Sent-but-unacknowledged batches handed from the pacer to the ack
/// collector. The producer window (5 batches per partition) is the real
/// bound; this only has to be larger so the pacer never waits on it.
const ACK_QUEUE_BATCHES: usize = 4096;
/// Sequence numbers above this in a delivery are corruption, not data: no
/// phase sends 100 M batches (that is 28 h at 1,000 batches/s).
const MAX_SEQ_PER_PHASE: u64 = 100_000_000;
/// Extra time a paced phase may run past twice its planned duration.
const OVERRUN_GRACE: Duration = Duration::from_secs(5);
/// How often the drain loop checks whether every acked batch has arrived.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// When a phase stops publishing.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    Duration(Duration),
    /// Stop once this many body bytes have been sent (backlog mode).
    Bytes(u64),
}

#[derive(Debug, Clone)]
pub struct PhaseConfig {
    pub name: String,
    pub size: SizeSpec,
    /// Batches per second, paced from the start time; `None`: closed loop,
    /// as fast as the producer window allows.
    pub rate: Option<f64>,
    pub limit: Limit,
    pub partitions: u32,
    /// After publishing ends, how long to wait for outstanding acks and
    /// deliveries before counting what is missing.
    pub drain_timeout: Duration,
    /// Slow subscriber: pause this long after each delivered batch.
    pub subscriber_delay: Option<Duration>,
    /// Wait until every acked batch is delivered (false for backlog runs,
    /// whose slow subscriber is not expected to catch up).
    pub wait_for_delivery: bool,
    /// Keep the subscriber reading this long after the last ack (backlog
    /// runs: memory while a slow subscriber works through stored data).
    pub hold_after: Duration,
    /// Leave the topic in place (its data size is reported), else delete it.
    pub keep_topic: bool,
}

/// The broker processes being measured (each with its descendants), when
/// busbench can see them.
#[derive(Clone)]
pub struct BrokerWatch {
    pub pids: Vec<u32>,
    pub rss: Arc<RssWatch>,
}

#[derive(Debug, Clone)]
pub struct PhaseResult {
    pub name: String,
    pub size_label: String,
    pub rows_per_batch: usize,
    pub bytes_per_batch: usize,
    pub partitions: u32,
    pub offered_rate: Option<f64>,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub duplicates: u64,
    /// First deliveries whose sequence number is below one delivered
    /// before them: out of publish order (meaningful with one partition).
    pub reordered: u64,
    /// Acked but not delivered when the phase ended.
    pub lost: u64,
    /// The subscription failed before the end: `lost` then counts what it
    /// could not check as well as what is missing.
    pub subscriber_failed: bool,
    pub unacked_outstanding: u64,
    pub errors_total: u64,
    pub errors: Vec<String>,
    /// Seconds from the start to the last send, ack and delivery.
    pub send_secs: f64,
    pub ack_secs: f64,
    pub deliver_secs: f64,
    pub send_lag: Option<Summary>,
    pub ack_latency: Option<Summary>,
    pub e2e_latency: Option<Summary>,
    pub broker_rss_max_kb: Option<u64>,
    pub broker_cpu_s: Option<f64>,
    pub client_cpu_s: Option<f64>,
    pub wall_secs: f64,
}

impl PhaseResult {
    pub fn achieved_send_rate(&self) -> f64 {
        per_sec(self.sent, self.send_secs)
    }
    pub fn acked_batches_per_s(&self) -> f64 {
        per_sec(self.acked, self.ack_secs)
    }
    pub fn acked_mb_per_s(&self) -> f64 {
        per_sec(self.acked * self.bytes_per_batch as u64, self.ack_secs) / 1e6
    }
    pub fn acked_rows_per_s(&self) -> f64 {
        per_sec(self.acked * self.rows_per_batch as u64, self.ack_secs)
    }
    pub fn delivered_mb_per_s(&self) -> f64 {
        per_sec(
            self.delivered * self.bytes_per_batch as u64,
            self.deliver_secs,
        ) / 1e6
    }
    /// Whether the phase shows a failure: nothing delivered, loss, or errors.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.delivered == 0 {
            f.push("nothing was delivered".to_owned());
        }
        if self.lost > 0 {
            f.push(format!("{} acked batches were not delivered", self.lost));
        }
        if self.acked < self.sent {
            f.push(format!(
                "{} of {} sent batches were not acked",
                self.sent - self.acked,
                self.sent
            ));
        }
        if self.errors_total > 0 {
            f.push(format!(
                "{} errors, first: {}",
                self.errors_total,
                self.errors.first().map_or("", |s| s.as_str())
            ));
        }
        f
    }
}

fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// What the pacer thread reports.
struct PacerOutcome {
    sent: u64,
    last_send: Option<Instant>,
    lag: Latency,
    errors_total: u64,
    errors: Vec<String>,
}

struct Sent {
    seq: u64,
    intended: Instant,
    ack: AckFut,
}

struct AckOutcome {
    acked_seqs: Vec<u64>,
    last_ack: Option<Instant>,
    latency: Latency,
    outstanding: u64,
    errors_total: u64,
    errors: Vec<String>,
}

struct SubOutcome {
    seen: Vec<bool>,
    delivered: u64,
    duplicates: u64,
    reordered: u64,
    last_delivery: Option<Instant>,
    latency: Latency,
    error: Option<String>,
}

impl SubOutcome {
    /// One send arrived (at `now`): its latency, and whether it is new,
    /// late or a duplicate.
    fn record(
        &mut self,
        send: &RecordBatch,
        clock: &Clock,
        now: Instant,
        count: &AtomicU64,
    ) -> Result<(), String> {
        let (seq, intended_us) = identify(send).map_err(|e| format!("{e:#}"))?;
        if seq >= MAX_SEQ_PER_PHASE {
            return Err(format!(
                "delivered batch claims sequence number {seq}, beyond any this phase sends"
            ));
        }
        let us = clock.micros_of(now).saturating_sub(intended_us).max(0) as u64;
        self.latency.record(Duration::from_micros(us));
        let i = seq as usize;
        if self.seen.len() <= i {
            self.seen.resize(i + 1, false);
        }
        if self.seen[i] {
            self.duplicates += 1;
        } else {
            // `seen` only grows past the highest sequence number delivered
            // so far: a first delivery inside it is late.
            if i + 1 < self.seen.len() {
                self.reordered += 1;
            }
            self.seen[i] = true;
            self.delivered += 1;
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.last_delivery = Some(now);
        Ok(())
    }
}

/// Run one phase on a fresh topic; the topic is deleted afterwards.
pub async fn run_phase(
    bus: &dyn Bus,
    broker: Option<&BrokerWatch>,
    cfg: &PhaseConfig,
) -> anyhow::Result<PhaseResult> {
    let size = cfg.size;
    let template = Arc::new(tokio::task::spawn_blocking(move || Template::new(size)).await??);
    // Names valid on every bus: Kafka topics, NATS streams and subjects, Redis keys.
    let topic = format!("busbench-{}-{}", std::process::id(), cfg.name).replace('.', "_");
    bus.create(&topic, &template.schema(), cfg.partitions)
        .await?;
    let result = measure(bus, broker, cfg, &topic, template).await;
    if !cfg.keep_topic {
        if let Err(e) = bus.delete(&topic).await {
            eprintln!("busbench: could not delete topic {topic}: {e:#}");
        }
    }
    result
}

async fn measure(
    bus: &dyn Bus,
    broker: Option<&BrokerWatch>,
    cfg: &PhaseConfig,
    topic: &str,
    template: Arc<Template>,
) -> anyhow::Result<PhaseResult> {
    let sub = bus.subscribe(topic, &template.schema()).await?;

    let broker_before = broker.map(|b| {
        b.rss.reset_phase(&b.pids);
        group_stats(&b.pids)
    });
    let client_before = proc_stats(std::process::id()).ok();
    let clock = Clock::now();

    // Subscriber.
    let delivered_count = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let sub_task = tokio::spawn(subscribe_loop(
        sub,
        clock,
        delivered_count.clone(),
        stop_rx,
        cfg.subscriber_delay,
        Latency::new()?,
        template.rows(),
    ));

    // Ack collector.
    let (ack_tx, ack_rx) = mpsc::channel::<Sent>(ACK_QUEUE_BATCHES);
    let ack_task = tokio::spawn(collect_acks(ack_rx, cfg.drain_timeout, Latency::new()?));

    // Pacer.
    // The publisher outlives the pacer: dropping it may abort its ack
    // readers, which fails every still-pending ack ("outcome unknown")
    // although the batches are stored.
    let producer = bus.publisher(topic).await?;
    let pacer = {
        let producer = producer.clone();
        let handle = tokio::runtime::Handle::current();
        let (template, rate, limit) = (template.clone(), cfg.rate, cfg.limit);
        std::thread::Builder::new()
            .name("busbench-pacer".into())
            .spawn(move || {
                pace(
                    &handle,
                    producer.as_ref(),
                    &template,
                    clock,
                    rate,
                    limit,
                    ack_tx,
                )
            })
            .context("starting the pacer thread")?
    };
    let pacer = tokio::task::spawn_blocking(move || pacer.join())
        .await
        .context("joining the pacer")?
        .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))??;
    let acks = ack_task.await.context("the ack collector failed")?;
    drop(producer);

    // Drain: wait until every acked batch has been delivered.
    if cfg.wait_for_delivery {
        let deadline = Instant::now() + cfg.drain_timeout;
        while delivered_count.load(Ordering::Relaxed) < acks.acked_seqs.len() as u64
            && Instant::now() < deadline
        {
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }
    tokio::time::sleep(cfg.hold_after).await;
    let _ = stop_tx.send(true);
    let subs = sub_task.await.context("the subscriber task failed")?;
    let wall_secs = clock.start.elapsed().as_secs_f64();

    let broker_after = broker.map(|b| group_stats(&b.pids));
    let client_after = proc_stats(std::process::id()).ok();
    // A backlog run's slow subscriber is expected to be behind: what it has
    // not reached yet is not lost.
    let lost = if !cfg.wait_for_delivery {
        0
    } else {
        acks.acked_seqs
            .iter()
            .filter(|&&s| !subs.seen.get(s as usize).copied().unwrap_or(false))
            .count() as u64
    };
    let mut errors = pacer.errors;
    errors.extend(acks.errors);
    if let Some(e) = &subs.error {
        errors.push(format!("subscriber: {e}"));
    }
    let errors_total = pacer.errors_total + acks.errors_total + u64::from(subs.error.is_some());
    errors.truncate(MAX_KEPT_ERRORS);
    let secs_to = |t: Option<Instant>| {
        t.map_or(0.0, |t| {
            t.saturating_duration_since(clock.start).as_secs_f64()
        })
    };
    Ok(PhaseResult {
        name: cfg.name.clone(),
        size_label: cfg.size.label(),
        rows_per_batch: template.rows(),
        bytes_per_batch: template.encoded_bytes,
        partitions: cfg.partitions,
        offered_rate: cfg.rate,
        sent: pacer.sent,
        acked: acks.acked_seqs.len() as u64,
        delivered: subs.delivered,
        duplicates: subs.duplicates,
        reordered: subs.reordered,
        lost,
        subscriber_failed: subs.error.is_some(),
        unacked_outstanding: acks.outstanding,
        errors_total,
        errors,
        send_secs: secs_to(pacer.last_send),
        ack_secs: secs_to(acks.last_ack),
        deliver_secs: secs_to(subs.last_delivery),
        send_lag: pacer.lag.summary(),
        ack_latency: acks.latency.summary(),
        e2e_latency: subs.latency.summary(),
        broker_rss_max_kb: broker.map(|b| b.rss.phase_max_kb.load(Ordering::Relaxed)),
        broker_cpu_s: broker_before
            .zip(broker_after)
            .map(|(a, b)| b.cpu_s - a.cpu_s),
        client_cpu_s: client_before
            .zip(client_after)
            .map(|(a, b)| b.cpu_s - a.cpu_s),
        wall_secs,
    })
}

fn pace(
    handle: &tokio::runtime::Handle,
    producer: &dyn Publisher,
    template: &Template,
    clock: Clock,
    rate: Option<f64>,
    limit: Limit,
    acks: mpsc::Sender<Sent>,
) -> anyhow::Result<PacerOutcome> {
    let mut out = PacerOutcome {
        sent: 0,
        last_send: None,
        lag: Latency::new()?,
        errors_total: 0,
        errors: Vec::new(),
    };
    let bytes_per_batch = template.encoded_bytes.max(1) as u64;
    for seq in 0..MAX_SEQ_PER_PHASE {
        let intended = match rate {
            Some(r) => clock.start + intended_offset(seq, r),
            None => Instant::now(),
        };
        let done = match limit {
            Limit::Duration(d) => intended.saturating_duration_since(clock.start) >= d,
            Limit::Bytes(b) => seq * bytes_per_batch >= b,
        };
        if done {
            break;
        }
        if let (Some(r), Limit::Duration(d)) = (rate, limit) {
            // Over capacity the schedule runs ahead of the sender forever;
            // stop at twice the planned length and say so.
            if clock.start.elapsed() > d * 2 + OVERRUN_GRACE {
                let planned = (d.as_secs_f64() * r) as u64;
                out.errors_total += 1;
                out.errors.push(format!(
                    "the sender fell behind the offered rate: {} of {planned} scheduled batches never sent (over capacity)",
                    planned.saturating_sub(seq)
                ));
                break;
            }
        }
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        out.lag
            .record(Instant::now().saturating_duration_since(intended));
        let batch = template.stamp(seq, clock.micros_of(intended))?;
        match handle.block_on(producer.send(&batch)) {
            Ok(ack) => {
                out.sent += 1;
                out.last_send = Some(Instant::now());
                if acks.blocking_send(Sent { seq, intended, ack }).is_err() {
                    anyhow::bail!("the ack collector stopped early");
                }
            }
            Err(e) => {
                out.errors_total += 1;
                if out.errors.len() < MAX_KEPT_ERRORS {
                    out.errors.push(format!("send #{seq}: {e:#}"));
                }
                if out.errors_total >= MAX_SEND_ERRORS {
                    break;
                }
            }
        }
    }
    Ok(out)
}

async fn collect_acks(
    mut rx: mpsc::Receiver<Sent>,
    drain_timeout: Duration,
    latency: Latency,
) -> AckOutcome {
    let mut out = AckOutcome {
        acked_seqs: Vec::new(),
        last_ack: None,
        latency,
        outstanding: 0,
        errors_total: 0,
        errors: Vec::new(),
    };
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    // Set once the pacer is done: outstanding acks get `drain_timeout` more.
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
    loop {
        if !open && pending.is_empty() {
            break;
        }
        tokio::select! {
            s = rx.recv(), if open => match s {
                Some(Sent { seq, intended, ack }) => pending.push(async move { (seq, intended, ack.await, Instant::now()) }),
                None => {
                    open = false;
                    deadline = tokio::time::Instant::now() + drain_timeout;
                }
            },
            Some((seq, intended, res, at)) = pending.next(), if !pending.is_empty() => match res {
                Ok(_) => {
                    out.latency.record(at.saturating_duration_since(intended));
                    out.acked_seqs.push(seq);
                    out.last_ack = Some(at);
                }
                Err(e) => {
                    out.errors_total += 1;
                    if out.errors.len() < MAX_KEPT_ERRORS {
                        out.errors.push(format!("ack #{seq}: {e:#}"));
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline), if !open => break,
            else => break,
        }
    }
    out.outstanding = pending.len() as u64;
    out
}

async fn subscribe_loop(
    mut sub: Box<dyn Deliveries>,
    clock: Clock,
    count: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    delay: Option<Duration>,
    latency: Latency,
    rows_per_send: usize,
) -> SubOutcome {
    let mut out = SubOutcome {
        seen: Vec::new(),
        delivered: 0,
        duplicates: 0,
        reordered: 0,
        last_delivery: None,
        latency,
        error: None,
    };
    loop {
        let d = tokio::select! {
            d = sub.next() => d,
            _ = stop.changed() => break,
        };
        let d = match d {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                out.error = Some(format!("{e:#}"));
                break;
            }
            None => {
                out.error = Some("the subscription ended".into());
                break;
            }
        };
        let now = Instant::now();
        // A producer that coalesces (arrowbus with linger) stores several
        // sends as one batch: every `rows_per_send` rows are one send.
        let rows = d.num_rows();
        if rows == 0 || rows % rows_per_send.max(1) != 0 {
            out.error = Some(format!(
                "a delivered batch of {rows} rows is not whole sends of {rows_per_send} rows"
            ));
            break;
        }
        for start in (0..rows).step_by(rows_per_send.max(1)) {
            if let Err(e) = out.record(&d.slice(start, rows_per_send), &clock, now, &count) {
                out.error = Some(e);
                break;
            }
        }
        if out.error.is_some() {
            break;
        }
        if let Some(delay) = delay {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => break,
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BoxFut;

    /// Deliveries replayed from a list, then the subscription ends.
    struct Replay(std::vec::IntoIter<RecordBatch>);

    impl Deliveries for Replay {
        fn next(&mut self) -> BoxFut<'_, Option<anyhow::Result<RecordBatch>>> {
            let b = self.0.next();
            Box::pin(async move { b.map(Ok) })
        }
    }

    #[tokio::test]
    async fn subscriber_counts_duplicates_and_reordering() -> anyhow::Result<()> {
        let t = Template::with_rows(2)?;
        let clock = Clock::now();
        let seqs = [0u64, 1, 3, 2, 3, 4, 0, 5];
        let batches = seqs
            .iter()
            .map(|&s| t.stamp(s, clock.micros_of(clock.start)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (_stop_tx, stop_rx) = watch::channel(false);
        let count = Arc::new(AtomicU64::new(0));
        let out = subscribe_loop(
            Box::new(Replay(batches.into_iter())),
            clock,
            count.clone(),
            stop_rx,
            None,
            Latency::new()?,
            2,
        )
        .await;
        // 0..=5 each delivered once; 3 and 0 again (duplicates); 2 after 3.
        assert_eq!(out.delivered, 6);
        assert_eq!(count.load(Ordering::Relaxed), 6);
        assert_eq!(out.duplicates, 2);
        assert_eq!(out.reordered, 1);
        assert_eq!(out.seen, vec![true; 6]);
        assert_eq!(out.error.as_deref(), Some("the subscription ended"));
        Ok(())
    }

    #[tokio::test]
    async fn coalesced_sends_count_one_by_one() -> anyhow::Result<()> {
        // A lingering producer stores sends 0, 1, 2 as one batch, then 3.
        let t = Template::with_rows(2)?;
        let clock = Clock::now();
        let stamp = |s| t.stamp(s, clock.micros_of(clock.start));
        let first =
            arrow_select::concat::concat_batches(&t.schema(), &[stamp(0)?, stamp(1)?, stamp(2)?])?;
        let (_stop_tx, stop_rx) = watch::channel(false);
        let count = Arc::new(AtomicU64::new(0));
        let out = subscribe_loop(
            Box::new(Replay(vec![first, stamp(3)?].into_iter())),
            clock,
            count.clone(),
            stop_rx,
            None,
            Latency::new()?,
            2,
        )
        .await;
        assert_eq!((out.delivered, out.duplicates, out.reordered), (4, 0, 0));
        assert_eq!(out.seen, vec![true; 4]);
        // A batch that is not whole sends is an error, not a guess.
        let odd = stamp(4)?.slice(0, 1);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let out = subscribe_loop(
            Box::new(Replay(vec![odd].into_iter())),
            clock,
            count,
            stop_rx,
            None,
            Latency::new()?,
            2,
        )
        .await;
        assert_eq!(out.delivered, 0);
        assert_eq!(
            out.error.as_deref(),
            Some("a delivered batch of 1 rows is not whole sends of 2 rows")
        );
        Ok(())
    }
}
