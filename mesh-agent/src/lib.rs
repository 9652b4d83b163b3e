//! The mesh node agent: captures the traffic of the node's meshed pods with eBPF
//! and proxies it (see DESIGN.md in the repository for the whole picture).
//!
//! Modules by concern: `config` (read and validate), `state` (the snapshot),
//! `route` (pure routing decision), `policy` (PeerAuthentication and
//! AuthorizationPolicy decisions), `identity` (SPIFFE certificates, the mesh CA),
//! `hbone` (mTLS tunnels between agents), `capture` (eBPF and netlink), `proxy` (L4),
//! `l7` (HTTP/1.1, HTTP/2, gRPC and WebSocket at the source agent),
//! `gateway` (ingress and egress gateway listeners),
//! `telemetry` (metrics), `admin` (HTTP admin), `agent` (the running process),
//! `cli` (arguments).
pub mod admin;
pub mod agent;
pub mod capture;
pub mod cli;
pub mod config;
pub mod gateway;
pub mod hbone;
pub mod identity;
pub mod l7;
pub mod policy;
pub mod privileges;
pub mod proxy;
pub mod route;
pub mod state;
pub mod telemetry;
