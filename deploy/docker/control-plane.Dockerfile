# control-plane: org key metadata, lifecycle, rotation, audit, authorisation;
# the admin and content-key APIs.
#
# Build from the repository root (the build context is the whole workspace):
#
#   docker build -f deploy/docker/control-plane.Dockerfile -t ghcr.io/cmk/control-plane:0.1.0 .
#
# BuildKit reads deploy/docker/control-plane.Dockerfile.dockerignore (next to this
# file) for the build context. The binary is the only thing in the runtime
# image; configuration, certificates, the policy and (on SQLite) the database
# are mounted (see deploy/kubernetes). Pin both base images by digest in your
# build system.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# target/ is a cache mount, so the binary is copied out in the same step.
# protoc comes from the protoc-bin-vendored crate; aws-lc-sys needs only the C
# compiler the rust image ships.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p cmk-control-plane --bin control-plane \
    && install -D -m 0755 target/release/control-plane /out/control-plane

# distroless/cc: glibc, libgcc and CA certificates, no shell, no package manager.
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="cmk control-plane" \
      org.opencontainers.image.description="Customer master key lifecycle, admin and content-key APIs over mutual TLS" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/control-plane /usr/local/bin/control-plane
# 65532 is distroless's "nonroot" user; given numerically so that Kubernetes'
# runAsNonRoot can verify it without an /etc/passwd lookup.
USER 65532:65532
# 8443: gRPC over mutual TLS. 8081: the plaintext gRPC health port for
# kubelet probes (health_listen; health only).
EXPOSE 8443 8081 9090
ENTRYPOINT ["/usr/local/bin/control-plane"]
CMD ["--config", "/etc/cmk/control-plane/control-plane.toml"]
