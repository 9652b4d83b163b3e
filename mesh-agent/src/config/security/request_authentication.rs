//! `RequestAuthentication`: which end-user JWTs a workload accepts, validated
//! into [`crate::state::security::RequestAuthentication`]. The key set is
//! parsed here, so that a key the agent could not use is an error naming it,
//! not a token refused later.
use std::sync::Arc;

use serde::Deserialize;

use super::{Ctx, Selector, TargetRef, attached_to, name_and_namespace, selector};
use crate::config::k8s::ObjectMeta;
use crate::state::security::{JwtRule, RequestAuthentication, TokenHeader};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RequestAuthenticationSpec,
    #[allow(dead_code)]
    pub status: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    pub selector: Option<Selector>,
    pub target_ref: Option<TargetRef>,
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRuleSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtRuleSpec {
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks_uri: Option<String>,
    pub jwks: Option<String>,
    #[serde(default)]
    pub from_headers: Vec<HeaderSpec>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub forward_original_token: bool,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeaderSpec>,
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeaderSpec {
    #[serde(default)]
    pub header: String,
    #[serde(default)]
    pub claim: String,
}

pub(in crate::config) fn build_request_authentication(
    ctx: &mut Ctx<'_>,
    obj: &RequestAuthenticationObject,
) -> Option<RequestAuthentication> {
    let (name, namespace) = name_and_namespace(ctx, &obj.metadata)?;
    let spec = &obj.spec;
    let errors_before = ctx.error_count();
    let selected = selector(ctx, &spec.selector);
    let refs = (spec.target_ref.as_ref(), spec.target_refs.as_slice());
    let (services, selector, gateway_class) = attached_to(ctx, &namespace, &spec.selector, refs, selected);
    let mut rules = Vec::with_capacity(spec.jwt_rules.len());
    for (i, r) in spec.jwt_rules.iter().enumerate() {
        let field = format!("spec.jwtRules[{i}]");
        if spec.jwt_rules[..i].iter().any(|other| other.issuer == r.issuer) {
            ctx.error(format!("{field}.issuer"), format!("{:?} has a rule already: one rule per issuer", r.issuer));
        }
        if let Some(rule) = jwt_rule(ctx, &field, r) {
            rules.push(Arc::new(rule));
        }
    }
    (ctx.error_count() == errors_before).then_some(RequestAuthentication {
        name,
        namespace,
        selector,
        services,
        gateway_class,
        rules,
    })
}

fn jwt_rule(ctx: &mut Ctx<'_>, field: &str, r: &JwtRuleSpec) -> Option<JwtRule> {
    if r.issuer.is_empty() {
        ctx.error(format!("{field}.issuer"), "required");
    }
    let keys = match (r.jwks.as_deref(), &r.jwks_uri) {
        (Some(_), Some(_)) => {
            ctx.error(format!("{field}.jwksUri"), "set one of jwks and jwksUri, not both");
            None
        }
        (Some(text), None) => {
            crate::identity::jwt::parse_jwks(text).map_err(|e| ctx.error(format!("{field}.jwks"), e)).ok()
        }
        (None, Some(uri)) => match crate::identity::jwt::jwks::parse_uri(uri) {
            Ok(_) => Some(Vec::new().into()),
            Err(e) => {
                ctx.error(format!("{field}.jwksUri"), e);
                None
            }
        },
        (None, None) => {
            ctx.error(
                format!("{field}.jwks"),
                "one of jwks (the issuer's JSON Web Key Set) and jwksUri (where to fetch it) is required",
            );
            None
        }
    };
    let timeout = match &r.timeout {
        None => Some(crate::identity::jwt::jwks::DEFAULT_TIMEOUT),
        Some(t) => match crate::config::networking::parse_duration(t) {
            Ok(d) => Some(d),
            Err(e) => {
                ctx.error(format!("{field}.timeout"), e);
                None
            }
        },
    };
    for (i, a) in r.audiences.iter().enumerate() {
        if a.is_empty() {
            ctx.error(format!("{field}.audiences[{i}]"), "empty value");
        }
    }
    let mut from_headers = Vec::with_capacity(r.from_headers.len());
    for (i, h) in r.from_headers.iter().enumerate() {
        if header_name(ctx, &format!("{field}.fromHeaders[{i}].name"), &h.name) {
            from_headers.push(TokenHeader { name: h.name.to_ascii_lowercase(), prefix: h.prefix.clone() });
        }
    }
    for (list, name) in [(&r.from_params, "fromParams"), (&r.from_cookies, "fromCookies")] {
        for (i, p) in list.iter().enumerate() {
            if p.is_empty() {
                ctx.error(format!("{field}.{name}[{i}]"), "empty name");
            }
        }
    }
    if let Some(h) = &r.output_payload_to_header {
        header_name(ctx, &format!("{field}.outputPayloadToHeader"), h);
    }
    let mut output_claim_to_headers = Vec::with_capacity(r.output_claim_to_headers.len());
    for (i, c) in r.output_claim_to_headers.iter().enumerate() {
        let ok = header_name(ctx, &format!("{field}.outputClaimToHeaders[{i}].header"), &c.header);
        if c.claim.is_empty() {
            ctx.error(format!("{field}.outputClaimToHeaders[{i}].claim"), "required");
        } else if ok {
            output_claim_to_headers.push((c.header.to_ascii_lowercase(), c.claim.clone()));
        }
    }
    Some(JwtRule {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        keys: keys?,
        jwks_uri: r.jwks_uri.clone(),
        timeout: timeout?,
        from_headers,
        from_params: r.from_params.clone(),
        from_cookies: r.from_cookies.clone(),
        output_payload_to_header: r.output_payload_to_header.as_ref().map(|h| h.to_ascii_lowercase()),
        output_claim_to_headers,
        forward_original_token: r.forward_original_token,
    })
}

/// Whether `name` is a valid HTTP header name (reported if not).
fn header_name(ctx: &mut Ctx<'_>, field: &str, name: &str) -> bool {
    if name.is_empty() {
        ctx.error(field, "required");
        return false;
    }
    if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() || name.starts_with(':') {
        ctx.error(field, format!("{name:?} is not a valid HTTP header name"));
        return false;
    }
    true
}
