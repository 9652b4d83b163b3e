//! `mesh-cni install` and `mesh-cni uninstall`: putting the plugin into a
//! node's CNI configuration, and taking it out, as Istio's install-cni does:
//! the binary into the CNI binary directory, and an entry appended to the
//! plugin list of the first network configuration (the one the runtime uses).
//! Each file is written beside its final name and renamed over it, so the
//! runtime never reads half a file.
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use serde_json::{Value, json};

const USAGE: &str = "usage: mesh-cni install --bin-dir DIR --conf-dir DIR [--socket PATH] [--timeout-seconds N]\n       \
                     mesh-cni uninstall --bin-dir DIR --conf-dir DIR\n\
                     (run by a container runtime, with CNI_COMMAND set, it is the plugin)";

pub fn main(args: &[String]) -> ExitCode {
    let result = match args.first().map(String::as_str) {
        Some("install") => options(&args[1..]).and_then(|o| install(&o)),
        Some("uninstall") => options(&args[1..]).and_then(|o| uninstall(&o)),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-cni: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Options {
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    socket: String,
    timeout_seconds: f64,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        bin_dir: PathBuf::new(),
        conf_dir: PathBuf::new(),
        socket: crate::DEFAULT_SOCKET.into(),
        timeout_seconds: 10.0,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--bin-dir" => o.bin_dir = value.into(),
            "--conf-dir" => o.conf_dir = value.into(),
            "--socket" => o.socket = value.clone(),
            "--timeout-seconds" => {
                o.timeout_seconds = value.parse().map_err(|_| format!("--timeout-seconds {value:?}"))?
            }
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    if o.bin_dir.as_os_str().is_empty() || o.conf_dir.as_os_str().is_empty() {
        return Err(USAGE.to_owned());
    }
    Ok(o)
}

/// The network configuration files of `dir`, in the runtime's order (by name).
fn configs(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json")))
        .collect();
    files.sort();
    Ok(files)
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension("mesh-cni-tmp");
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some("mesh-cni")
}

fn install(o: &Options) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("this binary: {e}"))?;
    let bin = o.bin_dir.join("mesh-cni");
    let same = matches!((exe.canonicalize(), bin.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if !same {
        let bytes = std::fs::read(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
        write_atomically(&bin, &bytes, 0o755)?;
    }
    let Some(first) = configs(&o.conf_dir)?.into_iter().next() else {
        return Err(format!(
            "no CNI network configuration in {} yet (is the cluster's CNI installed?)",
            o.conf_dir.display()
        ));
    };
    let conf = read_json(&first)?;
    // A single-plugin `.conf` becomes a list with the plugin first.
    let (mut list, target) = match conf.get("plugins") {
        Some(_) => (conf, first.clone()),
        None => {
            let version = conf.get("cniVersion").cloned().unwrap_or(json!("1.0.0"));
            let name = conf.get("name").cloned().unwrap_or(json!("k8s-pod-network"));
            (json!({"cniVersion": version, "name": name, "plugins": [conf]}), first.with_extension("conflist"))
        }
    };
    let entry = json!({
        "type": "mesh-cni",
        "agent_socket": o.socket,
        "timeout_seconds": o.timeout_seconds,
        "exclude_namespaces": ["kube-system"],
    });
    let plugins =
        list["plugins"].as_array_mut().ok_or_else(|| format!("{}: `plugins` is not a list", first.display()))?;
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry);
    let text = serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?;
    write_atomically(&target, text.as_bytes(), 0o644)?;
    if target != first {
        std::fs::remove_file(&first).map_err(|e| format!("{}: {e}", first.display()))?;
    }
    Ok(format!("mesh-cni installed: {} and {}", bin.display(), target.display()))
}

fn uninstall(o: &Options) -> Result<String, String> {
    let mut changed = Vec::new();
    for path in configs(&o.conf_dir)? {
        let mut conf = read_json(&path)?;
        let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else { continue };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            let text = serde_json::to_string_pretty(&conf).map_err(|e| e.to_string())?;
            write_atomically(&path, text.as_bytes(), 0o644)?;
            changed.push(path.display().to_string());
        }
    }
    let bin = o.bin_dir.join("mesh-cni");
    match std::fs::remove_file(&bin) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", bin.display())),
    }
    Ok(format!("mesh-cni removed from {} and [{}]", bin.display(), changed.join(", ")))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn install_appends_once_and_uninstall_restores_the_list() {
        let dir = std::env::temp_dir().join(format!("mesh-cni-install-{}", std::process::id()));
        let (bin_dir, conf_dir) = (dir.join("bin"), dir.join("net.d"));
        std::fs::create_dir_all(&bin_dir).unwrap();
        std::fs::create_dir_all(&conf_dir).unwrap();
        let original = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network",
            "plugins": [{"type": "ptp", "ipam": {"type": "host-local"}}, {"type": "portmap"}]});
        std::fs::write(conf_dir.join("10-ptp.conflist"), original.to_string()).unwrap();
        std::fs::write(conf_dir.join("99-other.conflist"), original.to_string()).unwrap();
        let o = Options {
            bin_dir: bin_dir.clone(),
            conf_dir: conf_dir.clone(),
            socket: "/run/x.sock".into(),
            timeout_seconds: 3.0,
        };
        install(&o).unwrap();
        install(&o).unwrap();
        let list = read_json(&conf_dir.join("10-ptp.conflist")).unwrap();
        let types: Vec<&str> =
            list["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["ptp", "portmap", "mesh-cni"]);
        assert_eq!(list["plugins"][2]["agent_socket"], "/run/x.sock");
        assert_eq!(
            read_json(&conf_dir.join("99-other.conflist")).unwrap(),
            original,
            "only the first list is the runtime's"
        );
        assert!(bin_dir.join("mesh-cni").exists());
        uninstall(&o).unwrap();
        assert_eq!(read_json(&conf_dir.join("10-ptp.conflist")).unwrap(), original);
        assert!(!bin_dir.join("mesh-cni").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let dir = std::env::temp_dir().join(format!("mesh-cni-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("10-bridge.conf"), r#"{"cniVersion":"0.4.0","name":"net","type":"ptp"}"#).unwrap();
        let o = Options { bin_dir: dir.clone(), conf_dir: dir.clone(), socket: "/s".into(), timeout_seconds: 1.0 };
        install(&o).unwrap();
        let list = read_json(&dir.join("10-bridge.conflist")).unwrap();
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["plugins"][0]["type"], "ptp");
        assert_eq!(list["plugins"][1]["type"], "mesh-cni");
        assert!(!dir.join("10-bridge.conf").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
