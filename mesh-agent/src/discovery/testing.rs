//! A stand-in for the Kubernetes API server, for tests (no API server can run
//! on the machines the tests run on): lists, chunked watch streams (with `410
//! Gone` for a watch that starts too far back), API discovery, TokenReviews
//! and SelfSubjectAccessReviews, from objects the test puts. Every request is
//! recorded, so a test can hold the code's requests against the RBAC in
//! `deploy/`. The unit tests call it through a mock service in place of the
//! HTTP client (kube-rs's `tower-test` pattern); the network tests serve it
//! over TLS to the real binary.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    convert::Infallible,
    sync::{Arc, Mutex},
};

use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Frame};
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

mod writes;

/// One request as the API server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
}

impl Request {
    /// The RBAC verb, group, resource and namespace it needs, or `None` for a
    /// non-resource URL (API discovery, which every authenticated user may read).
    pub fn rbac(&self) -> Option<(&'static str, String, String, Option<String>)> {
        let target = Target::parse(&self.path)?;
        let verb = match (self.method.as_str(), target.name.is_some(), self.query.contains("watch=true")) {
            ("POST", ..) => "create",
            ("PATCH", ..) => "patch",
            ("PUT", ..) => "update",
            ("GET", _, true) => "watch",
            ("GET", true, false) => "get",
            ("GET", false, false) => "list",
            _ => "other",
        };
        let resource = match &target.subresource {
            Some(sub) => format!("{}/{sub}", target.plural),
            None => target.plural,
        };
        Some((verb, target.group, resource, target.namespace))
    }
}

/// The API server's state.
#[derive(Clone, Default)]
pub struct FakeApi(Arc<Mutex<Inner>>);

#[derive(Default)]
struct Inner {
    rv: u64,
    /// (group, plural) → `namespace/name` → object.
    objects: BTreeMap<(String, String), BTreeMap<String, Value>>,
    events: Vec<Event>,
    /// Watches from an older resourceVersion than this get `410 Gone`.
    oldest_watchable: u64,
    watchers: Vec<Watcher>,
    /// Answer everything with 503.
    down: bool,
    requests: Vec<Request>,
    /// Bearer token → (username, pod name, pod uid, audiences).
    tokens: HashMap<String, Token>,
    /// (verb, group, resource) refused by SelfSubjectAccessReviews.
    refused: BTreeSet<(String, String, String)>,
    /// While set, TokenReview answers wait until it is cleared (`true` in
    /// the channel: held).
    held_reviews: Option<tokio::sync::watch::Sender<bool>>,
    /// The Gateway API's CRDs are not installed: its group is not served.
    no_gateway_api: bool,
}

struct Token {
    username: String,
    pod: Option<(String, String)>,
    audiences: Vec<String>,
}

struct Event {
    rv: u64,
    group: String,
    plural: String,
    namespace: Option<String>,
    name: String,
    kind: &'static str,
    object: Value,
}

struct Watcher {
    target: Target,
    name: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    group: String,
    version: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    /// `status`, in `…/<plural>/<name>/status`.
    subresource: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match parts.as_slice() {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
            rest => (None, rest),
        };
        let (plural, name, subresource) = match rest {
            [plural] => (*plural, None, None),
            [plural, name] => (*plural, Some((*name).to_owned()), None),
            [plural, name, sub] => (*plural, Some((*name).to_owned()), Some((*sub).to_owned())),
            _ => return None,
        };
        let (group, version, plural) = (group.into(), version.into(), plural.into());
        Some(Target { group, version, namespace, plural, name, subresource })
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }
}

/// `networkpolicy` → `networkpolicies`, `gateway` → `gateways`.
fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower.ends_with("ss") {
        return format!("{lower}es");
    }
    match lower.strip_suffix('y') {
        Some(stem) if !stem.ends_with(['a', 'e', 'o', 'u']) => format!("{stem}ies"),
        _ => format!("{lower}s"),
    }
}

fn group_of(api_version: &str) -> String {
    api_version.rsplit_once('/').map(|(g, _)| g.to_owned()).unwrap_or_default()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": message})
}

fn respond(code: u16, body: &Value) -> http::Response<Body> {
    let mut r = http::Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *r.status_mut() = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

/// `answer`, its body sent once `held` turns false.
fn held_response(mut held: tokio::sync::watch::Receiver<bool>, answer: Value) -> http::Response<Body> {
    let body = futures_util::stream::once(async move {
        let _ = held.wait_for(|h| !h).await;
        Ok::<_, Infallible>(Frame::data(Bytes::from(answer.to_string())))
    });
    let mut r = http::Response::new(StreamBody::new(body).boxed_unsync());
    *r.status_mut() = http::StatusCode::CREATED;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn line(v: &Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
}

impl FakeApi {
    /// An API server without the Gateway API's CRDs.
    pub fn without_gateway_api(&self) {
        self.0.lock().expect("fake API").no_gateway_api = true;
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates or replaces an object (`apiVersion`, `kind` and
    /// `metadata.name` required) and tells the watches.
    pub fn apply(&self, mut object: Value) {
        let mut inner = self.inner();
        inner.rv += 1;
        let rv = inner.rv;
        let api_version = object["apiVersion"].as_str().unwrap_or_default().to_owned();
        let (group, plural) = (group_of(&api_version), plural(object["kind"].as_str().unwrap_or_default()));
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let key = format!("{}/{name}", namespace.as_deref().unwrap_or_default());
        // Every API object has a uid (stable per name here, as a test wants it).
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{plural}-{key}"));
        }
        let objects = inner.objects.entry((group.clone(), plural.clone())).or_default();
        let kind = if objects.insert(key, object.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        inner.publish(Event { rv, group, plural, namespace, name, kind, object });
    }

    /// Deletes an object and tells the watches.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) {
        let mut inner = self.inner();
        let (group, plural) = (group_of(api_version), plural(kind));
        let key = format!("{}/{name}", namespace.unwrap_or_default());
        let Some(mut object) = inner.objects.get_mut(&(group.clone(), plural.clone())).and_then(|o| o.remove(&key))
        else {
            return;
        };
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let (namespace, name) = (namespace.map(str::to_owned), name.to_owned());
        inner.publish(Event { rv, group, plural, namespace, name, kind: "DELETED", object });
    }

    /// Forgets history: every open watch ends with `410 Gone`, as when the
    /// API server's watch cache has moved on, so clients must list again.
    pub fn expire_watches(&self) {
        let mut inner = self.inner();
        inner.oldest_watchable = inner.rv + 1;
        let gone = line(&json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")}));
        for w in inner.watchers.drain(..) {
            let _ = w.tx.send(gone.clone());
        }
    }

    /// While down, every request gets 503 and open watches are cut.
    pub fn set_down(&self, down: bool) {
        let mut inner = self.inner();
        inner.down = down;
        if down {
            inner.watchers.clear();
        }
    }

    /// A ServiceAccount token the TokenReview API accepts for `audiences`,
    /// bound to a pod (`name`, `uid`) when given.
    pub fn add_token(&self, token: &str, service_account: &str, pod: Option<(&str, &str)>, audiences: &[&str]) {
        let (ns, sa) = service_account.split_once('/').unwrap_or(("default", service_account));
        self.inner().tokens.insert(
            token.to_owned(),
            Token {
                username: format!("system:serviceaccount:{ns}:{sa}"),
                pod: pod.map(|(n, u)| (n.to_owned(), u.to_owned())),
                audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            },
        );
    }

    /// The TokenReview API refuses `token` from now on.
    pub fn revoke_token(&self, token: &str) {
        self.inner().tokens.remove(token);
    }

    /// Holds TokenReview answers (`true`) until released (`false`), as a
    /// slow API server would.
    pub fn hold_token_reviews(&self, hold: bool) {
        let mut inner = self.inner();
        match (&inner.held_reviews, hold) {
            (None, true) => inner.held_reviews = Some(tokio::sync::watch::channel(true).0),
            (Some(tx), false) => {
                let _ = tx.send(false);
                inner.held_reviews = None;
            }
            _ => {}
        }
    }

    /// SelfSubjectAccessReviews answer "not allowed" for this.
    pub fn refuse(&self, verb: &str, group: &str, resource: &str) {
        self.inner().refused.insert((verb.to_owned(), group.to_owned(), resource.to_owned()));
    }

    pub fn requests(&self) -> Vec<Request> {
        self.inner().requests.clone()
    }

    /// Answers one request.
    pub fn handle(&self, method: &http::Method, uri: &http::Uri, body: &[u8]) -> http::Response<Body> {
        let mut inner = self.inner();
        let query = uri.query().unwrap_or_default().to_owned();
        inner.requests.push(Request { method: method.to_string(), path: uri.path().to_owned(), query: query.clone() });
        if inner.down {
            return respond(503, &status(503, "ServiceUnavailable", "the API server is down (test)"));
        }
        let params: HashMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.replace("%3D", "=").replace("%3d", "=")))
            .collect();
        if uri.path() == "/apis" {
            return respond(200, &inner.discovery());
        }
        let Some(target) = Target::parse(uri.path()) else {
            return respond(404, &status(404, "NotFound", "unknown path"));
        };
        let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        match (method.as_str(), target.plural.as_str()) {
            ("POST", "tokenreviews") => {
                let answer = inner.token_review(request);
                match &inner.held_reviews {
                    Some(held) => held_response(held.subscribe(), answer),
                    None => respond(201, &answer),
                }
            }
            ("POST", "selfsubjectaccessreviews") => respond(201, &inner.access_review(request)),
            ("GET", _) if params.get("watch").is_some_and(|w| w == "true") => inner.watch(target, &params),
            ("GET", _) if target.name.is_some() => inner.get(&target),
            ("GET", _) => inner.list(&target, &params),
            ("PATCH", _) if target.subresource.as_deref() == Some("status") => inner.patch_status(&target, request),
            ("PATCH", _) if target.subresource.is_none() && target.name.is_some() => inner.patch(&target, request),
            ("POST", _) if target.name.is_none() => inner.create(&target, request),
            _ => respond(405, &status(405, "MethodNotAllowed", "not served by the fake")),
        }
    }
}

impl Inner {
    fn publish(&mut self, event: Event) {
        let message = line(&json!({"type": event.kind, "object": event.object}));
        self.watchers.retain(|w| !w.matches(&event) || w.tx.send(message.clone()).is_ok());
        self.events.push(event);
    }

    fn discovery(&self) -> Value {
        let groups: Vec<Value> = ["networking.istio.io", "security.istio.io", "telemetry.istio.io"]
            .iter()
            .map(|g| {
                let older = if *g == "telemetry.istio.io" { "v1alpha1" } else { "v1beta1" };
                let versions = [
                    json!({"groupVersion": format!("{g}/v1"), "version": "v1"}),
                    json!({"groupVersion": format!("{g}/{older}"), "version": older}),
                ];
                json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
            })
            .chain((!self.no_gateway_api).then(|| {
                // The Gateway API's experimental channel: HTTPRoute in v1,
                // ReferenceGrant in v1beta1, TCPRoute and TLSRoute in v1alpha2.
                let g = "gateway.networking.k8s.io";
                let versions = [
                    json!({"groupVersion": format!("{g}/v1"), "version": "v1"}),
                    json!({"groupVersion": format!("{g}/v1beta1"), "version": "v1beta1"}),
                    json!({"groupVersion": format!("{g}/v1alpha2"), "version": "v1alpha2"}),
                ];
                json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
            }))
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    fn stored(&self, target: &Target) -> Option<&Value> {
        let key = format!("{}/{}", target.namespace.as_deref().unwrap_or_default(), target.name.as_deref()?);
        self.objects.get(&(target.group.clone(), target.plural.clone()))?.get(&key)
    }

    /// One object, at the version asked.
    fn get(&self, target: &Target) -> http::Response<Body> {
        match self.stored(target) {
            Some(o) => {
                let mut o = o.clone();
                o["apiVersion"] = json!(target.api_version());
                respond(200, &o)
            }
            None => respond(404, &status(404, "NotFound", "no such object")),
        }
    }

    fn list(&self, target: &Target, params: &HashMap<String, String>) -> http::Response<Body> {
        let name = params.get("fieldSelector").and_then(|f| f.strip_prefix("metadata.name=")).map(str::to_owned);
        let name = name.or(target.name.clone());
        let objects = self.objects.get(&(target.group.clone(), target.plural.clone()));
        let items: Vec<Value> = objects
            .into_iter()
            .flat_map(|o| o.values())
            .filter(|o| {
                target.namespace.is_none() || o["metadata"]["namespace"].as_str() == target.namespace.as_deref()
            })
            .filter(|o| name.is_none() || o["metadata"]["name"].as_str() == name.as_deref())
            .map(|o| {
                let mut o = o.clone();
                o["apiVersion"] = json!(target.api_version());
                o
            })
            .collect();
        let kind = items.first().and_then(|o| o["kind"].as_str()).unwrap_or("Object").to_owned();
        let list = json!({
            "apiVersion": target.api_version(),
            "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        });
        respond(200, &list)
    }

    fn watch(&mut self, target: Target, params: &HashMap<String, String>) -> http::Response<Body> {
        let from: u64 = params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let name = params.get("fieldSelector").and_then(|f| f.strip_prefix("metadata.name=")).map(str::to_owned);
        let (tx, rx) = mpsc::unbounded_channel();
        let watcher = Watcher { target, name, tx };
        if from < self.oldest_watchable {
            let gone = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
            let _ = watcher.tx.send(line(&gone));
        } else {
            for e in self.events.iter().filter(|e| e.rv > from && watcher.matches(e)) {
                let _ = watcher.tx.send(line(&json!({"type": e.kind, "object": e.object})));
            }
            self.watchers.push(watcher);
        }
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let mut r = http::Response::new(StreamBody::new(stream).boxed_unsync());
        r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        r
    }

    fn token_review(&self, review: Value) -> Value {
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let wanted: Vec<&str> =
            review["spec"]["audiences"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let status = match self.tokens.get(token) {
            Some(t) => {
                let audiences: Vec<&String> = t.audiences.iter().filter(|a| wanted.contains(&a.as_str())).collect();
                if !wanted.is_empty() && audiences.is_empty() {
                    json!({"authenticated": false, "error": "token audiences do not match"})
                } else {
                    let mut extra = serde_json::Map::new();
                    if let Some((name, uid)) = &t.pod {
                        extra.insert("authentication.kubernetes.io/pod-name".into(), json!([name]));
                        extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
                    }
                    json!({"authenticated": true, "audiences": audiences, "user": {"username": t.username, "extra": extra}})
                }
            }
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": review["spec"], "status": status})
    }

    fn access_review(&self, review: Value) -> Value {
        let a = &review["spec"]["resourceAttributes"];
        let field = |k: &str| a[k].as_str().unwrap_or_default().to_owned();
        let allowed = !self.refused.contains(&(field("verb"), field("group"), field("resource")));
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": review["spec"], "status": {"allowed": allowed}})
    }
}

impl FakeApi {
    /// The stored object (`apiVersion` as applied), if any.
    pub fn object(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let inner = self.inner();
        let key = format!("{}/{name}", namespace.unwrap_or_default());
        inner.objects.get(&(group_of(api_version), plural(kind)))?.get(&key).cloned()
    }
}

impl Watcher {
    fn matches(&self, e: &Event) -> bool {
        e.group == self.target.group
            && e.plural == self.target.plural
            && (self.target.namespace.is_none() || self.target.namespace == e.namespace)
            && self.name.as_ref().is_none_or(|n| *n == e.name)
    }
}
