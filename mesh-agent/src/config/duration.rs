//! Durations in Go's syntax (`time.ParseDuration`), as Istio reads them in
//! YAML and Kubernetes components read them in flags: a sequence of decimal
//! numbers, each with an optional fraction and a unit (`ns`, `us` or `µs`,
//! `ms`, `s`, `m`, `h`), such as `1h30m`, `500ms`, `1.5s`; `0` alone.
use std::time::Duration;

/// The message every refused duration carries.
const EXPECTED: &str = "expected a duration such as 1h30m, 500ms or 1.5s";
const UNITS: &str = "ns, us, ms, s, m or h";

/// Parses `s` as Go does; a negative duration is refused.
pub fn parse_go(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: {EXPECTED}");
    let body = s.strip_prefix('+').unwrap_or(s);
    if body == "0" {
        return Ok(Duration::ZERO);
    }
    if body.is_empty() || body.starts_with('-') {
        return Err(if body.starts_with('-') { format!("{s:?}: a duration cannot be negative") } else { bad() });
    }
    let too_long = || format!("{s:?}: above the largest duration");
    let mut rest = body;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let nanos_per: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("{s:?}: missing unit ({UNITS})")),
            other => return Err(format!("{s:?}: unknown unit {other:?} ({UNITS})")),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
            return Err(bad());
        }
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| too_long())? };
        let mut part = whole.checked_mul(nanos_per).ok_or_else(too_long)?;
        // The fraction, digit by digit, as Go computes it (no float rounding).
        let mut scale = nanos_per;
        for d in fraction.bytes() {
            scale /= 10;
            part += u128::from(d - b'0') * scale;
        }
        total = total.checked_add(part).ok_or_else(too_long)?;
        rest = next;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| format!("{s:?}: above the largest duration"))?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_go;

    #[test]
    fn go_durations_parse_as_go_parses_them() {
        let ok: [(&str, Duration); 10] = [
            ("1h30m", Duration::from_secs(5400)),
            ("500ms", Duration::from_millis(500)),
            ("1.5s", Duration::from_millis(1500)),
            ("2m3.5s", Duration::from_millis(123_500)),
            ("0", Duration::ZERO),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("1ns", Duration::from_nanos(1)),
            (".5h", Duration::from_secs(1800)),
            ("+24h", Duration::from_secs(86_400)),
        ];
        for (s, want) in ok {
            assert_eq!(parse_go(s), Ok(want), "{s}");
        }
        for bad in ["", "1", "1.5", "s", "1d", "1h 30m", "-1s", "1..5s", "1.2.3s", "99999999999999999999h"] {
            let e = parse_go(bad).expect_err(bad);
            assert!(e.starts_with(&format!("{bad:?}: ")), "{bad}: {e}");
        }
    }
}
