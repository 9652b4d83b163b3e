#!/usr/bin/env bash
# A two-node mesh in network namespaces, step by step (docs/identity.md: "A two-node mesh by
# hand"). Everything lives in namespaces made here: mesh-net (the cluster network,
# routing each pod IP to its node; also "outside the mesh"), mesh-node1 and
# mesh-node2 (the nodes), mesh-test and mesh-hello (the pods).
#   setup.sh up     create it all, start the CA service and both agents
#   setup.sh down   stop them and remove everything
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${MESH_AGENT_BIN:-$HERE/../../target/release/mesh-agent}
RUN=/run/mesh-two-nodes   # configuration, CA directory, logs, pids

# node N SUBNET: namespace mesh-nodeN with uplink0 = SUBNET.2/24, the net side SUBNET.1.
node() {
    local ns=mesh-node$1
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add uplink0 type veth peer name "node$1" netns mesh-net
    ip -n "$ns" link set uplink0 up
    ip -n "$ns" addr add "$2.2/24" dev uplink0
    ip -n "$ns" route add default via "$2.1"
    ip -n mesh-net link set "node$1" up
    ip -n mesh-net addr add "$2.1/24" dev "node$1"
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
}

# pod NODE_NS NAME IP NODE_IP: eth0 with IP/32, default via 169.254.1.1 (proxy ARP),
# the node routes IP/32 to the pod's veth, the cluster network routes it to the node.
pod() {
    local node=$1 ns=mesh-$2 veth=v$2 ip=$3
    ip netns add "$ns"
    ip -n "$node" link add "$veth" type veth peer name eth0 netns "$ns"
    ip -n "$node" link set "$veth" up
    ip netns exec "$node" sysctl -qw "net.ipv4.conf.$veth.proxy_arp=1" "net.ipv4.neigh.$veth.proxy_delay=0"
    ip -n "$node" route add "$ip/32" dev "$veth"
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip -n "$ns" addr add "$ip/32" dev eth0
    ip -n "$ns" route add 169.254.1.1 dev eth0 scope link
    ip -n "$ns" route add default via 169.254.1.1 dev eth0
    ip -n mesh-net route add "$ip/32" via "$4"
}

up() {
    [ -x "$BIN" ] || { echo "no $BIN: cargo build --release -p mesh-agent" >&2; exit 1; }
    mkdir -p "$RUN/config" "$RUN/www"
    cp "$HERE/cluster.yaml" "$RUN/config/"
    echo "hello from helloworld" > "$RUN/www/index.html"
    ip netns add mesh-net
    ip -n mesh-net link set lo up
    ip netns exec mesh-net sysctl -qw net.ipv4.ip_forward=1
    node 1 172.18.0
    node 2 172.18.1
    pod mesh-node1 test 10.244.1.2 172.18.0.2
    pod mesh-node2 hello 10.244.2.2 172.18.1.2
    # helloworld: any HTTP server on 9095; its log shows the client address it saw.
    ip netns exec mesh-hello python3 -m http.server 9095 --directory "$RUN/www" >"$RUN/hello.log" 2>&1 &
    echo $! >"$RUN/hello.pid"
    for _ in $(seq 100); do ip netns exec mesh-hello curl -sf 127.0.0.1:9095/ >/dev/null && break; sleep 0.1; done
    # The CA service, in the cluster network; it writes the root and a token per Node.
    ip netns exec mesh-net "$BIN" ca --config "$RUN/config" --ca-dir "$RUN/ca" --listen 172.18.0.1:15012 \
        >"$RUN/ca.log" 2>&1 &
    echo $! >"$RUN/ca.pid"
    for _ in $(seq 100); do [ -f "$RUN/ca/node-tokens/node-2" ] && break; sleep 0.1; done
    # One agent per node, each with its node's token; neither holds the CA key.
    for n in 1 2; do
        ip netns exec "mesh-node$n" "$BIN" run --node "node-$n" --config "$RUN/config" \
            --state-dir "$RUN/node-$n" --ca-addr 172.18.0.1:15012 \
            --ca-root "$RUN/ca/root-cert.pem" --ca-token-file "$RUN/ca/node-tokens/node-$n" \
            >"$RUN/agent-$n.log" 2>&1 &
        echo $! >"$RUN/agent-$n.pid"
    done
    for n in 1 2; do
        for _ in $(seq 100); do
            ip netns exec "mesh-node$n" curl -sf 127.0.0.1:15000/ready >/dev/null 2>&1 && break
            sleep 0.1
        done
    done
    echo "up: logs in $RUN (agent-1.log agent-2.log ca.log hello.log)"
}

down() {
    for p in agent-1 agent-2 ca hello; do
        [ -f "$RUN/$p.pid" ] && kill "$(cat "$RUN/$p.pid")" 2>/dev/null || true
    done
    sleep 1
    for ns in mesh-test mesh-hello mesh-node1 mesh-node2 mesh-net; do
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$RUN"
    echo "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
