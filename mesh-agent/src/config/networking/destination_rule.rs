//! `DestinationRule`: traffic policies (load balancing, connection pools,
//! outlier detection, client TLS) for a Service and its subsets.
use super::*;

/// A `trafficPolicy`; what it leaves unset comes from `inherited` (a subset's
/// policy inherits the rule's).
fn policy(
    ctx: &mut Ctx<'_>,
    field: &str,
    tp: &Option<TrafficPolicySpec>,
    inherited: &Policy,
    secrets: &Secrets,
) -> Policy {
    let mut out = inherited.clone();
    let Some(tp) = tp.as_ref() else { return out };
    if let Some(tls) = &tp.tls {
        out.tls = client_tls(ctx, &format!("{field}.tls"), tls, secrets);
    }
    reject(
        ctx,
        field,
        &[
            ("portLevelSettings", &tp.port_level_settings),
            ("tunnel", &tp.tunnel),
            ("proxyProtocol", &tp.proxy_protocol),
        ],
    );
    if let Some(lb) = &tp.load_balancer
        && let Some(x) = load_balancer(ctx, &format!("{field}.loadBalancer"), lb)
    {
        out.load_balancer = x;
    }
    if let Some(cp) = &tp.connection_pool {
        let f = format!("{field}.connectionPool");
        if let Some(tcp) = &cp.tcp {
            let tf = format!("{f}.tcp");
            reject(
                ctx,
                &tf,
                &[
                    ("tcpKeepalive", &tcp.tcp_keepalive),
                    ("maxConnectionDuration", &tcp.max_connection_duration),
                    ("idleTimeout", &tcp.idle_timeout),
                ],
            );
            if let Some(n) = count(ctx, &format!("{tf}.maxConnections"), tcp.max_connections, i64::from(u32::MAX)) {
                out.pool.max_connections = Some(n);
            }
            if let Some(t) = duration_field(ctx, &format!("{tf}.connectTimeout"), &tcp.connect_timeout) {
                out.pool.connect_timeout = Some(t);
            }
        }
        if let Some(http) = &cp.http {
            let hf = format!("{f}.http");
            reject(
                ctx,
                &hf,
                &[("maxRetries", &http.max_retries), ("maxConcurrentStreams", &http.max_concurrent_streams)],
            );
            let max = i64::from(u32::MAX);
            if let Some(n) = count(ctx, &format!("{hf}.http1MaxPendingRequests"), http.http1_max_pending_requests, max)
            {
                out.pool.max_pending = Some(n);
            }
            if let Some(n) = count(ctx, &format!("{hf}.http2MaxRequests"), http.http2_max_requests, max) {
                out.pool.max_requests = Some(n);
            }
            // 0 means unlimited, as in Istio.
            match count(ctx, &format!("{hf}.maxRequestsPerConnection"), http.max_requests_per_connection, max) {
                Some(0) => out.pool.max_requests_per_connection = None,
                Some(n) => out.pool.max_requests_per_connection = Some(n),
                None => {}
            }
            if let Some(t) = duration_field(ctx, &format!("{hf}.idleTimeout"), &http.idle_timeout) {
                out.pool.idle_timeout = Some(t);
            }
            match http.h2_upgrade_policy.as_deref() {
                None | Some("DEFAULT" | "DO_NOT_UPGRADE") => {}
                Some("UPGRADE") => out.pool.h2_upgrade = true,
                Some(other) => ctx.error(
                    format!("{hf}.h2UpgradePolicy"),
                    format!("{other:?}: expected DEFAULT, DO_NOT_UPGRADE or UPGRADE"),
                ),
            }
            out.pool.use_client_protocol = http.use_client_protocol.unwrap_or(false);
        }
    }
    if let Some(od) = &tp.outlier_detection {
        let f = format!("{field}.outlierDetection");
        reject(
            ctx,
            &f,
            &[
                ("consecutiveErrors", &od.consecutive_errors),
                ("minHealthPercent", &od.min_health_percent),
                ("splitExternalLocalOriginErrors", &od.split_external_local_origin_errors),
                ("consecutiveLocalOriginFailures", &od.consecutive_local_origin_failures),
            ],
        );
        // Istio's defaults.
        out.outlier = Some(OutlierDetection {
            consecutive_5xx: count(ctx, &format!("{f}.consecutive5xxErrors"), od.consecutive_5xx_errors, 1000)
                .unwrap_or(5),
            consecutive_gateway: count(
                ctx,
                &format!("{f}.consecutiveGatewayErrors"),
                od.consecutive_gateway_errors,
                1000,
            )
            .unwrap_or(0),
            interval: duration_field(ctx, &format!("{f}.interval"), &od.interval).unwrap_or(Duration::from_secs(10)),
            base_ejection: duration_field(ctx, &format!("{f}.baseEjectionTime"), &od.base_ejection_time)
                .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: count(ctx, &format!("{f}.maxEjectionPercent"), od.max_ejection_percent, 100)
                .unwrap_or(10),
        });
    }
    out
}

fn load_balancer(ctx: &mut Ctx<'_>, lbf: &str, lb: &LoadBalancerSpec) -> Option<LoadBalancer> {
    reject(
        ctx,
        lbf,
        &[("localityLbSetting", &lb.locality_lb_setting), ("warmupDurationSecs", &lb.warmup_duration_secs)],
    );
    if let Some(ch) = &lb.consistent_hash {
        let f = format!("{lbf}.consistentHash");
        if lb.simple.is_some() {
            ctx.error(lbf, "set either simple or consistentHash");
        }
        reject(
            ctx,
            &f,
            &[
                ("httpCookie", &ch.http_cookie),
                ("ringHash", &ch.ring_hash),
                ("maglev", &ch.maglev),
                ("minimumRingSize", &ch.minimum_ring_size),
            ],
        );
        let key = match (&ch.http_header_name, &ch.http_query_parameter_name, ch.use_source_ip) {
            (Some(h), None, None | Some(false)) => HashKey::Header(h.to_ascii_lowercase()),
            (None, Some(q), None | Some(false)) => HashKey::QueryParameter(q.clone()),
            (None, None, Some(true)) => HashKey::SourceIp,
            _ => {
                ctx.error(&f, "exactly one of httpHeaderName, httpQueryParameterName or useSourceIp is required");
                return None;
            }
        };
        return Some(LoadBalancer::ConsistentHash(key));
    }
    match lb.simple.as_deref() {
        None | Some("UNSPECIFIED") | Some("ROUND_ROBIN") => Some(LoadBalancer::RoundRobin),
        Some("RANDOM") => Some(LoadBalancer::Random),
        // LEAST_CONN is Istio's deprecated name for LEAST_REQUEST.
        Some("LEAST_REQUEST" | "LEAST_CONN") => Some(LoadBalancer::LeastRequest),
        Some(other @ "PASSTHROUGH") => {
            ctx.error(format!("{lbf}.simple"), format!("{other} is {NOT_YET}"));
            None
        }
        Some(other) => {
            ctx.error(format!("{lbf}.simple"), format!("{other:?}: expected ROUND_ROBIN, RANDOM or LEAST_REQUEST"));
            None
        }
    }
}

pub(in crate::config) fn build_destination_rule(
    ctx: &mut Ctx<'_>,
    obj: &DestinationRuleObject,
    services: &BTreeMap<String, Arc<Service>>,
    secrets: &Secrets,
) -> Option<DestinationRule> {
    let (name, namespace) = crate::config::security::name_and_namespace(ctx, &obj.metadata)?;
    let before = ctx.error_count();
    let spec = &obj.spec;
    reject(ctx, "spec", &[("exportTo", &spec.export_to), ("workloadSelector", &spec.workload_selector)]);
    let service = match resolve_host(&spec.host, &namespace, services) {
        Some(s) => format!("{}/{}", s.namespace, s.name),
        None => {
            ctx.error("spec.host", format!("{:?} is not a known Service", spec.host));
            String::new()
        }
    };
    let top = policy(ctx, "spec.trafficPolicy", &spec.traffic_policy, &Policy::default(), secrets);
    let mut subsets = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let field = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            ctx.error(format!("{field}.name"), "required");
        }
        if subsets.iter().any(|x: &Subset| x.name == s.name) {
            ctx.error(format!("{field}.name"), format!("subset {:?} is defined twice", s.name));
        }
        let own = policy(ctx, &format!("{field}.trafficPolicy"), &s.traffic_policy, &top, secrets);
        subsets.push(Subset { name: s.name.clone(), labels: s.labels.clone(), policy: own });
    }
    (ctx.error_count() == before).then_some(DestinationRule { name, namespace, service, subsets, policy: top })
}

/// `trafficPolicy.tls`: SIMPLE originates TLS to the destination (the
/// application speaks plain HTTP); DISABLE and ISTIO_MUTUAL leave the
/// connection as the mesh makes it (mesh hops are always mutual TLS here).
fn client_tls(ctx: &mut Ctx<'_>, field: &str, t: &ClientTlsSpec, secrets: &Secrets) -> Option<Arc<TlsOrigination>> {
    reject(
        ctx,
        field,
        &[
            ("clientCertificate", &t.client_certificate),
            ("privateKey", &t.private_key),
            ("subjectAltNames", &t.subject_alt_names),
            ("caCrl", &t.ca_crl),
        ],
    );
    match t.mode.as_deref().unwrap_or("DISABLE") {
        "DISABLE" | "ISTIO_MUTUAL" => return None,
        "SIMPLE" => {}
        "MUTUAL" => {
            ctx.error(format!("{field}.mode"), format!("MUTUAL is {NOT_YET}"));
            return None;
        }
        other => {
            ctx.error(format!("{field}.mode"), format!("{other:?}: expected DISABLE, SIMPLE or ISTIO_MUTUAL"));
            return None;
        }
    }
    let insecure = t.insecure_skip_verify.unwrap_or(false);
    let (ca, pem) = match (&t.credential_name, &t.ca_certificates) {
        (Some(_), Some(_)) => {
            ctx.error(format!("{field}.caCertificates"), "give credentialName or caCertificates, not both");
            return None;
        }
        (Some(name), None) => {
            let key = if name.contains('/') { name.clone() } else { format!("{}/{name}", ctx_namespace(ctx)) };
            let value = secrets.get(&key).map(|s| {
                s.value("ca.crt").and_then(|v| match v {
                    Some(v) => Ok(v),
                    None => s.value("cacert").and_then(|v| v.ok_or_else(|| "has no ca.crt".to_owned())),
                })
            });
            match value {
                Some(Ok(pem)) => (format!("Secret {key}"), pem),
                Some(Err(e)) => {
                    ctx.error(format!("{field}.credentialName"), format!("Secret {key}: {e}"));
                    return None;
                }
                None => {
                    ctx.error(format!("{field}.credentialName"), format!("Secret {key} does not exist"));
                    return None;
                }
            }
        }
        (None, path) => {
            let path = path.as_deref().unwrap_or(crate::state::traffic::SYSTEM_ROOTS);
            match std::fs::read(path) {
                Ok(pem) => (path.to_owned(), pem),
                Err(_) if insecure => (path.to_owned(), Vec::new()),
                Err(e) => {
                    ctx.error(format!("{field}.caCertificates"), format!("{path}: {e}"));
                    return None;
                }
            }
        }
    };
    let roots = match insecure {
        true => Ok(Vec::new()),
        false => {
            crate::identity::ca::root_ders_from_pem(&String::from_utf8_lossy(&pem)).map_err(|e| format!("{ca}: {e}"))
        }
    };
    match roots {
        Ok(roots) => Some(Arc::new(TlsOrigination { sni: t.sni.clone(), ca, insecure_skip_verify: insecure, roots })),
        Err(e) => {
            ctx.error(field.to_owned(), e);
            None
        }
    }
}

/// A count in a policy: 0 or more, at most `max`.
fn count(ctx: &mut Ctx<'_>, field: &str, v: Option<i64>, max: i64) -> Option<u32> {
    let v = v?;
    if (0..=max).contains(&v) {
        Some(v as u32)
    } else {
        ctx.error(field, format!("{v} is out of range 0-{max}"));
        None
    }
}
