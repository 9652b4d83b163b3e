//! Security objects field by field: PeerAuthentication, AuthorizationPolicy
//! (every L4 and L7 field, CUSTOM's provider), RequestAuthentication and the
//! mesh config's external authorizers.
use super::*;

#[test]
fn security_policies_are_validated_field_by_field() {
    let pa = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let ap = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: a, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let ra = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let at = "cluster.yaml (document 1)";
    let cases = [
        (
            pa("{mtls: {mode: strict}}"),
            format!(
                "{at}: PeerAuthentication demo/p: spec.mtls.mode: \"strict\": expected UNSET, STRICT, PERMISSIVE or DISABLE"
            ),
        ),
        (
            pa("{mtls: {mode: STRICT, extra: 1}}"),
            format!("{at}: PeerAuthentication demo/p: spec.mtls.extra: unknown field `extra`"),
        ),
        (
            pa("{portLevelMtls: {\"80\": {mode: STRICT}}}"),
            format!("{at}: PeerAuthentication demo/p: spec.portLevelMtls: requires spec.selector"),
        ),
        (
            pa("{selector: {matchLabels: {app: x}}, portLevelMtls: {http: {mode: STRICT}}}"),
            format!("{at}: PeerAuthentication demo/p: spec.portLevelMtls[http]: \"http\" is not a port number"),
        ),
        (
            ap("{action: CUSTOM, provider: {name: opa}}"),
            format!(
                "{at}: AuthorizationPolicy demo/a: spec.provider.name: \"opa\" is not an external authorizer in the mesh config's extensionProviders"
            ),
        ),
        (
            ap("{action: CUSTOM}"),
            format!("{at}: AuthorizationPolicy demo/a: spec.provider: required with action CUSTOM"),
        ),
        (
            ap("{action: DENY, provider: {name: opa}}"),
            format!("{at}: AuthorizationPolicy demo/a: spec.provider: only with action CUSTOM"),
        ),
        (
            ap("{rules: [{to: [{operation: {methods: [get]}}]}]}"),
            format!(
                "{at}: AuthorizationPolicy demo/a: spec.rules[0].to[0].operation.methods[0]: \"get\": methods are matched case-sensitively"
            ),
        ),
        (
            ap("{rules: [{to: [{operation: {paths: [\"/api/{*}\"]}}]}]}"),
            format!(
                "{at}: AuthorizationPolicy demo/a: spec.rules[0].to[0].operation.paths[0]: \"/api/{{*}}\": path templates"
            ),
        ),
        (
            ap("{rules: [{to: [{operation: {paths: [api]}}]}]}"),
            format!(
                "{at}: AuthorizationPolicy demo/a: spec.rules[0].to[0].operation.paths[0]: \"api\": a path starts with '/'"
            ),
        ),
        (
            ap("{rules: [{from: [{source: {}}]}]}"),
            format!("{at}: AuthorizationPolicy demo/a: spec.rules[0].from[0].source: must not be empty"),
        ),
        (
            ap("{rules: [{from: [{source: {requestPrincipals: [\"\"]}}]}]}"),
            format!("{at}: AuthorizationPolicy demo/a: spec.rules[0].from[0].source.requestPrincipals[0]: empty value"),
        ),
        (
            ap("{rules: [{from: [{source: {remoteIpBlocks: [nope]}}]}]}"),
            format!(
                "{at}: AuthorizationPolicy demo/a: spec.rules[0].from[0].source.remoteIpBlocks[0]: \"nope\" is not an IPv4"
            ),
        ),
        (
            ap("{rules: [{when: [{key: request.auth.claims, values: [y]}]}]}"),
            format!(
                "{at}: AuthorizationPolicy demo/a: spec.rules[0].when[0].key: \"request.auth.claims\": expected `[name]`"
            ),
        ),
        (
            ap("{rules: [{when: [{key: request.time, values: [y]}]}]}"),
            format!(
                "{at}: AuthorizationPolicy demo/a: spec.rules[0].when[0].key: \"request.time\" is not a supported key"
            ),
        ),
        (
            ap("{rules: [{when: [{key: connection.sni, values: [a.example]}]}]}"),
            format!(
                "{at}: AuthorizationPolicy demo/a: spec.rules[0].when[0].key: \"connection.sni\" is not supported: connections reach a workload over HBONE"
            ),
        ),
        (
            ap("{rules: [{when: [{key: source.ip, values: [y]}]}]}"),
            format!("{at}: AuthorizationPolicy demo/a: spec.rules[0].when[0].values[0]: \"y\" is not an IPv4"),
        ),
        (
            ap("{rules: [{when: [{key: destination.port, notValues: [\"0\"]}]}]}"),
            format!("{at}: AuthorizationPolicy demo/a: spec.rules[0].when[0].notValues[0]: \"0\" is not a port number"),
        ),
        (
            ap("{rules: [{when: [{key: source.namespace}]}]}"),
            format!("{at}: AuthorizationPolicy demo/a: spec.rules[0].when[0]: needs values or notValues"),
        ),
        (
            ra("{jwtRules: [{issuer: x}]}"),
            format!("{at}: RequestAuthentication demo/r: spec.jwtRules[0].jwks: one of jwks"),
        ),
        (
            ra("{jwtRules: [{issuer: x, jwksUri: \"http://x/keys\"}]}"),
            format!(
                "{at}: RequestAuthentication demo/r: spec.jwtRules[0].jwksUri: \"http://x/keys\": keys are fetched over https only"
            ),
        ),
        (
            ra(&format!("{{jwtRules: [{{issuer: x, jwksUri: \"https://x/keys\", jwks: '{ED}'}}]}}")),
            format!(
                "{at}: RequestAuthentication demo/r: spec.jwtRules[0].jwksUri: set one of jwks and jwksUri, not both"
            ),
        ),
        (
            ra("{jwtRules: [{issuer: x, jwksUri: \"https://x/keys\", timeout: 0s}]}"),
            format!("{at}: RequestAuthentication demo/r: spec.jwtRules[0].timeout: \"0s\": below 1ms"),
        ),
        (
            ra("{jwtRules: [{jwks: '{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}'}]}"),
            format!("{at}: RequestAuthentication demo/r: spec.jwtRules[0].issuer: required"),
        ),
        (
            ra(&format!("{{jwtRules: [{{issuer: x, jwks: '{ED}', fromHeaders: [{{name: \"bad header\"}}]}}]}}")),
            format!(
                "{at}: RequestAuthentication demo/r: spec.jwtRules[0].fromHeaders[0].name: \"bad header\" is not a valid HTTP header name"
            ),
        ),
        (
            ra(&format!("{{jwtRules: [{{issuer: x, jwks: '{ED}', outputClaimToHeaders: [{{header: x-sub}}]}}]}}")),
            format!("{at}: RequestAuthentication demo/r: spec.jwtRules[0].outputClaimToHeaders[0].claim: required"),
        ),
        (
            ra(&format!("{{jwtRules: [{{issuer: x, jwks: '{ED}'}}, {{issuer: x, jwks: '{ED}'}}]}}")),
            format!("{at}: RequestAuthentication demo/r: spec.jwtRules[1].issuer: \"x\" has a rule already"),
        ),
        (
            ra(&format!("{{jwtRules: [{{issuer: x, jwks: '{ED}', timeout: 5 minutes}}]}}")),
            format!("{at}: RequestAuthentication demo/r: spec.jwtRules[0].timeout:"),
        ),
        (
            ra("{jwtRules: [{issuer: x, jwks: nope}]}"),
            format!("{at}: RequestAuthentication demo/r: spec.jwtRules[0].jwks: not a JSON Web Key Set"),
        ),
        (
            ra("{jwtRules: [{issuer: x, audience: [y]}]}"),
            format!("{at}: RequestAuthentication demo/r: spec.jwtRules[0].audience: unknown field `audience`"),
        ),
        (
            ap("{rules: [{from: [{source: {ipBlocks: [10.0.0.0/40]}}]}]}"),
            format!(
                "{at}: AuthorizationPolicy demo/a: spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/40\": prefix length above 32"
            ),
        ),
        (
            ap("{rules: [{to: [{operation: {ports: [\"http\"]}}]}]}"),
            format!(
                "{at}: AuthorizationPolicy demo/a: spec.rules[0].to[0].operation.ports[0]: String(\"http\") is not a port number 1-65535"
            ),
        ),
        (
            ap("{rules: [{from: [{source: {principal: [x]}}]}]}"),
            format!(
                "{at}: AuthorizationPolicy demo/a: spec.rules[0].from[0].source.principal: unknown field `principal`"
            ),
        ),
        (
            ap("{selector: {matchLabels: {}}}"),
            format!("{at}: AuthorizationPolicy demo/a: spec.selector.matchLabels: empty"),
        ),
        // targetRefs: Services of the policy's namespace; never with a selector.
        (
            ap("{selector: {matchLabels: {app: x}}, targetRefs: [{kind: Service, name: x}]}"),
            format!("{at}: AuthorizationPolicy demo/a: spec.targetRefs: only one of selector and targetRefs"),
        ),
        (
            ap("{targetRefs: [{kind: Service, name: x, namespace: other}]}"),
            format!(
                "{at}: AuthorizationPolicy demo/a: spec.targetRefs[0].namespace: \"other\": a policy may target only its own namespace"
            ),
        ),
        (
            ap("{targetRef: {kind: Pod, name: x}}"),
            format!("{at}: AuthorizationPolicy demo/a: spec.targetRef.kind: \"\" \"Pod\": expected a Service"),
        ),
        (
            ap("{targetRefs: [{kind: Service, name: x, port: 80}]}"),
            format!("{at}: AuthorizationPolicy demo/a: spec.targetRefs[0].port: unknown field `port`"),
        ),
        (
            ra("{targetRefs: [{kind: Service, name: x, sectionName: http}]}"),
            format!(
                "{at}: RequestAuthentication demo/r: spec.targetRefs[0].sectionName: is not supported by this version of mesh-agent"
            ),
        ),
        (
            ra("{targetRefs: [{kind: Service}], jwtRules: [{issuer: x, jwks: '{\"keys\": []}'}]}"),
            format!("{at}: RequestAuthentication demo/r: spec.targetRefs[0].name: required"),
        ),
    ];
    for (yaml, want) in cases {
        let got = error_of(&yaml);
        assert!(got.starts_with(&want), "for:\n{yaml}\nwant: {want}\ngot:  {got}");
    }
    // Both kinds load, with v1beta1 accepted too and kubectl's status ignored.
    let ok = format!(
        "{}---\n{}status: {{}}\n",
        pa("{mtls: {mode: STRICT}}").replace("security.istio.io/v1", "security.istio.io/v1beta1"),
        ap(
            "{action: DENY, rules: [{from: [{source: {notNamespaces: [demo]}}], to: [{operation: {ports: [22, \"23\"]}}]}]}"
        )
    );
    let loaded = load(&ok).expect("valid");
    assert_eq!(loaded.state.peer_authentications.len(), 1);
    assert_eq!(loaded.state.authorization_policies[0].rules[0].to[0].ports, [22, 23]);
    // Attached to Services: both kinds, `targetRef` and `targetRefs`.
    let attached = format!(
        "{}---\n{}",
        ap("{targetRef: {kind: Service, name: web}, action: DENY, rules: [{}]}"),
        ra(&format!(
            "{{targetRefs: [{{group: \"\", kind: Service, name: web}}, {{kind: Service, name: api}}], jwtRules: [{{issuer: x, jwks: '{ED}'}}]}}"
        ))
    );
    let loaded = load(&attached).expect("valid");
    assert_eq!(loaded.state.authorization_policies[0].services, [Arc::from("web")]);
    assert_eq!(loaded.state.request_authentications[0].services, [Arc::from("web"), Arc::from("api")]);
    // Every L7 field and key, and a RequestAuthentication with every field.
    let l7 = format!(
        "{}---\n{}",
        ap(
            r#"{action: AUDIT, rules: [{from: [{source: {requestPrincipals: ["*"], notRequestPrincipals: [a/b], remoteIpBlocks: [1.2.3.0/24], notRemoteIpBlocks: [1.2.3.4]}}],
              to: [{operation: {hosts: [A.example.com], notHosts: ["*.x"], methods: [GET], notMethods: [POST], paths: ["/a/*"], notPaths: ["*.png"]}}],
              when: [{key: "request.headers[X-User]", values: [u]}, {key: request.auth.principal, values: [a/b]}, {key: request.auth.audiences, values: [x]},
                     {key: request.auth.presenter, values: [x]}, {key: "request.auth.claims[a][b]", values: [x]}, {key: remote.ip, values: [1.2.3.4]},
                     {key: source.principal, values: [x]}, {key: destination.ip, values: [10.0.0.0/8]}]}]}"#
        ),
        ra(&format!(
            "{{selector: {{matchLabels: {{app: x}}}}, jwtRules: [{{issuer: x, audiences: [a], jwks: '{ED}', fromHeaders: [{{name: X-Jwt, prefix: \"Token \"}}], fromParams: [t], fromCookies: [c], outputPayloadToHeader: x-payload, forwardOriginalToken: true, outputClaimToHeaders: [{{header: x-sub, claim: sub}}], timeout: 5s}}]}}"
        ))
    );
    let loaded = load(&l7).expect("valid");
    let op = &loaded.state.authorization_policies[0].rules[0].to[0];
    assert_eq!(op.hosts[0], crate::state::security::Pattern::Exact("a.example.com".into()));
    let rule = &loaded.state.request_authentications[0].rules[0];
    assert_eq!((rule.keys.len(), rule.from_headers[0].name.as_str()), (1, "x-jwt"));
}

/// A valid key set: one Ed25519 key.
const ED: &str = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

#[test]
fn external_authorizers_are_validated_field_by_field() {
    let mesh = |providers: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\n\
             data:\n  mesh: |\n    extensionProviders: {providers}\n"
        )
    };
    let at = "cluster.yaml (document 1): ConfigMap istio-system/istio: data.mesh.extensionProviders[0]";
    let cases = [
        ("[{name: a, envoyExtAuthzHttp: {port: 80}}]", format!("{at}.envoyExtAuthzHttp.service: required")),
        ("[{name: a, envoyExtAuthzGrpc: {service: x}}]", format!("{at}.envoyExtAuthzGrpc.port: required")),
        (
            "[{name: a, envoyExtAuthzGrpc: {service: x, port: 70000}}]",
            format!("{at}.envoyExtAuthzGrpc.port: out of range"),
        ),
        (
            "[{name: a, envoyExtAuthzHttp: {service: x, port: 1, statusOnError: teapot}}]",
            format!("{at}.envoyExtAuthzHttp.statusOnError: \"teapot\" is not an HTTP status code"),
        ),
        (
            "[{name: a, envoyExtAuthzHttp: {service: x, port: 1, pathPrefix: check}}]",
            format!("{at}.envoyExtAuthzHttp.pathPrefix: \"check\" must start with '/'"),
        ),
        (
            "[{name: a, envoyExtAuthzHttp: {service: x, port: 1, headersToUpstreamOnAllow: [\"bad header\"]}}]",
            format!("{at}.envoyExtAuthzHttp.headersToUpstreamOnAllow[0]: \"bad header\" is not a header name"),
        ),
        (
            "[{name: a, envoyExtAuthzGrpc: {service: x, port: 1, clearRouteCache: true}}]",
            format!("{at}.envoyExtAuthzGrpc.clearRouteCache: not supported"),
        ),
        (
            "[{name: a, envoyExtAuthzGrpc: {service: x, port: 1, timeout: forever}}]",
            format!("{at}.envoyExtAuthzGrpc.timeout:"),
        ),
        (
            "[{name: a, envoyExtAuthzGrpc: {service: x, port: 1, failopen: true}}]",
            format!("{at}.envoyExtAuthzGrpc.failopen: unknown field `failopen`"),
        ),
        (
            "[{name: a, envoyExtAuthzGrpc: {service: x, port: 1}, envoyExtAuthzHttp: {service: x, port: 1}}]",
            format!("{at}: one of envoyExtAuthzHttp and envoyExtAuthzGrpc, not both"),
        ),
        ("[{envoyExtAuthzGrpc: {service: x, port: 1}}]", format!("{at}.name: required")),
    ];
    for (providers, want) in cases {
        let got = error_of(&mesh(providers));
        assert!(got.starts_with(&want), "for: {providers}\nwant: {want}\ngot:  {got}");
    }
    // Every field, a tracing provider skipped, and a CUSTOM policy naming it.
    let ok = mesh(
        "[{name: http, envoyExtAuthzHttp: {service: ext.foo.svc.cluster.local, port: 8000, timeout: 2s, pathPrefix: /check, failOpen: true,\n\
         \x20     statusOnError: \"503\", includeRequestHeadersInCheck: [x-a, \"x-b-*\"], includeAdditionalHeadersInCheck: {x-c: d},\n\
         \x20     includeRequestBodyInCheck: {maxRequestBytes: 100, allowPartialMessage: true}, headersToUpstreamOnAllow: [x-u],\n\
         \x20     headersToDownstreamOnDeny: [x-d], headersToDownstreamOnAllow: [x-e]}},\n\
         \x20   {name: grpc, envoyExtAuthzGrpc: {service: ext.foo.svc.cluster.local, port: 9000, includeRequestBodyInCheck: {packAsBytes: true}}},\n\
         \x20   {name: zipkin, zipkin: {service: z, port: 9411}}]",
    ) + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\n\
           spec: {action: CUSTOM, provider: {name: grpc}, rules: [{to: [{operation: {paths: [/x]}}]}]}\n";
    let loaded = load(&ok).expect("valid");
    let providers = &loaded.state.extension_providers;
    assert_eq!(providers.keys().collect::<Vec<_>>(), ["grpc", "http"]);
    assert_eq!(
        (providers["http"].timeout, providers["http"].status_on_error),
        (std::time::Duration::from_secs(2), 503)
    );
    let policy = &loaded.state.authorization_policies[0];
    assert_eq!(policy.provider.as_ref().map(|p| p.name.as_str()), Some("grpc"));
}
