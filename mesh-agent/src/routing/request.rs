//! What routing looks at in a request: a leaf, shared by route matching
//! (`http`) and hashing load balancers (`balance`).
use http::HeaderMap;

/// What routing looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The client's address (for `useSourceIp` hashing).
    pub client: std::net::Ipv4Addr,
    /// The client's namespace, for VirtualService `exportTo` (`None`: only
    /// rules exported everywhere apply).
    pub namespace: Option<&'a str>,
}
