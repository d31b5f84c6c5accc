//! Throughput as Redis served it, timed by the harness.
//!
//! redis-benchmark with `--threads` stops each thread's event loop from its
//! 250 ms throughput timer, so the run time it divides by is rounded up to
//! the next quarter second after the last reply: 200k W1 GETs straight to
//! the cluster take about 0.6 s and are printed as 199,800 requests/s (200k
//! in 1.001 s), and a run through the proxy rounds to 1.251 or 1.501 s.
//! Ratios of such figures move in steps of 15-40% here (of 4-6% with the
//! 1M and 4M requests of `../shared/bench/peers.sh`, where the W2 GET ratio
//! read either 0.53 or 0.57 and nothing between).
//!
//! So a thread samples every master's `INFO commandstats` (calls of SET and
//! GET), over connections made in the bench's netns, every few
//! milliseconds during a run,
//! and each test's rate is taken over the middle of its requests, from the
//! time the count crossed 10% of them to the time it crossed 90%
//! (interpolated between samples). Replicas are left out: they count the
//! SETs they replicate.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use testbed::{process::Place, resp::RespClient};

/// How often the masters are asked: each ask costs a master a few µs.
const INTERVAL: Duration = Duration::from_millis(4);
/// The part of a test's requests its rate is taken over.
const WINDOW: (f64, f64) = (0.1, 0.9);

/// The commands a run's tests send, by redis-benchmark's test name.
pub const COUNTED: [(&str, &str); 2] = [("SET", "cmdstat_set"), ("GET", "cmdstat_get")];

/// One sample: seconds since the sampler started, and the calls of each of
/// `COUNTED` summed over the masters.
type Point = (f64, [u64; 2]);

/// Samples the masters among `servers` until finished.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Vec<Point>>>,
}

impl Sampler {
    /// Connects to the masters among `servers` from inside `place` (the
    /// sockets keep its network namespace) and samples them from a thread
    /// of their own. Servers that do not answer or are replicas are
    /// skipped; none answering is an error.
    pub fn start(place: &Place, servers: &[SocketAddr]) -> Result<Self> {
        let mut masters = Vec::new();
        for addr in servers {
            let Ok(mut conn) = RespClient::connect_in(place, *addr) else {
                continue;
            };
            let replication = conn.call_str(&["INFO", "replication"])?;
            if replication.lines().any(|l| l.trim() == "role:master") {
                masters.push(conn);
            }
        }
        if masters.is_empty() {
            bail!("cannot sample the masters: none answered among {servers:?}");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || -> Result<Vec<Point>> {
            let start = Instant::now();
            let mut points = Vec::new();
            loop {
                let stopping_now = stopping.load(Ordering::Relaxed);
                let mut sums = [0u64; 2];
                for master in &mut masters {
                    let stats = master.call_str(&["INFO", "commandstats"])?;
                    for (sum, n) in sums.iter_mut().zip(calls(&stats)) {
                        *sum += n;
                    }
                }
                points.push((start.elapsed().as_secs_f64(), sums));
                if stopping_now {
                    return Ok(points);
                }
                std::thread::sleep(INTERVAL);
            }
        });
        Ok(Self { stop, thread })
    }

    /// Stops sampling; each counted test's rate over the middle of its
    /// `requests` (requests per second), `None` for one the samples do not
    /// time. Tests whose commands never reached a master (a responder
    /// answered them) are left out.
    pub fn finish(self, requests: u64) -> Result<Vec<(&'static str, Option<f64>)>> {
        self.stop.store(true, Ordering::Relaxed);
        let points = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the sampling thread panicked"))??;
        let mut rates = Vec::new();
        for (i, (test, _)) in COUNTED.iter().enumerate() {
            let series: Vec<(f64, u64)> = points.iter().map(|(t, c)| (*t, c[i])).collect();
            let served = series.last().map(|l| l.1) > series.first().map(|f| f.1);
            if served {
                rates.push((*test, rate(&series, requests)));
            }
        }
        Ok(rates)
    }
}

/// The rate over the middle of `requests` counted in `series` (seconds,
/// cumulative count): `WINDOW`'s share of them divided by the time between
/// the count crossing its two ends. `None` when the series does not cross
/// both, or crosses them between the same two samples (too short to time).
pub fn rate(series: &[(f64, u64)], requests: u64) -> Option<f64> {
    let base = series.first()?.1;
    // (which pair of samples, when)
    let crossing = |share: f64| -> Option<(usize, f64)> {
        let level = base as f64 + share * requests as f64;
        series.windows(2).enumerate().find_map(|(i, pair)| {
            let ((t0, c0), (t1, c1)) = (pair[0], pair[1]);
            let (c0, c1) = (c0 as f64, c1 as f64);
            (c0 < level && c1 >= level).then(|| (i, t0 + (t1 - t0) * (level - c0) / (c1 - c0)))
        })
    };
    let ((first, from), (last, to)) = (crossing(WINDOW.0)?, crossing(WINDOW.1)?);
    (last > first && to > from).then(|| (WINDOW.1 - WINDOW.0) * requests as f64 / (to - from))
}

/// The calls of each of `COUNTED` in an `INFO commandstats` reply (the
/// raw bulk string: its `$<length>` line matches no command).
fn calls(stats: &str) -> [u64; 2] {
    let mut out = [0; 2];
    for line in stats.lines() {
        let Some((name, fields)) = line.split_once(':') else {
            continue;
        };
        let Some(i) = COUNTED.iter().position(|(_, stat)| *stat == name) else {
            continue;
        };
        out[i] = fields
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_timed_between_the_windows_ends_interpolated() {
        // 1000 requests at 1000/s starting at 0.5 s, sampled every 0.3 s.
        let series: Vec<(f64, u64)> = (0..12)
            .map(|i| {
                let t = f64::from(i) * 0.3;
                (t, ((t - 0.5).clamp(0.0, 1.0) * 1000.0) as u64)
            })
            .collect();
        let rate = rate(&series, 1000).expect("crossed");
        // The samples' counts are whole requests: within 0.2%.
        assert!((rate - 1000.0).abs() < 2.0, "{rate}");
    }

    #[test]
    fn a_run_the_samples_do_not_cover_has_no_rate() {
        assert_eq!(rate(&[(0.0, 0), (1.0, 500)], 1000), None);
        assert_eq!(rate(&[(0.0, 0), (1.0, 1000)], 1000), None, "one step");
        assert_eq!(rate(&[], 1000), None);
    }

    #[test]
    fn commandstats_calls_are_read_by_command() {
        let stats = "$300\r\n# Commandstats\r\n\
            cmdstat_get:calls=1200,usec=900,usec_per_call=0.75,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_info:calls=3,usec=40,usec_per_call=13.33,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_set:calls=77,usec=100,usec_per_call=1.30,rejected_calls=0,failed_calls=0\r\n";
        assert_eq!(calls(stats), [77, 1200]);
        assert_eq!(calls("# Commandstats\r\n"), [0, 0]);
    }
}
