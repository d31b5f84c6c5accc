//! Statistics split into one shard per worker and summed when read: each
//! worker adds to its own cache line, so `--workers N` never has two
//! threads contending for a counter, or for a histogram's lock (the
//! prometheus-client histogram takes a write lock per observation).
//!
//! The sharded types are Prometheus metrics (they encode their sum), and
//! also serve the proxy's own INFO counters.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric, family::MetricConstructor},
};

/// One worker's cell, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Cell<A>(A);

/// How many shards each new series has: the number of workers.
#[derive(Clone, Copy, Debug)]
pub struct Shards(pub usize);

/// A counter with one cell per worker.
#[derive(Clone, Debug)]
pub struct ShardedCounter(Arc<[Cell<AtomicU64>]>);

impl ShardedCounter {
    pub fn new(shards: usize) -> Self {
        Self((0..shards.max(1)).map(|_| Cell::default()).collect())
    }

    /// Worker `index`'s handle (the last shard if there are fewer).
    pub fn shard(&self, index: usize) -> CounterShard {
        CounterShard {
            cells: Arc::clone(&self.0),
            index: index.min(self.0.len() - 1),
        }
    }

    /// The sum over every worker.
    pub fn get(&self) -> u64 {
        self.0.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }

    /// CONFIG RESETSTAT. Racing adds of other workers may survive it, as
    /// they would have come a moment later.
    pub fn reset(&self) {
        for cell in self.0.iter() {
            cell.0.store(0, Ordering::Relaxed);
        }
    }
}

impl MetricConstructor<ShardedCounter> for Shards {
    fn new_metric(&self) -> ShardedCounter {
        ShardedCounter::new(self.0)
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One worker's part of a [`ShardedCounter`].
#[derive(Clone)]
pub struct CounterShard {
    cells: Arc<[Cell<AtomicU64>]>,
    index: usize,
}

impl CounterShard {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.cells[self.index].0.fetch_add(n, Ordering::Relaxed);
    }

    /// `inc` by the worker this shard belongs to, from the request path:
    /// see [`owner_add`].
    pub fn inc_as_owner(&self) {
        owner_add(&self.cells[self.index].0, 1);
    }

    /// The sum over every worker.
    pub fn total(&self) -> u64 {
        self.cells.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

/// A gauge with one cell per worker (what is open now: each worker counts
/// its own, the series is their sum).
#[derive(Clone, Debug)]
pub struct ShardedGauge(Arc<[Cell<AtomicI64>]>);

impl ShardedGauge {
    pub fn new(shards: usize) -> Self {
        Self((0..shards.max(1)).map(|_| Cell::default()).collect())
    }

    pub fn shard(&self, index: usize) -> GaugeShard {
        GaugeShard {
            cells: Arc::clone(&self.0),
            index: index.min(self.0.len() - 1),
        }
    }

    pub fn get(&self) -> i64 {
        self.0.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

impl MetricConstructor<ShardedGauge> for Shards {
    fn new_metric(&self) -> ShardedGauge {
        ShardedGauge::new(self.0)
    }
}

impl TypedMetric for ShardedGauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for ShardedGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One worker's part of a [`ShardedGauge`].
#[derive(Clone)]
pub struct GaugeShard {
    cells: Arc<[Cell<AtomicI64>]>,
    index: usize,
}

impl GaugeShard {
    pub fn inc(&self) {
        self.cells[self.index].0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.cells[self.index].0.fetch_sub(1, Ordering::Relaxed);
    }

    /// The sum over every worker.
    pub fn total(&self) -> i64 {
        self.cells.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

/// Upper bounds of the latency buckets: 25 µs doubling to ~0.8 s, then
/// +Inf (as `exponential_buckets(25e-6, 2.0, 16)` gave before).
const LATENCY_BUCKETS: usize = 16;
const FIRST_BOUND_NS: u64 = 25_000;

/// One worker's latency histogram: plain atomic adds, no lock.
#[derive(Debug, Default)]
#[repr(align(64))]
struct LatencyCells {
    count: AtomicU64,
    sum_ns: AtomicU64,
    /// Per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
}

/// Command latency, one histogram per worker, merged when scraped.
#[derive(Clone, Debug)]
pub struct ShardedLatency(Arc<[LatencyCells]>);

impl ShardedLatency {
    pub fn new(shards: usize) -> Self {
        Self(
            (0..shards.max(1))
                .map(|_| LatencyCells::default())
                .collect(),
        )
    }

    pub fn shard(&self, index: usize) -> LatencyShard {
        LatencyShard {
            cells: Arc::clone(&self.0),
            index: index.min(self.0.len() - 1),
        }
    }

    /// Sum of seconds, count, and per-bucket counts with their bounds.
    fn merged(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut sum_ns = 0u64;
        let mut count = 0u64;
        let mut buckets: Vec<(f64, u64)> = (0..=LATENCY_BUCKETS)
            .map(|i| (bucket_bound(i), 0))
            .collect();
        for shard in self.0.iter() {
            sum_ns = sum_ns.wrapping_add(shard.sum_ns.load(Ordering::Relaxed));
            count += shard.count.load(Ordering::Relaxed);
            for (out, cell) in buckets.iter_mut().zip(&shard.buckets) {
                out.1 += cell.load(Ordering::Relaxed);
            }
        }
        (sum_ns as f64 / 1e9, count, buckets)
    }
}

/// The upper bound of bucket `i`, in seconds (the last: +Inf).
fn bucket_bound(i: usize) -> f64 {
    if i >= LATENCY_BUCKETS {
        f64::MAX
    } else {
        (FIRST_BOUND_NS << i) as f64 / 1e9
    }
}

/// The bucket of a duration: the first whose bound is not below it.
fn bucket_of(ns: u64) -> usize {
    (0..LATENCY_BUCKETS)
        .find(|&i| ns <= FIRST_BOUND_NS << i)
        .unwrap_or(LATENCY_BUCKETS)
}

impl MetricConstructor<ShardedLatency> for Shards {
    fn new_metric(&self) -> ShardedLatency {
        ShardedLatency::new(self.0)
    }
}

impl TypedMetric for ShardedLatency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedLatency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.merged();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One worker's part of a [`ShardedLatency`].
#[derive(Clone)]
pub struct LatencyShard {
    cells: Arc<[LatencyCells]>,
    index: usize,
}

impl LatencyShard {
    /// Only the worker this shard belongs to observes (its sessions'
    /// replies): see [`owner_add`].
    pub fn observe(&self, elapsed: Duration) {
        self.observe_many(elapsed, 1);
    }

    /// `n` observations of the same time: the replies of one pipelined
    /// read, which share its start.
    pub fn observe_many(&self, elapsed: Duration, n: u64) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let cells = &self.cells[self.index];
        owner_add(&cells.count, n);
        owner_add(&cells.sum_ns, ns.saturating_mul(n));
        owner_add(&cells.buckets[bucket_of(ns)], n);
    }
}

/// Adds to a cell only its own worker writes: a load and a store, not a
/// locked read-modify-write. Scrapes on other threads still read whole
/// values. A locked add cost as much as the rest of a command's metrics
/// (the samples gathered on the instructions after each `lock`), and every
/// command made five. A second writer would lose counts, never corrupt
/// memory; each worker's sessions, and the tasks they spawn, run on that
/// worker's own thread.
fn owner_add(cell: &AtomicU64, n: u64) {
    cell.store(
        cell.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, metrics::family::Family, registry::Registry};

    use super::*;

    #[test]
    fn a_counter_reads_as_the_sum_of_its_workers_shards() {
        let counter = ShardedCounter::new(3);
        counter.shard(0).inc();
        counter.shard(2).inc_by(5);
        // Out of range: the last shard, never a panic.
        counter.shard(9).inc();
        assert_eq!(counter.get(), 7);
        assert_eq!(counter.shard(1).total(), 7);
        counter.reset();
        assert_eq!(counter.get(), 0);
    }

    #[test]
    fn a_gauge_sums_opens_and_closes_made_on_different_workers() {
        let gauge = ShardedGauge::new(2);
        gauge.shard(0).inc();
        gauge.shard(0).inc();
        // A client counted on one worker is never closed on another, but
        // the sum must hold even so.
        gauge.shard(1).dec();
        assert_eq!(gauge.get(), 1);
        assert_eq!(gauge.shard(1).total(), 1);
    }

    #[test]
    fn durations_land_in_the_first_bucket_whose_bound_holds_them() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(25_000), 0);
        assert_eq!(bucket_of(25_001), 1);
        assert_eq!(bucket_of(50_000), 1);
        assert_eq!(bucket_of(FIRST_BOUND_NS << 15), 15);
        assert_eq!(bucket_of((FIRST_BOUND_NS << 15) + 1), LATENCY_BUCKETS);
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS);
    }

    #[test]
    fn a_reads_replies_observed_at_once_count_as_if_observed_one_by_one() {
        let at_once = ShardedLatency::new(1);
        let one_by_one = ShardedLatency::new(1);
        at_once.shard(0).observe_many(Duration::from_micros(30), 16);
        for _ in 0..16 {
            one_by_one.shard(0).observe(Duration::from_micros(30));
        }
        at_once.shard(0).observe(Duration::from_micros(700));
        one_by_one.shard(0).observe(Duration::from_micros(700));
        assert_eq!(at_once.merged(), one_by_one.merged());
        assert_eq!(at_once.merged().1, 17);
    }

    #[test]
    fn scrapes_show_one_series_merged_from_every_worker() {
        let mut registry = Registry::default();
        let commands: Family<Vec<(String, String)>, ShardedCounter, Shards> =
            Family::new_with_constructor(Shards(2));
        let latency: Family<Vec<(String, String)>, ShardedLatency, Shards> =
            Family::new_with_constructor(Shards(2));
        registry.register("commands", "c", commands.clone());
        registry.register("latency", "l", latency.clone());
        let labels = vec![("backend".to_string(), "cart".to_string())];
        let series = commands.get_or_create_owned(&labels);
        series.shard(0).inc_by(3);
        series.shard(1).inc_by(4);
        let histogram = latency.get_or_create_owned(&labels);
        histogram.shard(0).observe(Duration::from_micros(10));
        histogram.shard(1).observe(Duration::from_micros(40));
        histogram.shard(1).observe(Duration::from_secs(5));
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("commands_total{backend=\"cart\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("latency_count{backend=\"cart\"} 3\n"),
            "{text}"
        );
        // Cumulative buckets: 10 µs under 25 µs; 40 µs under 50 µs.
        assert!(
            text.contains("latency_bucket{le=\"0.000025\",backend=\"cart\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("latency_bucket{le=\"0.00005\",backend=\"cart\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("latency_bucket{le=\"+Inf\",backend=\"cart\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("latency_sum{backend=\"cart\"} 5.00005\n"),
            "{text}"
        );
    }
}
