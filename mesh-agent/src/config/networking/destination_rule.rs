//! `DestinationRule`: traffic policies (load balancing, connection pools,
//! outlier detection, client TLS) for a Service and its subsets.
use super::*;
use crate::state::PeerCheck;

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
    reject(ctx, field, &[("tunnel", &tp.tunnel), ("proxyProtocol", &tp.proxy_protocol)]);
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
    let (name, namespace) = crate::config::object::name_and_namespace(ctx, &obj.metadata)?;
    let before = ctx.error_count();
    let spec = &obj.spec;
    reject(ctx, "spec", &[("workloadSelector", &spec.workload_selector)]);
    let export_to = export_to(ctx, spec.export_to.as_deref(), &namespace);
    let service = match resolve_host(&spec.host, &namespace, services) {
        Some(s) => format!("{}/{}", s.namespace, s.name),
        None => {
            ctx.error("spec.host", format!("{:?} is not a known Service", spec.host));
            String::new()
        }
    };
    let field = "spec.trafficPolicy";
    let top = policy(ctx, field, &spec.traffic_policy, &Policy::default(), secrets);
    let mut ports = BTreeMap::new();
    for (port, f, tp) in port_level(ctx, field, &spec.traffic_policy) {
        ports.insert(port, policy(ctx, &f, &Some(tp), &top, secrets));
    }
    let mut subsets = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let field = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            ctx.error(format!("{field}.name"), "required");
        }
        if subsets.iter().any(|x: &Subset| x.name == s.name) {
            ctx.error(format!("{field}.name"), format!("subset {:?} is defined twice", s.name));
        }
        let tf = format!("{field}.trafficPolicy");
        let own = policy(ctx, &tf, &s.traffic_policy, &top, secrets);
        // On a port: the rule's policy there, then the subset's, then the
        // subset's on the port (a repeated error is reported once).
        let own_ports = port_level(ctx, &tf, &s.traffic_policy);
        let mut sub_ports = BTreeMap::new();
        for (port, base) in &ports {
            sub_ports.insert(*port, policy(ctx, &tf, &s.traffic_policy, base, secrets));
        }
        for (port, f, tp) in own_ports {
            let base = sub_ports.get(&port).unwrap_or(&own).clone();
            sub_ports.insert(port, policy(ctx, &f, &Some(tp), &base, secrets));
        }
        subsets.push(Subset { name: s.name.clone(), labels: s.labels.clone(), policy: own, ports: sub_ports });
    }
    let created = obj.metadata.creation_timestamp.clone();
    let rule = DestinationRule { name, namespace, service, export_to, created, subsets, policy: top, ports };
    (ctx.error_count() == before).then_some(rule)
}

/// `portLevelSettings`: each entry's port (a Service port number, each
/// once) and the entry as a policy of its own.
fn port_level(ctx: &mut Ctx<'_>, field: &str, tp: &Option<TrafficPolicySpec>) -> Vec<(u16, String, TrafficPolicySpec)> {
    let mut out: Vec<(u16, String, TrafficPolicySpec)> = Vec::new();
    let entries = tp.as_ref().and_then(|t| t.port_level_settings.as_ref());
    for (i, e) in entries.into_iter().flatten().enumerate() {
        let f = format!("{field}.portLevelSettings[{i}]");
        let Some(selector) = &e.port else {
            ctx.error(format!("{f}.port"), "required (port: {number: N})");
            continue;
        };
        let Some(port) = u16::try_from(selector.number).ok().filter(|p| *p != 0) else {
            ctx.error(format!("{f}.port.number"), format!("{} is out of range 1-65535", selector.number));
            continue;
        };
        if out.iter().any(|(p, _, _)| *p == port) {
            ctx.error(format!("{f}.port.number"), format!("port {port} has settings already"));
            continue;
        }
        out.push((port, f, e.as_policy()));
    }
    out
}

/// `trafficPolicy.tls`: SIMPLE and MUTUAL originate TLS to the destination
/// (the application speaks plain HTTP); DISABLE and ISTIO_MUTUAL leave the
/// connection as the mesh makes it (mesh hops are always mutual TLS here).
fn client_tls(ctx: &mut Ctx<'_>, field: &str, t: &ClientTlsSpec, secrets: &Secrets) -> Option<Arc<Origination>> {
    let mutual = match t.mode.as_deref().unwrap_or("DISABLE") {
        mode @ ("DISABLE" | "ISTIO_MUTUAL") => {
            let set = [
                ("credentialName", t.credential_name.is_some()),
                ("clientCertificate", t.client_certificate.is_some()),
                ("privateKey", t.private_key.is_some()),
                ("caCertificates", t.ca_certificates.is_some()),
                ("caCrl", t.ca_crl.is_some()),
            ];
            for (name, _) in set.iter().filter(|(_, s)| *s) {
                ctx.error(format!("{field}.{name}"), format!("only with mode SIMPLE or MUTUAL, not {mode}"));
            }
            return None;
        }
        "SIMPLE" => false,
        "MUTUAL" => true,
        other => {
            ctx.error(format!("{field}.mode"), format!("{other:?}: expected DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"));
            return None;
        }
    };
    match origination(t, mutual, &ctx_namespace(ctx), secrets) {
        Ok(o) => Some(Arc::new(o)),
        Err((name, e)) => {
            ctx.error(if name.is_empty() { field.to_owned() } else { format!("{field}.{name}") }, e);
            None
        }
    }
}

/// The origination `t` asks for, or the field at fault and why. With
/// `credentialName`, one for each namespace that holds a Secret of that
/// name: each client presents its own namespace's credentials, never the
/// rule's namespace's (Istio's `ClientTLSSettings.credentialName`).
fn origination(
    t: &ClientTlsSpec,
    mutual: bool,
    namespace: &str,
    secrets: &Secrets,
) -> Result<Origination, (&'static str, String)> {
    use crate::config::credentials::{client_cert, read_file};
    let insecure = t.insecure_skip_verify.unwrap_or(false);
    if insecure && t.subject_alt_names.as_ref().is_some_and(|n| !n.is_empty()) {
        return Err(("subjectAltNames", "insecureSkipVerify checks no certificate: drop one of them".into()));
    }
    if insecure && t.ca_certificates.is_some() {
        return Err(("caCertificates", "insecureSkipVerify checks no certificate: drop one of them".into()));
    }
    if !mutual && (t.client_certificate.is_some() || t.private_key.is_some()) {
        let name = if t.client_certificate.is_some() { "clientCertificate" } else { "privateKey" };
        return Err((name, "a client certificate is only presented with mode MUTUAL".into()));
    }
    let mut crls = Vec::new();
    if let Some(path) = &t.ca_crl {
        crls.push(read_file(namespace, path).map_err(|e| ("caCrl", e))?);
    }
    if let Some(name) = &t.credential_name {
        let files = [t.client_certificate.is_some(), t.private_key.is_some(), t.ca_certificates.is_some()];
        if files.into_iter().any(|f| f) {
            return Err((
                "credentialName",
                "give credentialName or clientCertificate/privateKey/caCertificates, not both".into(),
            ));
        }
        return per_namespace(t, mutual, namespace, name, &crls, secrets);
    }
    let ca = match &t.ca_certificates {
        Some(path) => Some((path.clone(), read_file(namespace, path).map_err(|e| ("caCertificates", e))?)),
        None => None,
    };
    let client = match (mutual, &t.client_certificate, &t.private_key) {
        (false, _, _) => None,
        (true, Some(c), Some(k)) => {
            let cert = read_file(namespace, c).map_err(|e| ("clientCertificate", e))?;
            let key = read_file(namespace, k).map_err(|e| ("privateKey", e))?;
            Some(client_cert(c.clone(), cert, key).map_err(|e| ("clientCertificate", e))?)
        }
        (true, None, _) => {
            return Err((
                "clientCertificate",
                "MUTUAL needs credentialName, or clientCertificate and privateKey".into(),
            ));
        }
        (true, Some(_), None) => return Err(("privateKey", "required with clientCertificate".into())),
    };
    Ok(Origination::Fixed(Arc::new(settings(t, ca, crls, client)?)))
}

/// `credentialName`: the settings from each namespace's Secret of that name.
/// The rule's own namespace's Secret must be usable if it exists, and some
/// namespace must hold one; another namespace's unusable Secret leaves that
/// namespace's clients without origination (their requests fail).
fn per_namespace(
    t: &ClientTlsSpec,
    mutual: bool,
    namespace: &str,
    name: &str,
    crls: &[Vec<u8>],
    secrets: &Secrets,
) -> Result<Origination, (&'static str, String)> {
    let fail = |e: String| ("credentialName", e);
    crate::config::credentials::plain_name(name).map_err(fail)?;
    let (mut by_namespace, mut unusable) = (BTreeMap::new(), BTreeMap::new());
    for (key, s) in secrets.iter().filter(|(k, _)| k.split_once('/').is_some_and(|(_, n)| n == name)) {
        let ns = key.split_once('/').map_or("", |(ns, _)| ns);
        match from_secret(t, mutual, key, s, crls.to_vec()) {
            Ok(o) => {
                by_namespace.insert(Arc::from(ns), Arc::new(o));
            }
            Err(e) if ns == namespace => return Err(fail(e)),
            Err(e) => {
                unusable.insert(Arc::from(ns), e);
            }
        }
    }
    if by_namespace.is_empty() && unusable.is_empty() {
        return Err(fail(format!(
            "Secret {namespace}/{name} does not exist, nor does any Secret {name} (credentialName is read in the namespace of each client that uses it)"
        )));
    }
    Ok(Origination::PerNamespace { credential: name.to_owned(), by_namespace, unusable })
}

/// The settings from one Secret (`key` is its `namespace/name`).
fn from_secret(
    t: &ClientTlsSpec,
    mutual: bool,
    key: &str,
    s: &crate::config::object::SecretObject,
    mut crls: Vec<Vec<u8>>,
) -> Result<TlsOrigination, String> {
    use crate::config::credentials::{client_cert, first_value};
    let in_secret = |keys: &[&str]| first_value(s, keys).map_err(|e| format!("Secret {key}: {e}"));
    if let Some(crl) = in_secret(&["ca.crl"])? {
        crls.push(crl);
    }
    let insecure = t.insecure_skip_verify.unwrap_or(false);
    let ca = in_secret(&["ca.crt", "cacert"])?.map(|pem| (format!("Secret {key}"), pem));
    if ca.is_none() && !mutual && !insecure {
        return Err(format!("Secret {key} has no ca.crt"));
    }
    let client = match (mutual, in_secret(&["tls.crt", "cert"])?, in_secret(&["tls.key", "key"])?) {
        (false, _, _) => None,
        (true, Some(c), Some(k)) => Some(client_cert(format!("Secret {key}"), c, k)?),
        (true, _, _) => return Err(format!("Secret {key}: MUTUAL needs tls.crt and tls.key (or cert and key)")),
    };
    settings(t, ca, crls, client).map_err(|(_, e)| e)
}

/// The settings once the CA, the CRLs and the client certificate are known;
/// without a CA of its own, the server is checked against the system's roots.
fn settings(
    t: &ClientTlsSpec,
    ca: Option<(String, Vec<u8>)>,
    crls: Vec<Vec<u8>>,
    client: Option<crate::state::traffic::ClientCert>,
) -> Result<TlsOrigination, (&'static str, String)> {
    use crate::config::credentials::peer_check;
    let insecure = t.insecure_skip_verify.unwrap_or(false);
    let names = t.subject_alt_names.clone().unwrap_or_default();
    let check = match (insecure, ca) {
        (true, _) => PeerCheck::default(),
        (false, Some((ca, pem))) => peer_check(ca, &pem, &crls, names).map_err(|e| ("", e))?,
        (false, None) => {
            let path = crate::state::traffic::SYSTEM_ROOTS;
            let pem = std::fs::read(path).map_err(|e| ("caCertificates", format!("{path}: {e}")))?;
            peer_check(path.to_owned(), &pem, &crls, names).map_err(|e| ("", e))?
        }
    };
    Ok(TlsOrigination { sni: t.sni.clone(), insecure_skip_verify: insecure, check, client_cert: client })
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
