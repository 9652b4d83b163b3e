//! Start-up check that the agent may do what `run` needs, so it fails at once
//! with a message naming what is missing rather than half-way through.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Effective capabilities of this process, from /proc/self/status.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Ok when the process has CAP_NET_ADMIN and CAP_BPF (or CAP_SYS_ADMIN) and the
/// kernel exposes BTF; otherwise a message saying what is missing.
pub fn check() -> Result<(), String> {
    let caps = effective_caps().ok_or("cannot read capabilities from /proc/self/status")?;
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !missing.is_empty() {
        return Err(format!("missing {}: run as root (sudo), or as a privileged DaemonSet pod", missing.join(" and ")));
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(
            "this kernel exposes no BTF (/sys/kernel/btf/vmlinux): eBPF capture needs CONFIG_DEBUG_INFO_BTF".into()
        );
    }
    Ok(())
}
