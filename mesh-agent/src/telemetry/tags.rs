//! Telemetry `tagOverrides` applied to a metric's labels: a standard label
//! removed (left empty, which Prometheus stores as absent) or set, and
//! labels added, with values from the request bounded in length and in
//! number per label, so that clients cannot grow the registry without bound.
use std::sync::{Arc, LazyLock, Mutex};

use prometheus_client::encoding::EncodeLabelSet;

use super::{Label, TcpLabels, UNKNOWN};
use crate::state::telemetry::{MetricSet, TagOverride, TagValue};

/// Labels beyond Istio's standard ones, added by Telemetry `tagOverrides`
/// (none unless a Telemetry asks: no allocation).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Extra(pub(super) Option<Arc<[Added]>>);

/// An added label: its name and value.
type Added = (Arc<str>, Label);

impl Extra {
    /// These labels (for tests: what a set of overrides should leave).
    #[cfg(test)]
    pub fn with<const N: usize>(self, pairs: [(&str, &str); N]) -> Extra {
        let list: Vec<Added> = pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        Extra((!list.is_empty()).then(|| list.into()))
    }
}

impl EncodeLabelSet for Extra {
    fn encode(&self, encoder: prometheus_client::encoding::LabelSetEncoder) -> std::fmt::Result {
        let pairs: Vec<(&str, &str)> = self.0.iter().flat_map(|p| p.iter()).map(|(k, v)| (&**k, &*v.0)).collect();
        EncodeLabelSet::encode(&pairs.as_slice(), encoder)
    }
}

/// The distinct values one added or overridden label may take, at most;
/// beyond them a value is counted as `other` (a tag from the request must
/// not let clients grow the registry without bound).
const TAG_VALUES: usize = 1000;
/// The longest value kept for such a label.
const TAG_VALUE_LEN: usize = 128;

/// The values seen so far, by tag.
type Seen = std::collections::HashMap<Arc<str>, std::collections::HashSet<Arc<str>>>;

static TAG_SEEN: LazyLock<Mutex<Seen>> = LazyLock::new(Default::default);

/// A tag's value as a label, bounded in length and in distinct values per tag.
fn bounded(name: &Arc<str>, value: &str) -> Label {
    let value = match value.char_indices().nth(TAG_VALUE_LEN) {
        Some((at, _)) => &value[..at],
        None => value,
    };
    let Ok(mut seen) = TAG_SEEN.lock() else { return "other".into() };
    let values = seen.entry(name.clone()).or_default();
    if let Some(v) = values.get(value) {
        return Label(v.clone());
    }
    if values.len() >= TAG_VALUES {
        return "other".into();
    }
    let v: Arc<str> = value.into();
    values.insert(v.clone());
    Label(v)
}

impl TcpLabels {
    /// The standard label `name`, when it is one a Telemetry may set.
    fn standard_mut(&mut self, name: &str) -> Option<&mut Label> {
        Some(match name {
            "source_workload" => &mut self.source_workload,
            "source_workload_namespace" => &mut self.source_workload_namespace,
            "source_principal" => &mut self.source_principal,
            "source_app" => &mut self.source_app,
            "source_version" => &mut self.source_version,
            "source_canonical_service" => &mut self.source_canonical_service,
            "source_canonical_revision" => &mut self.source_canonical_revision,
            "source_cluster" => &mut self.source_cluster,
            "destination_workload" => &mut self.destination_workload,
            "destination_workload_namespace" => &mut self.destination_workload_namespace,
            "destination_principal" => &mut self.destination_principal,
            "destination_app" => &mut self.destination_app,
            "destination_version" => &mut self.destination_version,
            "destination_canonical_service" => &mut self.destination_canonical_service,
            "destination_canonical_revision" => &mut self.destination_canonical_revision,
            "destination_cluster" => &mut self.destination_cluster,
            "destination_service" => &mut self.destination_service,
            "destination_service_name" => &mut self.destination_service_name,
            "destination_service_namespace" => &mut self.destination_service_namespace,
            _ => return None,
        })
    }

    /// These labels as a Telemetry's `tagOverrides` leave them for `metric`:
    /// a removed standard label is empty (Prometheus stores an empty label
    /// as absent), an upserted one takes `value`'s result (`unknown` when
    /// the attribute is not known, as a TCP metric's request attributes).
    pub fn with_tags(
        &self,
        tags: &[(MetricSet, TagOverride)],
        metric: MetricSet,
        value: &dyn Fn(&TagValue) -> Option<String>,
    ) -> TcpLabels {
        let mut out = self.clone();
        let mut extra: Vec<Added> = out.extra.0.as_deref().map(<[_]>::to_vec).unwrap_or_default();
        for (_, t) in tags.iter().filter(|(mask, _)| mask.contains(metric)) {
            let label = t.value.as_ref().map(|v| bounded(&t.name, value(v).as_deref().unwrap_or(UNKNOWN)));
            match (out.standard_mut(&t.name), label) {
                (Some(l), Some(v)) => *l = v,
                (Some(l), None) => *l = "".into(),
                (None, label) => {
                    extra.retain(|(k, _)| *k != t.name);
                    if let Some(v) = label {
                        extra.push((t.name.clone(), v));
                    }
                }
            }
        }
        out.extra = Extra((!extra.is_empty()).then(|| extra.into()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        state::telemetry::RequestAttribute,
        telemetry::{Flags, Metrics, RequestLabels},
    };

    fn tag(name: &str, value: Option<TagValue>) -> (MetricSet, TagOverride) {
        (MetricSet::REQUEST_COUNT, TagOverride { name: name.into(), value })
    }

    #[test]
    fn tags_remove_set_and_add_labels_for_their_metric_only() {
        let tags = [
            tag("destination_canonical_revision", None),
            tag("source_cluster", Some(TagValue::Literal("east".into()))),
            tag("request_host", Some(TagValue::Request(RequestAttribute::Host))),
            tag("never_known", Some(TagValue::Request(RequestAttribute::Referer))),
        ];
        let base = TcpLabels::new(None, None, None, false);
        let value = |v: &TagValue| match v {
            TagValue::Literal(s) => Some(s.to_string()),
            TagValue::Request(RequestAttribute::Host) => Some("hello.demo:9095".into()),
            _ => None,
        };
        let m = Metrics::new();
        let counted = base.with_tags(&tags, MetricSet::REQUEST_COUNT, &value);
        m.requests.get_or_create(&RequestLabels::new(counted, "http", 200, "-", Flags::NONE)).inc();
        // Another metric: untouched.
        assert_eq!(base.with_tags(&tags, MetricSet::REQUEST_DURATION, &value), base);
        let text = m.encode();
        let line = text.lines().find(|l| l.starts_with("istio_requests_total{")).expect("a series");
        for want in [
            "destination_canonical_revision=\"\"",
            "source_cluster=\"east\"",
            ",request_host=\"hello.demo:9095\"",
            ",never_known=\"unknown\"",
        ] {
            assert!(line.contains(want), "{want} not in {line}");
        }
    }

    #[test]
    fn a_tag_from_the_request_takes_a_bounded_number_of_values() {
        let name: Arc<str> = "bounded_test_tag".into();
        for i in 0..TAG_VALUES {
            assert_eq!(&*bounded(&name, &format!("v{i}")), format!("v{i}"));
        }
        assert_eq!(&*bounded(&name, "one more"), "other");
        // Values seen before keep their own label.
        assert_eq!(&*bounded(&name, "v7"), "v7");
        assert_eq!(bounded(&"long".into(), &"x".repeat(500)).len(), TAG_VALUE_LEN);
    }
}
