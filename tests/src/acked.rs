//! Bookkeeping of acknowledged batches for fault tests: a producer that
//! publishes numbered tick batches and reports every ack, and checks that
//! each acknowledged batch is where its ack said.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arrowbus::{StartAt, SubscribeOptions};
use tokio::sync::mpsc;

use crate::{read_all, seqs, ticks};

/// Rows in each batch the producer publishes.
pub const ROWS_PER_BATCH: usize = 50;

/// Acks: (partition, base offset) -> the seq values of the batch acknowledged there.
pub type Acked = BTreeMap<(u32, u64), Vec<i64>>;

/// One ack: partition, base offset, the batch's seq values.
pub type Ack = (u32, u64, Vec<i64>);

/// A producer publishing in the background, and the acks it got so far.
pub struct Load {
    stop: mpsc::Sender<()>,
    rx: mpsc::UnboundedReceiver<Ack>,
    task: tokio::task::JoinHandle<Vec<String>>,
    pub acked: Acked,
}

impl Load {
    /// Start publishing to partitions `0..partitions` of `topic` in turn.
    pub fn start(client: arrowbus::Client, topic: &'static str, partitions: u32) -> Self {
        let (stop, stop_rx) = mpsc::channel(1);
        let (ack_tx, rx) = mpsc::unbounded_channel();
        let task = spawn_producer(client, topic, partitions, stop_rx, ack_tx);
        Load {
            stop,
            rx,
            task,
            acked: Acked::new(),
        }
    }

    /// Wait (up to 30 s) for `n` more acks: publishing goes on.
    pub async fn await_acks(&mut self, n: usize, what: &str, logs: impl Fn() -> String) {
        await_acks(&mut self.rx, &mut self.acked, n, what, logs).await
    }

    /// Stop publishing; every ack. Fails the test if a publish failed
    /// after the client's retries.
    pub async fn finish(mut self) -> Acked {
        let _ = self.stop.send(()).await;
        let errors = self
            .task
            .await
            .unwrap_or_else(|e| panic!("producer task: {e}"));
        drain_acks(&mut self.rx, &mut self.acked);
        assert!(
            errors.is_empty(),
            "publishes failed after retries: {errors:?}"
        );
        self.acked
    }
}

/// Publish to partitions `0..partitions` in turn until `stop` closes; every
/// ack is reported. Returns the errors of publishes that failed after the
/// client's retries (those batches do not count as acknowledged).
fn spawn_producer(
    client: arrowbus::Client,
    topic: &'static str,
    partitions: u32,
    mut stop: mpsc::Receiver<()>,
    acks: mpsc::UnboundedSender<Ack>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let producer = client.producer();
        let mut next = 0i64;
        let mut errors = Vec::new();
        for p in (0..partitions.max(1)).cycle() {
            if stop.try_recv().is_ok() {
                break;
            }
            let batch = ticks(next, ROWS_PER_BATCH);
            let sent = seqs(&batch);
            next += ROWS_PER_BATCH as i64;
            match producer.publish_to(topic, p, &batch).await {
                Ok(ack) => {
                    assert_eq!(ack.rows as usize, ROWS_PER_BATCH, "ack row count");
                    let _ = acks.send((p, ack.base_offset, sent));
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        errors
    })
}

/// Wait (up to 30 s) until at least `n` more acks arrive: publishing goes
/// on. `logs` is printed on failure.
async fn await_acks(
    rx: &mut mpsc::UnboundedReceiver<Ack>,
    acked: &mut Acked,
    n: usize,
    what: &str,
    logs: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = 0;
    while got < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((p, off, s))) => {
                if let Some(prev) = acked.insert((p, off), s) {
                    panic!(
                        "two acks for partition {p} offset {off} (first: {} rows)",
                        prev.len()
                    );
                }
                got += 1;
            }
            _ => panic!("{what}: only {got} of {n} acks within 30 s\n{}", logs()),
        }
    }
}

/// Move the acks still queued into `acked`.
fn drain_acks(rx: &mut mpsc::UnboundedReceiver<Ack>, acked: &mut Acked) {
    while let Ok((p, off, s)) = rx.try_recv() {
        acked.insert((p, off), s);
    }
}

/// Every acknowledged batch is at the offsets its ack named, read back
/// from the partitions' current leaders.
pub async fn check_acked_present(client: &arrowbus::Client, topic: &str, acked: &Acked) {
    let partitions: std::collections::BTreeSet<u32> = acked.keys().map(|(p, _)| *p).collect();
    let opts = SubscribeOptions::default()
        .from(StartAt::Earliest)
        .partitions(partitions.into_iter().collect());
    let mut by_offset: BTreeMap<(u32, u64), i64> = BTreeMap::new();
    for d in read_all(client, topic, opts).await {
        for (i, s) in seqs(&d.batch).into_iter().enumerate() {
            by_offset.insert((d.partition, d.offset + i as u64), s);
        }
    }
    for ((p, off), sent) in acked {
        let got: Vec<i64> = (0..sent.len() as u64)
            .map(|i| {
                *by_offset.get(&(*p, off + i)).unwrap_or_else(|| {
                    panic!("acked offset {} of partition {p} is missing", off + i)
                })
            })
            .collect();
        assert_eq!(
            &got, sent,
            "rows at acked offset {off} of partition {p} are not the acknowledged batch"
        );
    }
}
