//! The request path's clock: monotonic nanoseconds as a plain integer.
//!
//! Each routed command reads the clock when its read returns and when its
//! reply is written, for its latency and the client's idle time. With
//! `Instant`, the two subtractions (`Timespec::sub_timespec`, checked and
//! normalised) cost a W1 GET about 80 user-space instructions (callgrind);
//! here a subtraction is one. Same clock as `Instant` (CLOCK_MONOTONIC).

use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// A reading of the monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(u64);

impl Stamp {
    pub fn now() -> Self {
        // CLOCK_MONOTONIC cannot fail on Linux; if it ever did, a reading
        // of zero only makes latencies look long, never panics.
        let Ok(ts) = clock_gettime(ClockId::CLOCK_MONOTONIC) else {
            return Self(0);
        };
        let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
        let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
        Self(secs * 1_000_000_000 + nanos)
    }

    /// The time from `earlier` to this reading; zero if `earlier` is later.
    pub fn since(self, earlier: Stamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// The time since this reading.
    pub fn elapsed(self) -> Duration {
        Self::now().since(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_reading_is_the_time_between_and_an_earlier_one_is_zero() {
        let first = Stamp::now();
        let wait = Duration::from_millis(5);
        std::thread::sleep(wait);
        let second = Stamp::now();
        let took = second.since(first);
        assert!(took >= wait, "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!(first.since(second), Duration::ZERO);
        assert!(first.elapsed() >= took);
    }
}
