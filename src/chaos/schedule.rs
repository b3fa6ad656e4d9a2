//! When the next experiment is due and what it may touch. Pure: the time and the random
//! numbers come from the caller.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ChaosConfig, Kind};

/// The wait before the next scheduled experiment: `min_between` plus an exponential draw
/// with mean `mean_between - min_between`, so the mean gap is `mean_between` and none is
/// shorter than `min_between` (Chaos Monkey's two knobs). With `min_between = 0` the starts
/// are a Poisson process of rate `1 / mean_between`.
pub fn next_gap(config: &ChaosConfig, rng: &mut fastrand::Rng) -> Duration {
    let floor = config.min_between.min(config.mean_between);
    let spread = (config.mean_between - floor).as_secs_f64();
    // 1 - u is in (0, 1]: its logarithm is finite.
    let u = 1.0 - rng.f64();
    let draw = -spread * u.ln();
    floor + Duration::from_secs_f64(draw.clamp(0.0, 1e9))
}

/// A daily window of wall-clock time: `"09:00-17:00"` (UTC), `"22:00-02:00 +01:00"` (a fixed
/// offset) or `"09:00-17:00 Europe/Paris"` (an IANA time zone, daylight saving included). It
/// may wrap past midnight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Minutes after midnight, local to the zone.
    pub start: u32,
    pub end: u32,
    /// Local time minus UTC, for a fixed offset.
    #[serde(default)]
    pub offset_minutes: i32,
    /// An IANA time zone the system's database knows; when set, `offset_minutes` is 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

impl Window {
    /// Reads `"HH:MM-HH:MM"` with an optional `UTC`, `Z`, `±HH:MM` or IANA time zone after a
    /// space. A zone the system's time zone database does not know is refused here, so a
    /// misspelt one fails the deploy instead of silently never opening.
    pub fn parse(text: &str) -> Result<Window, String> {
        let text = text.trim();
        let (range, zone) = match text.split_once(char::is_whitespace) {
            Some((range, zone)) => (range, Some(zone.trim())),
            None => (text, None),
        };
        let (start, end) = range
            .split_once('-')
            .ok_or_else(|| format!("{text:?} is not a window like \"09:00-17:00\""))?;
        let start =
            clock(start).ok_or_else(|| format!("{start:?} is not a time like \"09:00\""))?;
        let end = clock(end).ok_or_else(|| format!("{end:?} is not a time like \"17:00\""))?;
        if start == end {
            return Err(format!("{text:?} is an empty window"));
        }
        let (offset_minutes, zone) = match zone {
            None | Some("UTC" | "Z" | "utc") => (0, None),
            Some(zone) if zone.starts_with(['+', '-']) || zone.starts_with("UTC") => {
                let minutes = offset(zone).ok_or_else(|| {
                    format!("{zone:?} is not a UTC offset like \"+01:00\" (at most 14 hours)")
                })?;
                (minutes, None)
            }
            Some(zone) => {
                jiff::tz::TimeZone::get(zone).map_err(|_| {
                    format!(
                        "{zone:?} is neither a UTC offset like \"+01:00\" nor a time zone \
                         this machine knows"
                    )
                })?;
                (0, Some(zone.to_owned()))
            }
        };
        Ok(Window {
            start,
            end,
            offset_minutes,
            zone,
        })
    }

    /// Whether `now_ms` (ms since the epoch, UTC) falls inside. A named zone the system's
    /// database no longer knows is never inside: no experiment rather than one at the wrong
    /// hour.
    pub fn contains(&self, now_ms: u64) -> bool {
        let Some(of_day) = self.minute_of_day(now_ms) else {
            return false;
        };
        if self.start < self.end {
            (self.start..self.end).contains(&of_day)
        } else {
            of_day >= self.start || of_day < self.end
        }
    }

    /// Minutes after midnight at `now_ms` in the window's zone or offset.
    fn minute_of_day(&self, now_ms: u64) -> Option<u32> {
        let Some(name) = &self.zone else {
            let minutes = (now_ms / 60_000) as i64 + i64::from(self.offset_minutes);
            return Some(minutes.rem_euclid(24 * 60) as u32);
        };
        // jiff's database caches what it read: this is a map lookup after the first.
        let zone = jiff::tz::TimeZone::get(name).ok()?;
        let now = jiff::Timestamp::from_millisecond(i64::try_from(now_ms).ok()?).ok()?;
        let civil = zone.to_datetime(now);
        Some(civil.hour() as u32 * 60 + civil.minute() as u32)
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start), hm(self.end))?;
        if let Some(zone) = &self.zone {
            write!(f, " {zone}")?;
        } else if self.offset_minutes != 0 {
            let sign = if self.offset_minutes < 0 { '-' } else { '+' };
            write!(f, " {sign}{}", hm(self.offset_minutes.unsigned_abs()))?;
        }
        Ok(())
    }
}

fn clock(text: &str) -> Option<u32> {
    let (h, m) = text.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    // 24:00 is the end of the day.
    (h < 24 && m < 60 || h == 24 && m == 0).then_some(h * 60 + m)
}

fn offset(text: &str) -> Option<i32> {
    let text = text.strip_prefix("UTC").unwrap_or(text);
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let minutes = clock(rest).filter(|m| *m <= 14 * 60)?;
    Some(sign * minutes as i32)
}

/// One service as the controller sees it when an experiment is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub service: String,
    /// Its wanted instance count.
    pub desired: u32,
    /// How many may be down at once (`deploy.max_unavailable`; 1 for a stop-first service).
    pub max_unavailable: u32,
    /// Healthy, routed instances of the wanted release that nothing else is replacing.
    pub healthy: Vec<String>,
    /// Volumes or stop-first: touched only when it opts in.
    pub stateful: bool,
    /// A deploy (or rollback) of it is under way.
    pub deploying: bool,
    /// It has an HTTP route (faults are set there).
    pub http_route: bool,
}

/// Why a service cannot take an experiment of some kind now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Exempt,
    Stateful,
    Deploying,
    /// Stopping one more would leave fewer healthy than `instances - max_unavailable`.
    AtMinimum {
        healthy: u32,
        minimum: u32,
    },
    NoHttpRoute,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Exempt => f.write_str("it is exempt ([chaos] exempt)"),
            Refusal::Stateful => f.write_str(
                "it is stateful and does not opt in ([chaos] stateful names the ones that do)",
            ),
            Refusal::Deploying => f.write_str("a deploy of it is under way"),
            Refusal::AtMinimum { healthy, minimum } => write!(
                f,
                "{healthy} instance(s) healthy and its minimum is {minimum} (instances - \
                 max_unavailable): one fewer would go below it"
            ),
            Refusal::NoHttpRoute => f.write_str("it has no HTTP route to set a fault on"),
        }
    }
}

/// Whether `candidate` may take an experiment of `kind` under `config`.
pub fn allowed(config: &ChaosConfig, candidate: &Candidate, kind: Kind) -> Result<(), Refusal> {
    if config.exempt.contains(&candidate.service) {
        return Err(Refusal::Exempt);
    }
    if candidate.stateful && !config.stateful.contains(&candidate.service) {
        return Err(Refusal::Stateful);
    }
    if candidate.deploying {
        return Err(Refusal::Deploying);
    }
    if kind.targets_instance() {
        let healthy = candidate.healthy.len() as u32;
        let minimum = candidate.desired.saturating_sub(candidate.max_unavailable);
        if healthy == 0 || healthy - 1 < minimum {
            return Err(Refusal::AtMinimum { healthy, minimum });
        }
    } else if !candidate.http_route {
        return Err(Refusal::NoHttpRoute);
    }
    Ok(())
}

/// A scheduled experiment's target: a kind of the config's, a service that allows it, and
/// (for stop and kill) one of its healthy instances, each drawn uniformly among those
/// allowed. None when nothing is allowed now.
pub fn choose(
    config: &ChaosConfig,
    candidates: &[Candidate],
    rng: &mut fastrand::Rng,
) -> Option<(Kind, String, Option<String>)> {
    let mut options: Vec<(Kind, &Candidate)> = Vec::new();
    for &kind in &config.kinds {
        for candidate in candidates {
            if allowed(config, candidate, kind).is_ok() {
                options.push((kind, candidate));
            }
        }
    }
    if options.is_empty() {
        return None;
    }
    let (kind, candidate) = options[rng.usize(..options.len())];
    let instance = kind
        .targets_instance()
        .then(|| candidate.healthy[rng.usize(..candidate.healthy.len())].clone());
    Some((kind, candidate.service.clone(), instance))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(service: &str, healthy: usize) -> Candidate {
        Candidate {
            service: service.to_owned(),
            desired: 3,
            max_unavailable: 1,
            healthy: (0..healthy).map(|i| format!("{service}-{i}")).collect(),
            stateful: false,
            deploying: false,
            http_route: true,
        }
    }

    #[test]
    fn gaps_have_the_configured_mean_and_never_go_below_the_minimum() {
        let config = ChaosConfig {
            mean_between: Duration::from_secs(60),
            min_between: Duration::from_secs(20),
            ..ChaosConfig::default()
        };
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 20_000;
        let gaps: Vec<f64> = (0..n)
            .map(|_| next_gap(&config, &mut rng).as_secs_f64())
            .collect();
        assert!(gaps.iter().all(|g| *g >= 20.0));
        // The mean of n draws of min + Exp(40 s): standard error 40 / sqrt(n) ≈ 0.28 s, so
        // ±1.5 s is more than five of them.
        let mean = gaps.iter().sum::<f64>() / n as f64;
        assert!((mean - 60.0).abs() < 1.5, "mean gap {mean}");
        // Memoryless above the floor: P(gap > min + 40 s) = e^-1 ≈ 0.368 (±0.02 is > 5 sd).
        let over = gaps.iter().filter(|g| **g > 60.0).count() as f64 / n as f64;
        assert!((over - (-1.0f64).exp()).abs() < 0.02, "{over}");
    }

    #[test]
    fn a_minimum_above_the_mean_is_the_gap() {
        let config = ChaosConfig {
            mean_between: Duration::from_secs(10),
            min_between: Duration::from_secs(30),
            ..ChaosConfig::default()
        };
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(next_gap(&config, &mut rng), Duration::from_secs(10));
    }

    #[test]
    fn windows_read_and_contain() {
        let check = |text: &str, hour: u64, minute: u64, expected: bool| {
            let window = Window::parse(text).unwrap();
            let now = (hour * 60 + minute) * 60_000 + 86_400_000 * 3;
            assert_eq!(window.contains(now), expected, "{text} at {hour}:{minute}");
        };
        check("09:00-17:00", 9, 0, true);
        check("09:00-17:00", 16, 59, true);
        check("09:00-17:00", 17, 0, false);
        check("09:00-17:00", 8, 59, false);
        check("22:00-02:00", 23, 0, true);
        check("22:00-02:00", 1, 0, true);
        check("22:00-02:00", 12, 0, false);
        // 09:00-17:00 at +02:00 is 07:00-15:00 UTC.
        check("09:00-17:00 +02:00", 7, 0, true);
        check("09:00-17:00 +02:00", 15, 30, false);
        check("09:00-17:00 UTC-05:00", 14, 0, true);
        check("09:00-17:00 UTC-05:00", 13, 59, false);
        assert_eq!(
            Window::parse("09:00-17:00 +02:00").unwrap().to_string(),
            "09:00-17:00 +02:00"
        );
        // A named zone follows daylight saving: Paris is UTC+1 on 2026-01-05 and UTC+2 on
        // 2026-07-06 (days 20458 and 20640 since the epoch).
        let january = |hour: u64, minute: u64| (hour * 60 + minute) * 60_000 + 86_400_000 * 20458;
        let july = |hour: u64| (hour * 60) * 60_000 + 86_400_000 * 20640;
        let paris = Window::parse("09:00-17:00 Europe/Paris").unwrap();
        assert!(
            paris.contains(january(8, 0)),
            "09:00 in Paris in January is 08:00 UTC"
        );
        assert!(!paris.contains(january(7, 59)));
        assert!(
            !paris.contains(january(16, 0)),
            "17:00 in Paris in January is 16:00 UTC"
        );
        assert!(
            paris.contains(july(7)),
            "09:00 in Paris in July is 07:00 UTC"
        );
        assert!(
            !paris.contains(july(15)),
            "17:00 in Paris in July is 15:00 UTC"
        );
        assert!(paris.contains(july(14)));
        assert_eq!(paris.to_string(), "09:00-17:00 Europe/Paris");
        // A zone known when the config was read but gone since is never inside.
        let gone = Window {
            zone: Some("Nowhere/Gone".into()),
            ..paris
        };
        assert!(!gone.contains(july(12)));
        for bad in [
            "9-17",
            "09:00",
            "09:00-09:00",
            "25:00-26:00",
            "09:00-17:00 Mars/Olympus",
            "09:00-17:00 +15:00",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn never_below_the_minimum_never_exempt_never_stateful_never_while_deploying() {
        let config = ChaosConfig {
            exempt: vec!["db".into()],
            stateful: vec!["cache".into()],
            ..ChaosConfig::default()
        };
        let check = |c: Candidate, kind: Kind| allowed(&config, &c, kind);
        assert_eq!(check(candidate("web", 3), Kind::Kill), Ok(()));
        // 3 wanted, 1 may be unavailable: with 2 healthy, one more would leave 1.
        assert_eq!(
            check(candidate("web", 2), Kind::Stop),
            Err(Refusal::AtMinimum {
                healthy: 2,
                minimum: 2
            })
        );
        // A fault takes no instance away.
        assert_eq!(check(candidate("web", 2), Kind::Latency), Ok(()));
        assert_eq!(
            check(candidate("db", 3), Kind::Latency),
            Err(Refusal::Exempt)
        );
        let stateful = |name: &str| Candidate {
            stateful: true,
            ..candidate(name, 3)
        };
        assert_eq!(check(stateful("pg"), Kind::Stop), Err(Refusal::Stateful));
        assert_eq!(check(stateful("cache"), Kind::Stop), Ok(()));
        let deploying = Candidate {
            deploying: true,
            ..candidate("web", 3)
        };
        assert_eq!(check(deploying, Kind::Kill), Err(Refusal::Deploying));
        let tcp = Candidate {
            http_route: false,
            ..candidate("web", 3)
        };
        assert_eq!(check(tcp, Kind::Error), Err(Refusal::NoHttpRoute));
        let none_unavailable = Candidate {
            max_unavailable: 0,
            ..candidate("web", 3)
        };
        assert!(check(none_unavailable, Kind::Stop).is_err());
    }

    #[test]
    fn choices_are_spread_over_what_is_allowed_and_skip_the_rest() {
        let config = ChaosConfig {
            kinds: vec![Kind::Kill],
            exempt: vec!["db".into()],
            ..ChaosConfig::default()
        };
        let candidates = [candidate("web", 3), candidate("db", 3), candidate("api", 2)];
        let mut rng = fastrand::Rng::with_seed(3);
        let mut hits = std::collections::BTreeMap::new();
        for _ in 0..3000 {
            let (kind, service, instance) = choose(&config, &candidates, &mut rng).unwrap();
            assert_eq!((kind, service.as_str()), (Kind::Kill, "web"));
            *hits.entry(instance.unwrap()).or_insert(0) += 1;
        }
        // Each of three instances: 1000 expected, sd ≈ 26.
        assert_eq!(hits.len(), 3);
        assert!(hits.values().all(|n| (850..1150).contains(n)), "{hits:?}");
        assert_eq!(choose(&config, &candidates[1..], &mut rng), None);
    }
}
