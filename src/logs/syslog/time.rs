//! Timestamps as syslog writes them: RFC 3339 (RFC 5424's, always written in UTC with
//! microseconds) and RFC 3164's `Mmm dd hh:mm:ss` (no year, no zone: read as UTC in the year
//! that puts it nearest the receive time). Pure: the clock is an argument.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01 (year, month 1-12, day 1-31).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn split(time: SystemTime) -> (i64, u32) {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_micros()),
        Err(e) => {
            let d = e.duration();
            let micros = d.subsec_micros();
            if micros == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000 - micros)
            }
        }
    }
}

fn from_parts(secs: i64, nanos: u32) -> Option<SystemTime> {
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs as u64, nanos))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))?
            .checked_add(Duration::from_nanos(u64::from(nanos)))
    }
}

/// `2026-12-06T11:02:43.123456Z`: RFC 5424's TIMESTAMP, UTC, microseconds (its maximum).
pub fn rfc3339(time: SystemTime) -> String {
    let (secs, micros) = split(time);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// `Dec  6 11:02:43`: RFC 3164's TIMESTAMP (the day padded with a space), in UTC.
pub fn rfc3164(time: SystemTime) -> String {
    let (secs, _) = split(time);
    let (_, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{} {d:>2} {:02}:{:02}:{:02}",
        MONTHS[mo as usize - 1],
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

fn digits(s: &[u8], n: usize) -> Option<u32> {
    if s.len() < n || !s[..n].iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s[..n].iter().fold(0, |a, b| a * 10 + u32::from(b - b'0')))
}

/// Reads an RFC 3339 timestamp (`T` or space, fraction of any length, `Z` or `±hh:mm`).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(b, 4)?, digits(&b[5..], 2)?, digits(&b[8..], 2)?);
    let (hour, min, sec) = (
        digits(&b[11..], 2)?,
        digits(&b[14..], 2)?,
        digits(&b[17..], 2)?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut rest = &b[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        for (i, c) in frac[..n.min(9)].iter().enumerate() {
            nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
        }
        rest = &frac[n..];
    }
    let offset: i64 = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let h = digits(&[*h1, *h2], 2)?;
            let m = digits(&[*m1, *m2], 2)?;
            let o = i64::from(h * 3600 + m * 60);
            if *sign == b'-' { -o } else { o }
        }
        _ => return None,
    };
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + min * 60 + sec.min(59)) - offset;
    from_parts(secs, nanos)
}

/// Reads RFC 3164's `Mmm dd hh:mm:ss` (exactly 15 bytes), in the year that puts it nearest
/// `now`.
pub fn parse_rfc3164(s: &[u8], now: SystemTime) -> Option<SystemTime> {
    if s.len() != 15 || s[3] != b' ' || s[6] != b' ' || s[9] != b':' || s[12] != b':' {
        return None;
    }
    let month = MONTHS.iter().position(|m| m.as_bytes() == &s[..3])? as u32 + 1;
    let day = if s[4] == b' ' {
        digits(&s[5..], 1)?
    } else {
        digits(&s[4..], 2)?
    };
    let (hour, min, sec) = (
        digits(&s[7..], 2)?,
        digits(&s[10..], 2)?,
        digits(&s[13..], 2)?,
    );
    if !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let (now_secs, _) = split(now);
    let (year, _, _) = civil_from_days(now_secs.div_euclid(86_400));
    let at = |year: i64| {
        days_from_civil(year, month, day) * 86_400 + i64::from(hour * 3600 + min * 60 + sec.min(59))
    };
    // A December line read on the 1st of January is last year's.
    let secs = [year - 1, year, year + 1]
        .into_iter()
        .map(at)
        .min_by_key(|t| (t - now_secs).abs())?;
    from_parts(secs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trips() {
        for days in [-800_000, -1, 0, 1, 59, 10_957, 20_793, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn rfc3339_round_trips_and_reads_offsets() {
        let t = UNIX_EPOCH + Duration::new(1_796_554_963, 123_456_000);
        assert_eq!(rfc3339(t), "2026-12-06T11:02:43.123456Z");
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        assert_eq!(parse_rfc3339("2026-12-06T12:02:43.123456+01:00"), Some(t));
        assert_eq!(
            parse_rfc3339("2026-12-06T11:02:43Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_796_554_963))
        );
        assert_eq!(parse_rfc3339("2026-13-06T11:02:43Z"), None);
        assert_eq!(parse_rfc3339("-"), None);
    }

    #[test]
    fn rfc3164_reads_the_nearest_year() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_554_963);
        assert_eq!(rfc3164(t), "Dec  6 11:02:43");
        assert_eq!(parse_rfc3164(rfc3164(t).as_bytes(), t), Some(t));
        let new_year = parse_rfc3339("2027-01-01T00:00:10Z").unwrap();
        assert_eq!(
            parse_rfc3164(b"Dec 31 23:59:50", new_year),
            parse_rfc3339("2026-12-31T23:59:50Z")
        );
    }
}
