//! Sizes and ages as people read them, for the status page, the command
//! line and progress messages.

/// `812 B`, `1.5 kB`, `40.2 MB` (decimal units, as `ls -h --si` and Docker).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `42 s`, `5 min`, `3 h`, `2 days`.
pub fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_naturally() {
        assert_eq!(human_bytes(812), "812 B");
        assert_eq!(human_bytes(1_500), "1.5 kB");
        assert_eq!(human_bytes(40_200_000), "40.2 MB");
        assert_eq!(human_age(42), "42 s");
        assert_eq!(human_age(300), "5 min");
        assert_eq!(human_age(3 * 86_400), "3 days");
    }
}
