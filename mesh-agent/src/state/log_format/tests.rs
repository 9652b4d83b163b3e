//! Formats as tables: Istio's defaults, custom formats, and what is refused.
use std::time::{Duration, UNIX_EPOCH};

use hyper::header::{HeaderMap, HeaderValue};

use super::*;

fn request() -> (hyper::Uri, HeaderMap) {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("hello.demo:9095"));
    h.insert("user-agent", HeaderValue::from_static("curl/8.5"));
    h.insert("x-request-id", HeaderValue::from_static("id-1"));
    h.insert("authorization", HeaderValue::from_static("Bearer secret-token"));
    ("/hello?x=1".parse().expect("uri"), h)
}

fn entry<'a>(req: &'a Captured, resp: &'a Captured) -> Entry<'a> {
    Entry {
        kind: Kind::Http,
        start: UNIX_EPOCH + Duration::from_millis(1_460_751_420_310),
        protocol: Some("HTTP/1.1"),
        request: Some(req),
        response: Some(resp),
        response_code: Some(200),
        flags: "-".into(),
        details: Some("via_upstream"),
        transport_failure: None,
        bytes_received: 0,
        bytes_sent: 27,
        duration_ms: Some(3),
        grpc_status: None,
        upstream_host: Some("10.244.2.2:9095".parse().expect("addr")),
        upstream_cluster: Some("outbound|9095||helloworld.demo.svc.cluster.local"),
        upstream_local: None,
        downstream_local: Some("10.96.0.10:9095".parse().expect("addr")),
        downstream_remote: "10.244.1.2:40000".parse().expect("addr"),
        peer_principal: None,
        sni: None,
        route_name: Some("default"),
    }
}

#[test]
fn istios_default_text_line() {
    let f = Format::istio_default(false);
    let (uri, h) = request();
    let req = f.capture_request("GET", "/hello?x=1", &uri, &h);
    let line = f.render(&entry(&req, &Captured::default()));
    assert_eq!(
        line,
        "[2016-04-15T20:17:00.310Z] \"GET /hello?x=1 HTTP/1.1\" 200 - via_upstream - \"-\" 0 27 3 - \"-\" \
         \"curl/8.5\" \"id-1\" \"hello.demo:9095\" \"10.244.2.2:9095\" \
         outbound|9095||helloworld.demo.svc.cluster.local - 10.96.0.10:9095 10.244.1.2:40000 - default\n"
    );
    // Only what the format reads is kept: not the token.
    assert!(req.get("authorization").is_none());
}

#[test]
fn istios_default_json_fields_keep_types() {
    let f = Format::istio_default(true);
    let (uri, h) = request();
    let req = f.capture_request("GET", "/hello?x=1", &uri, &h);
    let line = f.render(&entry(&req, &Captured::default()));
    assert!(line.ends_with('\n'));
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    let keys: Vec<&str> = v.as_object().expect("object").keys().map(String::as_str).collect();
    assert_eq!(keys, ISTIO_JSON.map(|(k, _)| k));
    assert_eq!(v["response_code"], 200);
    assert_eq!(v["bytes_sent"], 27);
    assert_eq!(v["duration"], 3);
    assert_eq!(v["method"], "GET");
    assert_eq!(v["start_time"], "2016-04-15T20:17:00.310Z");
    assert_eq!(v["upstream_service_time"], serde_json::Value::Null);
    assert_eq!(v["response_flags"], "-");
}

#[test]
fn custom_formats() {
    let (uri, mut h) = request();
    h.insert("x-long", HeaderValue::from_static("abcdefgh"));
    let mut resp_h = HeaderMap::new();
    resp_h.insert("x-envoy-upstream-service-time", HeaderValue::from_static("2"));
    // (format, JSON encoding, line)
    let cases = [
        ("%REQ(:METHOD)% %REQ_WITHOUT_QUERY(:PATH)% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%", false, "GET /hello 2\n"),
        ("%REQ(X-MISSING?X-LONG):3% 100%% %ACCESS_LOG_TYPE%\n", false, "abc 100% DownstreamEnd\n"),
        ("%REQ(AUTHORIZATION)% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", false, "[REDACTED] 10.244.1.2\n"),
        (
            r#"{"code": "%RESPONSE_CODE%", "who": "%REQ(USER-AGENT)% via %UPSTREAM_HOST%"}"#,
            true,
            "{\"code\":200,\"who\":\"curl/8.5 via 10.244.2.2:9095\"}\n",
        ),
    ];
    for (format, json, want) in cases {
        let f = Format::parse(format, json).expect(format);
        let req = f.capture_request("GET", "/hello?x=1", &uri, &h);
        let resp = f.capture_response(&resp_h);
        assert_eq!(f.render(&entry(&req, &resp)), want, "{format}");
    }
}

#[test]
fn formats_the_agent_cannot_fill_are_named() {
    let cases = [
        ("%DYNAMIC_METADATA(istio.mixer:status)%", "unknown command operator %DYNAMIC_METADATA%"),
        ("%UPSTREAM_HOST", "no closing '%'"),
        ("%REQ()%", "not a header name"),
        ("%REQ(A):x%", "the length after ':' must be a number"),
        ("%DURATION(1)%", "takes no argument"),
    ];
    for (format, want) in cases {
        let err = Format::parse(format, false).expect_err(format).to_string();
        assert!(err.contains(want), "{format}: {err}");
    }
    let err = Format::parse("[1]", true).expect_err("not an object").to_string();
    assert!(err.contains("JSON object"), "{err}");
    let err = Format::parse(r#"{"a": 1}"#, true).expect_err("not a string").to_string();
    assert!(err.contains("\"a\" is not a string"), "{err}");
}

#[test]
fn a_tcp_connection_has_no_request_fields() {
    let f = Format::istio_default(false);
    let none = Captured::default();
    let e = Entry {
        kind: Kind::TcpClose,
        protocol: None,
        request: None,
        response: None,
        response_code: None,
        details: None,
        route_name: None,
        upstream_cluster: Some("outbound|7000||helloworld.demo.svc.cluster.local"),
        bytes_received: 5,
        bytes_sent: 5,
        ..entry(&none, &none)
    };
    let line = f.render(&e);
    assert!(line.starts_with("[2016-04-15T20:17:00.310Z] \"- - -\" 0 - - - \"-\" 5 5 3 - "), "{line}");
}
