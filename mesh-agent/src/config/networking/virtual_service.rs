//! A `VirtualService`: its hosts and gateways resolved, and its `http`,
//! `tcp` and `tls` rules validated field by field into the routing model.
use super::*;

pub(in crate::config) fn build_virtual_service(
    ctx: &mut Ctx<'_>,
    obj: &VirtualServiceObject,
    services: &BTreeMap<String, Arc<Service>>,
    gateways: &[Arc<Gateway>],
) -> Option<VirtualService> {
    let (name, namespace) = crate::config::object::name_and_namespace(ctx, &obj.metadata)?;
    let before = ctx.error_count();
    let spec = &obj.spec;
    // `exportTo`: where the rules apply (clients' namespaces, and the
    // namespaces of the gateways they bind).
    let export_to = export_to(ctx, spec.export_to.as_deref(), &namespace);
    // No `gateways` means the mesh only; `mesh` names the mesh among gateways.
    let gw_refs: Vec<String> = match spec.gateways.is_empty() {
        true => vec![MESH.to_owned()],
        false => spec.gateways.iter().map(|g| gateway_ref(g, &namespace)).collect(),
    };
    for (i, g) in gw_refs.iter().enumerate() {
        if g != MESH && !gateways.iter().any(|gw| *g == format!("{}/{}", gw.namespace, gw.name)) {
            ctx.error(format!("spec.gateways[{i}]"), format!("Gateway {g} does not exist"));
        }
    }
    let mesh_only = gw_refs.iter().all(|g| g == MESH);
    if spec.hosts.is_empty() {
        ctx.error("spec.hosts", "at least one host is required");
    }
    // For the mesh, hosts name Services; for gateways they are matched against
    // the request's host, and need not be Services.
    let mut hosts = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        match resolve_host(h, &namespace, services) {
            Some(s) => hosts.push(format!("{}/{}", s.namespace, s.name)),
            None if !mesh_only => {}
            None => ctx.error(format!("spec.hosts[{i}]"), format!("{h:?} is not a known Service")),
        }
    }
    if !gw_refs.iter().any(|g| g == MESH) {
        hosts.clear();
    }
    let mut http = Vec::new();
    for (ri, r) in spec.http.iter().enumerate() {
        let base = format!("spec.http[{ri}]");
        reject(
            ctx,
            &base,
            &[
                ("mirrors", &r.mirrors),
                ("corsPolicy", &r.cors_policy),
                ("directResponse", &r.direct_response),
                ("delegate", &r.delegate),
            ],
        );
        let mut matches = Vec::new();
        for (mi, m) in r.matches.iter().enumerate() {
            let mb = format!("{base}.match[{mi}]");
            reject(
                ctx,
                &mb,
                &[
                    ("scheme", &m.scheme),
                    ("authority", &m.authority),
                    ("withoutHeaders", &m.without_headers),
                    ("ignoreUriCase", &m.ignore_uri_case),
                    ("sourceLabels", &m.source_labels),
                    ("sourceNamespace", &m.source_namespace),
                ],
            );
            let mut match_gateways = Vec::new();
            for (gi, g) in m.gateways.iter().enumerate() {
                let g = gateway_ref(g, &namespace);
                if !gw_refs.contains(&g) {
                    ctx.error(format!("{mb}.gateways[{gi}]"), format!("{g:?} is not in spec.gateways"));
                }
                match_gateways.push(g);
            }
            let uri = m.uri.as_ref().and_then(|u| string_match(ctx, &format!("{mb}.uri"), u));
            let method = m.method.as_ref().and_then(|u| string_match(ctx, &format!("{mb}.method"), u));
            let mut headers = Vec::new();
            for (h, sm) in &m.headers {
                if let Some(x) = string_match(ctx, &format!("{mb}.headers[{h}]"), sm) {
                    headers.push((h.to_ascii_lowercase(), x));
                }
            }
            let port = match m.port {
                Some(p) => match u16::try_from(p) {
                    Ok(p) if p != 0 => Some(p),
                    _ => {
                        ctx.error(format!("{mb}.port"), format!("port {p} is out of range 1-65535"));
                        None
                    }
                },
                None => None,
            };
            let mut query_params = Vec::new();
            for (q, sm) in &m.query_params {
                if let Some(x) = string_match(ctx, &format!("{mb}.queryParams[{q}]"), sm) {
                    query_params.push((q.clone(), x));
                }
            }
            matches.push(HttpMatch { uri, method, headers, query_params, port, gateways: match_gateways });
        }
        let routes = destinations(ctx, &base, &r.route, &namespace, services);
        let timeout = match &r.timeout {
            Some(t) => match parse_duration(t) {
                Ok(d) => Some(d),
                Err(e) => {
                    ctx.error(format!("{base}.timeout"), e);
                    None
                }
            },
            None => None,
        };
        let retries = r.retries.as_ref().and_then(|x| retries(ctx, &format!("{base}.retries"), x));
        let fault = r.fault.as_ref().and_then(|f| fault(ctx, &format!("{base}.fault"), f));
        let headers = r.headers.as_ref().map(|h| header_rules(ctx, &format!("{base}.headers"), h)).unwrap_or_default();
        let mirror = match &r.mirror {
            Some(m) => {
                let spec = [RouteDestinationSpec { destination: m.clone(), weight: None, headers: None }];
                let pct =
                    percent(ctx, &format!("{base}.mirrorPercentage.value"), &r.mirror_percentage, r.mirror_percent);
                // Errors name `route[0]`; say `mirror` instead.
                let errors = ctx.error_count();
                let dest = destinations(ctx, &format!("{base}.mirror"), &spec, namespace.as_ref(), services);
                ctx.rename_errors_since(errors, &format!("{base}.mirror.route[0]"), &format!("{base}.mirror"));
                dest.into_iter().next().map(|d| (d, pct))
            }
            None => None,
        };
        let rewrite = r.rewrite.as_ref().map(|w| {
            reject(ctx, &format!("{base}.rewrite"), &[("uriRegexRewrite", &w.uri_regex_rewrite)]);
            Rewrite { uri: w.uri.clone(), authority: w.authority.clone(), full_path: false }
        });
        let redirect = r.redirect.as_ref().and_then(|d| redirect(ctx, &format!("{base}.redirect"), d));
        if redirect.is_some() && (!r.route.is_empty() || rewrite.is_some()) {
            ctx.error(format!("{base}.redirect"), "a redirect rule cannot also have route or rewrite");
        } else if r.route.is_empty() && r.redirect.is_none() {
            ctx.error(format!("{base}.route"), "at least one destination (or a redirect) is required");
        }
        http.push(Arc::new(HttpRoute {
            name: r.name.clone(),
            matches,
            routes,
            timeout,
            retries,
            fault,
            headers,
            rewrite,
            redirect,
            mirror,
        }));
    }
    let mut tcp = Vec::new();
    for (ri, r) in spec.tcp.iter().enumerate() {
        let base = format!("spec.tcp[{ri}]");
        let mut ports = Vec::new();
        for (mi, m) in r.matches.iter().enumerate() {
            let mb = format!("{base}.match[{mi}]");
            reject(
                ctx,
                &mb,
                &[
                    ("destinationSubnets", &m.destination_subnets),
                    ("sourceLabels", &m.source_labels),
                    ("sourceNamespace", &m.source_namespace),
                    ("gateways", &m.gateways),
                ],
            );
            if let Ok(p) = match_port(ctx, &format!("{mb}.port"), m.port) {
                ports.push(p);
            }
        }
        if r.route.is_empty() {
            ctx.error(format!("{base}.route"), "at least one destination is required");
        }
        let routes = destinations(ctx, &base, &r.route, &namespace, services);
        tcp.push(Arc::new(TcpRoute { ports, routes }));
    }
    let tls = tls_routes(ctx, spec, &namespace, services);
    let host_patterns = spec.hosts.clone();
    (ctx.error_count() == before).then_some(VirtualService {
        name,
        namespace,
        hosts,
        host_patterns,
        export_to,
        created: obj.metadata.creation_timestamp.clone(),
        gateways: gw_refs,
        http,
        tcp,
        tls,
    })
}

/// A match's optional port; `Err` (reported) when out of range.
fn match_port(ctx: &mut Ctx<'_>, field: &str, port: Option<i64>) -> Result<Option<u16>, ()> {
    match port.map(u16::try_from) {
        Some(Ok(p)) if p != 0 => Ok(Some(p)),
        Some(_) => {
            ctx.error(field, "out of range 1-65535");
            Err(())
        }
        None => Ok(None),
    }
}

/// `tls` rules: routed by SNI at gateways (TLS PASSTHROUGH servers) and,
/// for mesh traffic, at the source agent (the ClientHello peeked).
fn tls_routes(
    ctx: &mut Ctx<'_>,
    spec: &VirtualServiceSpec,
    namespace: &str,
    services: &BTreeMap<String, Arc<Service>>,
) -> Vec<Arc<TlsRoute>> {
    let mut out = Vec::new();
    for (ri, r) in spec.tls.iter().enumerate() {
        let base = format!("spec.tls[{ri}]");
        let mut matches = Vec::new();
        for (mi, m) in r.matches.iter().enumerate() {
            let mb = format!("{base}.match[{mi}]");
            reject(
                ctx,
                &mb,
                &[
                    ("destinationSubnets", &m.destination_subnets),
                    ("sourceLabels", &m.source_labels),
                    ("sourceNamespace", &m.source_namespace),
                ],
            );
            if m.sni_hosts.is_empty() {
                ctx.error(format!("{mb}.sniHosts"), "at least one SNI host is required");
            }
            let port = match_port(ctx, &format!("{mb}.port"), m.port).ok().flatten();
            let gateways: Vec<String> = m.gateways.iter().map(|g| gateway_ref(g, namespace)).collect();
            matches.push(TlsMatch { sni_hosts: m.sni_hosts.clone(), port, gateways });
        }
        if r.matches.is_empty() {
            ctx.error(format!("{base}.match"), "at least one match with sniHosts is required");
        }
        if r.route.is_empty() {
            ctx.error(format!("{base}.route"), "at least one destination is required");
        }
        let routes = destinations(ctx, &base, &r.route, namespace, services);
        out.push(Arc::new(TlsRoute { matches, routes }));
    }
    out
}

/// `route[]`: destinations with weights adding up to 100 (one may omit its weight).
fn destinations(
    ctx: &mut Ctx<'_>,
    base: &str,
    route: &[RouteDestinationSpec],
    namespace: &str,
    services: &BTreeMap<String, Arc<Service>>,
) -> Vec<WeightedDestination> {
    let mut routes = Vec::new();
    for (di, d) in route.iter().enumerate() {
        let db = format!("{base}.route[{di}]");
        reject(ctx, &db, &[("headers", &d.headers)]);
        let Some(service) = resolve_host(&d.destination.host, namespace, services) else {
            ctx.error(format!("{db}.destination.host"), format!("{:?} is not a known Service", d.destination.host));
            continue;
        };
        let port = match &d.destination.port {
            Some(p) => match u16::try_from(p.number) {
                Ok(n) if service.ports.iter().any(|sp| sp.port == n) => Some(n),
                _ => {
                    ctx.error(
                        format!("{db}.destination.port.number"),
                        format!("Service {}/{} has no port {}", service.namespace, service.name, p.number),
                    );
                    continue;
                }
            },
            None => None,
        };
        let weight = match d.weight {
            None => None,
            Some(w) if (0..=100).contains(&w) => Some(w as u32),
            Some(w) => {
                ctx.error(format!("{db}.weight"), format!("{w} is out of range 0-100"));
                continue;
            }
        };
        routes.push(WeightedDestination {
            service: format!("{}/{}", service.namespace, service.name),
            subset: d.destination.subset.clone(),
            port,
            weight: weight.unwrap_or(if route.len() == 1 { 100 } else { 0 }),
        });
    }
    let total: u32 = routes.iter().map(|r| r.weight).sum();
    if routes.len() > 1 && total != 100 {
        ctx.error(format!("{base}.route"), format!("weights add up to {total}, not 100"));
    }
    routes
}

fn redirect(ctx: &mut Ctx<'_>, base: &str, d: &RedirectSpec) -> Option<Redirect> {
    reject(ctx, base, &[("port", &d.port), ("derivePort", &d.derive_port), ("scheme", &d.scheme)]);
    let code = match d.redirect_code {
        None => 301,
        Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u16,
        Some(c) => {
            ctx.error(format!("{base}.redirectCode"), format!("{c}: expected 301, 302, 303, 307 or 308"));
            return None;
        }
    };
    Some(Redirect { uri: d.uri.clone(), authority: d.authority.clone(), code, gateway_api: None })
}

fn retries(ctx: &mut Ctx<'_>, base: &str, r: &RetriesSpec) -> Option<Retries> {
    reject(
        ctx,
        base,
        &[
            ("retryRemoteLocalities", &r.retry_remote_localities),
            ("retryIgnorePreviousHosts", &r.retry_ignore_previous_hosts),
            ("backoff", &r.backoff),
        ],
    );
    let attempts = match u32::try_from(r.attempts) {
        Ok(a) if a <= 100 => a,
        _ => {
            ctx.error(format!("{base}.attempts"), format!("{} is out of range 0-100", r.attempts));
            return None;
        }
    };
    let per_try_timeout = duration_field(ctx, &format!("{base}.perTryTimeout"), &r.per_try_timeout);
    // Istio's default conditions when none are given.
    let spec = r.retry_on.as_deref().unwrap_or("connect-failure,refused-stream,retriable-status-codes,503");
    let mut on = RetryOn::default();
    for (i, cond) in spec.split(',').map(str::trim).filter(|c| !c.is_empty()).enumerate() {
        match cond {
            "5xx" => on.five_xx = true,
            "gateway-error" => on.gateway_error = true,
            "reset" | "refused-stream" => on.reset = true,
            "connect-failure" => on.connect_failure = true,
            "retriable-status-codes" => {}
            code => match code.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => on.status_codes.push(c),
                _ => ctx.error(
                    format!("{base}.retryOn"),
                    format!(
                        "condition {} {code:?}: supported are 5xx, gateway-error, reset, refused-stream, \
                         connect-failure, retriable-status-codes and status codes",
                        i + 1
                    ),
                ),
            },
        }
    }
    (attempts > 0).then_some(Retries { attempts, per_try_timeout, on })
}

fn percent(ctx: &mut Ctx<'_>, field: &str, p: &Option<PercentSpec>, legacy: Option<i64>) -> f64 {
    let v = p.as_ref().map(|p| p.value).or(legacy.map(|l| l as f64)).unwrap_or(100.0);
    if !(0.0..=100.0).contains(&v) {
        ctx.error(field, format!("{v} is out of range 0-100"));
    }
    v
}

fn fault(ctx: &mut Ctx<'_>, base: &str, f: &FaultSpec) -> Option<Fault> {
    let mut out = Fault::default();
    if let Some(d) = &f.delay {
        reject(ctx, &format!("{base}.delay"), &[("exponentialDelay", &d.exponential_delay)]);
        let pct = percent(ctx, &format!("{base}.delay.percentage.value"), &d.percentage, d.percent);
        match duration_field(ctx, &format!("{base}.delay.fixedDelay"), &d.fixed_delay) {
            Some(t) => out.delay = Some((t, pct)),
            None if d.fixed_delay.is_none() => ctx.error(format!("{base}.delay.fixedDelay"), "required"),
            None => {}
        }
    }
    if let Some(a) = &f.abort {
        reject(ctx, &format!("{base}.abort"), &[("grpcStatus", &a.grpc_status), ("http2Error", &a.http2_error)]);
        let pct = percent(ctx, &format!("{base}.abort.percentage.value"), &a.percentage, None);
        match a.http_status.map(u16::try_from) {
            Some(Ok(code)) if (200..=599).contains(&code) => out.abort = Some((code, pct)),
            Some(_) => ctx.error(format!("{base}.abort.httpStatus"), "must be an HTTP status 200-599"),
            None => ctx.error(format!("{base}.abort.httpStatus"), "required"),
        }
    }
    Some(out)
}

fn header_ops(ctx: &mut Ctx<'_>, base: &str, h: &Option<HeaderOpsSpec>) -> HeaderOps {
    use hyper::header::{HeaderName, HeaderValue};
    let Some(h) = h else { return HeaderOps::default() };
    let name = |ctx: &mut Ctx<'_>, field: String, k: &str| match HeaderName::from_bytes(k.as_bytes()) {
        Ok(n) => Some(n),
        Err(_) => {
            ctx.error(field, format!("{k:?} is not a valid header name"));
            None
        }
    };
    let pairs = |ctx: &mut Ctx<'_>, op: &str, m: &BTreeMap<String, String>| {
        let mut out = Vec::new();
        for (k, v) in m {
            let field = format!("{base}.{op}.{k}");
            let value = HeaderValue::from_str(v);
            if value.is_err() {
                ctx.error(field.clone(), format!("{v:?} is not a valid header value"));
            }
            if let (Some(n), Ok(v)) = (name(ctx, field, k), value) {
                out.push(HeaderPair(n, v));
            }
        }
        out
    };
    let set = pairs(ctx, "set", &h.set);
    let add = pairs(ctx, "add", &h.add);
    let remove = h.remove.iter().enumerate().filter_map(|(i, k)| name(ctx, format!("{base}.remove[{i}]"), k)).collect();
    HeaderOps { set, add, remove }
}

fn header_rules(ctx: &mut Ctx<'_>, base: &str, h: &HeadersSpec) -> HeaderRules {
    HeaderRules {
        request: header_ops(ctx, &format!("{base}.request"), &h.request),
        response: header_ops(ctx, &format!("{base}.response"), &h.response),
    }
}
