//! The mesh-wide settings the agent takes from Istio's MeshConfig (the `mesh`
//! key of ConfigMap `istio-system/istio`).
use std::{collections::BTreeMap, sync::Arc};

use serde::Deserialize;

use super::object::Ctx;
use crate::state::{OutboundPolicy, PathNormalization, security::ExtAuthz};

mod providers;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshConfig {
    outbound_traffic_policy: Option<OutboundTrafficPolicySpec>,
    path_normalization: Option<PathNormalizationSpec>,
    #[serde(default)]
    extension_providers: Vec<serde_yaml_ng::Value>,
}

/// What the agent reads of MeshConfig.
#[derive(Debug, Default)]
pub(super) struct MeshSettings {
    pub outbound: OutboundPolicy,
    pub paths: PathNormalization,
    /// The external authorizers among `extensionProviders`, by name.
    pub providers: BTreeMap<String, Arc<ExtAuthz>>,
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
/// `outboundTrafficPolicy.mode`, `pathNormalization.normalization` and the
/// external authorizers of `extensionProviders` (other MeshConfig fields,
/// and other kinds of providers, are Istio's and ignored).
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
    MeshSettings { outbound, paths, providers }
}
