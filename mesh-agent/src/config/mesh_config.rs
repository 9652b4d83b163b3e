//! The mesh-wide settings the agent takes from Istio's MeshConfig (the `mesh`
//! key of ConfigMap `istio-system/istio`).
use std::{collections::BTreeMap, sync::Arc};

use serde::Deserialize;

use super::object::Ctx;
use crate::state::{
    AccessLogSettings, OutboundPolicy, PathNormalization, log_format::Format, security::ExtAuthz, trace::TraceSettings,
};

mod providers;
mod trace;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshConfig {
    outbound_traffic_policy: Option<OutboundTrafficPolicySpec>,
    path_normalization: Option<PathNormalizationSpec>,
    #[serde(default)]
    extension_providers: Vec<serde_yaml_ng::Value>,
    access_log_file: Option<String>,
    access_log_encoding: Option<String>,
    access_log_format: Option<String>,
    default_providers: Option<trace::DefaultProviders>,
    default_config: Option<trace::ProxyConfig>,
    mesh_id: Option<String>,
}

/// What the agent reads of MeshConfig.
#[derive(Debug, Default)]
pub(super) struct MeshSettings {
    pub outbound: OutboundPolicy,
    pub paths: PathNormalization,
    /// The external authorizers among `extensionProviders`, by name.
    pub providers: BTreeMap<String, Arc<ExtAuthz>>,
    pub access_log: AccessLogSettings,
    pub tracing: TraceSettings,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathNormalizationSpec {
    normalization: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboundTrafficPolicySpec {
    mode: Option<String>,
}

/// What the agent reads of the `mesh` key of ConfigMap `istio-system/istio`:
/// `outboundTrafficPolicy.mode`, `pathNormalization.normalization`, the
/// access log's file, encoding and format, the external authorizers and
/// OpenTelemetry tracers of `extensionProviders`, `defaultProviders.tracing`,
/// `defaultConfig.tracing` and `meshId` (other MeshConfig fields, and other
/// kinds of providers, are Istio's and ignored).
pub(super) fn mesh_config(ctx: &mut Ctx<'_>, data: &BTreeMap<String, String>) -> MeshSettings {
    let Some(text) = data.get("mesh") else { return Default::default() };
    let mesh: MeshConfig = match serde_yaml_ng::from_str::<Option<MeshConfig>>(text) {
        Ok(m) => m.unwrap_or_default(),
        Err(e) => {
            ctx.error("data.mesh", format!("not valid MeshConfig YAML: {e}"));
            return Default::default();
        }
    };
    let outbound = match mesh.outbound_traffic_policy.and_then(|p| p.mode).as_deref() {
        None | Some("ALLOW_ANY") => OutboundPolicy::AllowAny,
        Some("REGISTRY_ONLY") => OutboundPolicy::RegistryOnly,
        Some(other) => {
            ctx.error(
                "data.mesh.outboundTrafficPolicy.mode",
                format!("{other:?}: expected ALLOW_ANY or REGISTRY_ONLY"),
            );
            OutboundPolicy::AllowAny
        }
    };
    let paths = match mesh.path_normalization.and_then(|p| p.normalization).as_deref() {
        None | Some("DEFAULT") | Some("BASE") => PathNormalization::Base,
        Some("NONE") => PathNormalization::None,
        Some("MERGE_SLASHES") => PathNormalization::MergeSlashes,
        Some("DECODE_AND_MERGE_SLASHES") => PathNormalization::DecodeAndMergeSlashes,
        Some(other) => {
            ctx.error(
                "data.mesh.pathNormalization.normalization",
                format!("{other:?}: expected NONE, BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES"),
            );
            PathNormalization::Base
        }
    };
    let providers = providers::ext_authz(ctx, &mesh.extension_providers);
    let access_log = access_log(ctx, mesh.access_log_file, mesh.access_log_encoding, mesh.access_log_format);
    let proxy_tracing = mesh.default_config.and_then(|c| c.tracing);
    let tracing = trace::settings(ctx, &mesh.extension_providers, mesh.default_providers, proxy_tracing, mesh.mesh_id);
    MeshSettings { outbound, paths, providers, access_log, tracing }
}

/// `accessLogFile`, `accessLogEncoding` and `accessLogFormat`, as Istio
/// reads them: the file (`""`: off; absent: the agent's `--access-log`),
/// `TEXT` (the default) or `JSON`, and an Envoy format (Istio's own when
/// empty). A format the agent cannot fill is refused, and Istio's default
/// for the encoding is used.
fn access_log(
    ctx: &mut Ctx<'_>,
    file: Option<String>,
    encoding: Option<String>,
    format: Option<String>,
) -> AccessLogSettings {
    let json = match encoding.as_deref() {
        None | Some("TEXT") => false,
        Some("JSON") => true,
        Some(other) => {
            ctx.error("data.mesh.accessLogEncoding", format!("{other:?}: expected TEXT or JSON"));
            false
        }
    };
    let format = match format.as_deref().filter(|f| !f.trim().is_empty()) {
        None => Format::istio_default(json),
        Some(f) => Format::parse(f, json).unwrap_or_else(|e| {
            ctx.error("data.mesh.accessLogFormat", e.to_string());
            Format::istio_default(json)
        }),
    };
    AccessLogSettings { file: file.map(Arc::from), format: Arc::new(format) }
}
