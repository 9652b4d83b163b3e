//! The mesh node agent: captures the traffic of the node's meshed pods with eBPF
//! and proxies it (ARCHITECTURE.md and docs/traffic.md in the repository have
//! the whole picture).
//!
//! Layers, bottom up (ARCHITECTURE.md has the picture and the import rules):
//! `state` (the model: plain types and indexes), `routing` (pure decisions
//! over it: L4, policy, HTTP/TCP/TLS, protocol), `identity` (SPIFFE
//! certificates, the mesh CA, TLS settings), `config` (YAML in, model out,
//! object by object), `telemetry` (metrics), `capture` (eBPF and netlink),
//! `proxy` (the data path: inputs, L4 inbound/outbound, HBONE, L7, gateways),
//! `discovery` (the Kubernetes API server as a configuration source),
//! and at the top `agent` (the running process and its admin server),
//! `ca_server` (`mesh-agent ca`), `controller` (`mesh-agent controller`,
//! the Gateway API's status) and `cli`; `marks` and `privileges` (the
//! process's packet marks and privileges) sit below them all.
pub mod agent;
pub mod ca_server;
pub mod capture;
pub mod cli;
pub mod config;
pub mod controller;
pub mod discovery;
pub mod dns;
pub mod identity;
pub mod marks;
pub mod privileges;
pub mod proxy;
pub mod routing;
pub mod state;
pub mod telemetry;
