//! The destination side's one door. Every connection that arrives for a
//! local meshed pod is judged here the same way: PeerAuthentication for a
//! client without an identity, then either the destination's HTTP stage
//! (the pod's policies need its requests) or L4 authorization; a connection
//! admitted as such is connected to the pod and registered, so that a policy
//! change reaches it.
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
    state::{State, Workload, security::MtlsMode},
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
    if wanted(state, dest, port) {
        return Ok(Admission::Http(arrival));
    }
    let peer = Peer { principal: arrival.principal.as_deref(), ip: arrival.client_ip };
    if let Verdict::Deny(policy) = authorize(state, dest, &peer, port) {
        return Err(ProxyError::Denied { policy });
    }
    Ok(Admission::Tcp(arrival))
}

/// Whether connections to `dest`'s `port` are served by the HTTP stage: its policies
/// need requests and the port is not declared as opaque TCP.
fn wanted(state: &State, dest: &Workload, port: u16) -> bool {
    policy::needs_request(state, dest)
        && state.service_port_of(dest, port).is_none_or(|(_, p)| declared(p) != Declared::Tcp)
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
}
