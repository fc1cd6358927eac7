//! The `xtls-component` binary: command line, logging, signals.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::sync::mpsc;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry, fmt, reload};
use xtls_component::config::{Config, LogFormat};

/// XEP-0114 component that gives XMPP bots end-to-end encrypted XTLS endpoints.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect to the XMPP server and serve the bots and the admin API.
    Serve {
        /// The TOML configuration file; every key can also be set as XTLS_SECTION__KEY.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a configuration and exit.
    CheckConfig {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print a bot's certificate fingerprints from the store, to compare out of band (works
    /// while the component runs, and without its secrets).
    ///
    /// Example: xtls-component fingerprint --config /etc/xtls-component.toml weather
    Fingerprint {
        /// The bot's bare JID, or its localpart.
        jid: String,
        /// The TOML configuration file (read for `store.url` and `component.domain` only).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// One JSON object instead of lines for a person.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running instance's /healthz; exit 0 when it answers 200 (for container health checks).
    Healthcheck {
        /// The admin address to ask; by default `admin.listen` of the configuration.
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
        /// Ask over HTTPS (with `--addr`; otherwise the configuration's `admin.tls` decides).
        #[arg(long)]
        https: bool,
        /// The TOML configuration file (read for `admin.listen` and `admin.tls` only).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
}

/// The handle that changes what is logged while the process runs (SIGHUP).
type LogFilter = reload::Handle<EnvFilter, Registry>;

/// What is logged: `RUST_LOG` when set, else `log.filter`, else `info`.
fn log_filter(configured: Option<&str>) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .ok()
        .or_else(|| configured.and_then(|f| EnvFilter::try_new(f).ok()))
        .unwrap_or_else(|| EnvFilter::new("info"))
}

/// Logs to standard error in the configured format.
fn init_logging(format: LogFormat, filter: Option<&str>) -> LogFilter {
    let (filter, handle) = reload::Layer::new(log_filter(filter));
    let output = match format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
        // Colour codes only for a person at a terminal, never in a log file or journal.
        LogFormat::Text => fmt::layer()
            .with_ansi(
                std::io::IsTerminal::is_terminal(&std::io::stderr())
                    && std::env::var_os("NO_COLOR").is_none(),
            )
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
    handle
}

/// On every SIGHUP: reads the configuration again; when it is valid, applies its log filter
/// and hands it to the running component, else says why and changes nothing.
#[cfg(unix)]
async fn reload_on_hangup(path: Option<PathBuf>, filter: LogFilter, tx: mpsc::Sender<Config>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("no SIGHUP handler: configuration reloads are off");
        return;
    };
    while hangups.recv().await.is_some() {
        match Config::load(path.as_deref()) {
            Ok(config) => {
                if let Err(e) = filter.reload(log_filter(config.log.filter.as_deref())) {
                    tracing::warn!(error = %e, "log filter not reloaded");
                }
                if tx.send(config).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::error!(
                error = %e,
                "SIGHUP: the configuration is not valid; the running one stays as it was"
            ),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config_path, serve) = match cli.command {
        Command::Serve { config } => (config, true),
        Command::CheckConfig { config } => (config, false),
        Command::Healthcheck {
            addr,
            https,
            config,
            timeout,
        } => {
            init_logging(LogFormat::Text, None);
            return healthcheck(addr, https, config, timeout);
        }
        Command::Fingerprint { jid, config, json } => return fingerprint(&jid, config, json),
    };
    let config = match Config::load(config_path.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("xtls-component: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = init_logging(config.log.format, config.log.filter.as_deref());
    if !serve {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("xtls-component: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (reload_tx, reloads) = mpsc::channel(4);
    #[cfg(unix)]
    runtime.spawn(reload_on_hangup(config_path.clone(), filter, reload_tx));
    #[cfg(not(unix))]
    let _ = (filter, reload_tx);
    match runtime.block_on(xtls_component::app::run(config, shutdown_signal(), reloads)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtls-component: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `healthcheck`: GET /healthz on the admin listener, over loopback when it listens on all
/// addresses.
fn healthcheck(
    addr: Option<std::net::SocketAddr>,
    https: bool,
    config: Option<PathBuf>,
    timeout: u64,
) -> ExitCode {
    let (addr, https) = match addr {
        Some(addr) => (addr, https),
        None => match xtls_component::config::admin_endpoint(config.as_deref()) {
            Ok((addr, tls)) => (addr, https || tls),
            Err(e) => {
                eprintln!("xtls-component: configuration error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let probe =
        xtls_component::api::probe_health(addr, https, std::time::Duration::from_secs(timeout));
    let answer = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(probe),
        Err(e) => Err(format!("cannot start the runtime: {e}")),
    };
    match answer {
        Ok(()) => {
            println!("healthy");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xtls-component: unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `fingerprint`: a bot's fingerprints and validity, read from the store.
fn fingerprint(jid: &str, config: Option<PathBuf>, json: bool) -> ExitCode {
    use xtls_component::config::{single_key, store_url};
    let target = (|| {
        let url = store_url(config.as_deref())?;
        let domain: Option<String> = single_key(config.as_deref(), "component.domain")?;
        Ok::<_, xtls_component::config::ConfigError>((url, domain))
    })();
    let (url, domain) = match target {
        Ok(found) => found,
        Err(e) => {
            eprintln!("xtls-component: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let jid = match (jid.contains('@'), domain) {
        (true, _) => jid.to_owned(),
        (false, Some(domain)) => format!("{jid}@{domain}"),
        (false, None) => {
            eprintln!(
                "xtls-component: '{jid}' is a localpart and no component.domain is configured: give the bot's bare JID"
            );
            return ExitCode::from(2);
        }
    };
    let Some(jid) = xtls::certs::normalize_bare(&jid) else {
        eprintln!("xtls-component: '{jid}' is not a bare JID");
        return ExitCode::from(2);
    };
    let read = async {
        let store = xtls_component::store::Store::open_read_only(&url).await?;
        let cert = store.load_certificate(&jid).await;
        store.close().await;
        Ok::<_, xtls_component::store::StoreError>(xtls::certs::PeerCertInfo::parse(&cert?)?)
    };
    let info = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(read).map_err(|e| e.to_string()))
    {
        Ok(info) => info,
        Err(e) => {
            eprintln!(
                "xtls-component: cannot read {jid} from the store {url} (is --config right?): {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    let prints = &info.fingerprints;
    if json {
        let out = serde_json::json!({
            "jid": jid,
            "spki_sha256": prints.spki_sha256.to_string(),
            "cert_sha256": prints.cert_sha256.to_string(),
            "cert_sha1": prints.cert_sha1.to_string(),
            "not_before": info.not_before,
            "not_after": info.not_after,
        });
        println!("{out}");
    } else {
        println!("{jid}");
        println!("  key (SPKI SHA-256):  {}", prints.spki_sha256);
        println!("  certificate SHA-256: {}", prints.cert_sha256);
        println!("  certificate SHA-1:   {}", prints.cert_sha1);
        println!(
            "  valid:               {} to {}",
            info.not_before, info.not_after
        );
    }
    ExitCode::SUCCESS
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
