# syntax=docker/dockerfile:1
# Build stage: the official Rust image.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked --bin xtls-component

# Runtime stage: slim Debian, non-root, one volume for the store.
FROM debian:bookworm-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="xtls-component" \
      org.opencontainers.image.description="XEP-0114 component giving XMPP bots end-to-end encrypted XTLS endpoints" \
      org.opencontainers.image.version="${VERSION}"
RUN useradd --system --home /var/lib/xtls-component --create-home xtls
COPY --from=build /src/target/release/xtls-component /usr/local/bin/xtls-component
COPY config/xtls-component.toml /etc/xtls-component/xtls-component.toml
ENV XTLS_STORE__URL=sqlite:///var/lib/xtls-component/xtls-component.db \
    XTLS_ADMIN__LISTEN=0.0.0.0:8347
VOLUME /var/lib/xtls-component
EXPOSE 8347
USER xtls
STOPSIGNAL SIGTERM
ENTRYPOINT ["xtls-component"]
CMD ["serve", "--config", "/etc/xtls-component/xtls-component.toml"]
