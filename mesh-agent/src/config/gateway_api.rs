//! The Kubernetes Gateway API (`gateway.networking.k8s.io`), as far as this
//! version reads it: `HTTPRoute` attached to a Service (GAMMA: the mesh's
//! traffic to that Service routed as a VirtualService routes it, at the
//! source agent) and `ReferenceGrant` for its cross-namespace backends. The
//! shapes are the API's `v1` (`v1beta1` read too), unknown fields rejected;
//! each route becomes rules of the routing model ([`http_route`]).
//!
//! Sources: gateway-api.sigs.k8s.io/reference/spec (HTTPRoute, ReferenceGrant),
//! gateway-api.sigs.k8s.io/mesh (GAMMA: producer and consumer routes).
use serde::Deserialize;

use super::k8s::ObjectMeta;

pub(super) mod gateway;
pub(super) mod http_route;
pub(super) mod stream_route;

/// The controller names whose GatewayClasses this mesh serves: its own,
/// and Istio's (so that Istio's samples, `gatewayClassName: istio`, work).
pub const CONTROLLERS: [&str; 2] = ["mesh-agent.dev/gateway-controller", "istio.io/gateway-controller"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayClassObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewayClassSpec,
    #[allow(dead_code)]
    pub status: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayClassSpec {
    #[serde(default)]
    pub controller_name: String,
    pub parameters_ref: Option<serde_yaml_ng::Value>,
    #[allow(dead_code)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
    #[allow(dead_code)]
    pub status: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<ListenerSpec>,
    pub addresses: Option<serde_yaml_ng::Value>,
    pub infrastructure: Option<serde_yaml_ng::Value>,
    pub backend_tls: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenerSpec {
    #[serde(default)]
    pub name: String,
    pub hostname: Option<String>,
    #[serde(default)]
    pub port: i64,
    #[serde(default)]
    pub protocol: String,
    pub tls: Option<ListenerTls>,
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenerTls {
    pub mode: Option<String>,
    #[serde(default)]
    pub certificate_refs: Vec<SecretRef>,
    pub options: Option<serde_yaml_ng::Value>,
    pub frontend_validation: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowedRoutes {
    pub namespaces: Option<RouteNamespaces>,
    #[serde(default)]
    pub kinds: Vec<RouteKind>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteNamespaces {
    pub from: Option<String>,
    pub selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: std::collections::BTreeMap<String, String>,
    pub match_expressions: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteKind {
    pub group: Option<String>,
    #[serde(default)]
    pub kind: String,
}

pub(super) const GROUP: &str = "gateway.networking.k8s.io";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
    #[allow(dead_code)]
    pub status: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Option<Timeouts>,
    pub retry: Option<serde_yaml_ng::Value>,
    pub session_persistence: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchSpec {
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    pub method: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FilterSpec {
    #[serde(rename = "type", default)]
    pub kind: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_redirect: Option<RedirectSpec>,
    #[serde(rename = "urlRewrite")]
    pub url_rewrite: Option<RewriteSpec>,
    pub request_mirror: Option<MirrorSpec>,
    // Known fields of filter types refused by `type` (never silently unknown).
    #[allow(dead_code)]
    pub extension_ref: Option<serde_yaml_ng::Value>,
    #[allow(dead_code)]
    pub cors: Option<serde_yaml_ng::Value>,
    #[allow(dead_code)]
    pub external_auth: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<NameValue>,
    #[serde(default)]
    pub add: Vec<NameValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameValue {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedirectSpec {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<i64>,
    pub status_code: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type", default)]
    pub kind: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteSpec {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MirrorSpec {
    #[serde(default)]
    pub backend_ref: BackendRef,
    pub percent: Option<i64>,
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fraction {
    pub numerator: i64,
    pub denominator: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i64>,
    pub weight: Option<i64>,
    #[serde(default)]
    pub filters: Vec<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

/// `GRPCRoute`: routed as the HTTPRoute it amounts to (a method is a path,
/// `/<service>/<method>`), so that both kinds share one precedence.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GrpcRouteSpec,
    #[allow(dead_code)]
    pub status: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRuleSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRuleSpec {
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcMatchSpec>,
    #[serde(default)]
    pub filters: Vec<GrpcFilterSpec>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    pub session_persistence: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMatchSpec {
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub service: Option<String>,
    pub method: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcFilterSpec {
    #[serde(rename = "type", default)]
    pub kind: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_mirror: Option<MirrorSpec>,
    pub extension_ref: Option<serde_yaml_ng::Value>,
}

impl GrpcRouteObject {
    /// The HTTPRoute it amounts to: each method match a path match (exact
    /// `/<service>/<method>`, a prefix `/<service>/`, or a regular
    /// expression), the rest as it is.
    pub(super) fn as_http_route(&self) -> HttpRouteObject {
        let rules = self.spec.rules.iter().map(|r| RuleSpec {
            name: r.name.clone(),
            matches: r.matches.iter().map(GrpcMatchSpec::as_http_match).collect(),
            filters: r
                .filters
                .iter()
                .map(|f| FilterSpec {
                    // The HTTP-only filters are not a GRPCRoute's.
                    kind: match f.kind.as_str() {
                        k @ ("RequestRedirect" | "URLRewrite") => format!("{k} (an HTTPRoute filter)"),
                        k => k.to_owned(),
                    },
                    request_header_modifier: f.request_header_modifier.clone(),
                    response_header_modifier: f.response_header_modifier.clone(),
                    request_mirror: f.request_mirror.clone(),
                    extension_ref: f.extension_ref.clone(),
                    ..FilterSpec::default()
                })
                .collect(),
            backend_refs: r.backend_refs.clone(),
            session_persistence: r.session_persistence.clone(),
            ..RuleSpec::default()
        });
        HttpRouteObject {
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            metadata: self.metadata.clone(),
            spec: HttpRouteSpec {
                parent_refs: self.spec.parent_refs.clone(),
                hostnames: self.spec.hostnames.clone(),
                rules: rules.collect(),
            },
            status: None,
        }
    }
}

impl GrpcMatchSpec {
    fn as_http_match(&self) -> MatchSpec {
        let path = self.method.as_ref().map(|m| {
            let (service, method) = (m.service.as_deref(), m.method.as_deref());
            match (m.kind.as_deref().unwrap_or("Exact"), service, method) {
                ("Exact", Some(s), Some(me)) => {
                    PathMatch { kind: Some("Exact".into()), value: Some(format!("/{s}/{me}")) }
                }
                ("Exact", Some(s), None) => PathMatch { kind: Some("PathPrefix".into()), value: Some(format!("/{s}")) },
                ("Exact", None, Some(me)) => PathMatch {
                    kind: Some("RegularExpression".into()),
                    value: Some(format!("/[^/]+/{}", regex_lite::escape(me))),
                },
                ("Exact", None, None) => PathMatch { kind: Some("PathPrefix".into()), value: Some("/".into()) },
                ("RegularExpression", s, me) => PathMatch {
                    kind: Some("RegularExpression".into()),
                    value: Some(format!("/{}/{}", s.unwrap_or("[^/]+"), me.unwrap_or("[^/]+"))),
                },
                (other, _, _) => PathMatch { kind: Some(format!("{other} (method)")), value: Some("/".into()) },
            }
        });
        MatchSpec { path, headers: self.headers.clone(), ..MatchSpec::default() }
    }
}

/// `TCPRoute` and `TLSRoute` (the experimental channel's): a Gateway's TCP
/// or TLS passthrough listener sends connections (TLS by their SNI, among
/// `hostnames`) to weighted backends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StreamRouteObject {
    #[allow(dead_code)]
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: StreamRouteSpec,
    #[allow(dead_code)]
    pub status: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StreamRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// TLSRoute only: the SNI names.
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<StreamRuleSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StreamRuleSpec {
    #[allow(dead_code)]
    pub name: Option<String>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// `ReferenceGrant`: which kinds in which namespaces may refer to objects of
/// this one (the Gateway API's only way across namespaces).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReferenceGrantObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ReferenceGrantSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceGrantSpec {
    #[serde(default)]
    pub from: Vec<GrantFrom>,
    #[serde(default)]
    pub to: Vec<GrantTo>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantFrom {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantTo {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    pub name: Option<String>,
}

/// Whether a ReferenceGrant in `to_namespace` lets an object of `from_kind`
/// in `from_namespace` refer to the core object `to_kind` named `to_name`.
pub(super) fn granted(
    grants: &[ReferenceGrantObject],
    from_kind: &str,
    from_namespace: &str,
    to_kind: &str,
    to_namespace: &str,
    to_name: &str,
) -> bool {
    grants.iter().filter(|g| g.metadata.namespace.as_deref().unwrap_or("default") == to_namespace).any(|g| {
        let from = g.spec.from.iter().any(|f| f.group == GROUP && f.kind == from_kind && f.namespace == from_namespace);
        let to = g.spec.to.iter().any(|t| {
            matches!(t.group.as_str(), "" | "core")
                && t.kind == to_kind
                && t.name.as_deref().is_none_or(|n| n == to_name)
        });
        from && to
    })
}
