//! The retry back-off schedule.

/// Delays after the 1st..16th failure: 10 s, 30 s, 1 m, 2 m … 10 m, 20 m, 30 m, 1 h, 2 h.
pub const RETRY_DELAYS_MS: [u64; 16] = [
    10_000,
    30_000,
    60_000,
    2 * 60_000,
    3 * 60_000,
    4 * 60_000,
    5 * 60_000,
    6 * 60_000,
    7 * 60_000,
    8 * 60_000,
    9 * 60_000,
    10 * 60_000,
    20 * 60_000,
    30 * 60_000,
    3_600_000,
    2 * 3_600_000,
];

/// RocketMQ's 18 classic delay levels (level 1 = 1 s … level 18 = 2 h), which SDK clients name
/// in timer sends and send-backs.
pub const DELAY_LEVELS_MS: [u64; 18] = [
    1_000,
    5_000,
    10_000,
    30_000,
    60_000,
    2 * 60_000,
    3 * 60_000,
    4 * 60_000,
    5 * 60_000,
    6 * 60_000,
    7 * 60_000,
    8 * 60_000,
    9 * 60_000,
    10 * 60_000,
    20 * 60_000,
    30 * 60_000,
    3_600_000,
    2 * 3_600_000,
];

/// The delay of level `level` (1-based; past 18 means 2 h), multiplied by `scale`.
pub fn delay_level_ms(level: u32, scale: f64) -> u64 {
    let base = level
        .checked_sub(1)
        .and_then(|i| DELAY_LEVELS_MS.get(i as usize))
        .copied()
        .unwrap_or(DELAY_LEVELS_MS[17]);
    scaled(base, scale)
}

fn scaled(base: u64, scale: f64) -> u64 {
    let v = base as f64 * scale;
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

/// Delay for retries past the 16th (a group may allow more than 16).
pub const LATE_RETRY_DELAY_MS: u64 = 2 * 3_600_000;

/// Back-off before retry number `retry` (1-based: the 1st retry follows the 1st failure),
/// multiplied by `scale` (`[broker] retry_delay_scale`; tests shrink it).
pub fn retry_delay_ms(retry: u32, scale: f64) -> u64 {
    let base = retry
        .checked_sub(1)
        .and_then(|i| RETRY_DELAYS_MS.get(i as usize))
        .copied()
        .unwrap_or(LATE_RETRY_DELAY_MS);
    scaled(base, scale)
}

/// What to do with a message that failed `reconsume_times` times before this failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Retry after `delay_ms`, as attempt `retry`.
    Retry {
        /// 1-based retry number (the copy's reconsume times).
        retry: u32,
        /// Back-off.
        delay_ms: u64,
    },
    /// Out of retries: dead-letter it.
    DeadLetter,
}

/// Decides retry or dead letter; `max_reconsume_times` is read from the group at failure time.
pub fn next_step(reconsume_times: u32, max_reconsume_times: u32, scale: f64) -> NextStep {
    if reconsume_times >= max_reconsume_times {
        NextStep::DeadLetter
    } else {
        let retry = reconsume_times + 1;
        NextStep::Retry {
            retry,
            delay_ms: retry_delay_ms(retry, scale),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_levels_are_rocketmqs_eighteen() {
        let secs: Vec<u64> = (1..=18).map(|l| delay_level_ms(l, 1.0) / 1000).collect();
        assert_eq!(
            secs,
            [
                1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600,
                7200
            ]
        );
        assert_eq!(delay_level_ms(99, 1.0), 7_200_000, "past 18: the longest");
        assert_eq!(delay_level_ms(1, 0.01), 10);
    }

    #[test]
    fn schedule_matches_the_spec() {
        let minutes: Vec<f64> = (1..=16)
            .map(|r| retry_delay_ms(r, 1.0) as f64 / 60_000.0)
            .collect();
        let expected = [
            10.0 / 60.0,
            0.5,
            1.0,
            2.0,
            3.0,
            4.0,
            5.0,
            6.0,
            7.0,
            8.0,
            9.0,
            10.0,
            20.0,
            30.0,
            60.0,
            120.0,
        ];
        for (got, want) in minutes.iter().zip(expected) {
            assert!((got - want).abs() < 1e-9, "{got} != {want}");
        }
        // "about 4 h 46 m in all"
        let total: u64 = RETRY_DELAYS_MS.iter().sum();
        assert_eq!(total, (4 * 60 + 45) * 60_000 + 40_000);
        assert_eq!(retry_delay_ms(17, 1.0), 7_200_000);
        assert_eq!(retry_delay_ms(100, 1.0), 7_200_000);
    }

    #[test]
    fn scale_shrinks_delays() {
        assert_eq!(retry_delay_ms(1, 0.001), 10);
        assert_eq!(retry_delay_ms(16, 0.001), 7_200);
        assert_eq!(retry_delay_ms(1, 0.0), 0);
        assert_eq!(retry_delay_ms(1, f64::NAN), 0);
    }

    #[test]
    fn dead_letter_after_max() {
        assert_eq!(
            next_step(0, 16, 1.0),
            NextStep::Retry {
                retry: 1,
                delay_ms: 10_000
            }
        );
        assert_eq!(
            next_step(15, 16, 1.0),
            NextStep::Retry {
                retry: 16,
                delay_ms: 7_200_000
            }
        );
        assert_eq!(next_step(16, 16, 1.0), NextStep::DeadLetter);
        assert_eq!(next_step(0, 0, 1.0), NextStep::DeadLetter);
        assert_eq!(
            next_step(20, 30, 1.0),
            NextStep::Retry {
                retry: 21,
                delay_ms: 7_200_000
            }
        );
    }
}
