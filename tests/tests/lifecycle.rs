//! Capture across the agent's life (root): it outlives a `kill -9` and fails
//! closed while no agent runs, a new agent adopts it without duplicates and
//! reconciles what changed meanwhile, and `mesh-agent uninstall` leaves the
//! node as it was.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::net::Ipv4Addr;

use mesh_tests::{
    Agent, Cluster, Pod,
    agent::BpfFs,
    clients::{Curled, curl},
    fixture::{Objects, PodSpec},
    netns::enter_and_spawn,
    require_root, servers,
};

const HELLO: &str = "10.244.0.3";

/// Node node-1, namespace `demo` (meshed) with helloworld and the `clients`.
fn config(clients: &[(&str, &str)]) -> String {
    let mut o = Objects::demo();
    o.pod("node-1", "helloworld", HELLO.parse().unwrap(), PodSpec::app("demo", &[("app", "helloworld")]));
    for (name, ip) in clients {
        o.pod("node-1", name, ip.parse().unwrap(), PodSpec::app("demo", &[("app", *name)]));
    }
    o.yaml("")
}

fn get(ns: &Pod) -> Curled {
    curl(|args| ns.cmd(args), &["--max-time", "2", &format!("http://{HELLO}:9095/")])
}

/// Connections a namespace's listeners accepted a SYN for.
fn passive_opens(ns: &Pod) -> u64 {
    ns.snmp("Tcp", "PassiveOpens")
}

/// TCX programs attached to an interface of the node, both directions.
fn tcx(c: &Cluster, ifname: &str) -> usize {
    use aya::programs::{SchedClassifier, TcAttachType};
    let ifname = ifname.to_owned();
    enter_and_spawn(&c.node_ns, move || {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .map(|t| SchedClassifier::query_tcx(&ifname, t).map_or(0, |(_, progs)| progs.len()))
            .sum()
    })
    .join()
    .unwrap()
}

#[test]
fn capture_outlives_kill_9_fails_closed_is_adopted_and_uninstalled() {
    if !require_root("capture_outlives_kill_9_fails_closed_is_adopted_and_uninstalled") {
        return;
    }
    let mut c = Cluster::new();
    c.add_pod("test", Ipv4Addr::new(10, 244, 0, 2));
    c.add_pod("helloworld", Ipv4Addr::new(10, 244, 0, 3));
    servers::http_hello(c.pod("helloworld"), 9095);
    let lan = c.add_lan(0, "lan", "192.168.77");
    let daemon = c.node_process(0, "daemon");
    let bpf = BpfFs::mount(&c);
    let routing_before = c.node_routing();

    let mut a = Agent::start_on(&c, 0, &config(&[("test", "10.244.0.2")]), &bpf.agent_args());
    assert_eq!(get(c.pod("test")).code, 200, "{}", a.log_text());
    assert_eq!(get(&lan).code, 200);
    assert_eq!((tcx(&c, "vhelloworld"), tcx(&c, "vtest"), tcx(&c, "uplink0")), (2, 2, 1));
    let pins = bpf.pins();
    assert_eq!(pins.len(), 7, "{pins:?}");

    // Down: nothing reaches a meshed pod, by any path, and nothing leaves one.
    a.kill();
    let hello = c.pod("helloworld");
    let opens = passive_opens(hello);
    for (path, from) in [("meshed pod", c.pod("test")), ("second interface", &lan), ("node process", &daemon)] {
        let r = get(from);
        assert_ne!(r.code, 200, "{path}: reached the pod in plaintext while no agent ran: {}", r.body);
    }
    assert_eq!(passive_opens(hello), opens, "a connection reached the meshed pod while no agent ran");
    assert_eq!(bpf.pins(), pins, "pins changed while no agent ran");
    drop(a);

    // Meanwhile a pod arrives and another leaves the mesh.
    c.add_pod("late", Ipv4Addr::new(10, 244, 0, 5));
    let a = Agent::start_on(&c, 0, &config(&[("late", "10.244.0.5")]), &bpf.agent_args());
    let r = get(c.pod("late"));
    assert_eq!(r.code, 200, "{}{}\n{}", r.body, r.stderr, a.log_text());
    assert_eq!(r.body, "hello from helloworld; client 10.244.0.5\n");
    assert_eq!(get(&lan).code, 200);
    // Adopted, not duplicated; the departed pod's capture is gone.
    assert_eq!((tcx(&c, "vhelloworld"), tcx(&c, "vlate"), tcx(&c, "vtest"), tcx(&c, "uplink0")), (2, 2, 0, 1));
    assert_eq!(bpf.pins().len(), 7, "{:?}", bpf.pins());
    assert!(a.log_text().contains("adopted pinned capture"), "{}", a.log_text());
    assert!(a.log_text().contains("stale pinned capture removed"), "{}", a.log_text());

    // SIGTERM (an upgrade) leaves capture in place: still closed.
    let mut a = a;
    assert!(a.stop().success());
    assert_ne!(get(&lan).code, 200, "capture lapsed after SIGTERM");
    assert_eq!(bpf.pins().len(), 7);

    // Uninstall: the node as it was, and the pod reached directly.
    let out = c.node_cmd(&[
        mesh_tests::agent::binary().to_str().unwrap(),
        "uninstall",
        "--bpffs",
        bpf.path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "uninstall: {}", String::from_utf8_lossy(&out.stderr));
    assert!(bpf.pins().is_empty(), "{:?}", bpf.pins());
    assert_eq!((tcx(&c, "vhelloworld"), tcx(&c, "vlate"), tcx(&c, "uplink0")), (0, 0, 0));
    // (Less the route the test's "CNI" added for late.)
    let routing = c.node_routing().replace("10.244.0.5 dev vlate scope link \n", "");
    assert_eq!(routing, routing_before, "routing rules and tables restored");
    let r = get(&lan);
    assert_eq!(r.code, 200, "uninstalled, the pod is unreachable: {}", r.stderr);
    assert_eq!(r.body, "hello from helloworld; client 192.168.77.2\n");
    let nft = c.node_cmd(&["nft", "list", "tables"]);
    assert!(!String::from_utf8_lossy(&nft.stdout).contains("mesh_agent"), "the notrack table is left");
}
