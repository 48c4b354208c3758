//! Durations (`250ms`, `5s`, `2m`, `1h`) and byte sizes (`64KiB`, `100MiB`) as written in
//! the config file. Both parsers are strict on purpose: the classic mistakes (`M` read as
//! months, `100M` read as 10^6, a bare number of unknown unit) are errors, not guesses.

use std::time::Duration;

/// Longest duration accepted anywhere in the config. Far beyond any sane timeout, and small
/// enough that `Instant + duration` can never overflow.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Parses a duration such as `250ms`, `5s`, `2m`, `1h` or `1m30s`.
///
/// Rejects bare numbers (`5`: seconds or milliseconds?), `M`/months and years (`M` is the
/// classic typo for minutes, and neither is a fixed length), and anything above 30 days.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration; write e.g. `250ms`, `5s`, `2m` or `1h`".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{s}` has no unit; write e.g. `{s}s` or `{s}ms` (units: ms, s, m, h, d)"
        ));
    }
    for unit in s.split(|c: char| !c.is_ascii_alphabetic()) {
        if unit == "M" || unit.starts_with("month") {
            return Err(format!(
                "`{s}`: `M` means months; use `m` for minutes (units: ms, s, m, h, d)"
            ));
        }
        if unit == "y" || unit.starts_with("year") {
            return Err(format!(
                "`{s}`: years are not supported (units: ms, s, m, h, d)"
            ));
        }
    }
    let d = humantime::parse_duration(s).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => format!("duration `{s}` is too long (at most 30d)"),
        _ => format!("invalid duration `{s}`; write e.g. `250ms`, `5s`, `2m` or `1h` (units: ms, s, m, h, d)"),
    })?;
    if d > MAX_DURATION {
        return Err(format!("duration `{s}` is too long (at most 30d)"));
    }
    Ok(d)
}

/// Binary size units, largest first so `KiB` is never read as `B`.
const SIZE_UNITS: [(&str, u64); 4] = [
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];

/// Parses a byte size: a plain integer (bytes) or an integer with `B`, `KiB`, `MiB` or `GiB`.
///
/// Decimal and ambiguous units (`100M`, `100MB`, `100m`, `10k`) are rejected rather than
/// read as 10^6: nginx users write `100m` meaning MiB, bytesize-style parsers read MB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, rest) = s.split_at(digits_end);
    let unit = rest.trim_start();
    if number.is_empty() {
        return Err(format!(
            "invalid size `{s}`; write a whole number with KiB/MiB/GiB (binary units), e.g. `64KiB`"
        ));
    }
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "`{s}`: fractional sizes are not supported; write a whole number and use KiB/MiB/GiB \
             (binary units), e.g. `1536KiB` for 1.5MiB"
        ));
    }
    let multiplier = if unit.is_empty() {
        1
    } else if let Some((_, m)) = SIZE_UNITS.iter().find(|(name, _)| *name == unit) {
        *m
    } else {
        return Err(format!(
            "`{s}`: unknown or decimal size unit `{unit}`; use KiB/MiB/GiB (binary units), \
             e.g. `{number}MiB`"
        ));
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("size `{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(" 0s "), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn duration_mistakes() {
        let months = parse_duration("1M").unwrap_err();
        assert!(months.contains("months"), "{months}");
        assert!(parse_duration("2months").is_err());
        assert!(parse_duration("1y").is_err());
        let bare = parse_duration("30").unwrap_err();
        assert!(bare.contains("no unit"), "{bare}");
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("31d").unwrap_err().contains("too long"));
        assert!(parse_duration("99999999999999999999999s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100MiB"), Ok(104_857_600));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("8 KiB"), Ok(8192));
    }

    #[test]
    fn size_mistakes() {
        for bad in [
            "100M", "100MB", "100m", "10k", "10KB", "1G", "100mib", "1.5MiB",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("use KiB/MiB/GiB (binary units)"), "{bad}: {e}");
        }
        for bad in [
            "",
            "MiB",
            "-1",
            "1e6",
            "99999999999GiB",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
