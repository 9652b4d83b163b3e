//! The `mesh-agent` command line, as an operator uses it (no root needed).
#![expect(clippy::unwrap_used, reason = "tests")]

use std::process::Command;

use mesh_tests::agent::binary;

fn agent(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary()).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn validate_exits_0_for_good_config_and_1_with_every_error_located() {
    let dir = std::env::temp_dir().join(format!("mesh-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("good")).unwrap();
    std::fs::create_dir_all(dir.join("bad")).unwrap();
    std::fs::write(
        dir.join("good/a.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nspec: {nodeName: n}\nstatus: {podIP: 10.0.0.1}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("good/b.yml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
    )
    .unwrap();
    std::fs::write(dir.join("good/notes.txt"), "not config").unwrap();
    std::fs::write(
        dir.join("bad/a.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 1.2.3}\n",
    )
    .unwrap();
    std::fs::write(dir.join("bad/b.yaml"), "apiVersion: v1\nkind: Pod\nmetadata: {name: p\n").unwrap();

    let (code, out, err) = agent(&["validate", dir.join("good").to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(
            "valid (0 nodes, 1 namespaces, 1 pods, 1 services, 0 PeerAuthentications, 0 AuthorizationPolicies, \
             0 VirtualServices, 0 DestinationRules, 0 Gateways, 0 ServiceEntry hosts)"
        ),
        "{out}"
    );

    let (code, _, err) = agent(&["validate", dir.join("bad").to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("bad/a.yaml (document 1): Service default/s: spec.clusterIP: \"1.2.3\" is not an IPv4 address"),
        "{err}"
    );
    assert!(err.contains("bad/b.yaml (document 1): document: -: YAML syntax:"), "{err}");
}

#[test]
fn version_prints_the_version() {
    let (code, out, _) = agent(&["version"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("mesh-agent 0."), "{out}");
}

#[test]
fn unknown_flags_are_rejected() {
    let (code, _, err) = agent(&["run", "--config", "x", "--node", "n", "--bogus"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--bogus"), "{err}");
}

#[test]
fn ca_refuses_an_unreadable_config_and_run_needs_every_ca_flag() {
    let dir = std::env::temp_dir().join(format!("mesh-cli-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("missing.yaml");
    let ca_dir = dir.join("ca");
    let (code, _, err) = agent(&[
        "ca",
        "--config",
        cfg.to_str().unwrap(),
        "--ca-dir",
        ca_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("missing.yaml") && err.contains("cannot read"), "{err}");
    assert!(!ca_dir.exists(), "a CA was created without a configuration");
    let (code, _, err) = agent(&["run", "--node", "n", "--config", "x", "--ca-addr", "10.0.0.1:15012"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--ca-root") && err.contains("--ca-token-file"), "{err}");
}

#[test]
fn validate_names_a_gateway_whose_secret_is_missing_or_mismatched() {
    let certs = mesh_tests::certs::Certs::new(&format!("cli-{}", std::process::id()));
    let (crt, _) = certs.server("a", "a.example.com");
    let (_, other_key) = certs.server("b", "b.example.com");
    let block = |p: &std::path::Path| mesh_tests::certs::Certs::yaml_block(p, 4);
    let gateway = |name: &str, secret: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: istio-system}}\n\
             spec:\n  servers:\n  - port: {{number: 443, name: https, protocol: HTTPS}}\n    hosts: [\"*\"]\n    \
             tls: {{mode: SIMPLE, credentialName: {secret}}}\n---\n"
        )
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: mismatched, namespace: istio-system}}\ntype: kubernetes.io/tls\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n{}{}",
        block(&crt),
        block(&other_key),
        gateway("uses-missing", "nowhere"),
        gateway("uses-mismatched", "mismatched"),
    );
    let file = certs.dir.join("gateways.yaml");
    std::fs::write(&file, yaml).unwrap();
    let (code, _, err) = agent(&["validate", file.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            "Gateway istio-system/uses-missing: spec.servers[0].tls.credentialName: Secret istio-system/nowhere does not exist"
        ),
        "{err}"
    );
    assert!(
        err.contains("Gateway istio-system/uses-mismatched: spec.servers[0].tls.credentialName: Secret istio-system/mismatched: tls.key does not match the certificate in tls.crt"),
        "{err}"
    );
}

/// `binary args` with `env` set (and nothing else of the caller's MESH_*).
fn agent_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(binary());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("MESH_") && k != "MESH_AGENT_BIN") {
        cmd.env_remove(k);
    }
    let out = cmd.env_remove("NODE_NAME").args(args).envs(env.iter().copied()).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn flags_come_from_the_environment_and_durations_are_gos() {
    // --node from NODE_NAME (the downward API), the rest from MESH_*: with
    // neither, clap names what is missing; with them, the next check speaks.
    let (code, err) = agent_env(&["run", "--config", "/nonexistent"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--node"), "{err}");
    let bad = [("NODE_NAME", "node-1"), ("MESH_DRAIN_TIMEOUT", "5x")];
    let mut cmd = Command::new(binary());
    let out = cmd.args(["run", "--config", "/nonexistent"]).envs(bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'5x' for '--drain-timeout") && err.contains("unknown unit \"x\""), "{err}");
    // Go's syntax, as in Istio objects: 1h30m, 1.5s.
    for good in ["1h30m", "1.5s", "250ms"] {
        let (_, err) = agent_env(&["run", "--config", "/nonexistent", "--drain-timeout", good], &[("NODE_NAME", "n")]);
        assert!(!err.contains("--drain-timeout"), "{good}: {err}");
    }
    let (code, err) = agent_env(&["inspect", "workloads"], &[("MESH_NODE_ADMIN", "127.0.0.1:1")]);
    assert_eq!(code, Some(1));
    assert!(err.contains("admin API at 127.0.0.1:1"), "{err}");
    let (_, err) = agent_env(&["run", "--node", "n", "--config", "/x", "--mark-mask", "0x10"], &[]);
    assert!(err.contains("at least two bits"), "{err}");
}
