# syntax=docker/dockerfile:1
# Build stage: the official Rust image.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, from the manifests alone: stand-in sources with the same targets are
# built once and removed, so this layer (every third-party crate, compiled) survives any
# change to the project's own sources, and a rebuild compiles only the component's two crates.
COPY Cargo.toml Cargo.lock ./
COPY crates/xtls/Cargo.toml crates/xtls/
# The workspace's other member (the `xtls` client) is not built here, but its manifest and a
# stand-in make the workspace whole.
COPY crates/xtls-cli/Cargo.toml crates/xtls-cli/
RUN mkdir -p src benches crates/xtls/src crates/xtls-cli/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > crates/xtls-cli/src/main.rs \
 && touch src/lib.rs crates/xtls/src/lib.rs \
 && for bench in engine store; do echo 'fn main() {}' > "benches/$bench.rs"; done \
 && cargo build --release --locked --bin xtls-component \
 && rm -rf src benches crates/xtls/src crates/xtls-cli/src
COPY crates ./crates
COPY src ./src
COPY benches ./benches
COPY migrations ./migrations
# COPY keeps the sources' times, which may be older than the stand-ins' build: touch the crate
# roots so cargo compiles the real sources.
RUN touch src/main.rs src/lib.rs crates/xtls/src/lib.rs \
 && cargo build --release --locked --bin xtls-component

# Runtime stage: slim Debian, non-root, one volume for the store and the bots' keys.
FROM debian:bookworm-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="xtls-component" \
      org.opencontainers.image.description="XEP-0114 component giving XMPP bots end-to-end encrypted XTLS endpoints" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/xtls-component/xtls-component" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
# The service user and its group, both 10001 (a bind-mounted volume must be writable by them).
RUN groupadd --system --gid 10001 xtls \
 && useradd --system --uid 10001 --gid xtls --home-dir /var/lib/xtls-component --create-home \
      --shell /usr/sbin/nologin xtls
# Nothing installed here: the binary and the CA roots webhooks over https are verified against
# (Debian's bundle, from the build stage) are all the runtime needs.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /src/target/release/xtls-component /usr/local/bin/xtls-component
# No secrets and no domain in the image: they come from XTLS_<SECTION>__<KEY> variables or
# *_FILE keys pointing at mounted secrets, and the component refuses to start without them.
COPY config/docker.toml /etc/xtls-component/xtls-component.toml
VOLUME /var/lib/xtls-component
EXPOSE 8347
USER xtls
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["xtls-component", "healthcheck", "--config", "/etc/xtls-component/xtls-component.toml"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["xtls-component"]
CMD ["serve", "--config", "/etc/xtls-component/xtls-component.toml"]
