//! The CA on Kubernetes (`mesh-agent ca --kubernetes`): an agent proves
//! which node it runs on with its pod's projected ServiceAccount token. The
//! CA asks the API server (TokenReview, with the CA's own audience) who the
//! token belongs to, requires a trusted node-agent service account and a
//! token bound to a pod, finds that pod (name and UID) in its own view, and
//! takes the pod's node. Bootstrap token files stay for the file mode.
use hyper::StatusCode;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};

use crate::{discovery::Kind, state::State};

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// How the CA authenticates agents on Kubernetes.
#[derive(Debug, Clone)]
pub struct KubeAuthConfig {
    /// The audience agents' tokens must be issued for (`mesh-ca`).
    pub audience: String,
    /// Service accounts (`namespace/name`) whose pods are node agents.
    pub trusted_node_accounts: Vec<String>,
}

pub(super) struct KubeAuth {
    pub(super) client: Client,
    pub(super) config: KubeAuthConfig,
}

/// A refusal: the status (401, 403, or 503 to retry) and why.
pub(super) type Refusal = (StatusCode, String);

impl KubeAuth {
    /// The node whose agent presented `token`, in the CA's view `state`.
    pub(super) async fn node_of(&self, token: &str, state: &State) -> Result<String, Refusal> {
        let unauthorized = |m: String| (StatusCode::UNAUTHORIZED, m);
        if token.is_empty() {
            return Err(unauthorized("missing bearer token".into()));
        }
        let audience = &self.config.audience;
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![audience.clone()]) },
            ..Default::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let answer = reviews.create(&PostParams::default(), &review).await.map_err(|e| {
            (StatusCode::SERVICE_UNAVAILABLE, format!("cannot review the token with the API server ({e}); retry"))
        })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(unauthorized(format!("token refused by the API server: {why}")));
        }
        // The API server checked it; checked again, in case it ignored the audience.
        if !status.audiences.unwrap_or_default().iter().any(|a| a == audience) {
            return Err(unauthorized(format!("the token is not issued for audience {audience:?}")));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let account = username.strip_prefix("system:serviceaccount:").and_then(|a| a.split_once(':'));
        let Some((namespace, name)) = account else {
            return Err((StatusCode::FORBIDDEN, format!("{username} is not a service account")));
        };
        let account = format!("{namespace}/{name}");
        if !self.config.trusted_node_accounts.contains(&account) {
            let message = format!("service account {account} is not a node agent's (--trusted-node-accounts)");
            return Err((StatusCode::FORBIDDEN, message));
        }
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod), Some(uid)) = (one(POD_NAME), one(POD_UID)) else {
            return Err(unauthorized("the token is not bound to a pod (use a projected ServiceAccount token)".into()));
        };
        let key = format!("{namespace}/{pod}");
        let Some(workload) = state.workloads.get(&key) else {
            return Err((StatusCode::SERVICE_UNAVAILABLE, format!("pod {key} not seen by the CA yet; retry")));
        };
        if workload.uid.as_deref() != Some(uid.as_str()) {
            return Err(unauthorized(format!("the token's pod {key} (uid {uid}) no longer exists")));
        }
        match &workload.node {
            Some(node) => Ok(node.to_string()),
            None => Err((StatusCode::SERVICE_UNAVAILABLE, format!("pod {key} is not scheduled yet; retry"))),
        }
    }
}

/// Asks the API server (SelfSubjectAccessReview) whether the CA may review
/// tokens and read what it watches; names everything it may not do.
pub async fn missing_permissions(client: &Client, kinds: &[Kind]) -> Result<Vec<String>, kube::Error> {
    let mut wanted = vec![("create", "authentication.k8s.io".to_owned(), "tokenreviews".to_owned())];
    for k in kinds {
        for verb in ["list", "watch"] {
            wanted.push((verb, k.group.to_owned(), k.plural.to_owned()));
        }
    }
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    for (verb, group, resource) in wanted {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.to_owned()),
                    group: Some(group.clone()),
                    resource: Some(resource.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = reviews.create(&PostParams::default(), &review).await?;
        if !answer.status.is_some_and(|s| s.allowed) {
            let group = if group.is_empty() { "core".to_owned() } else { group };
            missing.push(format!("{verb} {resource} ({group})"));
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use hyper::StatusCode;

    use super::{KubeAuth, KubeAuthConfig, missing_permissions};
    use crate::discovery::{ca_kinds, testing::FakeApi, tests::mock_client};

    const CLUSTER: &str = include_str!("../discovery/tests/cluster.yaml");

    #[tokio::test]
    async fn a_token_is_reviewed_by_the_api_server_and_followed_to_its_pods_node() {
        let fake = FakeApi::default();
        let agent = Some(("agent-x1", "agent-uid-1"));
        fake.add_token("good", "mesh-system/mesh-agent", agent, &["mesh-ca"]);
        fake.add_token("for-the-api-server", "mesh-system/mesh-agent", agent, &["https://kubernetes.default.svc"]);
        let hello = Some(("helloworld-v1-5d8f9-abcde", "0b6b7e1c-1111-4a3e-9d57-0e3c1f0a0001"));
        fake.add_token("a-workload", "demo/helloworld", hello, &["mesh-ca"]);
        fake.add_token("unbound", "mesh-system/mesh-agent", None, &["mesh-ca"]);
        fake.add_token("stale", "mesh-system/mesh-agent", Some(("agent-x1", "uid-of-a-deleted-pod")), &["mesh-ca"]);
        fake.add_token("unseen", "mesh-system/mesh-agent", Some(("agent-x9", "uid-9")), &["mesh-ca"]);
        let state = crate::config::load_text("cluster.yaml", CLUSTER, "cluster.local").state;
        let config =
            KubeAuthConfig { audience: "mesh-ca".into(), trusted_node_accounts: vec!["mesh-system/mesh-agent".into()] };
        let auth = KubeAuth { client: mock_client(&fake), config };
        let cases = [
            ("good", Ok("n1")),
            ("", Err(StatusCode::UNAUTHORIZED)),
            ("forged", Err(StatusCode::UNAUTHORIZED)),
            ("for-the-api-server", Err(StatusCode::UNAUTHORIZED)),
            ("a-workload", Err(StatusCode::FORBIDDEN)),
            ("unbound", Err(StatusCode::UNAUTHORIZED)),
            ("stale", Err(StatusCode::UNAUTHORIZED)),
            ("unseen", Err(StatusCode::SERVICE_UNAVAILABLE)),
        ];
        for (token, want) in cases {
            let got = auth.node_of(token, &state).await;
            assert_eq!(got.as_deref().map_err(|e| e.0), want, "token {token:?}: {got:?}");
        }
        // The node's identities, not another node's (the 403 that follows).
        let n1 = state.node_identities("n1");
        assert!(n1.contains("spiffe://cluster.local/ns/demo/sa/helloworld"));
        assert!(!n1.contains("spiffe://cluster.local/ns/demo/sa/test"));
        // The API server unreachable: retry later, not "unauthenticated".
        fake.set_down(true);
        assert_eq!(auth.node_of("good", &state).await.map_err(|e| e.0), Err(StatusCode::SERVICE_UNAVAILABLE));
    }

    #[tokio::test]
    async fn the_ca_names_the_permissions_it_lacks() {
        let fake = FakeApi::default();
        let client = mock_client(&fake);
        assert_eq!(missing_permissions(&client, &ca_kinds()).await.expect("reviews"), Vec::<String>::new());
        fake.refuse("create", "authentication.k8s.io", "tokenreviews");
        fake.refuse("watch", "", "pods");
        let missing = missing_permissions(&client, &ca_kinds()).await.expect("reviews");
        assert_eq!(missing, ["create tokenreviews (authentication.k8s.io)", "watch pods (core)"]);
    }
}
