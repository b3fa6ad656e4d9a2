//! The outage checker: the steady-state hypothesis judged from the route's own counters.
//! A baseline is taken before an experiment; while it runs, the last few seconds are
//! compared with it every second, and the experiment is aborted when the error rate or the
//! p99 latency has moved past the thresholds. Pure: the figures are given.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::PPM;

/// The outage checker's settings (`[chaos.checker]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Off: experiments run their whole duration whatever users see.
    pub enabled: bool,
    /// The error rate may rise this far above the baseline's (parts per million).
    pub max_error_rate_ppm: u32,
    /// The p99 latency may rise this far above the baseline's.
    pub max_p99_increase: Duration,
    /// Fewer requests than this in the window judged: no verdict (too few to tell).
    pub min_requests: u64,
    /// How far back each judgement looks.
    pub window: Duration,
    /// After an abort, no scheduled experiment starts for this long.
    pub cool_down: Duration,
    /// How far back the baseline looks before an experiment starts.
    pub baseline: Duration,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            enabled: true,
            max_error_rate_ppm: 20_000,
            max_p99_increase: Duration::from_millis(500),
            min_requests: 20,
            window: Duration::from_secs(5),
            cool_down: Duration::from_secs(30 * 60),
            baseline: Duration::from_secs(30),
        }
    }
}

/// A route's cumulative counters at one moment, as the checker reads them: every request,
/// the ones that failed for the service's sake (5xx answers, the proxy's upstream and own
/// errors), the ones a fault answered or cut, and the latency histogram of the requests it
/// forwarded (a latency fault's delay is not in it: the service's latency is judged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Figures {
    pub requests: u64,
    pub errors: u64,
    pub injected: u64,
    pub bounds_us: Vec<u64>,
    pub counts: Vec<u64>,
}

impl Figures {
    /// What happened between `earlier` and `self` (counters only grow; a route rebound
    /// meanwhile starts again from zero, which reads as nothing).
    pub fn since(&self, earlier: &Figures) -> Figures {
        let counts = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, n)| n.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
            .collect();
        Figures {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            injected: self.injected.saturating_sub(earlier.injected),
            bounds_us: self.bounds_us.clone(),
            counts,
        }
    }

    /// The error rate of the requests the service answered, in parts per million.
    pub fn error_rate_ppm(&self) -> u32 {
        let judged = self.requests.saturating_sub(self.injected);
        if judged == 0 {
            return 0;
        }
        ((self.errors as u128 * u128::from(PPM)) / judged as u128).min(u128::from(PPM)) as u32
    }

    /// Quantile `q` of the latencies, estimated as the proxy's metrics estimate it
    /// (`histogram::quantile`); 0 when nothing was counted.
    pub fn quantile_us(&self, q: f64) -> u64 {
        crate::histogram::quantile(&self.bounds_us, &self.counts, q).unwrap_or(0)
    }

    /// The summary a report and an event carry.
    pub fn seen(&self) -> Seen {
        Seen {
            requests: self.requests,
            errors: self.errors,
            injected: self.injected,
            p50_us: self.quantile_us(0.50),
            p99_us: self.quantile_us(0.99),
        }
    }
}

/// What users saw over a stretch of time: requests, failed ones (injected ones among them
/// counted apart), latency percentiles of the forwarded ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub requests: u64,
    /// Failed for the service's sake (not counting injected ones).
    pub errors: u64,
    /// Answered or cut by a fault.
    pub injected: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// Why the steady state is judged broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum Broken {
    ErrorRate {
        rate_ppm: u32,
        baseline_ppm: u32,
        requests: u64,
    },
    Latency {
        p99_us: u64,
        baseline_p99_us: u64,
        requests: u64,
    },
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let percent = |ppm: u32| f64::from(ppm) / 10_000.0;
        match self {
            Broken::ErrorRate {
                rate_ppm,
                baseline_ppm,
                requests,
            } => write!(
                f,
                "error rate {}% of {requests} requests against {}% before",
                percent(*rate_ppm),
                percent(*baseline_ppm)
            ),
            Broken::Latency {
                p99_us,
                baseline_p99_us,
                requests,
            } => write!(
                f,
                "p99 latency {} over {requests} requests against {} before",
                humantime::format_duration(Duration::from_micros(*p99_us)),
                humantime::format_duration(Duration::from_micros(*baseline_p99_us))
            ),
        }
    }
}

/// Judges the last window against the baseline: None while the steady state holds (or
/// too few requests say anything).
pub fn judge(thresholds: &Thresholds, baseline: &Figures, window: &Figures) -> Option<Broken> {
    if !thresholds.enabled
        || window.requests.saturating_sub(window.injected) < thresholds.min_requests
    {
        return None;
    }
    let rate = window.error_rate_ppm();
    let baseline_rate = baseline.error_rate_ppm();
    if rate > baseline_rate.saturating_add(thresholds.max_error_rate_ppm) {
        return Some(Broken::ErrorRate {
            rate_ppm: rate,
            baseline_ppm: baseline_rate,
            requests: window.requests,
        });
    }
    let p99 = window.quantile_us(0.99);
    let baseline_p99 = baseline.quantile_us(0.99);
    let allowed = baseline_p99.saturating_add(thresholds.max_p99_increase.as_micros() as u64);
    if p99 > allowed {
        return Some(Broken::Latency {
            p99_us: p99,
            baseline_p99_us: baseline_p99,
            requests: window.requests,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: [u64; 4] = [1_000, 10_000, 100_000, 1_000_000];

    fn figures(requests: u64, errors: u64, counts: [u64; 5]) -> Figures {
        Figures {
            requests,
            errors,
            injected: 0,
            bounds_us: BOUNDS.to_vec(),
            counts: counts.to_vec(),
        }
    }

    #[test]
    fn a_steady_window_passes_and_a_broken_one_says_why() {
        let thresholds = Thresholds::default();
        let baseline = figures(1000, 5, [990, 10, 0, 0, 0]);
        assert_eq!(
            judge(&thresholds, &baseline, &figures(100, 1, [99, 1, 0, 0, 0])),
            None
        );
        let errors = judge(&thresholds, &baseline, &figures(100, 30, [100, 0, 0, 0, 0]));
        assert_eq!(
            errors,
            Some(Broken::ErrorRate {
                rate_ppm: 300_000,
                baseline_ppm: 5_000,
                requests: 100
            })
        );
        assert_eq!(
            errors.unwrap().to_string(),
            "error rate 30% of 100 requests against 0.5% before"
        );
        let slow = judge(&thresholds, &baseline, &figures(100, 0, [50, 0, 0, 50, 0]));
        assert!(
            matches!(
                slow,
                Some(Broken::Latency {
                    p99_us: 982_000,
                    ..
                })
            ),
            "{slow:?}"
        );
        // Too few requests: no verdict.
        assert_eq!(
            judge(&thresholds, &baseline, &figures(10, 10, [10, 0, 0, 0, 0])),
            None
        );
        let off = Thresholds {
            enabled: false,
            ..Thresholds::default()
        };
        assert_eq!(
            judge(&off, &baseline, &figures(100, 100, [100, 0, 0, 0, 0])),
            None
        );
    }

    /// The service is judged on the requests it answered: a fault's answers count neither
    /// as its errors, nor towards its rate's denominator, nor towards the requests needed
    /// for a verdict. Each case gets another verdict if the fault's answers were counted.
    #[test]
    fn injected_failures_are_not_the_services() {
        let thresholds = Thresholds::default();
        let baseline = figures(1000, 0, [1000, 0, 0, 0, 0]);
        let window = |requests: u64, injected: u64, errors: u64| Figures {
            injected,
            ..figures(requests, errors, [requests - injected, 0, 0, 0, 0])
        };
        // Half the requests cut by the fault, none of the service's failed.
        assert_eq!(judge(&thresholds, &baseline, &window(100, 50, 0)), None);
        // 2 of the 50 it answered failed: 4%, over the 2% allowed (2 of all 100 is not).
        assert_eq!(
            judge(&thresholds, &baseline, &window(100, 50, 2)),
            Some(Broken::ErrorRate {
                rate_ppm: 40_000,
                baseline_ppm: 0,
                requests: 100
            })
        );
        // The fault answered all but 10: too few of the service's own for a verdict.
        assert_eq!(judge(&thresholds, &baseline, &window(100, 90, 10)), None);
    }

    /// The checker reads a latency quantile from a histogram as the proxy's metrics do
    /// (`graven top`, the route's metrics): one estimate, not two that disagree.
    #[test]
    fn a_quantile_reads_as_the_proxy_s_metrics_read_it() {
        let bounds = [
            50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
        ];
        let mut counts = vec![0; bounds.len() + 1];
        counts[3] = 40;
        counts[7] = 50;
        counts[10] = 9;
        counts[bounds.len()] = 1;
        let figures = Figures {
            requests: 100,
            bounds_us: bounds.to_vec(),
            counts: counts.clone(),
            ..Figures::default()
        };
        for q in [0.1, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(
                Some(figures.quantile_us(q)),
                crate::histogram::quantile(&bounds, &counts, q),
                "q = {q}"
            );
        }
    }

    #[test]
    fn differences_and_quantiles() {
        let later = figures(300, 10, [200, 90, 10, 0, 0]);
        let earlier = figures(100, 4, [100, 0, 0, 0, 0]);
        let delta = later.since(&earlier);
        assert_eq!((delta.requests, delta.errors), (200, 6));
        assert_eq!(delta.counts, vec![100, 90, 10, 0, 0]);
        assert_eq!(delta.quantile_us(0.5), 1_000);
        // Inside the bucket (10 ms, 100 ms]: 8 of its 10 requests in.
        assert_eq!(delta.quantile_us(0.99), 82_000);
        // The unbounded bucket reads as its lower bound.
        assert_eq!(figures(1, 0, [0, 0, 0, 0, 1]).quantile_us(0.5), 1_000_000);
        // A rebound route (counters from zero) reads as nothing, not as a huge number.
        assert_eq!(earlier.since(&later).requests, 0);
    }
}
