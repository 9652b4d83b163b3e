//! `GRPCRoute`, read as the HTTPRoute its methods amount to.
use serde::Deserialize;

use super::{
    BackendRef, FilterSpec, HeaderModifier, HttpRouteObject, HttpRouteSpec, MatchSpec, MirrorSpec, ObjectMeta,
    ParentRef, PathMatch, RuleSpec, ValueMatch,
};

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
    pub(in crate::config) fn as_http_route(&self) -> HttpRouteObject {
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
