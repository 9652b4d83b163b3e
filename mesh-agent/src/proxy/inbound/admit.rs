//! The destination side's one door. Every connection that arrives for a
//! local meshed pod is judged here the same way: PeerAuthentication for a
//! client without an identity, then either the destination's HTTP stage
//! (a port that may carry HTTP: its requests are counted with
//! `reporter="destination"`, and judged when the pod's policies need them)
//! or L4 authorization; a connection admitted as such is connected to the
//! pod and registered, so that a policy change reaches it.
use std::{sync::Arc, time::Duration};

use tokio::net::TcpStream;

use super::Inbound;
use crate::{
    proxy::{
        Inputs, ProxyError, conns,
        l4::{connect, register},
    },
    routing::{
        policy::{self, Peer, Verdict, authorize, peer_mode},
        protocol::{Declared, declared},
    },
    state::{
        State, Workload,
        security::MtlsMode,
        telemetry::{Logging, MetricSet},
    },
};

/// How an arrival was admitted.
pub(crate) enum Admission {
    /// Its requests are judged one by one: the destination's HTTP stage
    /// takes the stream ([`super::http::serve`]).
    Http(Inbound),
    /// Authorized as a connection: [`connect_admitted`] reaches the pod.
    Tcp(Inbound),
}

/// Judges `arrival`, for the local meshed pod it names.
pub(crate) fn admit(state: &State, arrival: Inbound) -> Result<Admission, ProxyError> {
    let (dest, port) = (&arrival.dest, arrival.target.port());
    if arrival.principal.is_none() && peer_mode(state, dest, port) == MtlsMode::Strict {
        return Err(ProxyError::PlaintextRefused { pod: format!("{}/{}", dest.namespace, dest.name), port });
    }
    let needs_request = policy::needs_request(state, arrival.judged_as(state));
    let http = may_carry_http(state, dest, port) && (needs_request || (!arrival.opaque && counted(state, &arrival)));
    if http && needs_request {
        return Ok(Admission::Http(arrival));
    }
    // No rule needs the request: the connection is judged once, here, and
    // refused as a whole as ztunnel refuses it; one admitted may still have
    // its requests counted.
    let peer = Peer { principal: arrival.principal.as_deref(), ip: arrival.client_ip };
    if let Verdict::Deny(policy) = authorize(state, arrival.judged_as(state), &peer, port) {
        return Err(ProxyError::Denied { policy });
    }
    Ok(if http { Admission::Http(arrival) } else { Admission::Tcp(arrival) })
}

/// Whether `dest`'s `port` may carry HTTP: it is not declared opaque TCP.
/// Connections to it are served by the HTTP stage when the pod's policies
/// need requests, or to count them (Istio's default reporting,
/// `CLIENT_AND_SERVER`) unless this node's source side already found the
/// stream opaque.
fn may_carry_http(state: &State, dest: &Workload, port: u16) -> bool {
    state.service_port_of(dest, port).is_none_or(|(_, p)| declared(p) != Declared::Tcp)
}

/// Whether the pod's requests are reported here: its Telemetries (and those
/// attached to the Service the arrival is for) leave a request metric on or
/// its access log not off, as a server.
fn counted(state: &State, arrival: &Inbound) -> bool {
    let service = arrival.service_in(state).map_or("unknown", |s| &*s.hostname);
    let side = state.reporting(arrival.dest.ip, true, service);
    !side.off.contains(MetricSet::REQUESTS) || side.logging != Logging::Off
}

/// Connects an arrival authorized as a connection to its pod (from the
/// client's address where replies come back here) and registers it.
pub(crate) async fn connect_admitted(
    ctx: &Inputs,
    arrival: &Inbound,
    timeout: Duration,
) -> Result<(TcpStream, conns::Guard), ProxyError> {
    let upstream = connect(arrival.target, arrival.transparent, timeout).await?;
    let guard = register(ctx, authorized(arrival, None), &upstream, arrival.target)?;
    Ok((upstream, guard))
}

/// What a policy change judges again: the arrival, and for a tunnel upgraded
/// from a request, that request. A client without an identity is plaintext
/// (from outside the mesh); same-node and HBONE clients have one.
pub(crate) fn authorized(arrival: &Inbound, request: Option<Arc<conns::RequestSnapshot>>) -> conns::Authorized {
    conns::Authorized {
        dest_ip: *arrival.target.ip(),
        port: arrival.target.port(),
        principal: arrival.principal.clone(),
        peer_ip: arrival.client_ip,
        plaintext: arrival.principal.is_none(),
        service: arrival.service.as_ref().map(|s| s.hostname.clone()),
        request,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, SocketAddr, SocketAddrV4},
        sync::Arc,
    };

    use super::{Admission, Inbound, admit, authorized};
    use crate::proxy::{ProxyError, inputs::testing::TestInputs};

    const CLUSTER: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n\
        ---\napiVersion: v1\nkind: Pod\nmetadata: {name: hello, namespace: demo, labels: {app: hello}}\n\
        spec: {nodeName: n1, serviceAccountName: hello}\nstatus: {podIP: 10.244.0.3}\n\
        ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: demo}\n\
        spec: {mtls: {mode: STRICT}}\n";

    fn arrival(t: &TestInputs, principal: Option<&str>, mtls: bool) -> Inbound {
        Inbound { opaque: true, ..may_speak_http(t, principal, mtls) }
    }

    /// An arrival the source side did not find opaque (HBONE, plaintext, HTTP).
    fn may_speak_http(t: &TestInputs, principal: Option<&str>, mtls: bool) -> Inbound {
        let state = t.inputs.state();
        let dest = state.workload_by_ip(Ipv4Addr::new(10, 244, 0, 3)).expect("hello").clone();
        Inbound {
            dest,
            target: SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 3), 8080),
            peer: SocketAddr::from(([10, 244, 0, 2], 40_000)),
            principal: principal.map(Arc::from),
            client_ip: Ipv4Addr::new(10, 244, 0, 2),
            source: None,
            transparent: None,
            mtls,
            service: None,
            opaque: false,
        }
    }

    #[test]
    fn every_door_judges_alike_and_only_an_identityless_client_is_plaintext() {
        let extra = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                     metadata: {name: only-test, namespace: demo}\n\
                     spec: {action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/test]}}]}]}\n";
        let t = TestInputs::new(&format!("{CLUSTER}{extra}"));
        let state = t.inputs.state();
        let test = Some("spiffe://cluster.local/ns/demo/sa/test");
        // HBONE (mTLS) and same-node (capture) clients alike: admitted as
        // connections, and never taken for plaintext when policy is judged again.
        for mtls in [true, false] {
            let Ok(Admission::Tcp(a)) = admit(&state, arrival(&t, test, mtls)) else {
                panic!("test refused (mtls {mtls})")
            };
            assert!(!authorized(&a, None).plaintext, "a client with an identity was registered as plaintext");
        }
        let other = Some("spiffe://cluster.local/ns/demo/sa/other");
        assert!(matches!(admit(&state, arrival(&t, other, true)), Err(ProxyError::Denied { .. })));
        // No identity under STRICT: refused before any policy.
        assert!(matches!(admit(&state, arrival(&t, None, false)), Err(ProxyError::PlaintextRefused { .. })));
    }

    #[test]
    fn a_pod_whose_policies_need_requests_gets_the_http_stage() {
        let http_rule = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                         metadata: {name: paths, namespace: demo}\n\
                         spec: {action: ALLOW, rules: [{to: [{operation: {paths: [/public]}}]}]}\n";
        let t = TestInputs::new(&format!("{CLUSTER}{http_rule}"));
        let state = t.inputs.state();
        let a = admit(&state, arrival(&t, Some("spiffe://cluster.local/ns/demo/sa/test"), false));
        assert!(matches!(a, Ok(Admission::Http(_))));
    }

    #[test]
    fn requests_are_counted_at_the_destination_unless_the_port_is_opaque() {
        let service = "---\napiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: demo}\n\
                       spec: {selector: {app: hello}, ports: [{name: tcp-raw, port: 9000}, {name: http, port: 8080}]}\n";
        let t = TestInputs::new(&format!("{CLUSTER}{service}"));
        let state = t.inputs.state();
        let id = Some("spiffe://cluster.local/ns/demo/sa/test");
        // (port, the source side found it opaque) → served by the HTTP stage
        let cases = [(8080, false, true), (8080, true, false), (9000, false, false), (7000, false, true)];
        for (port, opaque, http) in cases {
            let mut a = Inbound { opaque, ..may_speak_http(&t, id, true) };
            a.target.set_port(port);
            let got = admit(&state, a);
            assert_eq!(matches!(got, Ok(Admission::Http(_))), http, "port {port}, opaque {opaque}");
        }
        // Plaintext (no identity) is counted too, when PeerAuthentication admits it.
        let permissive = CLUSTER.replace("mode: STRICT", "mode: PERMISSIVE");
        let t = TestInputs::new(&format!("{permissive}{service}"));
        assert!(matches!(admit(&t.inputs.state(), may_speak_http(&t, None, false)), Ok(Admission::Http(_))));
    }

    #[test]
    fn the_destination_labels_name_the_service_the_client_addressed_or_guess_it() {
        let services = "---\napiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: demo}\n\
                        spec: {selector: {app: hello}, ports: [{name: http, port: 80, targetPort: 8080}]}\n\
                        ---\napiVersion: v1\nkind: Service\nmetadata: {name: alias, namespace: demo}\n\
                        spec: {selector: {app: hello}, ports: [{name: http, port: 8080}]}\n";
        let t = TestInputs::new(&format!("{CLUSTER}{services}"));
        let state = t.inputs.state();
        const TEST: &str = "spiffe://cluster.local/ns/demo/sa/test";
        let id = Some(TEST);
        let hello = state.workload_by_ip([10, 244, 0, 3].into()).expect("hello").clone();
        let told = state.service_of_endpoint(&hello, "hello.demo.svc.cluster.local", 8080).cloned();
        assert!(told.is_some(), "hello selects its pod");
        let labels = Inbound { service: told, ..may_speak_http(&t, id, true) }.labels(&state);
        assert_eq!((&*labels.destination_service, labels.reporter), ("hello.demo.svc.cluster.local", "destination"));
        assert_eq!((&*labels.source_principal, labels.connection_security_policy), (TEST, "mutual_tls"));
        // Not told: the first Service (by name) whose target port this is.
        let guessed = may_speak_http(&t, None, false).labels(&state);
        assert_eq!(&*guessed.destination_service, "alias.demo.svc.cluster.local");
        assert_eq!((&*guessed.source_principal, guessed.connection_security_policy), ("unknown", "none"));
        // A Service that does not select the pod is never taken from a peer.
        assert!(state.service_of_endpoint(&hello, "kubernetes.default.svc.cluster.local", 8080).is_none());
        // A Service of the pod, but not for this port: a claim not kept.
        assert!(state.service_of_endpoint(&hello, "hello.demo.svc.cluster.local", 9000).is_none());
    }

    #[test]
    fn only_a_meshed_destination_is_labelled_with_a_principal() {
        let plain = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: plain, labels: {app: web}}\n\
                     spec: {nodeName: n1, serviceAccountName: web}\nstatus: {podIP: 10.244.0.9}\n";
        let t = TestInputs::new(&format!("{CLUSTER}{plain}"));
        let state = t.inputs.state();
        let label = |ip: [u8; 4]| {
            let w = state.workload_by_ip(ip.into()).expect("pod");
            crate::telemetry::TcpLabels::new(None, Some(w), None, false).destination_principal
        };
        assert_eq!(&*label([10, 244, 0, 9]), "unknown");
        assert_eq!(&*label([10, 244, 0, 3]), "spiffe://cluster.local/ns/demo/sa/hello");
    }
}
