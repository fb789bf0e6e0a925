//! Latency bookkeeping without coordinated omission.
//!
//! A paced workload sends batch `seq` at its *intended* time `start + seq /
//! rate`, fixed before the run begins. Every latency is measured from that
//! intended time, so when the broker (or the producer window) stalls the
//! sender, the batches that should have gone out during the stall are charged
//! for the wait instead of silently disappearing from the histogram.
//!
//! This module is pure: no clocks are read here; callers pass instants in.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hdrhistogram::Histogram;

/// Highest latency the histograms track, in ns: 120 s. A run whose latency
/// exceeds this is broken; values above it are clamped, not dropped, so the
/// count stays right.
const MAX_TRACKED_LATENCY_NS: u64 = 120_000_000_000;
/// Significant decimal digits kept by the histograms (0.1 % error).
const HISTOGRAM_SIGFIG: u8 = 3;

/// Intended send time of batch `seq` at a fixed rate, relative to the start.
pub fn intended_offset(seq: u64, rate_per_sec: f64) -> Duration {
    // f64 nanoseconds: exact enough (53-bit mantissa) for runs of days.
    Duration::from_nanos((seq as f64 * 1e9 / rate_per_sec) as u64)
}

/// One clock for the whole process: a monotonic start instant paired with
/// the wall-clock time at that instant. Batch timestamps are derived from
/// it, and so is "now" at delivery, so wall-clock steps (NTP) during a run
/// cannot distort latencies.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub start: Instant,
    wall0_us: i64,
}

impl Clock {
    pub fn new(start: Instant, wall: SystemTime) -> Self {
        let wall0_us = wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        Self { start, wall0_us }
    }

    pub fn now() -> Self {
        Self::new(Instant::now(), SystemTime::now())
    }

    /// Microseconds since the Unix epoch of `t` (on this clock).
    pub fn micros_of(&self, t: Instant) -> i64 {
        let since = t.saturating_duration_since(self.start).as_micros() as i64;
        self.wall0_us + since
    }
}

/// A latency histogram in nanoseconds.
pub struct Latency {
    hist: Histogram<u64>,
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Latency {
    pub fn new() -> anyhow::Result<Self> {
        let hist = Histogram::new_with_bounds(1, MAX_TRACKED_LATENCY_NS, HISTOGRAM_SIGFIG)
            .context("creating a latency histogram")?;
        Ok(Self { hist })
    }

    pub fn record(&mut self, d: Duration) {
        let ns = (d.as_nanos().min(u128::from(MAX_TRACKED_LATENCY_NS)) as u64).max(1);
        // Cannot fail: ns is clamped into the histogram's bounds above.
        let _ = self.hist.record(ns);
    }

    pub fn summary(&self) -> Option<Summary> {
        if self.hist.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(Summary {
            count: self.hist.len(),
            p50_us: us(self.hist.value_at_quantile(0.50)),
            p90_us: us(self.hist.value_at_quantile(0.90)),
            p99_us: us(self.hist.value_at_quantile(0.99)),
            p999_us: us(self.hist.value_at_quantile(0.999)),
            max_us: us(self.hist.max()),
            mean_us: self.hist.mean() / 1000.0,
        })
    }
}

impl Summary {
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
            "mean_us": self.mean_us,
        })
    }
}

/// Parse a duration such as `10s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms, 2m)"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{s:?}: a duration must be a non-negative number"));
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_fixed_from_the_start() {
        assert_eq!(intended_offset(0, 1000.0), Duration::ZERO);
        assert_eq!(intended_offset(1, 1000.0), Duration::from_millis(1));
        assert_eq!(intended_offset(2500, 1000.0), Duration::from_millis(2500));
        assert_eq!(intended_offset(3, 3.0), Duration::from_secs(1));
    }

    #[test]
    fn clock_maps_instants_to_epoch_micros() {
        let start = Instant::now();
        let c = Clock::new(start, UNIX_EPOCH + Duration::from_secs(10));
        assert_eq!(c.micros_of(start), 10_000_000);
        assert_eq!(c.micros_of(start + Duration::from_micros(1500)), 10_001_500);
    }

    #[test]
    fn stalled_sends_show_up_in_the_tail() -> anyhow::Result<()> {
        // 1000 sends at 1 ms intervals with a 1 µs service time, except that
        // the system stalls for 100 ms at the start. Measured from intended
        // times, the 100 batches that queued behind the stall are charged.
        let mut h = Latency::new()?;
        for seq in 0..1000u64 {
            let intended = Duration::from_millis(seq);
            let actual_start = intended.max(Duration::from_millis(100));
            h.record(actual_start - intended + Duration::from_micros(1));
        }
        let s = h.summary().ok_or_else(|| anyhow::anyhow!("empty"))?;
        assert_eq!(s.count, 1000);
        assert!(s.p90_us < 2.0, "{s:?}");
        assert!(s.p99_us > 80_000.0, "{s:?}");
        assert!(s.max_us > 99_000.0, "{s:?}");
        Ok(())
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
