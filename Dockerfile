# syntax=docker/dockerfile:1
# Build stage: the official Rust image.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY src ./src
COPY benches ./benches
COPY migrations ./migrations
RUN cargo build --release --locked --bin xtls-component

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
# ca-certificates: webhooks over https are verified against the system roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home /var/lib/xtls-component --create-home xtls
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
