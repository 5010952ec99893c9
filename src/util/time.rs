//! Wall-clock helpers: seconds since the epoch, and the two date formats the
//! daemon writes (HTTP dates and compact UTC timestamps), from one civil-date
//! conversion.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch; 0 for a clock set before 1970.
pub fn now_secs() -> u64 {
    secs_of(SystemTime::now())
}

fn secs_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// An HTTP date (RFC 9110 IMF-fixdate) for `t`.
pub(crate) fn http_date(t: SystemTime) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = secs_of(t);
    let ((year, month, day), (hh, mm, ss)) = civil(secs);
    format!(
        "{}, {day:02} {} {year} {hh:02}:{mm:02}:{ss:02} GMT",
        WEEKDAYS[(secs / 86_400 % 7) as usize],
        MONTHS[(month - 1) as usize],
    )
}

/// Date and time of day, UTC, of `secs` since the epoch.
fn civil(secs: u64) -> ((i64, u32, u32), (u64, u64, u64)) {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    (
        civil_from_days(days as i64),
        (rest / 3600, rest % 3600 / 60, rest % 60),
    )
}

/// `YYYYMMDDTHHMMSSZ` in UTC.
pub(crate) fn timestamp(t: SystemTime) -> String {
    let ((y, m, d), (hh, mm, ss)) = civil(secs_of(t));
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

/// `YYYY-MM-DDTHH:MM:SSZ` (RFC 3339, UTC) for `secs` since the epoch.
pub(crate) fn rfc3339(secs: u64) -> String {
    let ((y, m, d), (hh, mm, ss)) = civil(secs);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_from_one_conversion() {
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(timestamp(t), "19941106T084937Z");
        assert_eq!(rfc3339(784_111_777), "1994-11-06T08:49:37Z");
        assert_eq!(rfc3339(1_796_169_600), "2026-12-02T00:00:00Z");
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "20000229T000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(timestamp(t), "20240229T123456Z");
    }
}
