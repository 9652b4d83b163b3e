# The usual container build, for machines with a container engine and a
# registry (`docker build -t mesh-agent:0.1.0 .`). Without either,
# `cargo xtask image` builds the same image from scratch (README). Not
# exercised on the project's own machines, which have no container engine.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# LLVM 22 (bookworm-security), nightly rust-src and bpf-linker for the eBPF
# programs; nftables (setup installs it), copied below with its libraries.
# The agent with the data path's profile (mesh-agent/pgo/), as `cargo xtask
# release` builds it, for the host's triple.
RUN cargo xtask setup \
 && cargo xtask release \
 && cp target/x86_64-unknown-linux-gnu/release/mesh-agent target/release-agent \
 && cargo rustc --release -p mesh-cni --bin mesh-cni -- -C target-feature=+crt-static \
 && strip --strip-debug target/release-agent target/release/mesh-cni \
 && mkdir /nft && cp --parents /usr/sbin/nft $(ldd /usr/sbin/nft | awk '/=>/ {print $3}') /nft/

# glibc, libgcc, nft and its libraries: the agent needs no shell.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release-agent /usr/local/bin/mesh-agent
# Statically linked: the init container copies it onto the host.
COPY --from=build /src/target/release/mesh-cni /usr/local/bin/mesh-cni
# nft and the libraries it loads: the agent's nftables table (notrack for
# DNAT'd flows, the gate for pods not captured yet).
COPY --from=build /nft/ /
ENTRYPOINT ["/usr/local/bin/mesh-agent"]
