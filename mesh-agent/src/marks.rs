//! The packet marks this agent uses (`--mark-mask`), for the whole process:
//! capture puts them in the eBPF settings and the routing rules, and every
//! socket the agent opens (proxy, CA client, API server) carries the agent
//! mark, so the node's capture never takes it for a host client's.
use mesh_common::Marks;

/// The agent's marks, for the whole process: like the listener ports, one
/// value per node, set by `run` before the first socket is made.
static MARKS: std::sync::OnceLock<Marks> = std::sync::OnceLock::new();

/// The marks this process uses (the defaults until [`set`]).
pub fn get() -> Marks {
    MARKS.get().copied().unwrap_or(mesh_common::DEFAULT_MARKS)
}

/// Sets the process's marks (the first call wins: sockets made since carry them).
pub fn set(marks: Marks) {
    let _ = MARKS.set(marks);
}

/// The marks the bits of `mask` make (`--mark-mask`: hexadecimal with `0x`,
/// else decimal), or why not.
pub fn parse_mark_mask(s: &str) -> Result<Marks, String> {
    let mask = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))?;
    Marks::from_mask(mask)
        .ok_or_else(|| format!("{s:?}: the mask needs at least two bits (the agent uses three marks)"))
}

#[cfg(test)]
mod tests {
    use mesh_common::Marks;

    use super::parse_mark_mask;

    #[test]
    fn marks_are_made_of_the_two_lowest_bits_of_the_mask() {
        let m = |mask, agent, captured, handoff| Marks { mask, agent, captured, handoff };
        assert_eq!(parse_mark_mask("0x30"), Ok(m(0x30, 0x10, 0x20, 0x30)));
        assert_eq!(parse_mark_mask("0x00c00000"), Ok(m(0xc0_0000, 0x40_0000, 0x80_0000, 0xc0_0000)));
        // Bits need not be adjacent; the ones above the second are the agent's too.
        assert_eq!(parse_mark_mask("0x1010"), Ok(m(0x1010, 0x10, 0x1000, 0x1010)));
        assert_eq!(parse_mark_mask("48"), Ok(m(48, 0x10, 0x20, 0x30)));
        assert_eq!(parse_mark_mask("0x0f00").map(|m| m.handoff), Ok(0x300));
        assert_eq!(mesh_common::DEFAULT_MARKS, m(0x30, 0x10, 0x20, 0x30));
        for bad in ["0x10", "0", "0xzz", "-1", ""] {
            assert!(parse_mark_mask(bad).is_err(), "{bad} accepted");
        }
    }
}
