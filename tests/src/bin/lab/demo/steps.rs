//! The demo's steps: each client, path, protocol and identities, and the
//! answer it must get.
use super::*;

/// Where a step's client runs.
#[derive(Clone, Copy)]
pub(super) enum From {
    Pod(&'static str),
    /// The cluster network: outside the mesh and the nodes.
    Outside,
    /// node-1's own network namespace (a host-network process).
    Node1,
    /// node-2's own network namespace.
    Node2,
}

/// What a step expects: an HTTP status (0: the connection is refused), and
/// text the answer must contain.
pub(super) struct Step {
    pub(super) name: &'static str,
    pub(super) protocol: &'static str,
    pub(super) from: From,
    pub(super) path: &'static str,
    pub(super) identities: &'static str,
    pub(super) want: u16,
    pub(super) want_text: &'static str,
    pub(super) action: Action,
}

pub(super) enum Action {
    Curl(Vec<String>),
    Grpc(&'static str),
    WebSocket(&'static str),
    Tcp(SocketAddr),
}

pub(super) fn steps(ca: &str, token: &str, forged: &str) -> Vec<Step> {
    let bearer = format!("Authorization: Bearer {token}");
    let curl = |args: &[&str]| Action::Curl(args.iter().map(|s| s.to_string()).collect());
    let resolve = |host: &str| format!("{host}:80:{EXTERNAL_IP}");
    vec![
        Step {
            name: "test → helloworld",
            protocol: "HTTP/1.1",
            from: From::Pod("test"),
            path: "eBPF → agent → v1 over mTLS, or v2 locally",
            identities: "sample/test → sample/helloworld",
            want: 200,
            want_text: "hello from helloworld",
            action: curl(&["http://10.96.0.10:9095/hello"]),
        },
        Step {
            name: "test → helloworld again",
            protocol: "HTTP/1.1",
            from: From::Pod("test"),
            path: "round robin (per worker thread): v1 or v2",
            identities: "sample/test → sample/helloworld",
            want: 200,
            want_text: "hello from helloworld",
            action: curl(&["http://10.96.0.10:9095/hello"]),
        },
        Step {
            name: "helloworld-v1 → test",
            protocol: "HTTP/2",
            from: From::Pod("helloworld-v1"),
            path: "h2c to an http2 port, node-2 → mTLS → node-1",
            identities: "sample/helloworld → sample/test",
            want: 200,
            want_text: "HTTP/2.0",
            action: curl(&["--http2-prior-knowledge", "http://10.96.0.20:9095/hello"]),
        },
        Step {
            name: "test → grpc (test.Echo/Unary)",
            protocol: "gRPC",
            from: From::Pod("test"),
            path: "tonic client → mTLS → tonic server",
            identities: "sample/test → sample/helloworld",
            want: 200,
            want_text: "helloworld-v1: hi",
            action: Action::Grpc("http://10.96.0.14:80"),
        },
        Step {
            name: "test → ws (echo)",
            protocol: "WebSocket",
            from: From::Pod("test"),
            path: "Upgrade through the mesh",
            identities: "sample/test → sample/helloworld",
            want: 200,
            want_text: "over the mesh",
            action: Action::WebSocket("ws://10.96.0.13/echo"),
        },
        Step {
            name: "test → helloworld:7000 (echo)",
            protocol: "TCP",
            from: From::Pod("test"),
            path: "bytes both ways, half-close",
            identities: "sample/test → sample/helloworld",
            want: 200,
            want_text: "64 KiB echoed",
            action: Action::Tcp(SocketAddr::from(([10, 96, 0, 10], 7000))),
        },
        Step {
            name: "outside → http://<lb>/helloworld",
            protocol: "HTTP/1.1",
            from: From::Outside,
            path: "ingress Gateway :80 → mTLS → helloworld",
            identities: "istio-system/istio-ingressgateway + JWT alice → helloworld",
            want: 200,
            want_text: "hello from helloworld",
            action: curl(&["-H", &bearer, &format!("http://{INGRESS}:80/helloworld")]),
        },
        Step {
            name: "outside → <lb>/helloworld, no JWT",
            protocol: "HTTP/1.1",
            from: From::Outside,
            path: "ingress → helloworld's agent: 403",
            identities: "istio-system/istio-ingressgateway → sample/helloworld",
            want: 403,
            want_text: "RBAC: access denied",
            action: curl(&[&format!("http://{INGRESS}:80/helloworld")]),
        },
        Step {
            name: "outside → <lb>/helloworld, forged",
            protocol: "HTTP/1.1",
            from: From::Outside,
            path: "ingress → helloworld's agent: 401",
            identities: "istio-system/istio-ingressgateway → sample/helloworld",
            want: 401,
            want_text: "Jwt verification fails",
            action: curl(&[
                "-H",
                &format!("Authorization: Bearer {forged}"),
                &format!("http://{INGRESS}:80/helloworld"),
            ]),
        },
        Step {
            name: "outside → https://hello.example.com",
            protocol: "HTTPS",
            from: From::Outside,
            path: "Gateway :443, Secret's certificate",
            identities: "istio-system/istio-ingressgateway → sample/helloworld",
            want: 200,
            want_text: "hello from helloworld",
            action: curl(&[
                "-H",
                &bearer,
                "--cacert",
                ca,
                "--resolve",
                &format!("hello.example.com:443:{INGRESS}"),
                "https://hello.example.com/helloworld",
            ]),
        },
        Step {
            name: "outside → http://<lb>/nothing",
            protocol: "HTTP/1.1",
            from: From::Outside,
            path: "ingress Gateway: no route → 404",
            identities: "-",
            want: 404,
            want_text: "",
            action: curl(&[&format!("http://{INGRESS}/nothing")]),
        },
        Step {
            name: "test → direct.example",
            protocol: "HTTP/1.1",
            from: From::Pod("test"),
            path: "ServiceEntry: out from node-1 as the pod",
            identities: "sample/test → (external)",
            want: 200,
            want_text: "client 10.244.1.2",
            action: curl(&["--resolve", &resolve("direct.example"), "http://direct.example/"]),
        },
        Step {
            name: "test → 172.18.200.3 (unknown)",
            protocol: "HTTP/1.1",
            from: From::Pod("test"),
            path: "REGISTRY_ONLY: BlackHoleCluster → 502",
            identities: "sample/test → -",
            want: 502,
            want_text: "REGISTRY_ONLY",
            action: curl(&["http://172.18.200.3/"]),
        },
        Step {
            name: "test → external.example",
            protocol: "HTTP/1.1",
            from: From::Pod("test"),
            path: "mTLS → egress gateway pod (node-2) → out",
            identities: "sample/test → istio-system/istio-egressgateway",
            want: 200,
            want_text: "client 172.18.1.2",
            action: curl(&["--resolve", &resolve("external.example"), "http://external.example/"]),
        },
        Step {
            name: "node-1 host process → helloworld",
            protocol: "HTTP/1.1",
            from: From::Node1,
            path: "cgroup/connect4 → agent → mesh",
            identities: "istio-system/mesh-node-node-1 → …",
            want: 200,
            want_text: "hello from helloworld",
            action: curl(&["http://10.96.0.10:9095/hello"]),
        },
        Step {
            name: "node-2 host process → hw-v1 pod",
            protocol: "HTTP/1.1",
            from: From::Node2,
            path: "no way around: agent as node-2 → 403",
            identities: "istio-system/mesh-node-node-2 → …",
            want: 403,
            want_text: "RBAC: access denied",
            action: curl(&["http://10.244.2.2:9095/hello"]),
        },
        Step {
            name: "outside → helloworld-v1 pod",
            protocol: "HTTP/1.1",
            from: From::Outside,
            path: "uplink → agent:15006: STRICT refuses",
            identities: "(plaintext) → sample/helloworld",
            want: 0,
            want_text: "",
            action: curl(&["http://10.244.2.2:9095/hello"]),
        },
        Step {
            name: "sleep → helloworld",
            protocol: "HTTP/1.1",
            from: From::Pod("sleep"),
            path: "AuthorizationPolicy → 403",
            identities: "other/sleep → sample/helloworld",
            want: 403,
            want_text: "RBAC: access denied",
            action: curl(&["http://10.96.0.10:9095/hello"]),
        },
    ]
}
