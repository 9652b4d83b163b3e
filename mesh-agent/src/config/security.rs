//! `security.istio.io/v1` `PeerAuthentication` and `AuthorizationPolicy`: the
//! shapes Istio documents, with unknown fields rejected (a misspelt field in a
//! security policy must never be silently ignored), validated into
//! [`crate::policy`] types.
use std::{collections::BTreeMap, sync::Arc};

use serde::Deserialize;

use super::{
    k8s::ObjectMeta,
    object::{Ctx, TargetRef, name_and_namespace, targets},
};
use crate::state::security::{Action, AuthorizationPolicy, Cidr, MtlsMode, PeerAuthentication, Rule};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
    #[allow(dead_code)]
    pub status: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    pub selector: Option<Selector>,
    pub mtls: Option<Mtls>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicyObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
    #[allow(dead_code)]
    pub status: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub selector: Option<Selector>,
    pub target_ref: Option<TargetRef>,
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    pub action: Option<String>,
    pub provider: Option<ProviderRef>,
    pub rules: Option<Vec<RuleSpec>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderRef {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default)]
    pub from: Vec<FromSpec>,
    #[serde(default)]
    pub to: Vec<ToSpec>,
    #[serde(default)]
    pub when: Vec<ConditionSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromSpec {
    #[serde(default)]
    pub source: SourceSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    // Ambient waypoint-only selectors.
    pub service_accounts: Option<serde_yaml_ng::Value>,
    pub not_service_accounts: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToSpec {
    #[serde(default)]
    pub operation: OperationSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OperationSpec {
    #[serde(default)]
    pub ports: Vec<super::k8s::IntOrString>,
    #[serde(default)]
    pub not_ports: Vec<super::k8s::IntOrString>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConditionSpec {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

pub(super) fn selector(ctx: &mut Ctx<'_>, sel: &Option<Selector>) -> Option<BTreeMap<String, String>> {
    match sel {
        Some(s) if s.match_labels.is_empty() => {
            ctx.error("spec.selector.matchLabels", "empty: omit `selector` to select every workload");
            None
        }
        Some(s) => Some(s.match_labels.clone()),
        None => None,
    }
}

/// The target Services, the selector, and the target GatewayClass.
pub(super) type Attached = (Vec<Arc<str>>, Option<BTreeMap<String, String>>, Option<Arc<str>>);

/// The Services a policy is attached to by `targetRef(s)` (Istio's
/// `PolicyTargetReference`; other kinds are named errors), with Istio's rule
/// that a policy has a selector or targets, not both: the Services, and the
/// selector of a targeted Gateway's pods (else `selected`, the spec's), and
/// a targeted GatewayClass.
pub(super) fn attached_to(
    ctx: &mut Ctx<'_>,
    namespace: &str,
    selector: &Option<Selector>,
    (single, list): (Option<&TargetRef>, &[TargetRef]),
    selected: Option<BTreeMap<String, String>>,
) -> Attached {
    let targets = targets(ctx, namespace, single, list).unwrap_or_default();
    if selector.is_some() && (single.is_some() || !list.is_empty()) {
        ctx.error("spec.targetRefs", "only one of selector and targetRefs (as Istio)");
    }
    (targets.services, targets.gateway.or(selected), targets.gateway_class)
}

fn parse_mode(ctx: &mut Ctx<'_>, field: &str, m: &Mtls) -> Result<Option<MtlsMode>, ()> {
    match m.mode.as_deref() {
        None | Some("UNSET") => Ok(None),
        Some("STRICT") => Ok(Some(MtlsMode::Strict)),
        Some("PERMISSIVE") => Ok(Some(MtlsMode::Permissive)),
        Some("DISABLE") => Ok(Some(MtlsMode::Disable)),
        Some(other) => {
            ctx.error(field, format!("{other:?}: expected UNSET, STRICT, PERMISSIVE or DISABLE"));
            Err(())
        }
    }
}

pub(super) fn build_peer_authentication(
    ctx: &mut Ctx<'_>,
    obj: &PeerAuthenticationObject,
) -> Option<PeerAuthentication> {
    let (name, namespace) = name_and_namespace(ctx, &obj.metadata)?;
    let spec = &obj.spec;
    let selector = selector(ctx, &spec.selector);
    let mut ok = spec.selector.is_none() || selector.is_some();
    let mode = match &spec.mtls {
        Some(m) => parse_mode(ctx, "spec.mtls.mode", m).unwrap_or_else(|()| {
            ok = false;
            None
        }),
        None => None,
    };
    if !spec.port_level_mtls.is_empty() && selector.is_none() {
        ctx.error(
            "spec.portLevelMtls",
            "requires spec.selector (Istio applies port-level modes to selected workloads only)",
        );
        ok = false;
    }
    let mut port_modes = BTreeMap::new();
    for (port, m) in &spec.port_level_mtls {
        let field = format!("spec.portLevelMtls[{port}]");
        let Ok(p) = port.parse::<u16>() else {
            ctx.error(&field, format!("{port:?} is not a port number"));
            ok = false;
            continue;
        };
        match parse_mode(ctx, &format!("{field}.mode"), m) {
            Ok(Some(m)) if p != 0 => {
                port_modes.insert(p, m);
            }
            Ok(Some(_)) => {
                ctx.error(&field, "port 0 is out of range");
                ok = false;
            }
            Ok(None) => {}
            Err(()) => ok = false,
        }
    }
    ok.then_some(PeerAuthentication { name, namespace, selector, mode, port_modes })
}

pub(super) fn cidrs(ctx: &mut Ctx<'_>, field: &str, v: &[String]) -> Option<Vec<Cidr>> {
    let mut out = Vec::new();
    let mut ok = true;
    for (i, s) in v.iter().enumerate() {
        match Cidr::parse(s) {
            Ok(c) => out.push(c),
            Err(e) => {
                ctx.error(format!("{field}[{i}]"), e);
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

pub(super) fn ports(ctx: &mut Ctx<'_>, field: &str, v: &[super::k8s::IntOrString]) -> Option<Vec<u16>> {
    let mut out = Vec::new();
    let mut ok = true;
    for (i, p) in v.iter().enumerate() {
        let n = match p {
            super::k8s::IntOrString::Int(n) => Some(*n),
            super::k8s::IntOrString::String(s) => s.parse::<i64>().ok(),
        };
        match n.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0) {
            Some(n) => out.push(n),
            None => {
                ctx.error(format!("{field}[{i}]"), format!("{p:?} is not a port number 1-65535"));
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

pub(super) fn build_authorization_policy(
    ctx: &mut Ctx<'_>,
    obj: &AuthorizationPolicyObject,
    providers: &BTreeMap<String, Arc<crate::state::security::ExtAuthz>>,
) -> Option<AuthorizationPolicy> {
    let (name, namespace) = name_and_namespace(ctx, &obj.metadata)?;
    let spec = &obj.spec;
    let errors_before = ctx.error_count();
    let selected = selector(ctx, &spec.selector);
    let refs = (spec.target_ref.as_ref(), spec.target_refs.as_slice());
    let (services, selector, gateway_class) = attached_to(ctx, &namespace, &spec.selector, refs, selected);
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => Action::Custom,
        Some(other) => {
            ctx.error("spec.action", format!("{other:?}: expected ALLOW, DENY, AUDIT or CUSTOM"));
            Action::Allow
        }
    };
    let provider = match (&spec.provider, action) {
        (None, Action::Custom) => {
            ctx.error("spec.provider", "required with action CUSTOM: the name of an extensionProviders entry");
            None
        }
        (Some(p), Action::Custom) => match providers.get(&p.name) {
            Some(found) => Some(found.clone()),
            None => {
                let known: Vec<&str> = providers.keys().map(String::as_str).collect();
                ctx.error(
                    "spec.provider.name",
                    format!(
                        "{:?} is not an external authorizer in the mesh config's extensionProviders (known: {known:?})",
                        p.name
                    ),
                );
                None
            }
        },
        (Some(_), _) => {
            ctx.error("spec.provider", "only with action CUSTOM");
            None
        }
        (None, _) => None,
    };
    let rules =
        spec.rules.iter().flatten().enumerate().map(|(i, r)| rules::build_rule(ctx, &format!("spec.rules[{i}]"), r));
    let rules: Vec<Rule> = rules.collect();
    let policy = AuthorizationPolicy { name, namespace, selector, services, gateway_class, action, rules, provider };
    (ctx.error_count() == errors_before).then_some(policy)
}

pub(super) use request_authentication::{RequestAuthenticationObject, build_request_authentication};

mod request_authentication;
mod rules;
