//! Test harness: a node built from network namespaces, pods in it, the agent
//! running inside it, and in-process servers and clients that live in a pod's
//! namespace. Everything is created inside namespaces this harness makes, and
//! removed by `Drop` even when a test panics; nothing is routed out of the
//! machine's real interfaces.
#![expect(clippy::unwrap_used, clippy::missing_panics_doc, reason = "test harness: failing loudly is the point")]

pub mod agent;
pub mod certs;
pub mod clients;
pub mod dns;
pub mod edge;
pub mod egress;
pub mod ext_authz;
pub mod fixture;
pub mod graph;
pub mod grpc;
pub mod jwt;
pub mod kube_api;
pub mod mesh;
pub mod netns;
pub mod prometheus;
pub mod servers;

pub use agent::Agent;
pub use netns::{Cluster, Pod, require_root};
