//! The label sets of the agent's own counters (what a Kubernetes watch, a
//! load, a handshake, a refusal, a DNS lookup is counted by), beside the
//! Istio label sets of `telemetry.rs`.
use prometheus_client::encoding::EncodeLabelSet;

/// A watched Kubernetes kind (`Pod`, or `Secret/istio-system` for a
/// namespace-scoped watch).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub handshake: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// A connection turned away by a limit: where, and which limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub listener: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EbpfLabels {
    pub counter: &'static str,
}

/// A name the agent resolves for a ServiceEntry, and how a lookup went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub host: String,
    pub result: &'static str,
}

/// The pod a DNS query came from (ztunnel's `istio_dns_requests` labels, in part).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsRequestLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
}

/// `istio_build`'s labels: what this binary is, and its version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub component: &'static str,
    pub tag: &'static str,
}
