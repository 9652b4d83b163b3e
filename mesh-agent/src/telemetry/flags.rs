//! Envoy's response flags, as Istio reports them in `response_flags` and the
//! access log: a typed set, printed in a fixed order joined by commas (`-`
//! when empty), so flags combine by union instead of by string matching.
use std::fmt;

#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Flags(u16);

/// Each flag and how it prints, in print order.
const NAMES: [(Flags, &str); 14] = [
    (Flags::DC, "DC"),
    (Flags::DF, "DF"),
    (Flags::DI, "DI"),
    (Flags::DPE, "DPE"),
    (Flags::FI, "FI"),
    (Flags::NR, "NR"),
    (Flags::SI, "SI"),
    (Flags::UC, "UC"),
    (Flags::UF, "UF"),
    (Flags::UH, "UH"),
    (Flags::UO, "UO"),
    (Flags::UR, "UR"),
    (Flags::UT, "UT"),
    (Flags::URX, "URX"),
];

impl Flags {
    pub const NONE: Flags = Flags(0);
    /// Downstream connection closed before the response was complete.
    pub const DC: Flags = Flags(1);
    /// The request's host did not resolve (Envoy's dynamic forward proxy).
    pub const DF: Flags = Flags(1 << 13);
    /// Request delayed by the fault filter.
    pub const DI: Flags = Flags(1 << 1);
    /// Downstream protocol error (an unreadable request body).
    pub const DPE: Flags = Flags(1 << 2);
    /// Request aborted by the fault filter.
    pub const FI: Flags = Flags(1 << 3);
    /// No route.
    pub const NR: Flags = Flags(1 << 4);
    /// Stream idle timeout (the client stopped sending).
    pub const SI: Flags = Flags(1 << 12);
    /// Upstream connection terminated.
    pub const UC: Flags = Flags(1 << 5);
    /// Upstream connection failure.
    pub const UF: Flags = Flags(1 << 6);
    /// No healthy upstream.
    pub const UH: Flags = Flags(1 << 7);
    /// Upstream overflow (circuit breaking).
    pub const UO: Flags = Flags(1 << 8);
    /// Upstream remote reset (during the response).
    pub const UR: Flags = Flags(1 << 9);
    /// Upstream request timeout.
    pub const UT: Flags = Flags(1 << 10);
    /// Upstream retry limit exceeded (the request was retried).
    pub const URX: Flags = Flags(1 << 11);

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: Flags) {
        self.0 |= other.0;
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
}

impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for (flag, name) in NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl prometheus_client::encoding::EncodeLabelValue for Flags {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder) -> fmt::Result {
        fmt::Write::write_fmt(encoder, format_args!("{self}"))
    }
}

impl serde::Serialize for Flags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::Flags;

    #[test]
    fn prints_as_envoy_joins_them() {
        let cases = [
            (Flags::NONE, "-"),
            (Flags::UT, "UT"),
            (Flags::DI | Flags::URX, "DI,URX"),
            (Flags::URX | Flags::UF, "UF,URX"),
            (Flags::URX | Flags::UC, "UC,URX"),
            (Flags::UT | Flags::URX | Flags::DI, "DI,UT,URX"),
        ];
        for (flags, want) in cases {
            assert_eq!(flags.to_string(), want);
        }
    }
}
