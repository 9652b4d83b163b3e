//! The status written back for the Gateway API's objects, from the user's
//! YAML: which conditions, with which of the specification's reasons, and
//! no entry for what is another controller's.
use serde_json::Value;

use crate::config::{ObjectStatus, status_of_text};

const CLASSES: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: istio, generation: 1}\n\
    spec: {controllerName: istio.io/gateway-controller}\n---\n\
    apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: theirs}\n\
    spec: {controllerName: example.net/gateway-controller}\n---\n\
    apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n---\n\
    apiVersion: v1\nkind: Namespace\nmetadata: {name: demo2}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
    spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo2}\n\
    spec: {clusterIP: 10.96.0.11, selector: {app: web}, ports: [{name: http, port: 80}]}\n---\n";

const LISTENERS: &str = "[{name: same, port: 80, protocol: HTTP, hostname: \"*.example.com\"}, \
    {name: all, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}]";

fn gateway(class: &str, listeners: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: demo, generation: 3}}\n\
         spec: {{gatewayClassName: {class}, listeners: {listeners}}}\n---\n"
    )
}

fn route(kind: &str, namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}, generation: 7}}\nspec: {spec}\n---\n"
    )
}

fn statuses(yaml: &str) -> Vec<ObjectStatus> {
    status_of_text("cluster.yaml", &format!("{CLASSES}{yaml}"), "cluster.local")
}

fn find<'a>(all: &'a [ObjectStatus], kind: &str, name: &str) -> Option<&'a Value> {
    all.iter().find(|s| s.kind == kind && s.name == name).map(|s| &s.status)
}

/// `type=status/reason` of each condition.
fn conditions(v: &Value) -> Vec<String> {
    crate::config::condition_summary(v)
}

/// A route's conditions for its parent `i`, with the controller named.
fn parent(all: &[ObjectStatus], name: &str, i: usize) -> (String, Vec<String>) {
    let status = find(all, "HTTPRoute", name).unwrap_or_else(|| panic!("no status for HTTPRoute {name}: {all:#?}"));
    let p = &status["parents"][i];
    (p["controllerName"].as_str().unwrap_or_default().to_owned(), conditions(p))
}

#[test]
fn classes_of_this_mesh_are_accepted_and_others_left_alone() {
    let all = statuses("");
    assert_eq!(conditions(find(&all, "GatewayClass", "istio").expect("ours")), ["Accepted=True/Accepted"]);
    assert_eq!(find(&all, "GatewayClass", "istio").expect("present")["conditions"][0]["observedGeneration"], 1);
    assert!(find(&all, "GatewayClass", "theirs").is_none(), "another controller's class is not ours to judge");
    let with_params = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mine}\n\
        spec: {controllerName: mesh-agent.dev/gateway-controller, parametersRef: {group: \"\", kind: ConfigMap, name: p}}\n";
    let all = statuses(with_params);
    assert_eq!(conditions(find(&all, "GatewayClass", "mine").expect("present")), ["Accepted=False/InvalidParameters"]);
}

#[test]
fn a_gateway_is_programmed_once_its_pods_exist_and_counts_its_routes_per_listener() {
    let routes = format!(
        "{}{}",
        route(
            "HTTPRoute",
            "demo",
            "r1",
            "{parentRefs: [{name: gw}], hostnames: [a.example.com], rules: [{backendRefs: [{name: web, port: 80}]}]}"
        ),
        route(
            "HTTPRoute",
            "demo2",
            "r2",
            "{parentRefs: [{name: gw, namespace: demo}], rules: [{backendRefs: [{name: web, port: 80}]}]}"
        ),
    );
    let yaml = format!("{}{routes}", gateway("istio", LISTENERS));
    let all = statuses(&yaml);
    let gw = find(&all, "Gateway", "gw").expect("ours");
    assert_eq!(conditions(gw), ["Accepted=True/Accepted", "Programmed=False/NoResources"]);
    assert_eq!(gw["conditions"][0]["observedGeneration"], 3);
    let attached: Vec<(&str, i64)> = gw["listeners"]
        .as_array()
        .expect("present")
        .iter()
        .map(|l| (l["name"].as_str().expect("present"), l["attachedRoutes"].as_i64().expect("present")))
        .collect();
    // demo's route on both listeners, demo2's only on the one open to All.
    assert_eq!(attached, [("same", 1), ("all", 2)]);
    assert_eq!(
        conditions(&gw["listeners"][0]),
        [
            "Accepted=True/Accepted",
            "ResolvedRefs=True/ResolvedRefs",
            "Programmed=True/Programmed",
            "Conflicted=False/NoConflicts"
        ]
    );
    assert_eq!(gw["listeners"][0]["supportedKinds"][0]["kind"], "HTTPRoute");
    // Its pod and the Service in front: programmed, with that address.
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: gw-1, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: gw}}\n\
        spec: {nodeName: n1}\nstatus: {podIP: 10.244.0.9}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: gw-istio, namespace: demo}\n\
        spec: {clusterIP: 10.96.0.40, selector: {gateway.networking.k8s.io/gateway-name: gw}, ports: [{name: http, port: 80}]}\n---\n";
    let all = statuses(&format!("{yaml}{pod}"));
    let gw = find(&all, "Gateway", "gw").expect("present");
    assert_eq!(conditions(gw), ["Accepted=True/Accepted", "Programmed=True/Programmed"]);
    assert_eq!(gw["addresses"], serde_json::json!([{"type": "IPAddress", "value": "10.96.0.40"}]));
    // The routes: accepted by the Gateway's class's controller.
    assert_eq!(
        parent(&all, "r2", 0),
        (
            "istio.io/gateway-controller".to_owned(),
            vec!["Accepted=True/Accepted".to_owned(), "ResolvedRefs=True/ResolvedRefs".to_owned()]
        )
    );
    assert_eq!(
        find(&all, "HTTPRoute", "r2").expect("present")["parents"][0]["parentRef"],
        serde_json::json!({"name": "gw", "namespace": "demo"})
    );
}

#[test]
fn a_gateway_that_is_not_served_says_why_listener_by_listener() {
    #[rustfmt::skip]
    let cases = [
        ("[{name: a, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: c, namespace: data}]}}]",
         "Accepted=False/ListenersNotValid", ["Accepted=True/Accepted", "ResolvedRefs=False/RefNotPermitted", "Programmed=False/Invalid", "Conflicted=False/NoConflicts"]),
        ("[{name: a, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: nope}]}}]",
         "Accepted=False/ListenersNotValid", ["Accepted=True/Accepted", "ResolvedRefs=False/InvalidCertificateRef", "Programmed=False/Invalid", "Conflicted=False/NoConflicts"]),
        ("[{name: a, port: 80, protocol: UDP}]",
         "Accepted=False/ListenersNotValid", ["Accepted=False/UnsupportedProtocol", "ResolvedRefs=True/ResolvedRefs", "Programmed=False/Invalid", "Conflicted=False/NoConflicts"]),
        ("[{name: a, port: 80, protocol: HTTP, allowedRoutes: {kinds: [{kind: UDPRoute}]}}]",
         "Accepted=False/ListenersNotValid", ["Accepted=True/Accepted", "ResolvedRefs=False/InvalidRouteKinds", "Programmed=False/Invalid", "Conflicted=False/NoConflicts"]),
    ];
    for (listeners, gateway_accepted, listener) in cases {
        let all = statuses(&gateway("istio", listeners));
        let gw = find(&all, "Gateway", "gw").expect("ours, judged");
        assert_eq!(conditions(gw), [gateway_accepted, "Programmed=False/Invalid"], "{listeners}");
        assert_eq!(conditions(&gw["listeners"][0]), listener, "{listeners}");
        assert!(gw["conditions"][0]["message"].as_str().expect("present").contains("spec.listeners[0]"), "{gw}");
    }
    // Two protocols on one port: conflicted.
    let all = statuses(&gateway("istio", "[{name: a, port: 80, protocol: HTTP}, {name: b, port: 80, protocol: TCP}]"));
    let gw = find(&all, "Gateway", "gw").expect("present");
    assert_eq!(conditions(&gw["listeners"][1])[3], "Conflicted=True/ProtocolConflict");
    // Addresses of its own are refused as unsupported.
    let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: demo}\n\
        spec: {gatewayClassName: istio, addresses: [{value: 1.2.3.4}], listeners: [{name: a, port: 80, protocol: HTTP}]}\n";
    assert_eq!(
        conditions(find(&statuses(yaml), "Gateway", "gw").expect("present"))[0],
        "Accepted=False/UnsupportedAddress"
    );
    // A route to ours and to another controller's Gateway: served by ours,
    // one entry of ours; the other parent is its controller's to judge.
    let yaml = format!(
        "{}apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: theirs, namespace: demo}}\n\
         spec: {{gatewayClassName: theirs, listeners: [{{name: http, port: 80, protocol: HTTP}}]}}\n---\n{}",
        gateway("istio", LISTENERS),
        route(
            "HTTPRoute",
            "demo",
            "both",
            "{parentRefs: [{name: gw, sectionName: all}, {name: theirs}], rules: [{backendRefs: [{name: web, port: 80}]}]}"
        )
    );
    let all = statuses(&yaml);
    let both = find(&all, "HTTPRoute", "both").expect("ours judged");
    assert_eq!(both["parents"].as_array().map(Vec::len), Some(1), "{both}");
    assert_eq!(conditions(&both["parents"][0]), ["Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs"]);
    // Another controller's Gateway, and routes only to it: no status of ours.
    let yaml = format!(
        "{}{}",
        gateway("theirs", LISTENERS),
        route("HTTPRoute", "demo", "r", "{parentRefs: [{name: gw}], rules: [{backendRefs: [{name: web, port: 80}]}]}")
    );
    let all = statuses(&yaml);
    assert!(find(&all, "Gateway", "gw").is_none() && find(&all, "HTTPRoute", "r").is_none(), "{all:#?}");
}

#[test]
fn a_route_that_does_not_attach_gets_the_reason_the_api_names() {
    let backend = "rules: [{backendRefs: [{name: web, port: 80}]}]";
    #[rustfmt::skip]
    let cases = [
        // demo2 is not allowed on the listener `same`.
        (route("HTTPRoute", "demo2", "r", &format!("{{parentRefs: [{{name: gw, namespace: demo, sectionName: same}}], {backend}}}")),
         "Accepted=False/NotAllowedByListeners", "ResolvedRefs=True/ResolvedRefs"),
        // No listener of that name.
        (route("HTTPRoute", "demo", "r", &format!("{{parentRefs: [{{name: gw, sectionName: nope}}], {backend}}}")),
         "Accepted=False/NoMatchingParent", "ResolvedRefs=True/ResolvedRefs"),
        // A hostname no listener it may use shares.
        (route("HTTPRoute", "demo", "r", &format!("{{parentRefs: [{{name: gw, sectionName: same}}], hostnames: [a.other.org], {backend}}}")),
         "Accepted=False/NoMatchingListenerHostname", "ResolvedRefs=True/ResolvedRefs"),
        // Another namespace's Service without a ReferenceGrant: not served here.
        (route("HTTPRoute", "demo", "r", "{parentRefs: [{name: gw}], rules: [{backendRefs: [{name: web, namespace: demo2, port: 80}]}]}"),
         "Accepted=False/UnsupportedValue", "ResolvedRefs=False/RefNotPermitted"),
        (route("HTTPRoute", "demo", "r", "{parentRefs: [{name: gw}], rules: [{backendRefs: [{name: nope, port: 80}]}]}"),
         "Accepted=False/UnsupportedValue", "ResolvedRefs=False/BackendNotFound"),
        (route("HTTPRoute", "demo", "r", "{parentRefs: [{name: gw}], rules: [{backendRefs: [{group: networking.istio.io, kind: ServiceEntry, name: web, port: 80}]}]}"),
         "Accepted=False/UnsupportedValue", "ResolvedRefs=False/InvalidKind"),
    ];
    for (yaml, accepted, resolved) in cases {
        let all = statuses(&format!("{}{yaml}", gateway("istio", LISTENERS)));
        let (controller, got) = parent(&all, "r", 0);
        assert_eq!(controller, "istio.io/gateway-controller");
        assert_eq!(got, [accepted, resolved], "{yaml}");
        let entry = &find(&all, "HTTPRoute", "r").expect("present")["parents"][0]["conditions"][0];
        assert_eq!(entry["observedGeneration"], 7);
        assert!(!entry["message"].as_str().expect("present").is_empty());
    }
    // The attached listeners now count none of it.
    let yaml =
        route("HTTPRoute", "demo", "r", "{parentRefs: [{name: gw}], rules: [{backendRefs: [{name: nope, port: 80}]}]}");
    let all = statuses(&format!("{}{yaml}", gateway("istio", LISTENERS)));
    assert_eq!(find(&all, "Gateway", "gw").expect("present")["listeners"][0]["attachedRoutes"], 0);
}

#[test]
fn a_route_inside_the_mesh_is_judged_for_its_service_parent() {
    let yaml = route(
        "HTTPRoute",
        "demo",
        "mesh",
        "{parentRefs: [{group: \"\", kind: Service, name: web, port: 80}], rules: [{backendRefs: [{name: web, port: 80}]}]}",
    );
    let all = statuses(&yaml);
    assert_eq!(
        parent(&all, "mesh", 0),
        (
            crate::config::MESH_CONTROLLER.to_owned(),
            vec!["Accepted=True/Accepted".to_owned(), "ResolvedRefs=True/ResolvedRefs".to_owned()]
        )
    );
    let p = &find(&all, "HTTPRoute", "mesh").expect("present")["parents"][0]["parentRef"];
    assert_eq!(*p, serde_json::json!({"group": "", "kind": "Service", "name": "web", "port": 80}));
    let yaml = route(
        "HTTPRoute",
        "demo",
        "mesh",
        "{parentRefs: [{group: \"\", kind: Service, name: nope}], rules: [{backendRefs: [{name: web, port: 80}]}]}",
    );
    assert_eq!(parent(&statuses(&yaml), "mesh", 0).1[0], "Accepted=False/NoMatchingParent");
}
