//! An upstream's `Retry-After` header as a [`Duration`], so that it can travel with the
//! upstream's error answer to the client.
//!
//! Both forms of RFC 9110 §10.2.3 are read: delay-seconds (`Retry-After: 7`) as they
//! are, and an HTTP-date (`Retry-After: Sun, 06 Nov 1994 08:49:37 GMT`, the IMF-fixdate
//! form every sender must use) as the time left until then, zero when it has passed.
//! Anything else (the obsolete date forms, garbage) is ignored: the answer then goes
//! out without a `Retry-After`, as if the upstream had sent none. A delay over a day
//! is cut to a day ([`MAX_RETRY_AFTER_SECS`]).

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use virtual_llm_core::protocol::MAX_RETRY_AFTER_SECS;

/// The `Retry-After` of `headers`, as a delay from `now`, at most
/// [`MAX_RETRY_AFTER_SECS`].
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = if value.bytes().all(|b| b.is_ascii_digit()) {
        // Delay-seconds; too many digits for a u64 is no delay anyone meant.
        Duration::from_secs(value.parse().ok()?)
    } else {
        let at = http_date(value)?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(Duration::from_secs(MAX_RETRY_AFTER_SECS)))
}

/// An IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`, as a time; `None` for anything
/// else.
fn http_date(text: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    let mut parts = text.split(' ');
    let mut next = || parts.next().filter(|p| !p.is_empty());
    let weekday = next()?.strip_suffix(',')?;
    let day: u32 = digits(next()?, 2)?;
    let month_name = next()?;
    let month = MONTHS.iter().position(|m| *m == month_name)?;
    let month = u32::try_from(month).ok()? + 1;
    let year: i64 = digits(next()?, 4)?;
    let mut clock = next()?.split(':');
    let mut field = |max: u32| digits::<u32>(clock.next()?, 2).filter(|v| *v <= max);
    let (hour, minute, second) = (field(23)?, field(59)?, field(60)?);
    if clock.next().is_some() || next()? != "GMT" || next().is_some() {
        return None;
    }
    if !DAYS.contains(&weekday) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// `text` as a number of exactly `len` ASCII digits.
fn digits<T: std::str::FromStr>(text: &str, len: usize) -> Option<T> {
    (text.len() == len && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

/// How many days `month` (1–12) of `year` has.
fn days_in_month(year: i64, month: u32) -> u32 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the date `year`-`month`-`day` (month 1–12), in the
/// proleptic Gregorian calendar (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn after(value: &str, now: SystemTime) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        retry_after(&headers, now)
    }

    #[test]
    fn seconds_are_taken_as_they_are() {
        let now = SystemTime::now();
        assert_eq!(after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            after("86401", now),
            Some(Duration::from_secs(86_400)),
            "a day at most"
        );
        assert_eq!(after("99999999999999999999999", now), None);
        assert_eq!(after("-3", now), None);
        assert_eq!(after("1.5", now), None);
        assert_eq!(after("soon", now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn a_date_is_the_time_left_until_then() {
        // RFC 9110's example: 784111777 seconds after the epoch.
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(at));
        let now = at - Duration::from_secs(120);
        assert_eq!(
            after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            after("Sun, 06 Nov 1994 08:49:37 GMT", at + Duration::from_secs(5)),
            Some(Duration::ZERO),
            "a date that has passed: retry now"
        );
        let leap_day = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_164_800);
        assert_eq!(http_date("Thu, 29 Feb 2024 00:00:00 GMT"), Some(leap_day));
        assert_eq!(
            http_date("Fri, 31 Dec 1999 23:59:59 GMT"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_799))
        );
    }

    #[test]
    fn other_date_forms_and_garbage_are_ignored() {
        for bad in [
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun, 31 Nov 1994 08:49:37 GMT",
            "Sun, 29 Feb 2023 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT extra",
            "Xyz, 06 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1969 08:49:37 GMT",
        ] {
            assert_eq!(http_date(bad), None, "{bad}");
        }
    }
}
