//! The configuration: one TOML file, every key overridable from the environment.
//!
//! Keys map to environment variables as `XTLS_<SECTION>__<KEY>`, e.g. `component.secret` is
//! `XTLS_COMPONENT__SECRET` and `admin.token` is `XTLS_ADMIN__TOKEN`. Secrets may instead come
//! from files (`secret_file`, `token_file`). Unknown keys are errors. The documented example
//! with every default is `config/xtls-component.toml`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use xtls::tunnel::{PeerAuth, TrustMode, TunnelConfig};

/// A secret value: never printed, never serialized.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be parsed into the configuration.
    #[error("{0}")]
    Parse(#[from] Box<figment::Error>),
    /// A key has a value that parses but cannot be used.
    #[error("config key `{key}`: {problem}")]
    Invalid {
        /// The dotted key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The link to the XMPP server.
    #[serde(default)]
    pub component: ComponentConfig,
    /// The admin HTTP API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The SQL store.
    #[serde(default)]
    pub store: StoreConfig,
    /// How this instance shares the store with others.
    #[serde(default)]
    pub instances: InstancesConfig,
    /// Tunnel timers and sizes (spec §1.13).
    #[serde(default)]
    pub tunnel: TunnelSettings,
    /// Capacity caps.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The bots' event logs.
    #[serde(default)]
    pub events: EventsConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Webhook delivery.
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    /// The bots' own certificates: validity and rotation.
    #[serde(default)]
    pub certificates: CertificatesConfig,
    /// Bots created at start when missing.
    #[serde(default)]
    pub bots: Vec<BotConfig>,
    /// How the log is written.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[log]`: how the log on standard error is written (`RUST_LOG` sets what is logged).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people (the default), `json` for log shippers: one object per line.
    pub format: LogFormat,
    /// What is logged, as `RUST_LOG` directives (e.g. `info,xtls_component::session=debug`);
    /// `RUST_LOG`, when set, wins. Default `info`. SIGHUP applies a change.
    pub filter: Option<String>,
}

/// The log's format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Lines for a person (colours only at a terminal).
    #[default]
    Text,
    /// One JSON object per line, with the fields of the event at the top level.
    Json,
}

/// `[component]`: the XEP-0114 link.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// The component's domain, as declared in the server (required).
    #[serde(default)]
    pub domain: String,
    /// The server's component port, `host:port`.
    #[serde(default = "default_server")]
    pub server: String,
    /// The shared secret.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// A file holding the shared secret (trailing newline ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Seconds between whitespace keepalives.
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    /// Seconds between XEP-0199 pings to the server.
    #[serde(default = "default_ping_interval")]
    pub ping_interval_secs: u64,
    /// Seconds a ping may stay unanswered before the link is reconnected.
    #[serde(default = "default_ping_timeout")]
    pub ping_timeout_secs: u64,
    /// Longest reconnect back-off, in seconds.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_secs: u64,
}

impl Default for ComponentConfig {
    fn default() -> Self {
        Self {
            domain: String::new(),
            server: default_server(),
            secret: None,
            secret_file: None,
            keepalive_secs: default_keepalive(),
            ping_interval_secs: default_ping_interval(),
            ping_timeout_secs: default_ping_timeout(),
            reconnect_max_secs: default_reconnect_max(),
        }
    }
}

fn default_server() -> String {
    "127.0.0.1:5347".into()
}
fn default_keepalive() -> u64 {
    60
}
fn default_ping_interval() -> u64 {
    120
}
fn default_ping_timeout() -> u64 {
    30
}
fn default_reconnect_max() -> u64 {
    60
}

/// `[admin]`: the HTTP admin API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// The bearer token required on `/v1`.
    #[serde(default)]
    pub token: Option<Secret>,
    /// A file holding the token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Names the `Host` header may carry (`*`: any); empty: loopback and the listen address.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Origins allowed to call the API from a browser (CORS); empty: none.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Largest request body, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Seconds a client has to send its request headers.
    #[serde(default = "default_header_timeout_secs")]
    pub header_timeout_secs: u64,
    /// Seconds a client has to send its request body.
    #[serde(default = "default_body_timeout_secs")]
    pub body_timeout_secs: u64,
    /// Connections served at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTPS instead of HTTP, with these files.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8347))
}

fn default_max_body_bytes() -> usize {
    1024 * 1024
}

fn default_header_timeout_secs() -> u64 {
    10
}

fn default_body_timeout_secs() -> u64 {
    30
}

fn default_max_connections() -> usize {
    256
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
            token_file: None,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            max_body_bytes: default_max_body_bytes(),
            header_timeout_secs: default_header_timeout_secs(),
            body_timeout_secs: default_body_timeout_secs(),
            max_connections: default_max_connections(),
            tls: None,
        }
    }
}

/// `[store]`: where state lives.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://FILE` (created when missing) or `postgres://USER@HOST:PORT/DATABASE`.
    #[serde(default = "default_store_url")]
    pub url: String,
    /// The file holding the key that seals private keys and webhook secrets in the store
    /// (created with mode 0600 when missing); default: the store file's path plus `.key`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The store key itself (base64 of 32 bytes), instead of a file.
    #[serde(default)]
    pub key: Option<Secret>,
}

impl StoreConfig {
    /// Where the store key is kept: `key_file`, else beside the SQLite file; `None` for an
    /// in-memory store (a key of its own for each run).
    pub fn key_path(&self) -> Option<PathBuf> {
        if let Some(path) = &self.key_file {
            return Some(path.clone());
        }
        let path = self
            .url
            .strip_prefix("sqlite://")
            .or_else(|| self.url.strip_prefix("sqlite:"))?;
        let path = path.split('?').next().unwrap_or_default();
        (!path.is_empty() && !path.starts_with(':')).then(|| PathBuf::from(format!("{path}.key")))
    }
}

/// `[instances]`: how this instance shares its store with others.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstancesConfig {
    /// What this instance does when another one already serves the store.
    pub mode: InstanceMode,
    /// Where this instance's admin API is reached by people and other instances
    /// (`http://host:port`), recorded with the instance (`GET /v1/instances`).
    pub advertise_url: Option<String>,
}

/// What an instance does when another one already serves the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceMode {
    /// It stops at once and says why: one instance serves a store.
    #[default]
    Single,
    /// It waits as a standby, and serves when the active one stops (a PostgreSQL store).
    Failover,
    /// It serves beside the others, each running the bots whose stanzas the server routes to
    /// it (a PostgreSQL store and ejabberd's `domain_balancing`).
    Shared,
}

/// An admin address to advertise: an absolute `http` or `https` URL of a host, with no
/// credentials, query or fragment.
fn check_advertise_url(text: &str) -> Result<(), String> {
    // The value is never echoed: a mistyped URL may hold a password or a token.
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must start with http:// or https://".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("names no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not carry credentials: it is shown to anyone with the admin token".into(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or a fragment".into());
    }
    Ok(())
}

/// Which database a store URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreBackend {
    /// One SQLite file, served by one instance.
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

impl StoreBackend {
    /// The backend of `url`: `sqlite:`, or `postgres:`/`postgresql:`.
    pub fn of_url(url: &str) -> Result<StoreBackend, String> {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
        match scheme {
            "sqlite" => Ok(StoreBackend::Sqlite),
            "postgres" | "postgresql" => Ok(StoreBackend::Postgres),
            // Only the scheme is quoted: the rest of a URL may hold a password.
            _ => Err(format!(
                "the store URL must start with sqlite: or postgres:, not {scheme:?}"
            )),
        }
    }
}

fn default_store_url() -> String {
    "sqlite://xtls-component.db".into()
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: default_store_url(),
            key_file: None,
            key: None,
        }
    }
}

/// `[tunnel]`: timers and sizes of every tunnel (spec §1.13).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelSettings {
    /// Raw bytes per `<data/>` sent (at most 65535).
    pub chunk_size: usize,
    /// Unacknowledged `data` IQs per tunnel.
    pub window: usize,
    /// Seconds allowed for the answer to our `start`.
    pub start_timeout_secs: u64,
    /// Seconds from `start` to an open tunnel.
    pub handshake_timeout_secs: u64,
    /// Seconds allowed for the acknowledgement of one `data`.
    pub ack_timeout_secs: u64,
    /// Milliseconds an `api` bot keeps the acknowledgement of a peer's `data` waiting for
    /// the backend's reply, to send it behind that reply; 0 sends it at once.
    pub ack_hold_ms: u64,
    /// Seconds allowed for the answer to our `close`.
    pub close_timeout_secs: u64,
    /// Seconds without application data before an open tunnel is closed; 0 disables.
    pub idle_timeout_secs: u64,
    /// Largest inner stanza in bytes.
    pub max_inner_stanza: usize,
    /// Bytes queued per tunnel before senders are told to wait.
    pub max_queued_out: usize,
    /// Whether bots put a XEP-0250 offer in the `start`s they send.
    pub send_offer: bool,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        let t = TunnelConfig::default();
        Self {
            chunk_size: t.chunk_size,
            window: t.window,
            start_timeout_secs: t.start_timeout.as_secs(),
            handshake_timeout_secs: t.handshake_timeout.as_secs(),
            ack_timeout_secs: t.ack_timeout.as_secs(),
            // Above the 40 ms a client's kernel delays an ACK (docs/performance.md).
            ack_hold_ms: 50,
            close_timeout_secs: t.close_timeout.as_secs(),
            idle_timeout_secs: t.idle_timeout.map_or(0, |d| d.as_secs()),
            max_inner_stanza: t.max_inner_stanza,
            max_queued_out: t.max_queued_out,
            send_offer: t.send_offer,
        }
    }
}

impl TunnelSettings {
    /// The engine's view of these settings.
    pub fn to_tunnel_config(&self) -> TunnelConfig {
        TunnelConfig {
            chunk_size: self.chunk_size,
            window: self.window,
            start_timeout: Duration::from_secs(self.start_timeout_secs),
            handshake_timeout: Duration::from_secs(self.handshake_timeout_secs),
            ack_timeout: Duration::from_secs(self.ack_timeout_secs),
            ack_hold: Duration::from_millis(self.ack_hold_ms),
            close_timeout: Duration::from_secs(self.close_timeout_secs),
            idle_timeout: (self.idle_timeout_secs > 0)
                .then(|| Duration::from_secs(self.idle_timeout_secs)),
            peer_eof_timeout: Duration::from_secs(self.close_timeout_secs),
            max_inner_stanza: self.max_inner_stanza,
            max_queued_out: self.max_queued_out,
            send_offer: self.send_offer,
        }
    }
}

/// `[limits]`: capacity caps; exceeding one is answered `resource-constraint` (spec §1.11).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Live tunnels per bot.
    pub tunnels_per_bot: usize,
    /// Live tunnels per peer bare JID, per bot.
    pub tunnels_per_peer: usize,
    /// Live tunnels in the whole component.
    pub tunnels_total: usize,
    /// Concurrent TLS handshakes in the whole component.
    pub handshakes: usize,
    /// Stanzas queued for one bot before the router answers `wait`.
    pub bot_queue: usize,
    /// Stanzas queued for the server before senders wait.
    pub outbound_queue: usize,
    /// Largest stanza accepted from the server, in bytes.
    pub max_stanza_bytes: usize,
    /// `start`s one peer (bare JID) may send per minute, to all bots together.
    pub starts_per_peer_per_minute: u32,
    /// `start`s one peer may send at once before the per-minute rate applies.
    pub start_burst_per_peer: u32,
}

impl LimitsConfig {
    /// The fields of `new` that differ from these and take a restart: the queues are sized
    /// and the stream's stanza limit set when the process starts.
    pub fn fixed_changes(&self, new: &LimitsConfig) -> Vec<&'static str> {
        [
            ("limits.bot_queue", self.bot_queue != new.bot_queue),
            (
                "limits.outbound_queue",
                self.outbound_queue != new.outbound_queue,
            ),
            (
                "limits.max_stanza_bytes",
                self.max_stanza_bytes != new.max_stanza_bytes,
            ),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// `new` with the fields that take a restart kept as they are here.
    pub fn reloadable(&self, new: &LimitsConfig) -> LimitsConfig {
        LimitsConfig {
            bot_queue: self.bot_queue,
            outbound_queue: self.outbound_queue,
            max_stanza_bytes: self.max_stanza_bytes,
            ..new.clone()
        }
    }
}

/// A setting a reload may replace while the process runs; readers take the value in effect
/// when they ask, and keep it for as long as they hold it.
#[derive(Debug, Default)]
pub struct Live<T>(RwLock<Arc<T>>);

impl<T> Live<T> {
    /// Holds `value`.
    pub fn new(value: T) -> Self {
        Live(RwLock::new(Arc::new(value)))
    }

    /// The value in effect.
    pub fn get(&self) -> Arc<T> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts `value` in effect for every later reader.
    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            tunnels_per_bot: 1000,
            tunnels_per_peer: 16,
            tunnels_total: 10_000,
            handshakes: 64,
            bot_queue: 1024,
            outbound_queue: 4096,
            max_stanza_bytes: 1024 * 1024,
            starts_per_peer_per_minute: 120,
            start_burst_per_peer: 20,
        }
    }
}

/// `[metrics]`: where `/metrics` is served.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A listener of its own, without token; unset: on the admin listener, admin token required.
    pub listen: Option<SocketAddr>,
    /// HTTPS instead of HTTP on that listener, with these files.
    pub tls: Option<TlsFiles>,
}

/// `[admin.tls]`, `[metrics.tls]`: the certificate and key a listener serves HTTPS with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain in PEM, the listener's own certificate first.
    pub cert_file: PathBuf,
    /// Its private key in PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl TlsFiles {
    /// Reads both files into a TLS 1.3 server configuration for HTTP/1.1; an error names
    /// `key` (the dotted config key), the file and the problem, never the key's content.
    pub fn server_config(&self, key: &str) -> Result<rustls::ServerConfig, ConfigError> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let file = |name: &str, path: &Path, e: &dyn fmt::Display| {
            invalid(&format!("{key}.{name}"), format!("{}: {e}", path.display()))
        };
        let chain = CertificateDer::pem_file_iter(&self.cert_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| file("cert_file", &self.cert_file, &e))?;
        if chain.is_empty() {
            return Err(file("cert_file", &self.cert_file, &"holds no certificate"));
        }
        let secret = PrivateKeyDer::from_pem_file(&self.key_file).map_err(|e| {
            // The parser's messages name sections and I/O problems, not key bytes.
            file("key_file", &self.key_file, &e)
        })?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid(key, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, secret)
        .map_err(|e| {
            invalid(
                key,
                format!("the key does not fit the certificate, or is not usable: {e}"),
            )
        })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// `[events]`: the bots' event logs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Seconds an acknowledged event is kept before it is deleted.
    pub retention_secs: u64,
    /// Most events committed in one transaction.
    pub max_batch: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            retention_secs: 24 * 3600,
            max_batch: 256,
        }
    }
}

/// `[certificates]`: the validity of the bots' certificates and their rotation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CertificatesConfig {
    /// Days a new or re-issued certificate is valid.
    pub validity_days: u64,
    /// Seconds a next certificate is announced before it becomes active, unless a rotation
    /// says otherwise; also how long before its expiry a certificate is rotated automatically.
    pub overlap_secs: u64,
    /// Rotate certificates that expire within the overlap (keeping their key).
    pub auto_rotate: bool,
    /// Seconds between checks for certificates to activate or rotate.
    pub check_interval_secs: u64,
}

impl Default for CertificatesConfig {
    fn default() -> Self {
        Self {
            validity_days: 3650,
            overlap_secs: 14 * 86400,
            auto_rotate: true,
            check_interval_secs: 60,
        }
    }
}

impl CertificatesConfig {
    /// The validity of a new certificate.
    pub fn validity(&self) -> Duration {
        Duration::from_secs(self.validity_days * 86400)
    }

    /// The default overlap of a rotation.
    pub fn overlap(&self) -> Duration {
        Duration::from_secs(self.overlap_secs)
    }
}

/// `[webhooks]`: how events are pushed to bots' webhooks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// First retry delay, in milliseconds; it doubles per attempt.
    pub initial_backoff_ms: u64,
    /// Longest retry delay, in milliseconds.
    pub max_backoff_ms: u64,
    /// Seconds after the first attempt at which an event is dead-lettered.
    pub max_age_secs: u64,
    /// Default request timeout, in milliseconds.
    pub timeout_ms: u64,
    /// Default concurrent requests per bot.
    pub max_in_flight: usize,
    /// Internal networks (CIDR) webhooks may reach; loopback, private, link-local and other
    /// internal addresses are refused unless listed here.
    pub allowed_networks: Vec<ipnet::IpNet>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 1000,
            max_backoff_ms: 600_000,
            max_age_secs: 24 * 3600,
            timeout_ms: 5000,
            max_in_flight: 8,
            allowed_networks: Vec::new(),
        }
    }
}

/// What a bot does with the stanzas that reach it (stored by name; an unknown stored name is
/// an error when the row is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Handler {
    /// Answers every tunneled message with the same body through the same tunnel.
    Echo,
    /// Logs everything to the bot's event log for the bot-facing API (docs/bot-api.md).
    Api,
}

impl Handler {
    /// The config and API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Handler::Echo => "echo",
            Handler::Api => "api",
        }
    }
}

impl std::str::FromStr for Handler {
    type Err = xtls::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Handler::Echo, Handler::Api]
            .into_iter()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| xtls::UnknownName {
                kind: "handler",
                value: s.to_owned(),
            })
    }
}

/// Which peer keys a bot accepts (stored by name; `pinned`, the earlier name of `manual`, is
/// read as `manual`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum BotTrust {
    /// Trust on first use: a peer's first key is pinned, unverified; another key is refused
    /// (`peer.identity_changed`) until someone approves it.
    #[default]
    Tofu,
    /// Only keys someone approved or verified over the API; an unknown key is refused and
    /// reported (`peer.identity_new` with `accepted: false`).
    #[serde(alias = "pinned")]
    Manual,
    /// Only keys someone verified (compared out of band, or paired).
    VerifiedOnly,
}

impl BotTrust {
    /// The config, store and API name.
    pub fn as_str(self) -> &'static str {
        match self {
            BotTrust::Tofu => "tofu",
            BotTrust::Manual => "manual",
            BotTrust::VerifiedOnly => "verified_only",
        }
    }

    /// The engine's mode: trust on first use, or listed keys only.
    pub fn engine_mode(self) -> TrustMode {
        match self {
            BotTrust::Tofu => TrustMode::Tofu,
            BotTrust::Manual | BotTrust::VerifiedOnly => TrustMode::Pinned,
        }
    }
}

impl std::str::FromStr for BotTrust {
    type Err = xtls::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pinned" => Ok(BotTrust::Manual),
            _ => [BotTrust::Tofu, BotTrust::Manual, BotTrust::VerifiedOnly]
                .into_iter()
                .find(|t| t.as_str() == s)
                .ok_or_else(|| xtls::UnknownName {
                    kind: "trust mode",
                    value: s.to_owned(),
                }),
        }
    }
}

/// `[[bots]]`: a bot created at start when missing.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotConfig {
    /// The bot's localpart; its JID is `localpart@domain`.
    pub localpart: String,
    /// What the bot does.
    pub handler: Handler,
    /// Whether peers must present a certificate.
    #[serde(default)]
    pub peer_auth: PeerAuth,
    /// Which peers' keys are accepted.
    #[serde(default)]
    pub trust: BotTrust,
    /// Refuse messages sent in clear, telling the sender to use XTLS (default: deliver them
    /// to the bot marked as not encrypted).
    #[serde(default)]
    pub encrypted_only: bool,
}

impl Config {
    /// Loads the file (if given) with environment overrides, and validates it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::from_figment(sources(path)?)
    }
}

/// The configuration file (if given) merged with the `XTLS_` environment.
fn sources(path: Option<&Path>) -> Result<Figment, ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = path {
        if !path.exists() {
            return Err(invalid(
                "--config",
                format!("{} does not exist", path.display()),
            ));
        }
        figment = figment.merge(Toml::file(path));
    }
    // Only section-qualified names (`XTLS_SECTION__KEY`) are config keys, so unrelated
    // variables that merely share the prefix are left alone.
    let env = Env::prefixed("XTLS_")
        .filter(|key| key.as_str().contains("__"))
        .split("__");
    Ok(figment.merge(env))
}

/// One key of a configuration (file and environment), without requiring or validating the
/// rest: what the offline subcommands need. `None` when it is not set.
pub fn single_key<T: serde::de::DeserializeOwned>(
    path: Option<&Path>,
    key: &str,
) -> Result<Option<T>, ConfigError> {
    let figment = sources(path)?;
    if !figment.contains(key) {
        return Ok(None);
    }
    figment
        .extract_inner::<T>(key)
        .map(Some)
        .map_err(|e| ConfigError::Parse(Box::new(e)))
}

/// The store URL of a configuration, or the default.
pub fn store_url(path: Option<&Path>) -> Result<String, ConfigError> {
    Ok(single_key(path, "store.url")?.unwrap_or_else(default_store_url))
}

/// The admin listener of a configuration (file and environment) and whether it serves
/// HTTPS, without requiring the rest of it: what `healthcheck` needs inside a container that
/// has no secrets in its environment.
pub fn admin_endpoint(path: Option<&Path>) -> Result<(SocketAddr, bool), ConfigError> {
    let listen = single_key(path, "admin.listen")?.unwrap_or_else(default_admin_listen);
    let https = sources(path)?.contains("admin.tls");
    Ok((listen, https))
}

impl Config {
    /// Extracts and validates a configuration from any figment (used by tests too).
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let mut config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        let domain = &self.component.domain;
        if domain.is_empty() {
            return Err(invalid(
                "component.domain",
                "missing: set component.domain, or the environment variable XTLS_COMPONENT__DOMAIN",
            ));
        }
        match jid::Jid::new(domain) {
            Ok(j) if j.node().is_none() && j.resource().is_none() => {
                self.component.domain = j.to_string();
            }
            _ => {
                return Err(invalid(
                    "component.domain",
                    format!("'{domain}' is not a domain"),
                ));
            }
        }
        if !self.component.server.contains(':') {
            return Err(invalid("component.server", "expected host:port"));
        }
        let secret = read_secret(
            "component.secret",
            self.component.secret.take(),
            self.component.secret_file.as_deref(),
        )?;
        self.component.secret = Some(secret);
        let token = read_secret(
            "admin.token",
            self.admin.token.take(),
            self.admin.token_file.as_deref(),
        )?;
        if token.expose().len() < 8 {
            return Err(invalid("admin.token", "must be at least 8 characters"));
        }
        self.admin.token = Some(token);
        let a = &self.admin;
        if a.max_body_bytes < 1024 {
            return Err(invalid("admin.max_body_bytes", "must be at least 1024"));
        }
        if a.header_timeout_secs == 0 || a.body_timeout_secs == 0 || a.max_connections == 0 {
            return Err(invalid(
                "admin",
                "header_timeout_secs, body_timeout_secs and max_connections must be at least 1",
            ));
        }
        for origin in &a.cors_origins {
            let well_formed = (origin.starts_with("https://") || origin.starts_with("http://"))
                && !origin.ends_with('/')
                && origin.split("://").nth(1).is_some_and(|rest| {
                    !rest.is_empty() && !rest.contains('/') && !rest.contains('*')
                })
                && axum::http::HeaderValue::from_str(origin).is_ok();
            if !well_formed {
                return Err(invalid(
                    "admin.cors_origins",
                    format!(
                        "'{origin}' is not an origin like https://admin.example.org (no path, no wildcard)"
                    ),
                ));
            }
        }
        if let Some(tls) = &a.tls {
            tls.server_config("admin.tls")?;
        }
        match (&self.metrics.tls, self.metrics.listen) {
            (Some(_), None) => {
                return Err(invalid(
                    "metrics.tls",
                    "needs metrics.listen: without a listener of its own, /metrics is served on the admin listener (admin.tls)",
                ));
            }
            (Some(tls), Some(_)) => {
                tls.server_config("metrics.tls")?;
            }
            (None, _) => {}
        }
        match StoreBackend::of_url(&self.store.url) {
            Err(e) => return Err(invalid("store.url", e)),
            // Every instance on the database must seal with the same key, and no file beside
            // the store can hold it: say so before a key of one run seals anything.
            Ok(StoreBackend::Postgres)
                if self.store.key.is_none() && self.store.key_file.is_none() =>
            {
                return Err(invalid(
                    "store.key",
                    "a PostgreSQL store needs store.key or store.key_file (the key that seals the \
                     bots' private keys, the same for every instance): create one with \
                     `head -c 32 /dev/urandom | base64`",
                ));
            }
            Ok(StoreBackend::Sqlite) if self.instances.mode != InstanceMode::Single => {
                return Err(invalid(
                    "instances.mode",
                    "failover and shared need a PostgreSQL store: a SQLite file serves one \
                     instance, and another one cannot reach it from another host",
                ));
            }
            Ok(_) => {}
        }
        if self.instances.mode == InstanceMode::Shared && self.instances.advertise_url.is_none() {
            return Err(invalid(
                "instances.advertise_url",
                "instances.mode = \"shared\" needs the address of this instance's admin API \
                 (http://host:port): the other instances send it the requests for its bots",
            ));
        }
        if let Some(url) = &self.instances.advertise_url {
            check_advertise_url(url).map_err(|why| invalid("instances.advertise_url", &why))?;
        }
        let store_key = match (&self.store.key, self.store.key_path()) {
            (Some(_), Some(_)) if self.store.key_file.is_some() => {
                return Err(invalid(
                    "store.key",
                    "set either store.key or store.key_file, not both",
                ));
            }
            (Some(key), _) => Some(("store.key", key.expose().to_owned())),
            (None, Some(path)) if path.exists() => Some((
                "store.key_file",
                std::fs::read_to_string(&path).map_err(|e| {
                    invalid(
                        "store.key_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?,
            )),
            (None, _) => None,
        };
        if let Some((key, text)) = store_key {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD.decode(text.trim());
            if decoded.map(|b| b.len()) != Ok(32) {
                return Err(invalid(key, "not a store key: expected 32 bytes in base64"));
            }
        }
        let t = &self.tunnel;
        if t.chunk_size == 0 || t.chunk_size > xtls::stanza::xtls::MAX_CHUNK_ACCEPTED {
            return Err(invalid("tunnel.chunk_size", "must be between 1 and 65535"));
        }
        // The peer's `data` waits for this acknowledgement: longer than a second is a stall.
        if t.ack_hold_ms > 1000 {
            return Err(invalid("tunnel.ack_hold_ms", "must be at most 1000"));
        }
        // A zero here would be a timer that fires at once, a window or queue that never
        // opens, or an interval tokio refuses: say so now instead of failing at run time.
        let c = &self.component;
        let l = &self.limits;
        let w = &self.webhooks;
        for (key, value) in [
            ("tunnel.window", t.window as u64),
            ("tunnel.start_timeout_secs", t.start_timeout_secs),
            ("tunnel.handshake_timeout_secs", t.handshake_timeout_secs),
            ("tunnel.ack_timeout_secs", t.ack_timeout_secs),
            ("tunnel.close_timeout_secs", t.close_timeout_secs),
            ("tunnel.max_inner_stanza", t.max_inner_stanza as u64),
            ("tunnel.max_queued_out", t.max_queued_out as u64),
            ("component.keepalive_secs", c.keepalive_secs),
            ("component.ping_interval_secs", c.ping_interval_secs),
            ("component.ping_timeout_secs", c.ping_timeout_secs),
            ("component.reconnect_max_secs", c.reconnect_max_secs),
            ("limits.bot_queue", l.bot_queue as u64),
            ("limits.outbound_queue", l.outbound_queue as u64),
            ("limits.max_stanza_bytes", l.max_stanza_bytes as u64),
            (
                "limits.start_burst_per_peer",
                u64::from(l.start_burst_per_peer),
            ),
            ("events.max_batch", self.events.max_batch as u64),
            ("webhooks.initial_backoff_ms", w.initial_backoff_ms),
            ("webhooks.max_backoff_ms", w.max_backoff_ms),
            ("webhooks.timeout_ms", w.timeout_ms),
            ("webhooks.max_in_flight", w.max_in_flight as u64),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let certs = &self.certificates;
        if !(1..=36500).contains(&certs.validity_days) {
            return Err(invalid(
                "certificates.validity_days",
                "must be between 1 and 36500",
            ));
        }
        // A certificate due for rotation as soon as it is issued would be rotated forever.
        if certs.auto_rotate && certs.overlap_secs >= certs.validity_days * 86400 {
            return Err(invalid(
                "certificates.overlap_secs",
                "must be shorter than certificates.validity_days while auto_rotate is on",
            ));
        }
        if certs.check_interval_secs == 0 {
            return Err(invalid(
                "certificates.check_interval_secs",
                "must be at least 1",
            ));
        }
        if let Some(filter) = &self.log.filter
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(filter)
        {
            return Err(invalid("log.filter", format!("not a log filter: {e}")));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, bot) in self.bots.iter().enumerate() {
            let key = format!("bots[{i}].localpart");
            let jid = format!("{}@{}", bot.localpart, self.component.domain);
            if xtls::certs::normalize_bare(&jid).is_none() || bot.localpart.is_empty() {
                return Err(invalid(
                    &key,
                    format!("'{}' is not a valid localpart", bot.localpart),
                ));
            }
            if !seen.insert(bot.localpart.to_lowercase()) {
                return Err(invalid(
                    &key,
                    format!("'{}' is declared twice", bot.localpart),
                ));
            }
        }
        Ok(())
    }

    /// The component secret (present after validation).
    pub fn secret(&self) -> &Secret {
        self.component.secret.as_ref().expect("validated config")
    }

    /// The settings that differ in `new`, by name: sections, with `admin.token`,
    /// `admin.tls` and `metrics.tls` apart from the rest of theirs.
    pub fn changes(&self, new: &Config) -> Vec<&'static str> {
        let mut admin = self.admin.clone();
        admin.token.clone_from(&new.admin.token);
        admin.token_file.clone_from(&new.admin.token_file);
        admin.tls.clone_from(&new.admin.tls);
        let mut metrics = self.metrics.clone();
        metrics.tls.clone_from(&new.metrics.tls);
        [
            ("admin.token", self.admin.token != new.admin.token),
            ("log", self.log != new.log),
            ("component", self.component != new.component),
            ("admin", admin != new.admin),
            ("admin.tls", self.admin.tls != new.admin.tls),
            ("store", self.store != new.store),
            ("instances", self.instances != new.instances),
            ("tunnel", self.tunnel != new.tunnel),
            ("limits", self.limits != new.limits),
            ("events", self.events != new.events),
            ("metrics", metrics != new.metrics),
            ("metrics.tls", self.metrics.tls != new.metrics.tls),
            ("webhooks", self.webhooks != new.webhooks),
            ("certificates", self.certificates != new.certificates),
            ("bots", self.bots != new.bots),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// The admin token (present after validation).
    pub fn token(&self) -> &Secret {
        self.admin.token.as_ref().expect("validated config")
    }
}

fn read_secret(
    key: &str,
    value: Option<Secret>,
    file: Option<&Path>,
) -> Result<Secret, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(invalid(
            key,
            format!("set either {key} or {key}_file, not both"),
        )),
        (Some(v), None) if v.expose().is_empty() => Err(invalid(key, "is empty")),
        (Some(v), None) => Ok(v),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    &format!("{key}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let text = text.trim_end_matches(['\n', '\r']);
            if text.is_empty() {
                return Err(invalid(
                    &format!("{key}_file"),
                    format!("{} is empty", path.display()),
                ));
            }
            Ok(Secret::new(text))
        }
        (None, None) => Err(invalid(
            key,
            format!(
                "missing: set {key}, {key}_file, or the environment variable XTLS_{}",
                env_name(key)
            ),
        )),
    }
}

fn env_name(key: &str) -> String {
    key.to_uppercase().replace('.', "__")
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn load(toml: &str) -> Result<Config, ConfigError> {
        Config::from_figment(Figment::new().merge(Toml::string(toml)))
    }

    const MINIMAL: &str = r#"
        [component]
        domain = "bots.example.org"
        secret = "s3cret"
        [admin]
        token = "token-123456"
    "#;

    #[test]
    fn a_store_url_names_sqlite_or_postgres_and_postgres_needs_a_shared_key() {
        let with = |store: &str| load(&format!("{MINIMAL}\n[store]\n{store}"));
        assert!(with(r#"url = "sqlite://x.db""#).is_ok());
        let err = with(r#"url = "postgres://xtls:pw@db/bots""#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("store.key") && err.contains("same for every instance"),
            "{err}"
        );
        let key = "key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"";
        let c = with(&format!("url = \"postgresql://xtls@db/bots\"\n{key}")).unwrap();
        assert_eq!(
            StoreBackend::of_url(&c.store.url),
            Ok(StoreBackend::Postgres)
        );
        let err = with(r#"url = "mysql://root:pw@db/bots""#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.url") && !err.contains("pw"), "{err}");
        let err = with("url = \"sqlite://x.db\"\n[instances]\nmode = \"failover\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("instances.mode") && err.contains("PostgreSQL"),
            "{err}"
        );
        let c = with(&format!(
            "url = \"postgres://xtls@db/bots\"\n{key}\n[instances]\nmode = \"failover\""
        ))
        .unwrap();
        assert_eq!(c.instances.mode, InstanceMode::Failover);
        assert_eq!(load(MINIMAL).unwrap().instances.mode, InstanceMode::Single);
        let err = with("url = \"sqlite://x.db\"\n[instances]\nmode = \"shared\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("instances.mode") && err.contains("PostgreSQL"),
            "{err}"
        );
        let shared =
            format!("url = \"postgres://xtls@db/bots\"\n{key}\n[instances]\nmode = \"shared\"");
        let err = with(&shared).unwrap_err().to_string();
        assert!(err.contains("instances.advertise_url"), "{err}");
        let c = with(&format!("{shared}\nadvertise_url = \"http://xtls-a:8347\"")).unwrap();
        assert_eq!(c.instances.mode, InstanceMode::Shared);
    }

    #[test]
    fn an_advertised_admin_url_must_be_a_plain_http_url() {
        let with = |url: &str| {
            load(&format!(
                "{MINIMAL}\n[instances]\nadvertise_url = \"{url}\""
            ))
        };
        let c = with("https://xtls-a.internal:8347").unwrap();
        assert_eq!(
            c.instances.advertise_url.as_deref(),
            Some("https://xtls-a.internal:8347")
        );
        assert_eq!(load(MINIMAL).unwrap().instances.advertise_url, None);
        for (bad, says) in [
            ("xtls-a:8347", "http"),
            ("ftp://xtls-a/", "http"),
            ("http://admin:hunter2@xtls-a:8347", "credentials"),
            ("http://xtls-a:8347/?token=hunter2", "query"),
            ("admin:hunter2@xtls-a:8347", "http"),
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(
                err.contains("instances.advertise_url") && err.contains(says),
                "{bad}: {err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.component.server, "127.0.0.1:5347");
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:8347");
        assert_eq!(c.store.url, "sqlite://xtls-component.db");
        assert_eq!(c.tunnel.window, 4);
        assert_eq!(c.limits.tunnels_per_peer, 16);
        assert_eq!(c.secret().expose(), "s3cret");
    }

    #[test]
    fn admin_api_limits_and_origins_are_checked() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.admin.max_body_bytes, 1024 * 1024);
        assert!(c.admin.cors_origins.is_empty() && c.admin.allowed_hosts.is_empty());
        let with = |line: &str| load(&MINIMAL.replace("[admin]", &format!("[admin]\n{line}")));
        assert!(with(r#"cors_origins = ["https://console.example.org:8443"]"#).is_ok());
        for bad in [
            "*",
            "https://a.example/",
            "https://a.example/path",
            "ftp://a",
            "https://",
        ] {
            let e = with(&format!("cors_origins = [\"{bad}\"]")).unwrap_err();
            assert!(e.to_string().contains("admin.cors_origins"), "{bad}: {e}");
        }
        assert!(with("max_body_bytes = 10").is_err());
        assert!(with("max_connections = 0").is_err());
    }

    #[test]
    fn errors_name_the_key() {
        let e = load(&MINIMAL.replace("secret = \"s3cret\"", ""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("component.secret") && e.contains("XTLS_COMPONENT__SECRET"),
            "{e}"
        );
        for (section, key) in [
            ("tunnel", "window"),
            ("tunnel", "handshake_timeout_secs"),
            ("tunnel", "ack_timeout_secs"),
            ("component", "ping_timeout_secs"),
            ("limits", "bot_queue"),
            ("events", "max_batch"),
            ("webhooks", "timeout_ms"),
        ] {
            let file = if section == "component" {
                MINIMAL.replace("[component]", &format!("[component]\n{key} = 0"))
            } else {
                format!("{MINIMAL}\n[{section}]\n{key} = 0")
            };
            let e = load(&file).unwrap_err().to_string();
            assert!(e.contains(&format!("{section}.{key}")), "{e}");
            assert!(e.contains("must be at least 1"), "{e}");
        }
        // Zero where it means "off" stays allowed.
        load(&format!("{MINIMAL}\n[tunnel]\nidle_timeout_secs = 0")).unwrap();
        let e = load(&format!("{MINIMAL}\n[tunnel]\nwindoww = 2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("windoww"), "{e}");
        let e = load(&MINIMAL.replace("bots.example.org", "a@b"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("component.domain"), "{e}");
        let e = load(&format!(
            "{MINIMAL}\n[[bots]]\nlocalpart=\"echo\"\nhandler=\"echo\"\n[[bots]]\nlocalpart=\"echo\"\nhandler=\"echo\""
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("bots[1].localpart"), "{e}");
        let e = load(&format!(
            "{MINIMAL}\n[[bots]]\nlocalpart=\"x\"\nhandler=\"parrot\""
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("parrot"), "{e}");
    }

    #[test]
    fn certificate_rotation_settings_are_checked() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.certificates, CertificatesConfig::default());
        assert_eq!(c.certificates.validity(), Duration::from_secs(3650 * 86400));
        let with = |lines: &str| load(&format!("{MINIMAL}\n[certificates]\n{lines}"));
        for (lines, key) in [
            ("validity_days = 0", "certificates.validity_days"),
            ("validity_days = 40000", "certificates.validity_days"),
            ("validity_days = 10", "certificates.overlap_secs"),
            (
                "check_interval_secs = 0",
                "certificates.check_interval_secs",
            ),
        ] {
            let e = with(lines).unwrap_err().to_string();
            assert!(e.contains(key), "{lines}: {e}");
        }
        // An overlap past the validity is harmless when nothing rotates by itself.
        let c = with("validity_days = 10\nauto_rotate = false").unwrap();
        assert_eq!(c.certificates.overlap(), Duration::from_secs(14 * 86400));
    }

    #[test]
    fn secrets_come_from_files_and_never_print() {
        let dir = std::env::temp_dir().join(format!("xtls-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let toml = MINIMAL.replace(
            "secret = \"s3cret\"",
            &format!("secret_file = {:?}", file.display().to_string()),
        );
        let c = load(&toml).unwrap();
        assert_eq!(c.secret().expose(), "from-file");
        assert!(!format!("{c:?}").contains("from-file"));
        assert!(!format!("{c:?}").contains("token-123456"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn environment_style_overrides_win() {
        // Env::prefixed("XTLS_").split("__") maps XTLS_COMPONENT__SECRET to component.secret;
        // the same nesting is exercised here without touching the process environment.
        let figment = Figment::new()
            .merge(Toml::string(MINIMAL))
            .merge(Serialized::default("component.secret", "from-env"));
        let c = Config::from_figment(figment).unwrap();
        assert_eq!(c.secret().expose(), "from-env");
    }

    #[test]
    fn listener_tls_is_checked_when_loaded() {
        let dir = std::env::temp_dir().join(format!("xtls-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let identity = xtls::certs::BotIdentity::generate("admin@example.org").unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert, identity.cert_pem()).unwrap();
        let pem = |der: &[u8]| {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
        };
        std::fs::write(&key, pem(identity.key_der())).unwrap();
        let tls = |section: &str, c: &Path, k: &Path| {
            format!(
                "{MINIMAL}\n[{section}]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                c.display(),
                k.display()
            )
        };
        let ok = load(&tls("admin.tls", &cert, &key)).unwrap();
        assert_eq!(ok.admin.tls.as_ref().unwrap().cert_file, cert);

        let missing = dir.join("missing.pem");
        let err = load(&tls("admin.tls", &missing, &key))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("admin.tls.cert_file") && err.contains("missing.pem"),
            "{err}"
        );
        let other = xtls::certs::BotIdentity::generate("other@example.org").unwrap();
        std::fs::write(&key, pem(other.key_der())).unwrap();
        let err = load(&tls("admin.tls", &cert, &key))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not fit"), "{err}");
        assert!(!err.contains("PRIVATE KEY"), "{err}");

        let err = load(&tls("metrics.tls", &cert, &key))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs metrics.listen"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
