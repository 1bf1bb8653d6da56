//! How long SQS keeps a message away before delivering it again.

use std::time::Duration;

/// SQS refuses visibility timeouts above 12 hours.
pub const SQS_MAX_VISIBILITY: Duration = Duration::from_secs(43_200);
/// Kept free below the 12 hours a message may stay invisible since its first receive.
const SQS_LIMIT_MARGIN: Duration = Duration::from_secs(60);

/// The redelivery schedule: exponential in the receive count, capped, with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first delay.
    pub base: Duration,
    /// No delay is longer.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(900),
        }
    }
}

impl Backoff {
    /// The ceiling for a message delivered `receive_count` times: `min(cap, base * 2^(n-1))`.
    pub fn ceiling(&self, receive_count: u32) -> Duration {
        let exponent = receive_count.saturating_sub(1).min(30);
        self.base
            .checked_mul(1u32 << exponent)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// Full jitter: a delay drawn uniformly from `[0, ceiling]`, with `unit` in `[0, 1)`.
    pub fn delay(&self, receive_count: u32, unit: f64) -> Duration {
        self.delay_within(receive_count, Duration::MAX, unit)
    }

    /// Full jitter over the ceiling or `limit`, whichever is shorter.
    pub fn delay_within(&self, receive_count: u32, limit: Duration, unit: f64) -> Duration {
        self.ceiling(receive_count)
            .min(limit)
            .mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// How much longer a message first received `since_first_receive` ago may be kept invisible:
/// SQS allows 12 hours in all (less a minute's margin).
pub fn visibility_room(since_first_receive: Duration) -> Duration {
    SQS_MAX_VISIBILITY
        .saturating_sub(since_first_receive)
        .saturating_sub(SQS_LIMIT_MARGIN)
}

/// The visibility timeout to set, in whole seconds as SQS takes it: `delay` rounded up, never
/// past 12 hours in all since the message was first received `since_first_receive` ago.
pub fn visibility_seconds(delay: Duration, since_first_receive: Duration) -> i32 {
    let delay = delay.min(visibility_room(since_first_receive));
    let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    seconds as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_with_each_receive_up_to_the_cap() {
        let b = Backoff {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(60),
        };
        let ceilings: Vec<u64> = (0..=7).map(|n| b.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [2, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let b = Backoff::default();
        assert_eq!(b.delay(3, 0.0), Duration::ZERO);
        assert_eq!(b.delay(3, 0.5), Duration::from_secs(4));
        assert_eq!(b.delay(3, 0.999_999), b.ceiling(3).mul_f64(0.999_999));
        assert_eq!(b.delay(3, 7.0), b.ceiling(3));
    }

    #[test]
    fn visibility_is_rounded_up_and_kept_within_sqs_limits() {
        assert_eq!(
            visibility_seconds(Duration::from_millis(1), Duration::ZERO),
            1
        );
        assert_eq!(
            visibility_seconds(Duration::from_millis(2000), Duration::ZERO),
            2
        );
        assert_eq!(visibility_seconds(Duration::ZERO, Duration::ZERO), 0);
        assert_eq!(
            visibility_seconds(Duration::from_secs(90_000), Duration::ZERO),
            43_200 - 60
        );
        assert_eq!(
            visibility_seconds(Duration::from_secs(3600), Duration::from_secs(43_000)),
            140
        );
        assert_eq!(
            visibility_seconds(Duration::from_secs(3600), Duration::from_secs(43_190)),
            0
        );
    }
}
