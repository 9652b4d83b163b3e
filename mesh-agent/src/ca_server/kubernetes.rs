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

/// Longest bearer token sent for review (projected tokens are 1–2 KiB).
const MAX_TOKEN: usize = 16 * 1024;
/// How long a review's answer is reused for the same token: long enough that
/// a node's burst of new pods costs one review, short enough that a token
/// the API server stops accepting is refused within seconds. (The caller's
/// pod and its UID are still checked on every request.)
const REVIEW_TTL: std::time::Duration = std::time::Duration::from_secs(10);
/// Answers kept at most (the cache is emptied when full).
const REVIEW_CACHE: usize = 4096;
/// TokenReviews in flight at once; beyond that, callers retry.
const REVIEWS_IN_FLIGHT: usize = 32;

pub(super) struct KubeAuth {
    client: Client,
    config: KubeAuthConfig,
    /// Token → (when reviewed, the reviewed caller).
    reviewed: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, Caller)>>,
    in_flight: tokio::sync::Semaphore,
}

/// Who a reviewed token belongs to.
#[derive(Debug, Clone)]
struct Caller {
    /// `namespace/name` of the service account.
    account: String,
    pod: String,
    uid: String,
}

/// A refusal: the status (401, 403, or 503 to retry) and why.
pub(super) type Refusal = (StatusCode, String);

impl KubeAuth {
    pub(super) fn new(client: Client, config: KubeAuthConfig) -> Self {
        let (reviewed, in_flight) = (Default::default(), tokio::sync::Semaphore::new(REVIEWS_IN_FLIGHT));
        KubeAuth { client, config, reviewed, in_flight }
    }

    /// The node whose agent presented `token`, in the CA's view `state`.
    pub(super) async fn node_of(&self, token: &str, state: &State) -> Result<String, Refusal> {
        let caller = self.caller(token).await?;
        if !self.config.trusted_node_accounts.contains(&caller.account) {
            let message = format!("service account {} is not a node agent's (--trusted-node-accounts)", caller.account);
            return Err((StatusCode::FORBIDDEN, message));
        }
        let namespace = caller.account.split_once('/').map_or("", |(ns, _)| ns);
        let (key, uid) = (format!("{namespace}/{}", caller.pod), &caller.uid);
        let Some(workload) = state.workloads.get(&key) else {
            return Err((StatusCode::SERVICE_UNAVAILABLE, format!("pod {key} not seen by the CA yet; retry")));
        };
        if workload.uid.as_deref() != Some(uid.as_str()) {
            return Err((StatusCode::UNAUTHORIZED, format!("the token's pod {key} (uid {uid}) no longer exists")));
        }
        match &workload.node {
            Some(node) => Ok(node.to_string()),
            None => Err((StatusCode::SERVICE_UNAVAILABLE, format!("pod {key} is not scheduled yet; retry"))),
        }
    }

    /// Who `token` belongs to: reviewed by the API server, or as reviewed
    /// within [`REVIEW_TTL`]. Only accepted tokens are kept: refusals are
    /// reviewed again, bounded by [`REVIEWS_IN_FLIGHT`].
    async fn caller(&self, token: &str) -> Result<Caller, Refusal> {
        let unauthorized = |m: String| (StatusCode::UNAUTHORIZED, m);
        if token.is_empty() {
            return Err(unauthorized("missing bearer token".into()));
        }
        if token.len() > MAX_TOKEN {
            return Err(unauthorized(format!("bearer token longer than {MAX_TOKEN} bytes")));
        }
        let cached = self.reviewed.lock().ok().and_then(|m| m.get(token).cloned());
        if let Some((at, caller)) = cached.filter(|(at, _)| at.elapsed() < REVIEW_TTL) {
            tracing::trace!(?at, "token reviewed recently");
            return Ok(caller);
        }
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "too many token reviews in flight; retry".into()));
        };
        let caller = self.review(token).await?;
        if let Ok(mut m) = self.reviewed.lock() {
            if m.len() >= REVIEW_CACHE {
                m.clear();
            }
            m.insert(token.to_owned(), (std::time::Instant::now(), caller.clone()));
        }
        Ok(caller)
    }

    /// One TokenReview with the CA's audience.
    async fn review(&self, token: &str) -> Result<Caller, Refusal> {
        let unauthorized = |m: String| (StatusCode::UNAUTHORIZED, m);
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
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod), Some(uid)) = (one(POD_NAME), one(POD_UID)) else {
            return Err(unauthorized("the token is not bound to a pod (use a projected ServiceAccount token)".into()));
        };
        Ok(Caller { account: format!("{namespace}/{name}"), pod, uid })
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
        let auth = KubeAuth::new(mock_client(&fake), config);
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
        // The API server unreachable: retry later, not "unauthenticated" (a
        // token reviewed within the last minute is still known).
        fake.add_token("not-yet-reviewed", "mesh-system/mesh-agent", agent, &["mesh-ca"]);
        fake.set_down(true);
        let fresh = auth.node_of("not-yet-reviewed", &state).await;
        assert_eq!(fresh.map_err(|e| e.0), Err(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(auth.node_of("good", &state).await.as_deref(), Ok("n1"));
    }

    /// Anyone who can reach the CA can send tokens; each must not cost the
    /// API server a review: an oversized one is refused unread, a token
    /// reviewed moments ago is not reviewed again, and reviews in flight are
    /// bounded.
    #[tokio::test]
    async fn tokens_from_the_network_cannot_flood_the_api_server_with_reviews() {
        let fake = FakeApi::default();
        fake.add_token("good", "mesh-system/mesh-agent", Some(("agent-x1", "agent-uid-1")), &["mesh-ca"]);
        let state = crate::config::load_text("cluster.yaml", CLUSTER, "cluster.local").state;
        let config =
            KubeAuthConfig { audience: "mesh-ca".into(), trusted_node_accounts: vec!["mesh-system/mesh-agent".into()] };
        let auth = KubeAuth::new(mock_client(&fake), config);
        let reviews = || fake.requests().iter().filter(|r| r.path.ends_with("/tokenreviews")).count();
        let huge = "x".repeat(64 * 1024);
        assert_eq!(auth.node_of(&huge, &state).await.map_err(|e| e.0), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(reviews(), 0, "an oversized token was sent for review");
        for _ in 0..10 {
            assert_eq!(auth.node_of("good", &state).await.as_deref(), Ok("n1"));
        }
        assert_eq!(reviews(), 1, "a token reviewed moments ago was reviewed again");
        // The pod is still checked on every request: deleted, its token stops working at once.
        let gone = CLUSTER.replace("name: agent-x1", "name: agent-x2");
        let gone = crate::config::load_text("cluster.yaml", &gone, "cluster.local").state;
        assert_eq!(auth.node_of("good", &gone).await.map_err(|e| e.0), Err(StatusCode::SERVICE_UNAVAILABLE));
    }

    /// A slow API server and a caller sending many tokens at once: at most
    /// 32 reviews wait on it, the rest are told to retry at once.
    #[tokio::test]
    async fn token_reviews_in_flight_are_bounded() {
        let fake = FakeApi::default();
        let state = crate::config::load_text("cluster.yaml", CLUSTER, "cluster.local").state;
        let config =
            KubeAuthConfig { audience: "mesh-ca".into(), trusted_node_accounts: vec!["mesh-system/mesh-agent".into()] };
        let auth = std::sync::Arc::new(KubeAuth::new(mock_client(&fake), config));
        let state = std::sync::Arc::new(state);
        fake.hold_token_reviews(true);
        let calls: Vec<_> = (0..40)
            .map(|i| {
                let (auth, state) = (auth.clone(), state.clone());
                tokio::spawn(async move { auth.node_of(&format!("garbage-{i}"), &state).await.map_err(|e| e.0) })
            })
            .collect();
        let reviews = || fake.requests().iter().filter(|r| r.path.ends_with("/tokenreviews")).count();
        for _ in 0..500 {
            if reviews() >= 32 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(reviews(), 32, "reviews in flight");
        fake.hold_token_reviews(false);
        let mut answers = std::collections::BTreeMap::new();
        for c in calls {
            *answers.entry(c.await.expect("a call").err()).or_insert(0) += 1;
        }
        let expected = [(Some(StatusCode::UNAUTHORIZED), 32), (Some(StatusCode::SERVICE_UNAVAILABLE), 8)];
        assert_eq!(answers, expected.into_iter().collect(), "{answers:?}");
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
