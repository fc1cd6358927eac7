# syntax=docker/dockerfile:1
# Build stage: the official Rust image.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
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
 && useradd --system --home /var/lib/xtls-component --create-home xtls
COPY --from=build /src/target/release/xtls-component /usr/local/bin/xtls-component
COPY config/xtls-component.toml /etc/xtls-component/xtls-component.toml
# The secret and the admin token come from XTLS_COMPONENT__SECRET / XTLS_ADMIN__TOKEN (or
# their *_FILE keys pointing at mounted secrets); any other key as XTLS_<SECTION>__<KEY>.
ENV XTLS_STORE__URL=sqlite:///var/lib/xtls-component/xtls-component.db \
    XTLS_ADMIN__LISTEN=0.0.0.0:8347
VOLUME /var/lib/xtls-component
EXPOSE 8347
USER xtls
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["xtls-component", "healthcheck", "--config", "/etc/xtls-component/xtls-component.toml"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["xtls-component"]
CMD ["serve", "--config", "/etc/xtls-component/xtls-component.toml"]
