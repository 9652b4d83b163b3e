//! Access log lines as Envoy writes them for Istio: MeshConfig
//! `accessLogEncoding` (`TEXT`, `JSON`) and `accessLogFormat` (Envoy's
//! command operators, `%REQ(:METHOD)%`, `%RESPONSE_CODE%`, …), with Istio's
//! defaults when no format is given (istio/istio
//! `pilot/pkg/model/telemetry_logging.go`: `EnvoyTextLogFormat`,
//! `EnvoyJSONLogFormatIstio`). A format is parsed once, when the
//! configuration is loaded; an operator the agent cannot fill is a named
//! validation error there, never a surprise per request.
use std::{fmt::Write as _, net::SocketAddr, time::SystemTime};

use hyper::header::HeaderMap;

/// Istio's default TEXT format (`EnvoyTextLogFormat`).
pub const ISTIO_TEXT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
    %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \
    \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
    %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \
    \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% \
    %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% \
    %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's default JSON fields (`EnvoyJSONLogFormatIstio`), in the order
/// Envoy writes them (sorted by key).
pub const ISTIO_JSON: [(&str, &str); 24] = [
    ("authority", "%REQ(:AUTHORITY)%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("connection_termination_details", "%CONNECTION_TERMINATION_DETAILS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("duration", "%DURATION%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("route_name", "%ROUTE_NAME%"),
    ("start_time", "%START_TIME%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("upstream_service_time", "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%"),
    ("upstream_transport_failure_reason", "%UPSTREAM_TRANSPORT_FAILURE_REASON%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
];

/// The operators filled, by Envoy's names.
pub const SUPPORTED: &[&str] = &[
    "START_TIME",
    "REQ(…)",
    "RESP(…)",
    "REQ_WITHOUT_QUERY(…)",
    "PROTOCOL",
    "RESPONSE_CODE",
    "RESPONSE_FLAGS",
    "RESPONSE_CODE_DETAILS",
    "CONNECTION_TERMINATION_DETAILS",
    "UPSTREAM_TRANSPORT_FAILURE_REASON",
    "BYTES_RECEIVED",
    "BYTES_SENT",
    "DURATION",
    "GRPC_STATUS",
    "UPSTREAM_HOST",
    "UPSTREAM_CLUSTER",
    "UPSTREAM_CLUSTER_RAW",
    "UPSTREAM_LOCAL_ADDRESS",
    "DOWNSTREAM_LOCAL_ADDRESS",
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_REMOTE_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_PEER_URI_SAN",
    "REQUESTED_SERVER_NAME",
    "ROUTE_NAME",
    "ACCESS_LOG_TYPE",
    "HOSTNAME",
];

/// Request headers whose values are secrets: logged as `[REDACTED]`.
const SECRET_HEADERS: [&str; 4] = ["authorization", "proxy-authorization", "cookie", "set-cookie"];

/// One command operator (Envoy's `%NAME(ARG):MAX%`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    StartTime,
    /// `REQ(A?B):N`: the first of the headers present, cut to N characters;
    /// `without_query` drops a path's query.
    Req {
        names: Vec<Box<str>>,
        max: Option<usize>,
        without_query: bool,
    },
    Resp {
        names: Vec<Box<str>>,
        max: Option<usize>,
    },
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    TerminationDetails,
    TransportFailure,
    BytesReceived,
    BytesSent,
    Duration,
    GrpcStatus,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocal,
    DownstreamLocal {
        port: bool,
    },
    DownstreamRemote {
        port: bool,
    },
    PeerUriSan,
    Sni,
    RouteName,
    LogType,
    Hostname,
}

/// A piece of a format: literal text, or an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Op(Op),
}

/// A parsed format: a text line, or a JSON object of fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Text(Vec<Piece>),
    Json(Vec<(String, Vec<Piece>)>),
}

/// Why a format cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("unknown command operator %{0}% (supported: {list})", list = SUPPORTED.join(", "))]
    Unknown(String),
    #[error("%{0}: no closing '%'")]
    Unclosed(String),
    #[error("%{op}%: {why}")]
    Argument { op: String, why: &'static str },
    #[error("accessLogFormat with JSON encoding must be a JSON object of strings: {0}")]
    Json(String),
}

impl Format {
    /// Istio's default for an encoding.
    pub fn istio_default(json: bool) -> Format {
        if json {
            let fields = ISTIO_JSON.iter().map(|(k, v)| ((*k).to_owned(), parse(v).unwrap_or_default())).collect();
            Format::Json(fields)
        } else {
            Format::Text(parse(ISTIO_TEXT).unwrap_or_default())
        }
    }

    /// `accessLogFormat` for `accessLogEncoding`: a format string (TEXT), or
    /// a JSON object whose values are format strings (JSON).
    pub fn parse(format: &str, json: bool) -> Result<Format, FormatError> {
        if !json {
            let mut pieces = parse(format)?;
            // Envoy writes the string as given; Istio's line ends with a newline.
            if !format.ends_with('\n') {
                pieces.push(Piece::Text("\n".into()));
            }
            return Ok(Format::Text(pieces));
        }
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(format).map_err(|e| FormatError::Json(e.to_string()))?;
        let mut fields = Vec::with_capacity(object.len());
        for (k, v) in object {
            let serde_json::Value::String(s) = v else {
                return Err(FormatError::Json(format!("{k:?} is not a string")));
            };
            fields.push((k, parse(&s)?));
        }
        Ok(Format::Json(fields))
    }

    fn ops(&self) -> impl Iterator<Item = &Op> {
        let pieces: Box<dyn Iterator<Item = &Piece>> = match self {
            Format::Text(p) => Box::new(p.iter()),
            Format::Json(f) => Box::new(f.iter().flat_map(|(_, p)| p.iter())),
        };
        pieces.filter_map(|p| match p {
            Piece::Op(op) => Some(op),
            Piece::Text(_) => None,
        })
    }

    /// What a request keeps for its line: the headers (and `:method`,
    /// `:path`, `:authority`, `:scheme`) the format reads, nothing else;
    /// `path` is the request's path as it may be logged (tokens redacted).
    pub fn capture_request(&self, method: &str, path: &str, uri: &hyper::Uri, h: &HeaderMap) -> Captured {
        let mut kept = Captured::default();
        for name in self.ops().filter_map(|op| match op {
            Op::Req { names, .. } => Some(names),
            _ => None,
        }) {
            for n in name {
                if kept.get(n).is_some() {
                    continue;
                }
                let v = match &**n {
                    ":method" => Some(method.to_owned()),
                    ":path" => Some(path.to_owned()),
                    ":authority" => uri.authority().map(|a| a.to_string()).or_else(|| text(h, "host")),
                    ":scheme" => Some(uri.scheme_str().unwrap_or("http").to_owned()),
                    // Envoy's record of a rewritten path; the agent logs the
                    // path as received, so a client's own value is not taken.
                    "x-envoy-original-path" => None,
                    other => text(h, other),
                };
                if let Some(v) = v {
                    kept.0.push((n.clone(), v));
                }
            }
        }
        kept
    }

    /// The response headers the format reads.
    pub fn capture_response(&self, h: &HeaderMap) -> Captured {
        let mut kept = Captured::default();
        for names in self.ops().filter_map(|op| match op {
            Op::Resp { names, .. } => Some(names),
            _ => None,
        }) {
            for n in names {
                if let (None, Some(v)) = (kept.get(n), text(h, n)) {
                    kept.0.push((n.clone(), v));
                }
            }
        }
        kept
    }

    /// Whether the format reads any response header.
    pub fn reads_response(&self) -> bool {
        self.ops().any(|op| matches!(op, Op::Resp { .. }))
    }

    /// The line for `e`, newline-terminated.
    pub fn render(&self, e: &Entry<'_>) -> String {
        match self {
            Format::Text(pieces) => {
                let mut out = String::with_capacity(256);
                for p in pieces {
                    match p {
                        Piece::Text(t) => out.push_str(t),
                        Piece::Op(op) => out.push_str(&e.value(op).unwrap_or_else(|| "-".into())),
                    }
                }
                out
            }
            Format::Json(fields) => {
                let mut object = serde_json::Map::with_capacity(fields.len());
                for (k, pieces) in fields {
                    object.insert(k.clone(), json_value(e, pieces));
                }
                let mut line = serde_json::Value::Object(object).to_string();
                line.push('\n');
                line
            }
        }
    }
}

/// A JSON field: one operator alone keeps its type (numbers as numbers,
/// absent as null, as Envoy's typed JSON does); anything else is a string.
fn json_value(e: &Entry<'_>, pieces: &[Piece]) -> serde_json::Value {
    if let [Piece::Op(op)] = pieces {
        let numeric = matches!(op, Op::ResponseCode | Op::BytesReceived | Op::BytesSent | Op::Duration);
        return match e.value(op) {
            None => serde_json::Value::Null,
            Some(v) if numeric => v.parse::<u64>().map_or(serde_json::Value::String(v.clone()), Into::into),
            Some(v) => serde_json::Value::String(v),
        };
    }
    let mut s = String::new();
    for p in pieces {
        match p {
            Piece::Text(t) => s.push_str(t),
            Piece::Op(op) => s.push_str(&e.value(op).unwrap_or_else(|| "-".into())),
        }
    }
    serde_json::Value::String(s)
}

/// Splits a format string into text and operators.
fn parse(format: &str) -> Result<Vec<Piece>, FormatError> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = format;
    while let Some(at) = rest.find('%') {
        text.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        // `%%` is a literal percent sign.
        if let Some(r) = after.strip_prefix('%') {
            text.push('%');
            rest = r;
            continue;
        }
        let end = operator_end(after).ok_or_else(|| FormatError::Unclosed(after.chars().take(40).collect()))?;
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        pieces.push(Piece::Op(operator(&after[..end])?));
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// Where an operator's closing `%` is: after its parenthesised argument, if any.
fn operator_end(s: &str) -> Option<usize> {
    let name_end = s.find(['(', '%'])?;
    if s.as_bytes()[name_end] == b'%' {
        return Some(name_end);
    }
    let close = name_end + s[name_end..].find(')')?;
    close.checked_add(s[close..].find('%')?)
}

fn operator(spec: &str) -> Result<Op, FormatError> {
    let (name, arg, max) = match spec.split_once('(') {
        None => (spec, None, None),
        Some((name, rest)) => {
            let (arg, tail) = rest.split_once(')').unwrap_or((rest, ""));
            let max = match tail.strip_prefix(':') {
                None if tail.is_empty() => None,
                Some(n) => Some(n.parse::<usize>().map_err(|_| FormatError::Argument {
                    op: spec.into(),
                    why: "the length after ':' must be a number",
                })?),
                None => return Err(FormatError::Argument { op: spec.into(), why: "unexpected text after ')'" }),
            };
            (name, Some(arg), max)
        }
    };
    let headers = |arg: Option<&str>| -> Result<Vec<Box<str>>, FormatError> {
        let arg = arg.ok_or(FormatError::Argument { op: spec.into(), why: "needs a header name: REQ(NAME)" })?;
        arg.split('?')
            .map(|h| {
                let h = h.trim().to_ascii_lowercase();
                let name = h.strip_prefix(':').unwrap_or(&h);
                if name.is_empty() || hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(FormatError::Argument { op: spec.into(), why: "not a header name" });
                }
                Ok(h.into())
            })
            .collect()
    };
    let plain = |op: Op| {
        if arg.is_some() { Err(FormatError::Argument { op: spec.into(), why: "takes no argument" }) } else { Ok(op) }
    };
    match name {
        "REQ" => Ok(Op::Req { names: headers(arg)?, max, without_query: false }),
        "REQ_WITHOUT_QUERY" => Ok(Op::Req { names: headers(arg)?, max, without_query: true }),
        "RESP" => Ok(Op::Resp { names: headers(arg)?, max }),
        // Envoy's default time format; a strftime argument is not read.
        "START_TIME" => plain(Op::StartTime),
        "PROTOCOL" => plain(Op::Protocol),
        "RESPONSE_CODE" => plain(Op::ResponseCode),
        "RESPONSE_FLAGS" => plain(Op::ResponseFlags),
        "RESPONSE_CODE_DETAILS" => plain(Op::ResponseCodeDetails),
        "CONNECTION_TERMINATION_DETAILS" => plain(Op::TerminationDetails),
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => plain(Op::TransportFailure),
        "BYTES_RECEIVED" => plain(Op::BytesReceived),
        "BYTES_SENT" => plain(Op::BytesSent),
        "DURATION" => plain(Op::Duration),
        "GRPC_STATUS" => plain(Op::GrpcStatus),
        "UPSTREAM_HOST" => plain(Op::UpstreamHost),
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => plain(Op::UpstreamCluster),
        "UPSTREAM_LOCAL_ADDRESS" => plain(Op::UpstreamLocal),
        "DOWNSTREAM_LOCAL_ADDRESS" => plain(Op::DownstreamLocal { port: true }),
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => plain(Op::DownstreamLocal { port: false }),
        "DOWNSTREAM_REMOTE_ADDRESS" => plain(Op::DownstreamRemote { port: true }),
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => plain(Op::DownstreamRemote { port: false }),
        "DOWNSTREAM_PEER_URI_SAN" => plain(Op::PeerUriSan),
        "REQUESTED_SERVER_NAME" => plain(Op::Sni),
        "ROUTE_NAME" => plain(Op::RouteName),
        "ACCESS_LOG_TYPE" => plain(Op::LogType),
        "HOSTNAME" => plain(Op::Hostname),
        other => Err(FormatError::Unknown(other.into())),
    }
}

/// Which record a line is (Envoy's `%ACCESS_LOG_TYPE%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request, when its response is complete.
    Http,
    /// A TCP connection whose upstream connected.
    TcpOpen,
    /// A TCP connection that closed.
    TcpClose,
}

impl Kind {
    fn envoy_name(self) -> &'static str {
        match self {
            Kind::Http => "DownstreamEnd",
            Kind::TcpOpen => "TcpUpstreamConnected",
            Kind::TcpClose => "TcpConnectionEnd",
        }
    }
}

/// What a line describes. `None` is written `-` (text) or `null` (JSON).
pub struct Entry<'a> {
    pub kind: Kind,
    pub start: SystemTime,
    /// `HTTP/1.1`, `HTTP/2`; `None` for TCP.
    pub protocol: Option<&'static str>,
    /// The request's headers the format reads ([`Format::capture_request`]).
    pub request: Option<&'a Captured>,
    pub response: Option<&'a Captured>,
    pub response_code: Option<u16>,
    /// Envoy's response flags as written (`-` for none).
    pub flags: String,
    pub details: Option<&'a str>,
    pub transport_failure: Option<&'a str>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration_ms: Option<u64>,
    pub grpc_status: Option<&'a str>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<&'a str>,
    pub upstream_local: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub downstream_remote: SocketAddr,
    pub peer_principal: Option<&'a str>,
    pub sni: Option<&'a str>,
    pub route_name: Option<&'a str>,
}

impl Entry<'_> {
    fn value(&self, op: &Op) -> Option<String> {
        let addr = |a: Option<SocketAddr>, port: bool| a.map(|a| if port { a.to_string() } else { a.ip().to_string() });
        match op {
            Op::StartTime => Some(envoy_time(self.start)),
            Op::Req { names, max, without_query } => {
                let v = self.request?.first(names)?;
                let v = if *without_query { v.split('?').next().unwrap_or_default().to_owned() } else { v };
                Some(cut(v, *max))
            }
            Op::Resp { names, max } => self.response?.first(names).map(|v| cut(v, *max)),
            Op::Protocol => self.protocol.map(Into::into),
            Op::ResponseCode => Some(self.response_code.unwrap_or(0).to_string()),
            Op::ResponseFlags => Some(self.flags.clone()),
            Op::ResponseCodeDetails => self.details.map(Into::into),
            Op::TerminationDetails => None,
            Op::TransportFailure => self.transport_failure.map(Into::into),
            Op::BytesReceived => Some(self.bytes_received.to_string()),
            Op::BytesSent => Some(self.bytes_sent.to_string()),
            Op::Duration => self.duration_ms.map(|d| d.to_string()),
            Op::GrpcStatus => self.grpc_status.map(Into::into),
            Op::UpstreamHost => self.upstream_host.map(|a| a.to_string()),
            Op::UpstreamCluster => self.upstream_cluster.map(Into::into),
            Op::UpstreamLocal => addr(self.upstream_local, true),
            Op::DownstreamLocal { port } => addr(self.downstream_local, *port),
            Op::DownstreamRemote { port } => addr(Some(self.downstream_remote), *port),
            Op::PeerUriSan => self.peer_principal.map(Into::into),
            Op::Sni => self.sni.map(Into::into),
            Op::RouteName => self.route_name.map(Into::into),
            Op::LogType => Some(self.kind.envoy_name().into()),
            Op::Hostname => hostname(),
        }
    }
}

/// Header values kept for a line, by lower-case name.
#[derive(Debug, Default, Clone)]
pub struct Captured(Vec<(Box<str>, String)>);

impl Captured {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| &**n == name).map(|(_, v)| v.as_str())
    }

    /// The first of `names` present; a secret's value is never written.
    fn first(&self, names: &[Box<str>]) -> Option<String> {
        let (name, v) = names.iter().find_map(|n| self.get(n).map(|v| (n, v)))?;
        if SECRET_HEADERS.contains(&&**name) {
            return Some("[REDACTED]".into());
        }
        Some(v.to_owned())
    }
}

fn text(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn cut(mut v: String, max: Option<usize>) -> String {
    if let Some(n) = max
        && let Some((at, _)) = v.char_indices().nth(n)
    {
        v.truncate(at);
    }
    v
}

/// Envoy's default `%START_TIME%`: UTC, milliseconds (`2016-04-15T20:17:00.310Z`).
pub fn envoy_time(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let mut s = String::with_capacity(24);
    let _ = write!(
        s,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    );
    s
}

fn hostname() -> Option<String> {
    static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned())).clone()
}

#[cfg(test)]
mod tests;
