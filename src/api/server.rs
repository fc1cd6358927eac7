//! The HTTP/1.1 server under the admin and metrics listeners, closed by default: a deadline
//! on request headers and bodies, a cap on connections and body sizes, a `Host` allow-list,
//! and HTTPS when the listener has certificate files.
//!
//! `axum::serve` has no header deadline and no connection cap, so a client that trickles
//! headers or opens connections without end could hold resources forever; this loop bounds
//! both and drains connections on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use super::ApiError;
use crate::config::Live;

/// How much a client may ask of the HTTP server.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Request headers must arrive within this.
    pub header_timeout: Duration,
    /// A request body must arrive within this.
    pub body_timeout: Duration,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl From<&crate::config::AdminConfig> for HttpLimits {
    fn from(c: &crate::config::AdminConfig) -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(c.header_timeout_secs),
            body_timeout: Duration::from_secs(c.body_timeout_secs),
            max_body_bytes: c.max_body_bytes,
            max_connections: c.max_connections,
        }
    }
}

/// A listener's TLS configuration; a reload replaces it (a renewed certificate) for the
/// connections accepted after.
pub type ListenerTls = Arc<Live<rustls::ServerConfig>>;

/// Serves `app` on `listener` (over TLS when `tls` is set) until `stop` turns true, then
/// lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &HttpLimits,
    tls: Option<ListenerTls>,
    mut stop: watch::Receiver<bool>,
) {
    let handshakes_stop = stop.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut stopped => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, mostly: wait instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), tls.clone());
        let mut stop = handshakes_stop.clone();
        // The handshake gets the header deadline, so a silent client holds its slot no longer
        // than one that trickles headers.
        let handshake_deadline = limits.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let served = match tls {
                None => {
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(stream), service))
                        .await
                }
                Some(tls) => {
                    let accept = tokio_rustls::TlsAcceptor::from(tls.get()).accept(stream);
                    // A handshake in progress holds the graceful shutdown: end it on stop.
                    let handshake = tokio::select! {
                        done = tokio::time::timeout(handshake_deadline, accept) => done,
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    let stream = match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "HTTPS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("HTTPS handshake not finished in time");
                            return;
                        }
                    };
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(stream), service))
                        .await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Reads the whole request body within the deadline and the size limit (408, 413), so no
/// handler waits on a slow client or holds more than `max_body_bytes` of one.
pub async fn read_body(
    State(limits): State<Arc<HttpLimits>>,
    req: Request,
    next: Next,
) -> Response {
    let too_large = || ApiError::PayloadTooLarge(limits.max_body_bytes).into_response();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, limits.max_body_bytes);
    let bytes = match tokio::time::timeout(limits.body_timeout, limited.collect()).await {
        Err(_) => return ApiError::RequestTimeout.into_response(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "request body ended early");
            return ApiError::Invalid("the request body ended early".into()).into_response();
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The names a `Host` header may carry, without ports; `*` allows any.
#[derive(Debug, Clone)]
pub struct AllowedHosts(Vec<String>);

impl AllowedHosts {
    /// `configured`, or when empty: `localhost`, the loopback addresses and the listen address.
    pub fn new(configured: &[String], listen: SocketAddr) -> Self {
        if !configured.is_empty() {
            return AllowedHosts(configured.iter().map(|h| h.to_ascii_lowercase()).collect());
        }
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
            names.push(match listen {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            });
        }
        AllowedHosts(names)
    }

    /// These names, and the host of `url` (the address this API advertises to other
    /// instances, which they send requests to) when there is one.
    pub fn with_advertised(mut self, url: Option<&str>) -> Self {
        let host = url
            .and_then(|u| reqwest::Url::parse(u).ok())
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase));
        if let Some(host) = host
            && !self.0.contains(&host)
        {
            self.0.push(host);
        }
        self
    }

    /// Whether a `Host` header value (with or without port) names this server.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let name = match host.rfind(':') {
            // "[::1]:8347" or "name:8347", but not the bare "[::1]".
            Some(i) if !host.ends_with(']') => &host[..i],
            _ => host.as_str(),
        };
        self.0
            .iter()
            .any(|allowed| allowed == "*" || allowed == name)
    }
}

/// The liveness and readiness probes: orchestrators send any `Host` (a pod address), and
/// they reveal nothing a rebinding page could use.
pub const PROBES: [&str; 2] = ["/healthz", "/readyz"];

/// Refuses requests whose `Host` is not an allowed name (DNS rebinding), with 421; the
/// probes answer whatever the `Host`.
pub async fn check_host(
    State(allowed): State<Arc<AllowedHosts>>,
    req: Request,
    next: Next,
) -> Response {
    if PROBES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !allowed.allows(host) {
        return ApiError::MisdirectedHost.into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_allow_list() {
        let local = AllowedHosts::new(&[], "127.0.0.1:8347".parse().unwrap());
        for ok in [
            "localhost",
            "LOCALHOST:8347",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:8347",
        ] {
            assert!(local.allows(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:8347",
            "127.0.0.2",
            "localhost.evil",
        ] {
            assert!(!local.allows(bad), "{bad}");
        }
        let wide = AllowedHosts::new(&[], "192.0.2.7:8347".parse().unwrap());
        assert!(wide.allows("192.0.2.7:8347"));
        let named = AllowedHosts::new(&["Admin.Example".into()], "0.0.0.0:1".parse().unwrap());
        assert!(named.allows("admin.example:443") && !named.allows("localhost"));
        let any = AllowedHosts::new(&["*".into()], "0.0.0.0:1".parse().unwrap());
        assert!(any.allows("anything"));
        // The address other instances are told to use is one they may use.
        let advertised = AllowedHosts::new(&["admin.example".into()], "0.0.0.0:1".parse().unwrap())
            .with_advertised(Some("http://XTLS-B.internal:8347"));
        assert!(advertised.allows("xtls-b.internal:8347") && advertised.allows("admin.example"));
        assert!(!advertised.allows("localhost"));
    }
}
