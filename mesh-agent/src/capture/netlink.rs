//! Netlink side of capture: finding pods' host-side interfaces from the node's
//! routes, and the policy-routing rule and local route that deliver marked
//! packets to the agent's sockets.
use std::{collections::HashMap, net::Ipv4Addr};

use futures_util::TryStreamExt as _;
use mesh_common::{Marks, PROXY_ROUTE_TABLE, PROXY_RULE_PRIORITY};
use rtnetlink::{
    Handle, IpVersion, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};

/// A netlink request failed; `what` names the operation for the operator.
#[derive(Debug, thiserror::Error)]
#[error("netlink: {what}: {source}")]
pub struct NetlinkError {
    pub what: &'static str,
    #[source]
    pub source: rtnetlink::Error,
}

fn nl(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |source| NetlinkError { what, source }
}

/// Opens a route-netlink connection in the current network namespace.
pub fn connect() -> std::io::Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

/// `pod IP → ifindex` for every `/32` route of the main table that goes straight
/// out of an interface (no gateway), the way CNIs route each local pod to its veth.
pub async fn pod_routes(handle: &Handle) -> Result<HashMap<Ipv4Addr, u32>, NetlinkError> {
    let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let mut routes = handle.route().get(filter).execute();
    let mut out = HashMap::new();
    while let Some(msg) = routes.try_next().await.map_err(nl("list routes"))? {
        if let Some((ip, oif)) = pod_route(&msg) {
            out.insert(ip, oif);
        }
    }
    Ok(out)
}

fn pod_route(msg: &RouteMessage) -> Option<(Ipv4Addr, u32)> {
    let h = &msg.header;
    let in_main = h.table == RouteHeader::RT_TABLE_MAIN
        || msg
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Table(t) if *t == u32::from(RouteHeader::RT_TABLE_MAIN)));
    if h.address_family != AddressFamily::Inet
        || h.destination_prefix_length != 32
        || h.kind != RouteType::Unicast
        || !in_main
    {
        return None;
    }
    let mut dst = None;
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(_) | RouteAttribute::MultiPath(_) => return None,
            _ => {}
        }
    }
    Some((dst?, oif?))
}

/// The interface that holds `ip` as one of its addresses (the node's uplink,
/// for the node's InternalIP).
pub async fn link_with_address(handle: &Handle, ip: Ipv4Addr) -> Result<Option<u32>, NetlinkError> {
    use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
    let mut addrs = handle.address().get().execute();
    let mut found = None;
    // Read the whole dump: leaving it half-read makes the netlink connection
    // warn about answers nobody takes.
    while let Some(msg) = addrs.try_next().await.map_err(nl("list addresses"))? {
        let AddressMessage { header, attributes, .. } = msg;
        let has = attributes.iter().any(|a| {
            matches!(a, AddressAttribute::Local(std::net::IpAddr::V4(a)) | AddressAttribute::Address(std::net::IpAddr::V4(a)) if *a == ip)
        });
        if has && found.is_none() {
            found = Some(header.index);
        }
    }
    Ok(found)
}

/// `ifindex → name` of every interface, from glibc's `if_nameindex` (one
/// link dump whose messages it reads for the name alone). rtnetlink's
/// parser decodes every attribute of every link, formatting error contexts
/// as it goes: on a node with 1 000 pods, at one resync a second, that was
/// most of the idle agent's CPU (docs/performance.md, "A node with 1 000
/// pods").
pub fn link_names() -> std::io::Result<HashMap<u32, String>> {
    // SAFETY: `if_nameindex` returns null (errno set) or an array ended by
    // an entry with index 0 and a null name, whose names are C strings;
    // it is read before `if_freenameindex` frees it, once.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut out = HashMap::new();
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*entry).if_name).to_string_lossy().into_owned();
            out.insert((*entry).if_index, name);
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// The agent's rules, whatever marks the run that installed them used: its
/// priority and its table.
fn is_ours(rule: &RuleMessage) -> bool {
    let attrs = &rule.attributes;
    attrs.contains(&RuleAttribute::Priority(PROXY_RULE_PRIORITY))
        && attrs.contains(&RuleAttribute::Table(PROXY_ROUTE_TABLE))
        && attrs.iter().any(|a| matches!(a, RuleAttribute::FwMark(_)))
}

/// Removes the agent's rule (left by a previous run that crashed, or ours at exit).
pub async fn remove_proxy_rule(handle: &Handle) -> Result<usize, NetlinkError> {
    let rules: Vec<RuleMessage> =
        handle.rule().get(IpVersion::V4).execute().try_collect().await.map_err(nl("list rules"))?;
    let mut removed = 0;
    for rule in rules.into_iter().filter(is_ours) {
        handle.rule().del(rule).execute().await.map_err(nl("delete rule"))?;
        removed += 1;
    }
    Ok(removed)
}

fn local_route(lo: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .table_id(PROXY_ROUTE_TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .output_interface(lo)
        .build()
}

/// Installs `fwmark captured/mask lookup PROXY_ROUTE_TABLE` (and the same for
/// the hand-off mark: the marks of packets assigned to an agent socket, kept
/// apart so that netfilter can skip handed-back ones) and `local 0.0.0.0/0
/// dev lo table PROXY_ROUTE_TABLE`, replacing stale copies. The rules this
/// run wants are added before any other is removed, and one already in
/// place is kept: an agent that replaces a running one (an upgrade) leaves
/// no moment in which captured packets find no rule.
pub async fn install_proxy_routing(handle: &Handle, lo: u32, marks: &Marks) -> Result<(), NetlinkError> {
    handle.route().add(local_route(lo)).replace().execute().await.map_err(nl("add local route"))?;
    let rules: Vec<RuleMessage> =
        handle.rule().get(IpVersion::V4).execute().try_collect().await.map_err(nl("list rules"))?;
    let ours: Vec<RuleMessage> = rules.into_iter().filter(is_ours).collect();
    let wanted = [marks.captured, marks.handoff].map(|m| (m, marks.mask));
    for (mark, mask) in wanted {
        if ours.iter().any(|r| mark_of(r) == Some((mark, mask))) {
            continue;
        }
        let mut req = handle
            .rule()
            .add()
            .v4()
            .table_id(PROXY_ROUTE_TABLE)
            .priority(PROXY_RULE_PRIORITY)
            .fw_mark(mark)
            .action(RuleAction::ToTable);
        req.message_mut().attributes.push(RuleAttribute::FwMask(mask));
        req.execute().await.map_err(nl("add rule"))?;
    }
    for rule in ours.into_iter().filter(|r| mark_of(r).is_none_or(|m| !wanted.contains(&m))) {
        handle.rule().del(rule).execute().await.map_err(nl("delete rule"))?;
    }
    Ok(())
}

/// A rule's `fwmark/mask` (the mask all ones when the rule names none).
fn mark_of(rule: &RuleMessage) -> Option<(u32, u32)> {
    let attrs = &rule.attributes;
    let mark = attrs.iter().find_map(|a| match a {
        RuleAttribute::FwMark(m) => Some(*m),
        _ => None,
    })?;
    let mask = attrs.iter().find_map(|a| match a {
        RuleAttribute::FwMask(m) => Some(*m),
        _ => None,
    });
    Some((mark, mask.unwrap_or(u32::MAX)))
}

/// Removes what [`install_proxy_routing`] added.
pub async fn remove_proxy_routing(handle: &Handle, lo: u32) -> Result<(), NetlinkError> {
    remove_proxy_rule(handle).await?;
    match handle.route().del(local_route(lo)).execute().await {
        Ok(()) => Ok(()),
        // Already gone (ENOENT/ESRCH): nothing to restore.
        Err(rtnetlink::Error::NetlinkError(e)) if matches!(e.raw_code(), -2 | -3) => Ok(()),
        Err(e) => Err(nl("delete local route")(e)),
    }
}

/// Kernel notifications of link and IPv4 route changes in this namespace:
/// a pod's veth and its route appearing or going, as they happen.
pub struct Changes(futures_util::stream::BoxStream<'static, ()>);

/// Subscribes to link and IPv4 route notifications.
pub fn changes() -> std::io::Result<Changes> {
    use futures_util::StreamExt as _;
    use rtnetlink::{
        constants::{RTMGRP_IPV4_ROUTE, RTMGRP_LINK},
        sys::{AsyncSocket as _, SocketAddr},
    };
    let (mut conn, _handle, messages) = rtnetlink::new_connection()?;
    conn.socket_mut().socket_mut().bind(&SocketAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_ROUTE))?;
    // Runs as long as the notifications are read (the handle is not needed).
    tokio::spawn(conn);
    Ok(Changes(messages.map(|_| ()).boxed()))
}

impl Changes {
    /// Waits for a change, then takes the ones queued with it (a new pod's
    /// link, its state and its route arrive as several): how many.
    /// `None`: the subscription ended.
    pub async fn next(&mut self) -> Option<usize> {
        use futures_util::{FutureExt as _, StreamExt as _};
        self.0.next().await?;
        let mut n = 1;
        while let Some(Some(())) = self.0.next().now_or_never() {
            n += 1;
        }
        Some(n)
    }
}
