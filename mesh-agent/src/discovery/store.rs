//! The watched objects, kind by kind, each kept once in the form the builder
//! reads (reduced YAML values), as kube-rs's reflector keeps them: a relist
//! fills a buffer that replaces the kind's objects only when it is complete,
//! so a relist in progress never shows a half-empty cluster.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use kube::{api::DynamicObject, runtime::watcher::Event};
use tokio::sync::watch;

use super::{Kind, reduce};
use crate::config::{Body, Document, Origin};

type Objects = BTreeMap<String, Body>;

#[derive(Default)]
struct KindObjects {
    objects: Objects,
    /// A list in progress.
    relist: Option<Objects>,
    /// Whether a first list has completed.
    listed: bool,
}

pub(super) struct Store {
    kinds: Mutex<Vec<KindObjects>>,
    /// Bumped on every change the builder must see.
    changed: watch::Sender<u64>,
}

impl Store {
    pub(super) fn new(kinds: usize, changed: watch::Sender<u64>) -> Self {
        Store { kinds: Mutex::new((0..kinds).map(|_| KindObjects::default()).collect()), changed }
    }

    pub(super) fn apply(&self, index: usize, kind: &Kind, event: Event<DynamicObject>) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let Some(k) = kinds.get_mut(index) else { return };
        match event {
            Event::Init => {
                k.relist = Some(Objects::new());
                return;
            }
            Event::InitApply(obj) => {
                if let (Some(relist), Some((key, value))) = (k.relist.as_mut(), entry(kind, obj)) {
                    relist.insert(key, value);
                }
                return;
            }
            Event::InitDone => {
                k.objects = k.relist.take().unwrap_or_default();
                k.listed = true;
            }
            Event::Apply(obj) => {
                let Some((key, value)) = entry(kind, obj) else { return };
                // A change to what the agent does not read (a status written
                // back, an annotation, a managed field) builds nothing.
                if k.objects.get(&key) == Some(&value) {
                    return;
                }
                k.objects.insert(key, value);
            }
            Event::Delete(obj) => {
                k.objects.remove(&key(&obj));
            }
        }
        drop(kinds);
        self.changed.send_modify(|g| *g += 1);
    }

    /// Every object as a document, in kind then `namespace/name` order; `None`
    /// until every kind has been listed once.
    pub(super) fn documents(&self, kinds: &[Kind]) -> Option<Vec<Document>> {
        let store = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = store.iter().position(|k| !k.listed) {
            tracing::debug!(kind = %kinds.get(i).map(Kind::label).unwrap_or_default(), "waiting for the first list");
            return None;
        }
        let values = store.iter().flat_map(|k| k.objects.values());
        Some(values.enumerate().map(|(i, b)| Document { origin: Origin::api(i + 1), body: b.clone() }).collect())
    }
}

fn key(obj: &DynamicObject) -> String {
    let name = obj.metadata.name.as_deref().unwrap_or_default();
    match obj.metadata.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

/// The object's key and its reduced form: typed for the core kinds the API
/// server has checked (compact, and parsed once), else YAML for the builder
/// to validate field by field. `None` (logged) when it cannot be represented,
/// which a well-formed API object never is.
fn entry(kind: &Kind, obj: DynamicObject) -> Option<(String, Body)> {
    let key = key(&obj);
    let json = reduce::reduce(kind, obj);
    let typed = match kind.kind {
        "Pod" => typed(&json).map(Body::Pod),
        "Service" => typed(&json).map(Body::Service),
        "Node" => typed(&json).map(Body::Node),
        "Namespace" => typed(&json).map(Body::Namespace),
        _ => None,
    };
    if let Some(body) = typed {
        return Some((key, body));
    }
    match serde_yaml_ng::to_value(json) {
        Ok(v) => Some((key, Body::Yaml(Arc::new(v)))),
        Err(e) => {
            tracing::warn!(kind = kind.kind, object = %key, error = %e, "object skipped: not representable");
            None
        }
    }
}

/// The object as the builder's type; `None` sends it the long way, where a
/// field that does not fit is reported by name.
fn typed<T: serde::de::DeserializeOwned>(json: &serde_json::Value) -> Option<Arc<T>> {
    T::deserialize(json).ok().map(Arc::new)
}
