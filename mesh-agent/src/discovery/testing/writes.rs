//! The fake API server's writes: objects created, and JSON merge patches
//! of an object or of its `status` (what the controller sends).
use serde_json::{Value, json};

use super::{Body, Event, Inner, Target, respond, status};

impl Inner {
    /// Stores a changed object under a new resourceVersion and tells the
    /// watches; the object as stored.
    fn modified(&mut self, target: &Target, mut object: Value) -> Value {
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let (namespace, name) = (target.namespace.clone(), target.name.clone().unwrap_or_default());
        let key = format!("{}/{name}", namespace.as_deref().unwrap_or_default());
        let (group, plural) = (target.group.clone(), target.plural.clone());
        self.objects.entry((group.clone(), plural.clone())).or_default().insert(key, object.clone());
        self.publish(Event { rv, group, plural, namespace, name, kind: "MODIFIED", object: object.clone() });
        object
    }

    /// Creates an object (`409 AlreadyExists` if it does), with a uid.
    pub(super) fn create(&mut self, target: &Target, mut object: Value) -> http::Response<Body> {
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let namespace = target.namespace.clone();
        let key = format!("{}/{name}", namespace.as_deref().unwrap_or_default());
        let (group, plural) = (target.group.clone(), target.plural.clone());
        if self.objects.get(&(group.clone(), plural.clone())).is_some_and(|o| o.contains_key(&key)) {
            return respond(409, &status(409, "AlreadyExists", "the object exists"));
        }
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(format!("uid-{rv}"));
        self.objects.entry((group.clone(), plural.clone())).or_default().insert(key, object.clone());
        let kind = "ADDED";
        self.publish(Event { rv, group, plural, namespace, name, kind, object: object.clone() });
        respond(201, &object)
    }

    /// A JSON merge patch of a whole object (its `status` untouched).
    pub(super) fn patch(&mut self, target: &Target, mut patch: Value) -> http::Response<Body> {
        let Some(mut object) = self.stored(target).cloned() else {
            return respond(404, &status(404, "NotFound", "no such object"));
        };
        if let Value::Object(p) = &mut patch {
            p.remove("status");
        }
        merge_patch(&mut object, &patch);
        let object = self.modified(target, object);
        respond(200, &object)
    }

    /// A JSON merge patch (RFC 7386) of an object's `status`, refused with
    /// 409 when it names a `resourceVersion` that is no longer the object's.
    /// Only `status` changes, as through the API server's subresource.
    pub(super) fn patch_status(&mut self, target: &Target, patch: Value) -> http::Response<Body> {
        let Some(current) = self.stored(target).cloned() else {
            return respond(404, &status(404, "NotFound", "no such object"));
        };
        if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
            && current["metadata"]["resourceVersion"].as_str() != Some(rv)
        {
            return respond(409, &status(409, "Conflict", "the object has been modified"));
        }
        let mut object = current;
        merge_patch(&mut object["status"], &patch["status"]);
        let mut object = self.modified(target, object);
        object["apiVersion"] = json!(target.api_version());
        respond(200, &object)
    }
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}
