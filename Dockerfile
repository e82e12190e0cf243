# syntax=docker/dockerfile:1
# The wsgate image: one binary, /wsgate, for both `wsgate proxy` (the sidecar) and `wsgate inject`
# (the injector). Build: docker build -t wsgate:dev --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Build stage: the official Rust image on Debian 12 (bookworm), the same Debian as the runtime
# image below, so the binary needs nothing newer than the glibc it finds there. glibc rather than
# a static musl build: musl's allocator is slow under the many-threaded load of a proxy.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
# aws-lc-sys (C code of the crypto provider, aws-lc-rs) builds with the image's own gcc: no cmake,
# Go, clang or nasm to install (its Rust bindings for this target ship pre-generated).
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo reads every target Cargo.toml declares (the [[bench]]es too) before it builds anything.
COPY benches ./benches
# ... and every workspace member's manifest and sources (bench/: the comparison harness, built
# only with --workspace; the image builds the wsgate package alone).
COPY bench/Cargo.toml ./bench/Cargo.toml
COPY bench/src ./bench/src
# --locked: exactly the dependency versions of Cargo.lock. The target is named, so the binary's
# path below is cargo's target/<triple>/release/<name> (tests/it/chart.rs checks it).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo build --release --locked --target x86_64-unknown-linux-gnu

# Runtime: distroless "cc" (glibc, libgcc, CA certificates; no shell, no package manager).
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="wsgate" \
      org.opencontainers.image.description="mTLS WebSocket sidecar for Kubernetes (wsgate proxy) and its injector (wsgate inject)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build /src/target/x86_64-unknown-linux-gnu/release/wsgate /wsgate
# 65532 is distroless's "nonroot"; the chart and the injected sidecar run as 65532 too.
USER 65532:65532
# proxy: 8443 (mTLS) and 9901 (admin); inject: 9443 (webhook) and 9901 (admin).
EXPOSE 8443 9443 9901
ENTRYPOINT ["/wsgate"]
