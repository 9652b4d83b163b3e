//! The decisions over the model, as pure functions of a [`crate::state::State`]
//! snapshot and what a connection or request shows, tested as tables from the
//! user's YAML: `l4` (a captured connection's destination: a Service's
//! endpoint, a pod, an external service, or a refusal), `policy`
//! (PeerAuthentication and AuthorizationPolicy), `http` (VirtualService and
//! DestinationRule routing of HTTP, TCP and TLS, at the mesh and at gateways),
//! `balance` (endpoint choice and the load-balancing randomness), `sni`
//! (which HTTPS gateway server a TLS connection and its requests belong to).
pub mod balance;
pub mod http;
pub mod l4;
pub mod policy;
pub mod protocol;
pub mod request;
pub mod sni;
