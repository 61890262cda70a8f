//! The budget decision both backends share: given what the database says a provider has
//! used, may it start calls now, how many, and if not, until when must it wait?
//!
//! Rate windows are counted in per-second buckets (`provider_usage`), so checking a budget
//! reads at most ~61 small rows whatever the call rate. A bucket counts while any part of
//! its second is inside the window, which errs on the safe side: never more than `rpm`
//! starts in any window, at the price of up to one second of unused budget.

use super::{Blocked, Budget, RATE_WINDOW_MS};

/// What the lease transaction read about a provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cooldown_until: i64,
    pub breaker_open_until: i64,
    /// Jobs of this provider running now, on every instance.
    pub running: i64,
    /// Call starts and tokens in the buckets of the window.
    pub calls: i64,
    pub tokens: i64,
    /// The oldest bucket (second) in the window that holds anything.
    pub oldest_second: Option<i64>,
}

/// The first bucket (second since the epoch) that still counts at `now`.
pub fn window_start_second(now_ms: i64) -> i64 {
    (now_ms - RATE_WINDOW_MS).div_euclid(1000)
}

/// The bucket a call started at `ms` belongs to.
pub fn second_of(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

/// How many jobs may be leased now (at most `max_jobs`), or why none.
pub fn admit(u: &Usage, b: &Budget, now_ms: i64, max_jobs: u32) -> Result<i64, Blocked> {
    if u.cooldown_until > now_ms {
        return Err(Blocked::Cooldown(u.cooldown_until));
    }
    if u.breaker_open_until > now_ms {
        return Err(Blocked::Breaker(u.breaker_open_until));
    }
    let free = i64::from(b.concurrency) - u.running;
    if free <= 0 {
        return Err(Blocked::Concurrency);
    }
    // The oldest bucket stops counting once its whole second has left the window.
    let frees_at = u
        .oldest_second
        .map_or(now_ms + 1000, |s| (s + 1) * 1000 + RATE_WINDOW_MS);
    let rpm_left = i64::from(b.rpm) - u.calls;
    if rpm_left <= 0 {
        return Err(Blocked::Rpm(frees_at));
    }
    let mut limit = free.min(rpm_left).min(i64::from(max_jobs.max(1)));
    if let Some(tpm) = b.tpm {
        if u.tokens >= i64::from(tpm) {
            return Err(Blocked::Tpm(frees_at));
        }
        // Token use is only known per call: admit one at a time and re-check.
        limit = 1;
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Budget = Budget {
        rpm: 3,
        concurrency: 2,
        tpm: None,
    };

    #[test]
    fn admits_within_every_limit() {
        assert_eq!(admit(&Usage::default(), &B, 10_000, 10), Ok(2));
        assert_eq!(
            admit(
                &Usage {
                    calls: 2,
                    ..Default::default()
                },
                &B,
                10_000,
                10
            ),
            Ok(1)
        );
        assert_eq!(admit(&Usage::default(), &B, 10_000, 1), Ok(1));
    }

    #[test]
    fn blocks_with_the_moment_it_frees() {
        let now = 100_000;
        assert_eq!(
            admit(
                &Usage {
                    cooldown_until: 105_000,
                    ..Default::default()
                },
                &B,
                now,
                1
            ),
            Err(Blocked::Cooldown(105_000))
        );
        assert_eq!(
            admit(
                &Usage {
                    breaker_open_until: 107_000,
                    ..Default::default()
                },
                &B,
                now,
                1
            ),
            Err(Blocked::Breaker(107_000))
        );
        assert_eq!(
            admit(
                &Usage {
                    running: 2,
                    ..Default::default()
                },
                &B,
                now,
                1
            ),
            Err(Blocked::Concurrency)
        );
        let full = Usage {
            calls: 3,
            oldest_second: Some(60),
            ..Default::default()
        };
        assert_eq!(
            admit(&full, &B, now, 1),
            Err(Blocked::Rpm(61_000 + RATE_WINDOW_MS))
        );
        let tpm = Budget {
            tpm: Some(100),
            ..B
        };
        assert_eq!(
            admit(
                &Usage {
                    tokens: 100,
                    oldest_second: Some(60),
                    ..Default::default()
                },
                &tpm,
                now,
                5
            ),
            Err(Blocked::Tpm(61_000 + RATE_WINDOW_MS))
        );
        assert_eq!(
            admit(
                &Usage {
                    tokens: 10,
                    ..Default::default()
                },
                &tpm,
                now,
                5
            ),
            Ok(1)
        );
    }

    #[test]
    fn a_bucket_counts_until_its_whole_second_left_the_window() {
        // A call at 1_500 ms sits in bucket 1; at 1_500 + window it must still count.
        let now = 1_500 + RATE_WINDOW_MS;
        assert!(window_start_second(now) <= second_of(1_500));
        assert!(window_start_second(2_000 + RATE_WINDOW_MS) > second_of(1_500));
    }
}
