//! Which objects apply to a client, as Istio looks them up: DestinationRules,
//! ServiceEntries, mesh VirtualServices, and a gateway port's merged rules.
//! A tenant's object changes its own clients' traffic only.
use super::*;

/// Which DestinationRule applies, as Istio looks one up for a client: its
/// own namespace's, then the Service's namespace's, then the root
/// namespace's, each exported to the client; the oldest in a namespace; a
/// rule in any other namespace never. A tenant's rule changes its own
/// clients' traffic only.
#[test]
fn destination_rules_are_looked_up_for_the_client_in_istios_order() {
    let rule = |name: &str, ns: &str, extra: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: {name}, namespace: {ns}{extra}}}\nspec: {{host: hello.demo.svc.cluster.local}}\n"
        )
    };
    let created = |t: &str| format!(", creationTimestamp: \"{t}\"");
    let yaml = format!(
        "{}{}{}{}{}{}",
        // Replaced: demo's own rule, named so that it sorts after the others.
        CLUSTER.replace(
            "metadata: {name: hello, namespace: demo}\nspec:\n  host: hello\n",
            "metadata: {name: z-hello, namespace: demo, creationTimestamp: \"2026-01-01T00:00:00Z\"}\nspec:\n  host: hello.demo.svc.cluster.local\n"
        ),
        rule("a-newer", "demo", &created("2026-06-01T00:00:00Z")),
        rule("evil", "attacker", ""),
        rule("third", "bystander", ""),
        rule("mesh-wide", "istio-system", ""),
        rule("private", "team", "").replace("spec: {", "spec: {exportTo: [.], "),
    );
    let s = state_from_yaml(&yaml);
    let applies = |client: Option<&str>| s.destination_rule("demo/hello", client).map(|d| d.name.to_string());
    let table = [
        (Some("demo"), "z-hello"),  // the oldest of the Service's namespace
        (Some("attacker"), "evil"), // a tenant's rule: its own clients only
        (Some("bystander"), "third"),
        (Some("elsewhere"), "z-hello"), // not attacker's, bystander's or team's
        (Some("team"), "private"),      // `.`: its own namespace
        (None, "z-hello"),
    ];
    for (client, want) in table {
        assert_eq!(applies(client).as_deref(), Some(want), "client in {client:?}");
    }
    // Without the Service's namespace's rules: the root namespace's.
    let s = state_from_yaml(
        &yaml
            .replace("namespace: demo, creationTimestamp", "namespace: gone, creationTimestamp")
            .replace("a-newer, namespace: demo", "a-newer, namespace: gone"),
    );
    assert_eq!(s.destination_rule("demo/hello", Some("elsewhere")).map(|d| &*d.name), Some("mesh-wide"));
}

/// One host declared by ServiceEntries of two namespaces: each namespace's
/// clients reach their own namespace's entry (by `Host` and by address), and
/// clients of other namespaces the oldest entry, as Istio chooses.
#[test]
fn a_host_declared_in_two_namespaces_is_each_clients_own() {
    let entry = |ns: &str, created: &str, endpoint: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: partner, namespace: {ns}, creationTimestamp: \"{created}\"}}\n\
             spec: {{hosts: [partner.example], addresses: [192.0.2.50], ports: [{{number: 80, name: http, protocol: HTTP}}], \
             resolution: STATIC, endpoints: [{{address: {endpoint}}}]}}\n"
        )
    };
    // The attacker's entry is older and first by namespace.
    let yaml = format!(
        "{CLUSTER}{}{}",
        entry("bank", "2026-02-01T00:00:00Z", "198.51.100.10"),
        entry("attacker", "2026-01-01T00:00:00Z", "198.51.100.66")
    );
    let s = state_from_yaml(&yaml);
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("partner.example"));
    let by_host = |namespace: Option<&str>| {
        let view = RequestView { method: "GET", path: "/", headers: &headers, client: CLIENT, namespace };
        // An address no entry claims: the request's host decides.
        describe(&route_request(&s, "203.0.113.1:80".parse().expect("a"), &view, 0, 0, &NoState))
    };
    let by_address = |namespace: Option<&str>| {
        describe(&Decision {
            route: crate::routing::l4::route(&s, "192.0.2.50:80".parse().expect("a"), namespace, 0),
            rule: None,
            matched_prefix: None,
            cluster: None,
        })
    };
    let table = [
        (Some("bank"), "198.51.100.10 198.51.100.10:80"),
        (Some("attacker"), "198.51.100.66 198.51.100.66:80"),
        (Some("elsewhere"), "198.51.100.66 198.51.100.66:80"),
        (None, "198.51.100.66 198.51.100.66:80"),
    ];
    for (client, want) in table {
        assert_eq!(by_host(client), want, "by host, client in {client:?}");
        assert_eq!(by_address(client), want, "by address, client in {client:?}");
    }
    // An address claimed by the attacker's entry alone still reaches, for
    // bank's clients, the host as bank declares it.
    let s = state_from_yaml(&yaml.replacen("addresses: [192.0.2.50], ", "", 1));
    let route = crate::routing::l4::route(&s, "192.0.2.50:80".parse().expect("a"), Some("bank"), 0);
    let d = Decision { route, rule: None, matched_prefix: None, cluster: None };
    assert_eq!(describe(&d), "198.51.100.10 198.51.100.10:80");
}

/// Istio's merged route table for a gateway port: the most specific host
/// wins, then the oldest VirtualService, whichever Gateway (of any
/// namespace) it is bound to; a tenant's newer rule for another tenant's
/// host never comes first.
#[test]
fn gateway_rules_for_a_host_are_the_oldest_and_most_specific() {
    let vs = |name: &str, ns: &str, created: &str, hosts: &str, gw: &str, service: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
             metadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"{created}\"}}\n\
             spec: {{hosts: [{hosts}], gateways: [{gw}], http: [{{route: [{{destination: {{host: {service}}}}}]}}]}}\n"
        )
    };
    let gateway = |name: &str, ns: &str, created: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: Gateway\n\
             metadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"{created}\"}}\n\
             spec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: 80, name: http, protocol: HTTP}}, hosts: ['*']}}]}}\n"
        )
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{istio: ingressgateway}}}}\n\
         status: {{addresses: [{{type: InternalIP, address: 172.18.0.2}}]}}\n---\n{CLUSTER}{}{}{}{}{}",
        gateway("ingress", "demo", "2026-01-01T00:00:00Z"),
        gateway("tenant", "attacker", "2026-03-01T00:00:00Z"),
        vs("bank", "demo", "2026-01-02T00:00:00Z", "www.bank.example", "ingress", "hello.demo.svc.cluster.local"),
        vs(
            "takeover",
            "attacker",
            "2026-02-01T00:00:00Z",
            "www.bank.example",
            "tenant",
            "other.demo.svc.cluster.local"
        ),
        vs("wide", "attacker", "2025-01-01T00:00:00Z", "'*.bank.example'", "tenant", "other.demo.svc.cluster.local"),
    );
    let s = state_from_yaml(&yaml);
    let gateways = ["attacker/tenant".to_owned(), "demo/ingress".to_owned()];
    let at = |host: &str| {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_str(host).expect("host"));
        let view = RequestView { method: "GET", path: "/", headers: &headers, client: CLIENT, namespace: None };
        route_gateway(&s, &gateways, None, "172.18.0.2:80".parse().expect("a"), &view, 0, 0, &NoState)
            .map_or_else(|| "404".to_owned(), |(d, gw)| format!("{} via {gw}", describe(&d)))
    };
    // The older rule for the exact host, though the tenant's Gateway sorts first.
    assert_eq!(at("www.bank.example"), "hello-v1 10.244.0.2:8080 via demo/ingress");
    // The wildcard (older still) only where no exact host is declared.
    assert_eq!(at("api.bank.example"), "other 10.244.0.4:9000 via attacker/tenant");
    assert_eq!(at("nobody.example"), "404");
}

/// Mesh VirtualServices for a Service, chosen for the client as Istio looks
/// them up: the client's namespace's, else the Service's namespace's, else
/// the root namespace's; a tenant's rule for another namespace's Service
/// changes only the tenant's own clients' traffic.
#[test]
fn mesh_virtual_services_are_looked_up_for_the_client() {
    let vs = |name: &str, ns: &str, to: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{hosts: [hello.demo.svc.cluster.local], http: [{{route: [{{destination: {{host: {to}}}}}]}}]}}\n"
        )
    };
    // Without demo's own rules: a tenant's, a bystander's and the root's.
    let vs_at =
        CLUSTER.find("---\napiVersion: networking.istio.io/v1\nkind: VirtualService").expect("demo's VirtualService");
    let base = &CLUSTER[..vs_at];
    let yaml = format!(
        "{base}{}{}{}",
        vs("evil", "attacker", "other.demo.svc.cluster.local"),
        vs("third", "bystander", "other.demo.svc.cluster.local"),
        vs("mesh-wide", "istio-system", "hello.demo.svc.cluster.local"),
    );
    let s = state_from_yaml(&yaml);
    let headers = HeaderMap::new();
    let at = |namespace: Option<&str>| {
        let view = RequestView { method: "GET", path: "/", headers: &headers, client: CLIENT, namespace };
        let d = route_request(&s, "10.96.0.10:80".parse().expect("a"), &view, 0, 0, &NoState);
        format!("{} {:?}", describe(&d).split(' ').next().unwrap_or_default(), d.rule.is_some())
    };
    assert_eq!(at(Some("attacker")), "other true", "the tenant's own clients follow its rule");
    assert_eq!(at(Some("bystander")), "other true");
    assert_eq!(at(Some("demo")), "hello-v1 true", "demo's clients: the root namespace's rule");
    assert_eq!(at(Some("elsewhere")), "hello-v1 true");
    // With demo's own rules, they apply to everyone but the namespaces that have their own.
    let s = state_from_yaml(&format!("{CLUSTER}{}", vs("evil", "attacker", "other.demo.svc.cluster.local")));
    let headers = HeaderMap::new();
    let view = |namespace| RequestView { method: "GET", path: "/", headers: &headers, client: CLIENT, namespace };
    let d = route_request(&s, "10.96.0.10:80".parse().expect("a"), &view(Some("elsewhere")), 0, 0, &NoState);
    assert!(describe(&d).starts_with("hello-v"), "{}", describe(&d));
}
