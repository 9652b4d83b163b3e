//! A Telemetry's tag overrides on a request's metrics: the request
//! attributes they read, taken when the request arrives.
use std::sync::Arc;

use hyper::Request;

use crate::{
    state::telemetry::{MetricSet, RequestAttribute, TagOverride, TagValue},
    telemetry::RequestLabels,
};

/// A side's tag overrides and the request attributes they read, taken when
/// the request arrives (its head is gone by the time it is counted).
pub(super) struct Tags {
    tags: Arc<[(MetricSet, TagOverride)]>,
    values: Vec<(RequestAttribute, String)>,
}

impl Tags {
    pub(super) fn capture<B>(tags: Arc<[(MetricSet, TagOverride)]>, req: &Request<B>) -> Tags {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut values = Vec::new();
        for (_, t) in tags.iter() {
            let Some(TagValue::Request(a)) = &t.value else { continue };
            if values.iter().any(|(seen, _)| seen == a) {
                continue;
            }
            let v = match a {
                RequestAttribute::Host => req.uri().authority().map(|a| a.to_string()).or_else(|| header("host")),
                RequestAttribute::Method => Some(req.method().to_string()),
                RequestAttribute::Path => req.uri().path_and_query().map(|p| p.to_string()),
                RequestAttribute::UrlPath => Some(req.uri().path().to_owned()),
                RequestAttribute::Scheme => Some(req.uri().scheme_str().unwrap_or("http").to_owned()),
                RequestAttribute::Protocol => Some(format!("{:?}", req.version())),
                RequestAttribute::UserAgent => header("user-agent"),
                RequestAttribute::Id => header("x-request-id"),
                RequestAttribute::Referer => header("referer"),
                RequestAttribute::Header(h) => header(h),
            };
            if let Some(v) = v {
                values.push((a.clone(), v));
            }
        }
        Tags { tags, values }
    }

    pub(super) fn labels(&self, base: &RequestLabels, metric: MetricSet, status: u16) -> RequestLabels {
        let value = |v: &TagValue| match v {
            TagValue::Literal(s) => Some(s.to_string()),
            TagValue::ResponseCode => Some(status.to_string()),
            TagValue::Request(a) => self.values.iter().find(|(seen, _)| seen == a).map(|(_, v)| v.clone()),
        };
        RequestLabels { connection: base.connection.with_tags(&self.tags, metric, &value), ..base.clone() }
    }
}
