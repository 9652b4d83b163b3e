//! Security policy, as Istio defines it: `PeerAuthentication` (which mTLS
//! mode a workload port requires) and `AuthorizationPolicy` (who may connect,
//! and which requests they may make), with the RequestAuthentications that
//! say which workloads check end-user JWTs.
//! Validated objects live in the [`State`]; the decisions here are pure
//! functions of it, tested with tables.
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use crate::state::security::*;
use crate::state::{ROOT_NAMESPACE, Service, State, Workload};

/// What a connection or request is judged for: the local meshed pod, and
/// the Service it was addressed to (told by the client's agent, else the
/// pod's Service whose port it is), whose attached policies apply too.
#[derive(Debug, Clone, Copy)]
pub struct Dest<'a> {
    pub pod: &'a Workload,
    pub service: Option<&'a Service>,
}

impl<'a> From<&'a Workload> for Dest<'a> {
    /// The pod alone: traffic not addressed to any of its Services.
    fn from(pod: &'a Workload) -> Self {
        Dest { pod, service: None }
    }
}

/// Who is connecting, as the destination agent knows it.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The SPIFFE ID proven by mTLS (or by capture on this node); `None` for plaintext.
    pub principal: Option<&'a str>,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied, naming the policy (`ns/name`) or `no ALLOW policy matched`.
    Deny(String),
}

fn selects(selector: &Option<BTreeMap<String, String>>, w: &Workload) -> bool {
    selector.as_ref().is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
}

/// The mTLS mode for connections to `port` (the pod's port) of `w`: the
/// workload's policy (port level first), then its namespace's, then the mesh's,
/// else PERMISSIVE.
pub fn peer_mode(state: &State, w: &Workload, port: u16) -> MtlsMode {
    let in_ns = |ns| state.peer_authentications_in(ns);
    let workload_level = in_ns(&w.namespace).filter(|p| p.selector.is_some() && selects(&p.selector, w));
    for p in workload_level {
        if let Some(m) = p.port_modes.get(&port) {
            return *m;
        }
        if let Some(m) = p.mode {
            return m;
        }
    }
    let namespace_level = in_ns(&w.namespace).filter(|p| p.selector.is_none()).find_map(|p| p.mode);
    let mesh_level = || in_ns(ROOT_NAMESPACE).filter(|p| p.selector.is_none()).find_map(|p| p.mode);
    namespace_level.or_else(mesh_level).unwrap_or(MtlsMode::Permissive)
}

/// What an HTTP request adds to its connection's attributes.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Normalised, without the query.
    pub path: &'a str,
    /// `Host` (`:authority`).
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The request's valid JWT, if it carried one.
    pub auth: Option<Auth<'a>>,
    /// The original client (`remote.ip`, `remoteIpBlocks`): the connection's
    /// client, as no proxy in front of the mesh is trusted to name another.
    pub remote_ip: Ipv4Addr,
}

/// A request's verified end-user identity (`request.auth.*`).
#[derive(Debug, Clone, Copy)]
pub struct Auth<'a> {
    /// `iss/sub`.
    pub principal: &'a str,
    pub audiences: &'a [String],
    pub presenter: Option<&'a str>,
    pub claims: &'a serde_json::Map<String, serde_json::Value>,
}

/// Everything a decision reads: who connects, to which port, and, for an
/// HTTP request, the request.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    pub peer: Peer<'a>,
    pub port: u16,
    /// `None` for a connection that is not HTTP (or not parsed as HTTP).
    pub request: Option<Request<'a>>,
}

/// A decision, and the AUDIT policy that matched (if one did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub audit: Option<String>,
}

const NO_ALLOW: &str = "no ALLOW policy matched";

/// Istio's evaluation at L4: a connection that is not HTTP.
pub fn authorize(state: &State, dest: Dest<'_>, peer: &Peer<'_>, port: u16) -> Verdict {
    evaluate(state, dest, &Attributes { peer: *peer, port, request: None }).verdict
}

/// Istio's evaluation, once for the policies that select the pod (by
/// selector, its namespace's, the mesh's: as its own proxy would judge) and
/// once for those attached to the Service it is addressed to (as that
/// Service's waypoint would judge): both must allow, so that attaching a
/// policy to a Service can only narrow what the pod's own policies allow.
///
/// Each evaluation: a matching DENY denies; else with no ALLOW policy, allow;
/// else allow only if an ALLOW policy matches. AUDIT policies decide
/// nothing; the first that matches is named.
///
/// Without a request, a rule naming HTTP-only fields (methods, paths, hosts,
/// request principals, remote IPs, request conditions) cannot be matched, and
/// Istio's documented answer is followed: in an ALLOW policy it grants
/// nothing; in a DENY policy its HTTP fields are ignored, so it denies on the
/// rest (failing closed).
pub fn evaluate(state: &State, dest: Dest<'_>, a: &Attributes<'_>) -> Decision {
    let ctx = Eval { a, dest_ip: dest.pod.ip };
    let pod = ctx.decide(|| selecting(state, dest.pod));
    let Some(svc) = dest.service else { return pod };
    let mut service = ctx.decide(|| attached(state, svc));
    if let Verdict::Deny(why) = &mut service.verdict
        && why == NO_ALLOW
    {
        *why = format!("no ALLOW policy attached to Service {}/{} matched", svc.namespace, svc.name);
    }
    let audit = pod.audit.or(service.audit);
    let verdict = if pod.verdict == Verdict::Allow { service.verdict } else { pod.verdict };
    Decision { verdict, audit }
}

/// The CUSTOM policies whose authorizers must be asked about this request,
/// before DENY and ALLOW are judged: for each layer (the pod's, then its
/// Service's), the first (its namespace's, then the mesh's, by name) whose
/// rules match.
pub fn custom<'s>(state: &'s State, dest: Dest<'_>, a: &Attributes<'_>) -> Vec<&'s AuthorizationPolicy> {
    let ctx = Eval { a, dest_ip: dest.pod.ip };
    let asks = |p: &&AuthorizationPolicy| p.action == Action::Custom && ctx.policy_matches(p);
    let pod = selecting(state, dest.pod).find(asks);
    let service = dest.service.and_then(|svc| attached(state, svc).find(asks));
    pod.into_iter().chain(service).collect()
}

/// Whether a request to `dest` must be parsed as HTTP at its destination: a
/// RequestAuthentication, a CUSTOM policy or an AuthorizationPolicy with
/// HTTP-only rules applies to it.
pub fn needs_request(state: &State, dest: Dest<'_>) -> bool {
    let http = |p: &AuthorizationPolicy| p.action == Action::Custom || p.rules.iter().any(Rule::is_http);
    let service = dest
        .service
        .is_some_and(|svc| authentications_attached(state, svc).next().is_some() || attached(state, svc).any(http));
    service || request_authentications(state, dest.pod).next().is_some() || selecting(state, dest.pod).any(http)
}

/// The JWT rules of the RequestAuthentications that apply to `dest` (those
/// selecting the pod, its namespace's then the mesh-wide ones, in name
/// order; then those attached to its Service).
pub fn jwt_rules<'s>(state: &'s State, dest: Dest<'_>) -> Vec<&'s JwtRule> {
    let attached = dest.service.into_iter().flat_map(|svc| authentications_attached(state, svc));
    request_authentications(state, dest.pod).chain(attached).flat_map(|p| p.rules.iter().map(|r| &**r)).collect()
}

/// The workload's namespace, then the mesh-wide root namespace (once).
fn namespaces(w: &Workload) -> impl Iterator<Item = &str> {
    let root = (&*w.namespace != ROOT_NAMESPACE).then_some(ROOT_NAMESPACE);
    std::iter::once(&*w.namespace).chain(root)
}

/// The AuthorizationPolicies that select `w` (not those attached to a
/// Service), its namespace's first.
fn selecting<'s, 'w>(state: &'s State, w: &'w Workload) -> impl Iterator<Item = &'s AuthorizationPolicy> + use<'s, 'w> {
    let policies = namespaces(w).flat_map(|ns| state.authorization_policies_in(ns));
    policies.filter(|p| p.services.is_empty() && selects_or_class(&p.selector, p.gateway_class.as_ref(), w))
}

/// The AuthorizationPolicies attached to `svc` by `targetRefs`.
fn attached<'s, 'v>(state: &'s State, svc: &'v Service) -> impl Iterator<Item = &'s AuthorizationPolicy> + use<'s, 'v> {
    state.authorization_policies_in(&svc.namespace).filter(|p| p.services.contains(&svc.name))
}

/// The RequestAuthentications that select `w`, its namespace's first.
fn request_authentications<'s, 'w>(
    state: &'s State,
    w: &'w Workload,
) -> impl Iterator<Item = &'s RequestAuthentication> + use<'s, 'w> {
    let policies = namespaces(w).flat_map(|ns| state.request_authentications_in(ns));
    policies.filter(|p| p.services.is_empty() && selects_or_class(&p.selector, p.gateway_class.as_ref(), w))
}

/// A policy attached to a GatewayClass judges the pods of that class's
/// Gateways alone (never the root namespace's whole mesh); any other, by
/// its selector.
fn selects_or_class(selector: &Option<BTreeMap<String, String>>, class: Option<&Arc<str>>, w: &Workload) -> bool {
    match class {
        Some(c) => w.gateway_class.as_ref() == Some(c),
        None => selects(selector, w),
    }
}

/// The RequestAuthentications attached to `svc` by `targetRefs`.
fn authentications_attached<'s, 'v>(
    state: &'s State,
    svc: &'v Service,
) -> impl Iterator<Item = &'s RequestAuthentication> + use<'s, 'v> {
    state.request_authentications_in(&svc.namespace).filter(|p| p.services.contains(&svc.name))
}

struct Eval<'a> {
    a: &'a Attributes<'a>,
    dest_ip: Option<Ipv4Addr>,
}

impl Eval<'_> {
    /// One layer's decision over its `policies` (called once per action).
    fn decide<'s, I: Iterator<Item = &'s AuthorizationPolicy>>(&self, policies: impl Fn() -> I) -> Decision {
        let audit = policies()
            .filter(|p| p.action == Action::Audit)
            .find(|p| self.policy_matches(p))
            .map(|p| format!("{}/{}", p.namespace, p.name));
        let decide = |verdict| Decision { verdict, audit: audit.clone() };
        // CUSTOM asks an authorizer about requests (see [`custom`]); a
        // connection that is not HTTP cannot be asked about, and is refused.
        if self.a.request.is_none()
            && let Some(p) = policies().filter(|p| p.action == Action::Custom).find(|p| self.policy_matches(p))
        {
            return decide(Verdict::Deny(format!("{}/{} (CUSTOM, not HTTP)", p.namespace, p.name)));
        }
        if let Some(p) = policies().filter(|p| p.action == Action::Deny).find(|p| self.policy_matches(p)) {
            return decide(Verdict::Deny(format!("{}/{}", p.namespace, p.name)));
        }
        let mut allows = policies().filter(|p| p.action == Action::Allow).peekable();
        if allows.peek().is_none() {
            return decide(Verdict::Allow);
        }
        if allows.any(|p| self.policy_matches(p)) {
            decide(Verdict::Allow)
        } else {
            decide(Verdict::Deny(NO_ALLOW.into()))
        }
    }

    /// Any rule matches. No rules: matches nothing (so an empty ALLOW denies all).
    fn policy_matches(&self, p: &AuthorizationPolicy) -> bool {
        let l4 = self.a.request.is_none();
        p.rules.iter().any(|r| {
            if l4 && matches!(p.action, Action::Allow | Action::Audit) && r.is_http() {
                return false;
            }
            (r.from.is_empty() || r.from.iter().any(|s| self.source(s)))
                && (r.to.is_empty() || r.to.iter().any(|o| self.operation(o)))
                && r.when.iter().all(|c| self.condition(c))
        })
    }

    fn principal(&self) -> Option<&str> {
        // Istio writes principals without the scheme: `cluster.local/ns/x/sa/y`.
        self.a.peer.principal.map(|p| p.strip_prefix("spiffe://").unwrap_or(p))
    }

    fn namespace(&self) -> Option<&str> {
        self.principal().and_then(|p| {
            let mut it = p.split('/');
            it.find(|s| *s == "ns").and_then(|_| it.next())
        })
    }

    fn source(&self, s: &Source) -> bool {
        let principal = self.principal();
        let namespace = self.namespace();
        let ip = self.a.peer.ip;
        let l4 = matches_l4(&s.principals, &s.not_principals, principal)
            && matches_l4(&s.namespaces, &s.not_namespaces, namespace)
            && in_blocks(&s.ip_blocks, &s.not_ip_blocks, ip);
        // Without a request, HTTP-only fields are ignored (only DENY gets here).
        let Some(req) = &self.a.request else { return l4 };
        let request_principal = req.auth.map(|a| a.principal);
        l4 && matches_l4(&s.request_principals, &s.not_request_principals, request_principal)
            && in_blocks(&s.remote_ip_blocks, &s.not_remote_ip_blocks, req.remote_ip)
    }

    fn operation(&self, o: &Operation) -> bool {
        let port = self.a.port;
        let l4 = (o.ports.is_empty() || o.ports.contains(&port)) && !o.not_ports.contains(&port);
        let Some(req) = &self.a.request else { return l4 };
        let host = |pats: &[Pattern]| pats.iter().any(|p| host_matches(p, req.host));
        l4 && (o.hosts.is_empty() || host(&o.hosts))
            && !host(&o.not_hosts)
            && matches_l4(&o.methods, &o.not_methods, Some(req.method))
            && matches_l4(&o.paths, &o.not_paths, Some(req.path))
    }

    fn condition(&self, c: &Condition) -> bool {
        use std::borrow::Cow;
        let (ip, strings): (Option<Ipv4Addr>, Vec<Cow<'_, str>>) = match &c.key {
            ConditionKey::SourceIp => (Some(self.a.peer.ip), vec![]),
            ConditionKey::DestinationIp => (self.dest_ip, vec![]),
            ConditionKey::DestinationPort => {
                let port = self.a.port;
                let hit = |v: &[Value]| v.contains(&Value::Port(port));
                return (c.values.is_empty() || hit(&c.values)) && !hit(&c.not_values);
            }
            ConditionKey::SourceNamespace => (None, self.namespace().map(Cow::Borrowed).into_iter().collect()),
            ConditionKey::SourcePrincipal => (None, self.principal().map(Cow::Borrowed).into_iter().collect()),
            // HTTP keys without a request: ignored (only DENY gets here).
            _ if self.a.request.is_none() => return true,
            key => {
                let Some(req) = &self.a.request else { return true };
                match key {
                    ConditionKey::RemoteIp => (Some(req.remote_ip), vec![]),
                    ConditionKey::RequestHeader(name) => {
                        let values = req.headers.get_all(name.as_str()).into_iter();
                        (None, values.filter_map(|v| v.to_str().ok()).map(Cow::Borrowed).collect())
                    }
                    ConditionKey::RequestPrincipal => {
                        (None, req.auth.map(|a| Cow::Borrowed(a.principal)).into_iter().collect())
                    }
                    ConditionKey::RequestAudiences => (
                        None,
                        req.auth
                            .into_iter()
                            .flat_map(|a| a.audiences.iter().map(|s| Cow::Borrowed(s.as_str())))
                            .collect(),
                    ),
                    ConditionKey::RequestPresenter => {
                        (None, req.auth.and_then(|a| a.presenter).map(Cow::Borrowed).into_iter().collect())
                    }
                    ConditionKey::RequestClaim(path) => {
                        (None, req.auth.map(|a| claim_values(a.claims, path)).unwrap_or_default())
                    }
                    _ => (None, vec![]),
                }
            }
        };
        let hit = |values: &[Value]| {
            values.iter().any(|v| match (v, ip) {
                (Value::Cidr(c), Some(ip)) => c.contains(ip),
                (Value::Pattern(p), _) => strings.iter().any(|s| p.matches(s)),
                _ => false,
            })
        };
        (c.values.is_empty() || hit(&c.values)) && !hit(&c.not_values)
    }
}

/// `values` (any, if given) and `not_values` (none) against an attribute
/// that may be absent: an absent one matches no value.
fn matches_l4(values: &[Pattern], not_values: &[Pattern], v: Option<&str>) -> bool {
    let any = |pats: &[Pattern]| v.is_some_and(|v| pats.iter().any(|p| p.matches(v)));
    (values.is_empty() || any(values)) && (not_values.is_empty() || !any(not_values))
}

fn in_blocks(blocks: &[Cidr], not_blocks: &[Cidr], ip: Ipv4Addr) -> bool {
    (blocks.is_empty() || blocks.iter().any(|c| c.contains(ip))) && !not_blocks.iter().any(|c| c.contains(ip))
}

/// Hosts compare case-insensitively (patterns are kept lowercase); a pattern
/// without a port matches the host with any port, as Istio's does.
fn host_matches(p: &Pattern, host: &str) -> bool {
    let has_port = |s: &str| s.rsplit_once(':').is_some_and(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()));
    let pattern_port = match p {
        Pattern::Exact(s) | Pattern::Prefix(s) | Pattern::Suffix(s) => has_port(s),
        Pattern::Any => return true,
    };
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !pattern_port && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    match p {
        Pattern::Exact(s) => host.eq_ignore_ascii_case(s),
        Pattern::Prefix(s) => host.get(..s.len()).is_some_and(|h| h.eq_ignore_ascii_case(s)),
        Pattern::Suffix(s) => {
            host.len() >= s.len() && host.get(host.len() - s.len()..).is_some_and(|h| h.eq_ignore_ascii_case(s))
        }
        Pattern::Any => true,
    }
}

/// A claim by its path (`request.auth.claims[a][b]`), as the strings policy
/// compares: a string, each string of a list, or a number or boolean written out.
pub fn claim_values<'a>(
    claims: &'a serde_json::Map<String, serde_json::Value>,
    path: &[String],
) -> Vec<std::borrow::Cow<'a, str>> {
    use serde_json::Value as J;
    let Some(mut v) = path.first().and_then(|p| claims.get(p)) else { return Vec::new() };
    for p in &path[1..] {
        match v.get(p) {
            Some(next) => v = next,
            None => return Vec::new(),
        }
    }
    let one = |v: &'a J| match v {
        J::String(s) => Some(std::borrow::Cow::Borrowed(s.as_str())),
        J::Bool(_) | J::Number(_) => Some(std::borrow::Cow::Owned(v.to_string())),
        _ => None,
    };
    match v {
        J::Array(list) => list.iter().filter_map(one).collect(),
        v => one(v).into_iter().collect(),
    }
}

#[cfg(test)]
mod tests;
