//! `kill -9` of busd in the middle of a continuous, pipelined publish,
//! repeated: after every restart each acknowledged batch is present at the
//! offsets its ack named, bit-exact; nothing that was never sent appears, and
//! no torn batch is visible.

use std::collections::BTreeMap;
use std::time::Duration;

use arrowbus::{NewTopic, StartAt, SubscribeOptions};
use arrowbus_tests::{seqs, ticks, Busd};
use futures::StreamExt;
use rand::{Rng, SeedableRng};

/// Kill rounds per run: enough to hit different moments of the write path.
const ROUNDS: usize = 5;
/// Rows per batch: batches of different sizes cross segment and fsync-group
/// boundaries at different points.
const ROWS_MAX: usize = 400;

#[tokio::test(flavor = "multi_thread")]
async fn acked_batches_survive_repeated_kill9() {
    let seed = arrowbus_tests::seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut busd = Busd::start();
    busd.client()
        .await
        .admin()
        .create_topic(NewTopic::new("crash").partitions(2))
        .await
        .unwrap();

    // (partition, base_offset) -> first seq of the batch and its row count.
    let mut acked: BTreeMap<(u32, u64), (i64, usize)> = BTreeMap::new();
    // Every batch ever sent: first seq -> rows. Used to tell an unacked but
    // stored batch (allowed: its ack was lost with the process) from garbage.
    let mut sent: BTreeMap<i64, usize> = BTreeMap::new();
    let mut next_seq = 0i64;

    for round in 0..ROUNDS {
        let client = busd.client().await;
        let producer = client.producer();
        let kill_after = Duration::from_millis(rng.random_range(50..400));
        let started = std::time::Instant::now();
        let mut pending = std::collections::VecDeque::new();
        // Publish pipelined until the kill; then collect what was acked.
        let mut killed = false;
        while !killed {
            let rows = rng.random_range(1..ROWS_MAX);
            let batch = ticks(next_seq, rows);
            sent.insert(next_seq, rows);
            match producer.send("crash", None, &batch).await {
                Ok(p) => pending.push_back((next_seq, rows, p)),
                Err(_) => break,
            }
            next_seq += rows as i64;
            if pending.len() >= 8 {
                let (s, r, p) = pending.pop_front().unwrap();
                if let Ok(ack) = p.await {
                    assert_eq!(ack.rows as usize, r);
                    acked.insert((ack.partition, ack.base_offset), (s, r));
                }
            }
            if started.elapsed() >= kill_after {
                busd.kill9();
                killed = true;
            }
        }
        // After the kill an ack can still arrive if it was already on the
        // wire. Anything else is indeterminate: without an answer the client
        // learns of the dead broker only at the QUIC idle timeout (30 s), so
        // stop waiting after a moment.
        let late = tokio::time::Instant::now() + Duration::from_secs(2);
        for (s, r, p) in pending {
            if let Ok(Ok(ack)) = tokio::time::timeout_at(late, p).await {
                acked.insert((ack.partition, ack.base_offset), (s, r));
            }
        }
        println!(
            "round {round}: killed after {kill_after:?}, {} batches acked so far",
            acked.len()
        );
        busd.restart();
        verify(&busd, &acked, &sent).await;
    }
    assert!(
        acked.len() > ROUNDS,
        "too few acks to mean anything: {}",
        acked.len()
    );
}

async fn verify(
    busd: &Busd,
    acked: &BTreeMap<(u32, u64), (i64, usize)>,
    sent: &BTreeMap<i64, usize>,
) {
    let client = busd.client().await;
    let mut sub = client
        .subscribe(
            "crash",
            SubscribeOptions::default()
                .from(StartAt::Earliest)
                .until_end(),
        )
        .await
        .unwrap();
    let mut seen: BTreeMap<(u32, u64), Vec<i64>> = BTreeMap::new();
    let mut next_by_partition: BTreeMap<u32, u64> = BTreeMap::new();
    while let Some(d) = sub.next().await {
        let d = d.unwrap_or_else(|e| panic!("reading after restart: {e}"));
        // Offsets in a partition are contiguous: nothing lost in the middle.
        let expect = next_by_partition.entry(d.partition).or_insert(0);
        assert_eq!(d.offset, *expect, "gap in partition {}", d.partition);
        *expect = d.next_offset();
        let rows = seqs(&d.batch);
        // Whatever is visible was really sent, whole (a batch is one sent batch).
        let first = rows[0];
        assert_eq!(
            sent.get(&first),
            Some(&rows.len()),
            "visible batch at p{} offset {} was never sent as such",
            d.partition,
            d.offset
        );
        assert_eq!(rows, (first..first + rows.len() as i64).collect::<Vec<_>>());
        seen.insert((d.partition, d.offset), rows);
    }
    for ((p, off), (first, n)) in acked {
        let rows = seen.get(&(*p, *off)).unwrap_or_else(|| {
            panic!("acked batch p{p} offset {off} (seq {first}, {n} rows) is missing after restart")
        });
        assert_eq!(rows.len(), *n);
        assert_eq!(
            rows[0], *first,
            "p{p} offset {off} holds other rows than were acked"
        );
    }
}
