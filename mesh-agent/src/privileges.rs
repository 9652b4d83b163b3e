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

/// Raises the open-file limit to its hard maximum: every proxied connection
/// holds two descriptors (three across nodes until the tunnel is pooled), and
/// the usual soft limit of 1024 would cap the node at a few hundred.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid out-pointer for getrlimit, then the same struct for setrlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "could not raise the open-file limit");
            }
        }
    }
}
