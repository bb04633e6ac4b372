//! Sizes, durations and bandwidths as users type them, and as ferry prints them.

use std::time::Duration;

/// A size, duration or bandwidth that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// A bad size such as `--disk 4GB!`.
    #[error("invalid size {input:?}: {reason}; use e.g. 512MiB, 4GiB, 1.5GiB or 65536 (bytes)")]
    Size {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A bad duration such as `--rpo 5x`.
    #[error(
        "invalid duration {input:?}: {reason}; use e.g. 30s, 5m, 24h, 2d, 500ms or 90 (seconds)"
    )]
    Duration {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A bad bandwidth such as `--bandwidth fast`.
    #[error(
        "invalid bandwidth {input:?}: {reason}; use e.g. 100MiB/s or 1GB/s (bytes per second)"
    )]
    Bandwidth {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Most significant decimals a number may have (keeps the exact arithmetic within `u128`).
const MAX_DECIMALS: usize = 18;

/// A non-negative decimal number split into its integer digits and fraction digits.
struct Decimal<'a> {
    /// Digits before the point (may be empty, as in `.5`).
    int: &'a str,
    /// Digits after the point (may be empty).
    frac: &'a str,
}

/// Splits `s` into a leading decimal number and the rest (the unit), or says why it cannot.
fn split_number(s: &str) -> Result<(Decimal<'_>, &str), String> {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, rest) = s.split_at(end);
    if num.is_empty() {
        return Err(if s.starts_with('-') {
            "it must not be negative".to_string()
        } else {
            "it does not start with a number".to_string()
        });
    }
    let (int, frac) = match num.split_once('.') {
        Some((int, frac)) => (int, frac),
        None => (num, ""),
    };
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) || num.ends_with('.') {
        return Err(format!("{num:?} is not a number"));
    }
    if frac.trim_end_matches('0').len() > MAX_DECIMALS {
        return Err(format!("it has more than {MAX_DECIMALS} decimals"));
    }
    Ok((Decimal { int, frac }, rest.trim_start()))
}

impl Decimal<'_> {
    /// `self × unit`, with the result's fractional part in `remainder / 10^frac_digits`.
    /// Returns `(whole, remainder, 10^frac_digits)` or `None` on overflow.
    fn times(&self, unit: u128) -> Option<(u128, u128, u128)> {
        let frac = self.frac.trim_end_matches('0');
        if frac.len() > MAX_DECIMALS {
            return None;
        }
        let scale = 10u128.checked_pow(frac.len() as u32)?;
        let int: u128 = if self.int.is_empty() {
            0
        } else {
            self.int.parse().ok()?
        };
        let frac_val: u128 = if frac.is_empty() {
            0
        } else {
            frac.parse().ok()?
        };
        let whole = int.checked_mul(unit)?;
        let frac_scaled = frac_val.checked_mul(unit)?;
        let whole = whole.checked_add(frac_scaled / scale)?;
        Some((whole, frac_scaled % scale, scale))
    }
}

/// Bytes per unit for a size suffix (case-insensitive), or `None` if unknown.
fn size_unit(suffix: &str) -> Option<u64> {
    const KI: u64 = 1 << 10;
    let unit = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KI,
        "kb" => 1_000,
        "m" | "mib" => KI.pow(2),
        "mb" => 1_000_000,
        "g" | "gib" => KI.pow(3),
        "gb" => 1_000_000_000,
        "t" | "tib" => KI.pow(4),
        "tb" => 1_000_000_000_000,
        _ => return None,
    };
    Some(unit)
}

/// Parses a size in bytes: `512MiB`, `4GiB`, `1.5GiB`, `10MB` (10×10⁶), `64KiB`, `65536`, `0`.
///
/// Units are case-insensitive: B; K, KiB, M, MiB, G, GiB, T, TiB (powers of 1024);
/// KB, MB, GB, TB (powers of 1000). The result must be a whole number of bytes.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    size_inner(s).map_err(|reason| UnitError::Size {
        input: s.to_string(),
        reason,
    })
}

/// [`parse_size`] with the reason for a failure as plain text.
fn size_inner(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("it is empty".to_string());
    }
    let (num, suffix) = split_number(t)?;
    let unit = size_unit(suffix).ok_or_else(|| {
        format!("unknown unit {suffix:?} (known: B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    })?;
    let too_large = || format!("it is larger than {} bytes", u64::MAX);
    let (whole, rem, _) = num.times(unit as u128).ok_or_else(too_large)?;
    if rem != 0 {
        return Err("it is not a whole number of bytes".to_string());
    }
    u64::try_from(whole).map_err(|_| too_large())
}

/// Nanoseconds per unit for a duration suffix (case-insensitive), or `None` if unknown.
fn duration_unit(suffix: &str) -> Option<u128> {
    const SEC: u128 = 1_000_000_000;
    let unit = match suffix.to_ascii_lowercase().as_str() {
        "ms" => 1_000_000,
        "s" | "sec" | "secs" => SEC,
        "m" | "min" | "mins" => 60 * SEC,
        "h" | "hr" | "hrs" => 3_600 * SEC,
        "d" | "day" | "days" => 86_400 * SEC,
        _ => return None,
    };
    Some(unit)
}

/// Parses a duration: `30s`, `5m`, `24h`, `2d`, `500ms`, `1.5h`, `4m05s`, or a bare number of seconds (`90`).
///
/// Units are case-insensitive (`m` is minutes); several parts add up (`1h30m`), as printed by
/// [`format_duration`].
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    duration_inner(s).map_err(|reason| UnitError::Duration {
        input: s.to_string(),
        reason,
    })
}

/// [`parse_duration`] with the reason for a failure as plain text.
fn duration_inner(s: &str) -> Result<Duration, String> {
    const SEC: u128 = 1_000_000_000;
    let t = s.trim();
    if t.is_empty() {
        return Err("it is empty".to_string());
    }
    let too_long = || "it is too long".to_string();
    let mut rest = t;
    let mut nanos: u128 = 0;
    let mut first = true;
    while !rest.is_empty() {
        let (num, after) = split_number(rest)?;
        let unit_len = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (suffix, after) = after.split_at(unit_len);
        let unit = if suffix.is_empty() && first && after.is_empty() {
            SEC
        } else if suffix.is_empty() {
            return Err("every part needs a unit (ms, s, m, h or d)".to_string());
        } else {
            duration_unit(suffix)
                .ok_or_else(|| format!("unknown unit {suffix:?} (known: ms, s, m, h, d)"))?
        };
        let (whole, rem, scale) = num.times(unit).ok_or_else(too_long)?;
        // Round a fraction of a nanosecond to the nearest one.
        let whole = whole + u128::from(rem * 2 >= scale && rem != 0);
        nanos = nanos.checked_add(whole).ok_or_else(too_long)?;
        rest = after.trim_start();
        first = false;
    }
    let secs = u64::try_from(nanos / SEC).map_err(|_| too_long())?;
    Ok(Duration::new(secs, (nanos % SEC) as u32))
}

/// Parses a bandwidth in bytes per second: `100MiB/s`, `1GB/s`, or a size meaning per second (`100MiB`).
///
/// A bandwidth of zero is refused: it would never move anything.
pub fn parse_bandwidth(s: &str) -> Result<u64, UnitError> {
    let fail = |reason: String| UnitError::Bandwidth {
        input: s.to_string(),
        reason,
    };
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let per_second = ["/s", "/sec", "ps"]
        .into_iter()
        .find(|tail| lower.ends_with(tail) && lower.len() > tail.len())
        .map_or(t, |tail| &t[..t.len() - tail.len()]);
    let bytes = size_inner(per_second.trim_end()).map_err(fail)?;
    if bytes == 0 {
        return Err(fail("it must be more than 0".to_string()));
    }
    Ok(bytes)
}

/// Formats a byte count with binary units and about three significant digits: `0 B`, `512 B`, `64.0 KiB`, `1.50 GiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut i = 1;
    while i + 1 < UNITS.len() && n >= 1u64 << (10 * (i + 1)) {
        i += 1;
    }
    loop {
        let v = n as f64 / (1u64 << (10 * i)) as f64;
        // Choose the decimals from the value as it will be rounded, so 9.999 becomes "10.0".
        if v < 9.995 {
            return format!("{v:.2} {}", UNITS[i]);
        } else if v < 99.95 {
            return format!("{v:.1} {}", UNITS[i]);
        } else if v < 1023.5 || i + 1 == UNITS.len() {
            return format!("{v:.0} {}", UNITS[i]);
        }
        i += 1;
    }
}

/// Formats a duration compactly: `850ms`, `12.3s`, `4m05s`, `2h03m`, `3d04h`; [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    const MS: u128 = 1_000_000;
    const SEC: u128 = 1_000 * MS;
    const MIN: u128 = 60 * SEC;
    const HOUR: u128 = 60 * MIN;
    let n = d.as_nanos();
    let rounded = |unit: u128| (n + unit / 2) / unit;
    let ms = rounded(MS);
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let tenths = rounded(SEC / 10);
    if tenths < 600 {
        return format!("{}.{}s", tenths / 10, tenths % 10);
    }
    let secs = rounded(SEC);
    if secs < 3_600 {
        return format!("{}m{:02}s", secs / 60, secs % 60);
    }
    let mins = rounded(MIN);
    if mins < 24 * 60 {
        return format!("{}h{:02}m", mins / 60, mins % 60);
    }
    let hours = rounded(HOUR);
    format!("{}d{:02}h", hours / 24, hours % 24)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;
    const TIB: u64 = 1024 * GIB;

    #[test]
    fn sizes() {
        let cases = [
            ("512MiB", 512 * MIB),
            ("4GiB", 4 * GIB),
            ("65536", 65_536),
            ("64KiB", 64 * KIB),
            ("1.5GiB", 3 * GIB / 2),
            ("10MB", 10_000_000),
            ("1KB", 1_000),
            ("0", 0),
            ("0B", 0),
            ("12b", 12),
            ("2k", 2 * KIB),
            ("2K", 2 * KIB),
            ("3m", 3 * MIB),
            ("1g", GIB),
            ("1T", TIB),
            ("1TB", 1_000_000_000_000),
            ("2tib", 2 * TIB),
            ("1gb", 1_000_000_000),
            ("5mib", 5 * MIB),
            ("4 GiB", 4 * GIB),
            (" 4GiB ", 4 * GIB),
            (".5KiB", 512),
            ("1.50GiB", 3 * GIB / 2),
            ("1.000000000000000000000000000000000000KiB", KIB),
            ("0.25MB", 250_000),
            ("16777215TiB", 16_777_215 * TIB),
            ("18446744073709551615", u64::MAX),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn bad_sizes() {
        for text in [
            "",
            "  ",
            "GiB",
            "-1",
            "1.2.3",
            "1.",
            ".",
            "4 GiB/s",
            "4GiBs",
            "4XB",
            "1e6",
            "0.1B",
            "1.3KiB",
            "16777216TiB",
            "18446744073709551616",
            "99999999999999999999999999999999999999999",
            "1..5GiB",
            "4 G iB",
        ] {
            assert!(parse_size(text).is_err(), "{text:?} accepted");
        }
        let e = parse_size("4XB").unwrap_err().to_string();
        assert!(
            e.contains("\"4XB\"") && e.contains("512MiB") && e.contains("\"XB\""),
            "{e}"
        );
        let e = parse_size("-5").unwrap_err().to_string();
        assert!(e.contains("negative"), "{e}");
        let e = parse_size("1.3KiB").unwrap_err().to_string();
        assert!(e.contains("whole number of bytes"), "{e}");
        assert!(parse_size("99999999TiB")
            .unwrap_err()
            .to_string()
            .contains("larger"));
    }

    #[test]
    fn durations() {
        let d = Duration::from_secs;
        let cases = [
            ("30s", d(30)),
            ("5m", d(300)),
            ("24h", d(86_400)),
            ("2d", d(172_800)),
            ("500ms", Duration::from_millis(500)),
            ("90", d(90)),
            ("0", d(0)),
            ("0s", d(0)),
            ("1.5h", d(5_400)),
            ("12.3s", Duration::from_millis(12_300)),
            ("4m05s", d(245)),
            ("2h03m", d(7_380)),
            ("1h 30m", d(5_400)),
            ("3d04h", d(3 * 86_400 + 4 * 3_600)),
            ("5M", d(300)),
            ("10 min", d(600)),
            ("1day", d(86_400)),
            (" 7s ", d(7)),
            ("0.5ms", Duration::from_micros(500)),
            ("0.0000000004s", d(0)),
            ("0.0000000005s", Duration::from_nanos(1)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_durations() {
        for text in [
            "",
            "s",
            "5x",
            "-5s",
            "5 s m",
            "1h30",
            "30 5m",
            "1.2.3s",
            "ms5",
            "5m-",
            "5Mb",
            "999999999999999999999d",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} accepted");
        }
        let e = parse_duration("5x").unwrap_err().to_string();
        assert!(
            e.contains("\"5x\"") && e.contains("30s") && e.contains("\"x\""),
            "{e}"
        );
    }

    #[test]
    fn bandwidths() {
        let cases = [
            ("100MiB/s", 100 * MIB),
            ("100MiB", 100 * MIB),
            ("1GB/s", 1_000_000_000),
            ("10 MB/s", 10_000_000),
            ("64KiB/sec", 64 * KIB),
            ("5MBps", 5_000_000),
            ("1048576", MIB),
            ("1048576/s", MIB),
        ];
        for (text, want) in cases {
            assert_eq!(parse_bandwidth(text), Ok(want), "{text}");
        }
        for text in ["", "/s", "fast", "0", "0MiB/s", "100MiB/h", "-1MB/s"] {
            assert!(parse_bandwidth(text).is_err(), "{text:?} accepted");
        }
        let e = parse_bandwidth("fast").unwrap_err().to_string();
        assert!(e.contains("\"fast\"") && e.contains("100MiB/s"), "{e}");
    }

    #[test]
    fn bytes_formatting() {
        let cases = [
            (0, "0 B"),
            (1, "1 B"),
            (512, "512 B"),
            (1023, "1023 B"),
            (1024, "1.00 KiB"),
            (1536, "1.50 KiB"),
            (64 * KIB, "64.0 KiB"),
            (512 * KIB, "512 KiB"),
            (3 * GIB / 2, "1.50 GiB"),
            (10 * KIB - 1, "10.0 KiB"),
            (100 * KIB - 1, "100 KiB"),
            (MIB - 1, "1.00 MiB"),
            (1023 * MIB, "1023 MiB"),
            (4 * TIB, "4.00 TiB"),
            (u64::MAX, "16.0 EiB"),
        ];
        for (n, want) in cases {
            assert_eq!(format_bytes(n), want, "{n}");
        }
    }

    #[test]
    fn duration_formatting() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        let cases = [
            (Duration::ZERO, "0ms"),
            (ms(850), "850ms"),
            (Duration::from_micros(999_600), "1.0s"),
            (ms(12_340), "12.3s"),
            (ms(59_960), "1m00s"),
            (s(245), "4m05s"),
            (s(3_599), "59m59s"),
            (ms(3_599_600), "1h00m"),
            (s(7_380), "2h03m"),
            (s(86_369), "23h59m"),
            (s(86_399), "1d00h"),
            (s(86_400 + 1_799), "1d00h"),
            (s(3 * 86_400 + 4 * 3_600), "3d04h"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want, "{d:?}");
        }
        let _ = format_duration(Duration::MAX);
    }

    proptest! {
        #[test]
        fn sizes_round_trip_in_every_unit(n in 0u64..(1 << 24), unit in 0usize..9) {
            let (suffix, mult) = [
                ("", 1), ("B", 1), ("KiB", KIB), ("MiB", MIB), ("GiB", GIB),
                ("KB", 1_000), ("MB", 1_000_000), ("GB", 1_000_000_000), ("TiB", TIB),
            ][unit];
            prop_assert_eq!(parse_size(&format!("{n}{suffix}")), Ok(n * mult));
            prop_assert_eq!(parse_size(&format!("{n}{}", suffix.to_lowercase())), Ok(n * mult));
        }

        #[test]
        fn formatted_durations_parse_back_closely(nanos in 0u64..(400 * 86_400 * 1_000_000_000)) {
            let d = Duration::from_nanos(nanos);
            let text = format_duration(d);
            let back = parse_duration(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            // The printed form keeps about three significant digits.
            let err = back.as_secs_f64() - d.as_secs_f64();
            prop_assert!(err.abs() <= d.as_secs_f64() / 15.0 + 0.0005, "{:?} → {} → {:?}", d, text, back);
        }

        #[test]
        fn formatted_bytes_are_close(n in any::<u64>()) {
            let text = format_bytes(n);
            let (num, unit) = text.split_once(' ').unwrap();
            let exp = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
                .iter().position(|u| *u == unit).unwrap();
            let v: f64 = num.parse().unwrap();
            prop_assert!(num.len() <= 4, "{}", text);
            let approx = v * (1u64 << (10 * exp)) as f64;
            prop_assert!((approx - n as f64).abs() <= n as f64 / 100.0, "{} for {}", text, n);
        }

        #[test]
        fn parsers_never_panic(s in "\\PC{0,24}") {
            let _ = parse_size(&s);
            let _ = parse_duration(&s);
            let _ = parse_bandwidth(&s);
        }
    }
}
