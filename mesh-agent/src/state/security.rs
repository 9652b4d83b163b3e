//! Security policy as admitted: `PeerAuthentication` (which mTLS mode a
//! workload port requires), `AuthorizationPolicy` (who may connect, and which
//! requests they may make) and `RequestAuthentication` (which end-user JWTs
//! are valid). Plain data with its matching primitives; the decisions are in
//! [`crate::routing::policy`], the token checks in [`crate::identity::jwt`].
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Only mTLS (HBONE) connections are admitted.
    Strict,
    /// mTLS and plaintext are both admitted (Istio's default).
    Permissive,
    /// As PERMISSIVE for plaintext arriving at the node; mesh traffic between
    /// agents stays mTLS (as in Istio ambient, where the tunnel is always mTLS).
    Disable,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerAuthentication {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `spec.selector.matchLabels`; `None` applies to the whole namespace.
    pub selector: Option<BTreeMap<String, String>>,
    /// `None` is UNSET: inherit from the namespace, then the mesh.
    pub mode: Option<MtlsMode>,
    pub port_modes: BTreeMap<u16, MtlsMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    /// Grants and denies nothing: a matching request is recorded as audited.
    Audit,
    /// A matching request is checked by an external authorizer first.
    Custom,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuthorizationPolicy {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub selector: Option<BTreeMap<String, String>>,
    /// The Services of `namespace` it is attached to (`targetRefs`): it then
    /// judges only traffic addressed to one of them, and `selector` is `None`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Arc<str>>,
    /// The GatewayClass it is attached to (`targetRefs`, root namespace
    /// only): it then judges the pods of every Gateway of that class, and
    /// `selector` is `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_class: Option<Arc<str>>,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// For CUSTOM: the extension provider (MeshConfig `extensionProviders`) to ask.
    pub provider: Option<Arc<ExtAuthz>>,
}

/// Matches when any `from` matches (or there is none), any `to` matches (or
/// there is none) and every `when` condition holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

/// Every non-empty field must match.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Source {
    pub principals: Vec<Pattern>,
    pub not_principals: Vec<Pattern>,
    pub namespaces: Vec<Pattern>,
    pub not_namespaces: Vec<Pattern>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
    /// HTTP only: the request's JWT principal, `iss/sub`.
    pub request_principals: Vec<Pattern>,
    pub not_request_principals: Vec<Pattern>,
    /// HTTP only: the original client's address.
    pub remote_ip_blocks: Vec<Cidr>,
    pub not_remote_ip_blocks: Vec<Cidr>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    /// HTTP only. Hosts match case-insensitively (patterns kept lowercase).
    pub hosts: Vec<Pattern>,
    pub not_hosts: Vec<Pattern>,
    pub methods: Vec<Pattern>,
    pub not_methods: Vec<Pattern>,
    /// Matched against the normalised path, without the query.
    pub paths: Vec<Pattern>,
    pub not_paths: Vec<Pattern>,
}

/// A `when` condition: the attribute named by `key` matches one of `values`
/// (if any) and none of `not_values`.
#[derive(Debug, Clone, Serialize)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: Vec<Value>,
    pub not_values: Vec<Value>,
}

/// Istio's condition keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ConditionKey {
    /// `request.headers[name]`, the name lowercase.
    RequestHeader(String),
    RequestPrincipal,
    RequestAudiences,
    RequestPresenter,
    /// `request.auth.claims[a][b]`: the path into nested claims.
    RequestClaim(Vec<String>),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
}

/// A condition value: an address block for the `*.ip` keys, a port for
/// `destination.port`, else a string pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Value {
    Pattern(Pattern),
    Cidr(Cidr),
    Port(u16),
}

/// `RequestAuthentication`: the JWTs a workload accepts.
#[derive(Debug, Clone, Serialize)]
pub struct RequestAuthentication {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub selector: Option<BTreeMap<String, String>>,
    /// As [`AuthorizationPolicy::services`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Arc<str>>,
    /// As [`AuthorizationPolicy::gateway_class`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_class: Option<Arc<str>>,
    pub rules: Vec<Arc<JwtRule>>,
}

/// One `jwtRules[]` entry.
#[derive(Debug, Clone, Serialize)]
pub struct JwtRule {
    pub issuer: String,
    /// Empty: the token's audience is not checked.
    pub audiences: Vec<String>,
    /// The issuer's keys given inline (`jwks`); empty when fetched from `jwks_uri`.
    pub keys: Arc<[JwtKey]>,
    /// Where the keys are fetched from (HTTPS), when not given inline.
    pub jwks_uri: Option<String>,
    /// How long a request may wait for keys being fetched.
    pub timeout: std::time::Duration,
    /// Where the token may be: empty headers and params mean Istio's defaults
    /// (`Authorization: Bearer`, `?access_token=`).
    pub from_headers: Vec<TokenHeader>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    pub output_payload_to_header: Option<String>,
    pub output_claim_to_headers: Vec<(String, String)>,
    pub forward_original_token: bool,
}

/// A verification key from the issuer's key set.
#[derive(Clone, Serialize)]
pub struct JwtKey {
    pub kid: Option<String>,
    /// The key's `alg`, when the set names one: only that algorithm may use it.
    pub alg: Option<jsonwebtoken::Algorithm>,
    /// What kind of key: `RSA`, `EC` or `OKP`.
    pub kty: &'static str,
    #[serde(skip)]
    pub key: jsonwebtoken::DecodingKey,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey").field("kid", &self.kid).field("alg", &self.alg).field("kty", &self.kty).finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenHeader {
    /// Lowercase.
    pub name: String,
    pub prefix: String,
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// An external authorizer (MeshConfig `extensionProviders[]` with
/// `envoyExtAuthzHttp` or `envoyExtAuthzGrpc`), spoken to as Envoy speaks to one.
#[derive(Debug, Clone, Serialize)]
pub struct ExtAuthz {
    pub name: String,
    pub kind: ExtAuthzKind,
    /// The authorizer's Service host (`name.namespace.svc.cluster.local`, or
    /// a ServiceEntry host), and its port.
    pub service: String,
    pub port: u16,
    pub timeout: std::time::Duration,
    /// Let the request through when the authorizer cannot be asked (or
    /// answers 5xx over HTTP).
    pub fail_open: bool,
    /// The status a request gets when the authorizer cannot be asked.
    pub status_on_error: u16,
    /// Send the request body (at most this many bytes) in the check.
    pub body: Option<BodyInCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub enum ExtAuthzKind {
    Http(HttpAuthz),
    /// `envoy.service.auth.v3.Authorization/Check`.
    Grpc,
}

/// The HTTP authorizer's settings. Header names are patterns (exact,
/// `prefix*`, `*suffix`), lowercase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HttpAuthz {
    pub path_prefix: String,
    pub include_request_headers: Vec<Pattern>,
    pub include_additional_headers: Vec<(String, String)>,
    pub headers_to_upstream_on_allow: Vec<Pattern>,
    pub headers_to_downstream_on_allow: Vec<Pattern>,
    /// Empty: every header of the authorizer's answer.
    pub headers_to_downstream_on_deny: Vec<Pattern>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct BodyInCheck {
    pub max_bytes: u32,
    /// A larger body is cut to `max_bytes` (else refused with 413).
    pub allow_partial: bool,
    /// gRPC: the body as bytes (`raw_body`) rather than as text.
    pub pack_as_bytes: bool,
}

// === impl Pattern ===

impl Pattern {
    pub fn parse(s: &str) -> Pattern {
        if s == "*" {
            Pattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Pattern::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            Pattern::Suffix(p.to_owned())
        } else {
            Pattern::Exact(s.to_owned())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(s) => v.ends_with(s.as_str()),
            Pattern::Any => true,
        }
    }
}

// === impl Cidr ===

impl Cidr {
    /// `a.b.c.d` or `a.b.c.d/n`.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, p.parse::<u8>().map_err(|_| format!("{s:?}: bad prefix length"))?),
            None => (s, 32),
        };
        let addr: Ipv4Addr = ip.parse().map_err(|_| format!("{s:?} is not an IPv4 address or CIDR"))?;
        if prefix > 32 {
            return Err(format!("{s:?}: prefix length above 32"));
        }
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

// === impl Rule ===

impl Rule {
    /// Whether the rule names anything only an HTTP request has: on a
    /// connection that is not HTTP, Istio ignores such a rule in an ALLOW
    /// policy (it grants nothing) and its HTTP fields in a DENY policy (it
    /// denies on the rest).
    pub fn is_http(&self) -> bool {
        self.from.iter().any(Source::is_http)
            || self.to.iter().any(Operation::is_http)
            || self.when.iter().any(|c| c.key.is_http())
    }
}

impl Source {
    fn is_http(&self) -> bool {
        !(self.request_principals.is_empty()
            && self.not_request_principals.is_empty()
            && self.remote_ip_blocks.is_empty()
            && self.not_remote_ip_blocks.is_empty())
    }
}

impl Operation {
    fn is_http(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
}

impl ConditionKey {
    pub fn is_http(&self) -> bool {
        matches!(
            self,
            ConditionKey::RequestHeader(_)
                | ConditionKey::RequestPrincipal
                | ConditionKey::RequestAudiences
                | ConditionKey::RequestPresenter
                | ConditionKey::RequestClaim(_)
                | ConditionKey::RemoteIp
        )
    }

    /// Istio's key syntax: `source.ip`, `request.headers[x-user]`,
    /// `request.auth.claims[groups]`, `request.auth.claims[a][b]`.
    pub fn parse(key: &str) -> Result<ConditionKey, String> {
        let fixed = match key {
            "request.auth.principal" => Some(ConditionKey::RequestPrincipal),
            "request.auth.audiences" => Some(ConditionKey::RequestAudiences),
            "request.auth.presenter" => Some(ConditionKey::RequestPresenter),
            "source.ip" => Some(ConditionKey::SourceIp),
            "remote.ip" => Some(ConditionKey::RemoteIp),
            "source.namespace" => Some(ConditionKey::SourceNamespace),
            "source.principal" => Some(ConditionKey::SourcePrincipal),
            "destination.ip" => Some(ConditionKey::DestinationIp),
            "destination.port" => Some(ConditionKey::DestinationPort),
            // Istio's `connection.sni` is the server name of the mTLS between
            // sidecars; HBONE carries none to match, and a client's own TLS is
            // bytes to the agent: a condition on it could never be met as
            // written, so it is refused rather than silently never true.
            "connection.sni" => {
                return Err(format!(
                    "{key:?} is not supported: connections reach a workload over HBONE, which carries no server name of the workload's, and a client's own TLS passes through unread"
                ));
            }
            _ => None,
        };
        if let Some(k) = fixed {
            return Ok(k);
        }
        let bracketed = |prefix: &str| -> Option<Result<Vec<String>, String>> {
            let rest = key.strip_prefix(prefix)?;
            let mut parts = Vec::new();
            let mut rest = rest;
            while !rest.is_empty() {
                let Some(inner) = rest.strip_prefix('[') else {
                    return Some(Err(format!("{key:?}: expected `[name]` after {prefix:?}")));
                };
                let Some((name, after)) = inner.split_once(']') else {
                    return Some(Err(format!("{key:?}: `[` without `]`")));
                };
                if name.is_empty() {
                    return Some(Err(format!("{key:?}: empty name in `[]`")));
                }
                parts.push(name.to_owned());
                rest = after;
            }
            Some(if parts.is_empty() { Err(format!("{key:?}: expected `[name]` after {prefix:?}")) } else { Ok(parts) })
        };
        if let Some(parts) = bracketed("request.headers") {
            let mut parts = parts?;
            if parts.len() != 1 {
                return Err(format!("{key:?}: request.headers takes one header name"));
            }
            return Ok(ConditionKey::RequestHeader(parts.remove(0).to_ascii_lowercase()));
        }
        if let Some(parts) = bracketed("request.auth.claims") {
            return Ok(ConditionKey::RequestClaim(parts?));
        }
        Err(format!(
            "{key:?} is not a supported key (request.headers[...], request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[...], source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port)"
        ))
    }
}
