//! What every kind's validation shares, and nothing else: the error
//! collector ([`Ctx`]), names, addresses and ports, and Secrets. A leaf: it
//! imports no other module of `config` but the plain Kubernetes types.
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use serde::Deserialize;

use super::{
    ConfigError, Origin,
    k8s::{self, ObjectMeta},
};

/// Collects errors against one object.
pub(super) struct Ctx<'a> {
    pub(super) origin: &'a Origin,
    pub(super) object: String,
    pub(super) errors: &'a mut Vec<ConfigError>,
}

impl Ctx<'_> {
    pub(super) fn object(&self) -> &str {
        &self.object
    }

    pub(super) fn error_count(&self) -> usize {
        self.errors.len()
    }

    /// Rewrites the field prefix `from` to `to` in the errors reported since `since`.
    pub(super) fn rename_errors_since(&mut self, since: usize, from: &str, to: &str) {
        for e in self.errors.iter_mut().skip(since) {
            if let Some(rest) = e.field.strip_prefix(from) {
                e.field = format!("{to}{rest}");
            }
        }
    }

    /// Rewrites `from` to `to` anywhere in the fields of the errors reported
    /// since `since` (a kind checked as another names its fields so).
    pub(super) fn rename_in_errors_since(&mut self, since: usize, from: &str, to: &str) {
        for e in self.errors.iter_mut().skip(since) {
            e.field = e.field.replace(from, to);
        }
    }

    /// Reports an error (once: a setting checked again, as a policy
    /// inherited by subsets and ports is, is not reported twice).
    pub(super) fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let e = ConfigError {
            origin: self.origin.clone(),
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        };
        if !self.errors.contains(&e) {
            self.errors.push(e);
        }
    }
}

pub(super) fn parse_ip(ctx: &mut Ctx<'_>, field: &str, s: &str) -> Option<Ipv4Addr> {
    match s.parse::<Ipv4Addr>() {
        Ok(ip) => Some(ip),
        Err(_) if s.parse::<std::net::Ipv6Addr>().is_ok() => {
            ctx.error(field, format!("{s:?}: IPv6 is not supported yet"));
            None
        }
        Err(_) => {
            ctx.error(field, format!("{s:?} is not an IPv4 address"));
            None
        }
    }
}

pub(super) fn parse_port(ctx: &mut Ctx<'_>, field: &str, p: i64) -> Option<u16> {
    match u16::try_from(p) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            ctx.error(field, format!("port {p} is out of range 1-65535"));
            None
        }
    }
}

/// Kubernetes IANA_SVC_NAME: 1-15 lowercase alphanumerics or '-', with a letter,
/// not starting or ending with '-'.
pub(super) fn valid_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

pub(super) fn require_name(ctx: &mut Ctx<'_>, meta: &k8s::ObjectMeta) -> Option<Arc<str>> {
    match meta.name.as_deref() {
        Some(n) if !n.is_empty() => Some(n.into()),
        _ => {
            ctx.error("metadata.name", "required");
            None
        }
    }
}

/// The object's name (required) and namespace (`default` when absent).
pub(super) fn name_and_namespace(ctx: &mut Ctx<'_>, meta: &ObjectMeta) -> Option<(Arc<str>, Arc<str>)> {
    let name = require_name(ctx, meta)?;
    Some((name, meta.namespace.as_deref().unwrap_or("default").into()))
}

/// A Kubernetes `Secret` (only `kubernetes.io/tls` and `Opaque` ones are read,
/// when a Gateway or DestinationRule names them).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SecretObject {
    pub metadata: ObjectMeta,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Base64 values, as the API server returns them.
    pub data: BTreeMap<String, String>,
    /// Plain values, as one may write them.
    pub string_data: BTreeMap<String, String>,
}

impl SecretObject {
    /// The decoded value of `key` (`stringData` wins, as in Kubernetes).
    pub fn value(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        use base64::Engine as _;
        if let Some(v) = self.string_data.get(key) {
            return Ok(Some(v.as_bytes().to_vec()));
        }
        match self.data.get(key) {
            Some(v) => base64::engine::general_purpose::STANDARD
                .decode(v.split_whitespace().collect::<String>())
                .map(Some)
                .map_err(|e| format!("data[{key}] is not valid base64: {e}")),
            None => Ok(None),
        }
    }
}

/// Secrets by `namespace/name`.
pub type Secrets = BTreeMap<String, SecretObject>;

/// A policy's `targetRef`/`targetRefs` entry (Istio's `PolicyTargetReference`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
    pub section_name: Option<String>,
}

/// The label a Gateway API gateway's pods carry: its Gateway's name.
pub(super) const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// What a policy's `targetRef`/`targetRefs` attach it to, in its own
/// namespace: Services, or one Gateway API Gateway (whose pods carry its
/// name in `gateway.networking.k8s.io/gateway-name`).
#[derive(Debug, Default)]
pub(super) struct Targets {
    pub services: Vec<Arc<str>>,
    /// The Gateway's pods, as a selector of the policy's namespace.
    pub gateway: Option<BTreeMap<String, String>>,
    /// A GatewayClass: the pods of every Gateway of that class (a policy of
    /// the root namespace only, as Istio).
    pub gateway_class: Option<Arc<str>>,
}

/// The targets `targetRef` and `targetRefs` name; any other kind is an
/// error naming it, and so is a target in another namespace (Istio allows
/// only the policy's own), more than one Gateway, or Gateways with Services.
/// A GatewayClass may be targeted from the root namespace alone (Istio's
/// rule: a class spans every tenant's Gateways), one per policy and alone.
pub(super) fn targets(
    ctx: &mut Ctx<'_>,
    namespace: &str,
    single: Option<&TargetRef>,
    list: &[TargetRef],
) -> Option<Targets> {
    let before = ctx.error_count();
    let entries = single.map(|t| ("spec.targetRef".to_owned(), t));
    let entries = entries.into_iter().chain(list.iter().enumerate().map(|(i, t)| (format!("spec.targetRefs[{i}]"), t)));
    let mut out = Targets::default();
    for (field, t) in entries {
        let gateway = match (t.group.as_str(), t.kind.as_str()) {
            ("" | "core", "Service") => false,
            ("gateway.networking.k8s.io", "Gateway") => true,
            ("gateway.networking.k8s.io", "GatewayClass") => {
                if namespace != crate::state::ROOT_NAMESPACE {
                    let root = crate::state::ROOT_NAMESPACE;
                    ctx.error(
                        format!("{field}.kind"),
                        format!("a GatewayClass is targeted only by a policy of the root namespace {root} (as Istio): it spans every namespace's Gateways"),
                    );
                } else if t.name.is_empty() {
                    ctx.error(format!("{field}.name"), "required");
                } else if out.gateway_class.is_some() {
                    ctx.error(field, "one GatewayClass per policy in this version of mesh-agent");
                } else {
                    out.gateway_class = Some(Arc::from(t.name.as_str()));
                }
                continue;
            }
            ("networking.istio.io", "ServiceEntry") => {
                ctx.error(
                    format!("{field}.kind"),
                    "ServiceEntry targets are not supported by this version of mesh-agent",
                );
                continue;
            }
            (group, kind) => {
                ctx.error(
                    format!("{field}.kind"),
                    format!("{group:?} {kind:?}: expected a Service (group \"\") or a Gateway (group gateway.networking.k8s.io)"),
                );
                continue;
            }
        };
        if t.name.is_empty() {
            ctx.error(format!("{field}.name"), "required");
        }
        if let Some(ns) = t.namespace.as_deref().filter(|ns| *ns != namespace) {
            ctx.error(format!("{field}.namespace"), format!("{ns:?}: a policy may target only its own namespace"));
        }
        if t.section_name.is_some() {
            ctx.error(format!("{field}.sectionName"), "is not supported by this version of mesh-agent");
        }
        if !gateway {
            out.services.push(Arc::from(t.name.as_str()));
        } else if out.gateway.is_some() {
            ctx.error(field, "one Gateway per policy in this version of mesh-agent");
        } else {
            let label = GATEWAY_NAME_LABEL.to_owned();
            out.gateway = Some(BTreeMap::from([(label, t.name.clone())]));
        }
    }
    if out.gateway.is_some() && !out.services.is_empty() {
        ctx.error("spec.targetRefs", "a Gateway and Services in one policy: write one policy for each");
    }
    if out.gateway_class.is_some() && (out.gateway.is_some() || !out.services.is_empty()) {
        ctx.error("spec.targetRefs", "a GatewayClass and other targets in one policy: write one policy for each");
    }
    (ctx.error_count() == before).then_some(out)
}

/// Istio's precedence among objects that claim the same thing: the oldest
/// first (by `creationTimestamp`; objects without one, as files written by
/// hand, after those with one), then by namespace and name.
pub(super) fn by_age<'a>(
    created: &'a Option<String>,
    namespace: &'a str,
    name: &'a str,
) -> (bool, &'a Option<String>, &'a str, &'a str) {
    (created.is_none(), created, namespace, name)
}
