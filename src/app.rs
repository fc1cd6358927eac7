//! Wiring: store, bots, component link, router and admin API, with an ordered shutdown.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use std::sync::Arc;

use crate::api::{self, AdminState, AllowedHosts, HttpLimits, ListenerTls};
use crate::config::{Config, InstanceMode, Live, TlsFiles};
use crate::link::{self, LinkConfig, LinkEvent, LinkStatus};
use crate::router;
use crate::session::{BotTable, NewBot, Ownership, Shared};
use crate::store::{SoleInstance, Store, StoreError, StoreKey};

/// Runs the component until `shutdown` resolves or the server refuses the configuration.
/// Each configuration from `reloads` (SIGHUP) applies what can change in a running process
/// (see `Running::reload`); the rest is named in the log as needing a restart.
pub async fn run(
    mut config: Config,
    shutdown: impl Future<Output = ()>,
    mut reloads: mpsc::Receiver<Config>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    // Before anything else touches the store: a second instance must not reach the start-up
    // clean-up below, which would close the first one's live tunnels. A standby waits here.
    let shown = crate::store::display_url(&config.store.url);
    let mut claim = match config.instances.mode {
        InstanceMode::Single => crate::store::claim_sole_instance(&config.store.url)
            .await
            .with_context(|| format!("cannot use the store at {shown}"))?,
        InstanceMode::Failover => match standby(&config, shutdown.as_mut()).await? {
            Some(claim) => Some(claim),
            None => return Ok(()),
        },
        // Every instance serves; each runs the bots the server routes to it.
        InstanceMode::Shared => None,
    };
    let sharing = config.instances.mode == InstanceMode::Shared;
    let store = Store::open(&config.store.url)
        .await
        .with_context(|| format!("cannot open the store at {shown}"))?;
    let key = store_key(&config.store, &store).await?;
    let sealed = store
        .use_key(key)
        .await
        .context("cannot use the store key")?;
    if sealed > 0 {
        tracing::info!(
            count = sealed,
            "secrets written before the store key was in use are sealed now"
        );
    }
    let instance = store
        .register_instance(config.instances.advertise_url.as_deref())
        .await
        .context("cannot register this instance in the store")?;
    tracing::info!(instance, "instance registered");
    // Alone (the claim above), every other instance is gone; sharing the store, those whose
    // heartbeat stopped.
    let stale = store
        .close_lost_tunnels(sharing.then_some(LOST_AFTER.as_millis() as i64))
        .await?;
    if stale > 0 {
        tracing::info!(
            count = stale,
            "tunnels left open by a previous run marked closed"
        );
    }
    // Heartbeats are for instances that share a store; a SQLite file has one (the claim), and
    // a writer held by heartbeats would only delay the bots' own writes when the file is busy.
    let beat_store = store.clone();
    let advertised = config.instances.advertise_url.clone();
    let heartbeat = (store.backend() != crate::store::Backend::Sqlite).then(|| {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT);
            loop {
                every.tick().await;
                match beat_store.heartbeat().await {
                    Ok(()) => {}
                    // Late enough for the others to take it for dead: it is alive after all.
                    Err(StoreError::Conflict(why)) => {
                        tracing::warn!(
                            why,
                            "this instance was taken for dead; registering it again"
                        );
                        if let Err(e) = beat_store.register_again(advertised.as_deref()).await {
                            tracing::warn!(error = %e, "cannot register this instance again");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot record this instance's heartbeat"),
                }
            }
        })
    });
    // Sharing the store, the live rows of an instance that died are closed by the others once
    // its heartbeat is old enough (apart from the heartbeats, which must not wait for it).
    let sweep_store = store.clone();
    let sweeper = sharing.then(|| {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT);
            loop {
                every.tick().await;
                match sweep_store
                    .close_lost_tunnels(Some(LOST_AFTER.as_millis() as i64))
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        count = n,
                        "tunnels of an instance that stopped answering marked closed"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot close the tunnels of lost instances")
                    }
                }
            }
        })
    });

    let (out_tx, out_rx) = mpsc::channel(config.limits.outbound_queue);
    let owners = match sharing {
        true => Ownership::shared(),
        false => Ownership::sole(),
    };
    let shared = Shared::new(
        store.clone(),
        owners,
        out_tx.clone(),
        config.tunnel.to_tunnel_config(),
        config.limits.clone(),
        config.component.domain.clone(),
        &config.events,
        config.webhooks.clone(),
    );
    shared.certificates.set(config.certificates.clone());
    let bots = BotTable::load(shared).await.context("cannot load bots")?;
    for bot in &config.bots {
        if bots.by_localpart(&bot.localpart).is_none() {
            bots.create(NewBot {
                localpart: bot.localpart.clone(),
                handler: bot.handler,
                peer_auth: bot.peer_auth,
                trust: bot.trust,
                encrypted_only: bot.encrypted_only,
            })
            .await
            .with_context(|| format!("cannot create bot {}", bot.localpart))?;
        }
    }

    release_freed_memory();

    let rotations = tokio::spawn(bots.clone().run_rotations());
    let claims = sharing.then(|| tokio::spawn(bots.clone().run_claims()));

    let retention = std::time::Duration::from_secs(config.events.retention_secs);
    let pruner_store = store.clone();
    let pruner = tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(600));
        loop {
            every.tick().await;
            let before = xtls::certs::rfc3339(time::OffsetDateTime::now_utc() - retention);
            match pruner_store.prune_events(&before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(count = n, "acknowledged events past retention deleted"),
                Err(e) => tracing::warn!(error = %e, "cannot prune the event logs"),
            }
        }
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let (status_tx, status_rx) = watch::channel(LinkStatus::Connecting(None));
    let (events_tx, mut events_rx) = mpsc::channel(config.limits.outbound_queue);
    let link_config = LinkConfig::new(
        &config.component,
        config.secret().clone(),
        config.limits.max_stanza_bytes,
    );
    let mut link = tokio::spawn(link::run(
        link_config,
        events_tx,
        out_rx,
        status_tx,
        stop_rx.clone(),
    ));

    let router_bots = bots.clone();
    let router = tokio::spawn(async move {
        while let Some(event) = events_rx.recv().await {
            match event {
                LinkEvent::Up => {
                    router_bots.shared().metrics.connected.set(1);
                    router_bots.broadcast_link(true).await;
                    if sharing {
                        // Each probe comes back to the bot's owner, which claims it.
                        tokio::spawn({
                            let bots = router_bots.clone();
                            async move { bots.probe_all().await }
                        });
                    }
                }
                LinkEvent::Down(code, reason) => {
                    let metrics = &router_bots.shared().metrics;
                    metrics.connected.set(0);
                    metrics
                        .reconnects
                        .get_or_create(&crate::metrics::Reason {
                            reason: code.into(),
                        })
                        .inc();
                    tracing::warn!(reason, "all tunnels lost with the server link");
                    router_bots.broadcast_link(false).await;
                }
                LinkEvent::Stanza(stanza) => {
                    // Never wait here: the link waits for this loop, and this loop must not
                    // wait for the link (a flood of requests would deadlock both).
                    if let Some(reply) = router::route(stanza, &router_bots)
                        && out_tx.try_send(reply).is_err()
                    {
                        tracing::warn!("outbound queue full: router reply dropped");
                    }
                }
            }
        }
    });

    let admin_tls = listener_tls(config.admin.tls.as_ref(), "admin.tls")?;
    let metrics_tls = listener_tls(config.metrics.tls.as_ref(), "metrics.tls")?;
    let listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin.listen)", config.admin.listen))?;
    tracing::info!(
        listen = %config.admin.listen,
        https = admin_tls.is_some(),
        "admin API listening"
    );
    let limits = HttpLimits::from(&config.admin);
    let state = AdminState {
        bots: bots.clone(),
        // The API keeps only the digest; the configuration's copy is dropped here (the
        // environment a token came from is the process's own and stays as it was).
        token: api::AdminToken::new(&config.admin.token.take().expect("validated config")),
        link: status_rx,
        limits: std::sync::Arc::new(limits.clone()),
        allowed_hosts: std::sync::Arc::new(
            AllowedHosts::new(&config.admin.allowed_hosts, config.admin.listen)
                .with_advertised(config.instances.advertise_url.as_deref()),
        ),
        cors_origins: config.admin.cors_origins.clone(),
    };
    let mut running = Running {
        config: config.clone(),
        token: state.token.clone(),
        bots: bots.clone(),
        admin_tls: admin_tls.clone(),
        metrics_tls: metrics_tls.clone(),
    };
    tokio::spawn(async move {
        while let Some(new) = reloads.recv().await {
            let (applied, restart) = running.reload(new);
            tracing::info!(applied = %applied.join(", "), "configuration reloaded");
            if !restart.is_empty() {
                tracing::warn!(
                    settings = %restart.join(", "),
                    "changed settings not applied: they take a restart"
                );
            }
        }
    });
    let metrics_server = match config.metrics.listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?;
            tracing::info!(listen = %addr, https = metrics_tls.is_some(), "metrics listening");
            let (stop, app, limits) = (
                stop_rx.clone(),
                api::metrics_app(bots.clone()),
                limits.clone(),
            );
            Some(tokio::spawn(async move {
                api::serve(listener, app, &limits, metrics_tls, stop).await
            }))
        }
        None => None,
    };
    let admin_stop = stop_rx.clone();
    let admin = tokio::spawn(async move {
        api::serve(listener, api::app(state), &limits, admin_tls, admin_stop).await
    });

    let outcome = tokio::select! {
        _ = &mut shutdown => Ok(()),
        lost = claim_lost(&mut claim) => Err(anyhow::Error::new(lost).context(
            "lost the store's instance lock: stopping, so that no two instances serve the store",
        )),
        result = &mut link => match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e)),
            Err(e) => Err(anyhow::Error::new(e).context("component link task failed")),
        },
    };

    // Ordered shutdown: bots close their tunnels (their `<close/>`s are queued), then the
    // link writes them and the stream footer, then the admin API and the store stop.
    tracing::info!("shutting down");
    if tokio::time::timeout(std::time::Duration::from_secs(10), bots.stop_all())
        .await
        .is_err()
    {
        tracing::warn!("bots did not stop within 10 s");
    }
    let _ = stop_tx.send(true);
    if !link.is_finished() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut link).await;
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), admin).await;
    router.abort();
    if let Some(server) = metrics_server {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    }
    pruner.abort();
    rotations.abort();
    if let Some(claims) = claims {
        claims.abort();
    }
    if let Some(heartbeat) = heartbeat {
        heartbeat.abort();
    }
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    if let Err(e) = store.deregister_instance().await {
        tracing::warn!(error = %e, "cannot remove this instance from the store");
    }
    store.close().await;
    outcome
}

/// Gives memory freed by the start-up back to the system. Loading reads every bot's row, key
/// and certificate (a page at a time); glibc keeps what was freed mapped: with 100,000 bots
/// the process held 6.2 KiB per bot at rest without this, 3.4 KiB with it
/// (docs/performance.md).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's own heap to the kernel; it takes
    // no pointer and has no precondition.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How often an instance on a PostgreSQL store records there that it is alive.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// How old the heartbeat of an instance sharing the store may get before the others take it
/// for dead and close its tunnel rows (three missed beats).
const LOST_AFTER: Duration = Duration::from_secs(15);

/// How often a standby reads which instance serves the store, for its answers.
const SERVING_POLL: Duration = Duration::from_secs(5);

/// How often the instance that serves a PostgreSQL store checks the connection holding its
/// lock, and a standby retries a store it cannot reach.
const CLAIM_CHECK: Duration = Duration::from_secs(2);

/// Waits as a standby while another instance serves the store, answering `/healthz` (alive)
/// and `/readyz` (not ready: standby) on the admin listener meanwhile. Returns the claim once
/// this instance holds the store, `None` when shut down first.
async fn standby(
    config: &Config,
    shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<Option<SoleInstance>> {
    let url = &config.store.url;
    let shown = crate::store::display_url(url);
    match crate::store::claim_sole_instance(url).await {
        Ok(Some(claim)) => return Ok(Some(claim)),
        Err(StoreError::InUse(_)) => {}
        Ok(None) => anyhow::bail!("instances.mode = failover needs a PostgreSQL store"),
        Err(e) => return Err(e).with_context(|| format!("cannot use the store at {shown}")),
    }
    tracing::info!(store = %shown, "standby: another instance serves the store; this one takes over when it stops");
    let tls = listener_tls(config.admin.tls.as_ref(), "admin.tls")?;
    let listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin.listen)", config.admin.listen))?;
    let limits = HttpLimits::from(&config.admin);
    let hosts = std::sync::Arc::new(AllowedHosts::new(
        &config.admin.allowed_hosts,
        config.admin.listen,
    ));
    // Which instance serves, for the answers of this one: read before the first answer, then
    // every few seconds; a store that does not answer delays neither the answers nor a stop
    // for longer than one poll.
    let first = tokio::time::timeout(SERVING_POLL, read_serving(url)).await;
    let (serving_tx, serving) = watch::channel(first.unwrap_or(None));
    let poll_url = url.clone();
    let poll = tokio::spawn(async move {
        loop {
            tokio::time::sleep(SERVING_POLL).await;
            if let Ok(active) = tokio::time::timeout(SERVING_POLL, read_serving(&poll_url)).await {
                serving_tx.send_replace(active);
            }
        }
    });
    let app = api::standby_app(hosts, serving);
    let (stop_tx, stop_rx) = watch::channel(false);
    let server =
        tokio::spawn(async move { api::serve(listener, app, &limits, tls, stop_rx).await });
    let claimed = tokio::select! {
        _ = shutdown => Ok(None),
        claim = SoleInstance::wait_for(url, CLAIM_CHECK) => claim.map(Some),
    };
    poll.abort();
    let _ = stop_tx.send(true);
    let _ = server.await;
    let claimed = claimed.with_context(|| format!("cannot use the store at {shown}"))?;
    if claimed.is_some() {
        tracing::info!(store = %shown, "standby: the store is free; this instance serves it now");
    }
    Ok(claimed)
}

/// The instance serving the store, as a standby reads it; `None` when unknown (logged).
async fn read_serving(url: &str) -> Option<crate::store::InstanceRecord> {
    crate::store::serving_instance(url)
        .await
        .inspect_err(|e| tracing::debug!(error = %e, "standby: cannot read which instance serves"))
        .unwrap_or(None)
}

/// Resolves when this instance loses its claim on the store (never for a SQLite file).
async fn claim_lost(claim: &mut Option<SoleInstance>) -> StoreError {
    match claim {
        Some(claim) => claim.lost(CLAIM_CHECK).await,
        None => std::future::pending().await,
    }
}

/// The key that seals secrets in the store: `store.key`, or the key file, created (mode 0600)
/// on first start.
async fn store_key(config: &crate::config::StoreConfig, store: &Store) -> anyhow::Result<StoreKey> {
    if let Some(key) = &config.key {
        return StoreKey::from_text(key.expose()).context("store.key");
    }
    let Some(path) = config.key_path() else {
        tracing::warn!("in-memory store: its secrets are sealed with a key of this run only");
        return Ok(StoreKey::generate().0);
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            StoreKey::from_text(&text).with_context(|| format!("store key {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A new key only for a store with nothing sealed yet: a key file that went
            // missing must be restored, not replaced by one that opens nothing.
            if store.has_sealed_secrets().await? {
                anyhow::bail!(
                    "the store's secrets are sealed, and their key is not at {}: restore the key file \
                     (or point store.key_file at it); without it the bots' private keys cannot be read",
                    path.display()
                );
            }
            let (key, text) = StoreKey::generate();
            write_private(&path, &text)
                .with_context(|| format!("cannot create the store key {}", path.display()))?;
            tracing::warn!(
                path = %path.display(),
                "created a new store key: back it up with the store, which cannot be read without it"
            );
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read the store key {}", path.display())),
    }
}

/// Writes a new file readable by its owner only, all or nothing: the text goes to a
/// temporary file beside it, synced, then linked to `path` (which fails when `path` exists)
/// and the directory synced, so a crash leaves either no key or the whole key.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.{}.new", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = (|| {
        let mut file = options.open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::hard_link(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    let _ = std::fs::remove_file(&temp);
    written
}

/// A listener's TLS from its files, when it has them.
fn listener_tls(files: Option<&TlsFiles>, key: &str) -> anyhow::Result<Option<ListenerTls>> {
    files
        .map(|files| Ok(Arc::new(Live::new(files.server_config(key)?))))
        .transpose()
}

/// What a reload may change, and the configuration in effect.
struct Running {
    config: Config,
    token: api::AdminToken,
    bots: BotTable,
    admin_tls: Option<ListenerTls>,
    metrics_tls: Option<ListenerTls>,
}

impl Running {
    /// Puts what can change in a running process in effect (the admin token, the log
    /// section, limits, webhook and bot certificate settings, the listeners' certificates, read again even when
    /// their paths did not change) and updates the configuration to match; returns what was
    /// applied and what takes a restart. The caller has applied the log filter already.
    fn reload(&mut self, mut new: Config) -> (Vec<&'static str>, Vec<&'static str>) {
        let mut applied = Vec::new();
        let secret = new.admin.token.take().expect("validated config");
        if !self.token.matches(secret.expose()) {
            self.token.replace(&secret);
            applied.push("admin.token");
        }
        let mut restart = Vec::new();
        let shared = self.bots.shared();
        let running = &mut self.config;
        for section in running.changes(&new) {
            match section {
                "log" => running.log = new.log.clone(),
                "limits" => {
                    restart.extend(running.limits.fixed_changes(&new.limits));
                    let live = running.limits.reloadable(&new.limits);
                    if live == running.limits {
                        continue;
                    }
                    shared.reload_limits(&live);
                    running.limits = live;
                }
                "webhooks" => {
                    shared.reload_webhooks(&new.webhooks);
                    running.webhooks = new.webhooks.clone();
                }
                // Read at each use: the next rotation and the next check follow it.
                "certificates" => {
                    shared.certificates.set(new.certificates.clone());
                    running.certificates = new.certificates.clone();
                }
                // Handled below with the certificates, changed or not.
                "admin.tls" | "metrics.tls" => continue,
                other => {
                    restart.push(other);
                    continue;
                }
            }
            applied.push(section);
        }
        for (key, live, now, next) in [
            (
                "admin.tls",
                &self.admin_tls,
                &mut running.admin.tls,
                new.admin.tls,
            ),
            (
                "metrics.tls",
                &self.metrics_tls,
                &mut running.metrics.tls,
                new.metrics.tls,
            ),
        ] {
            match (live, next) {
                (Some(live), Some(files)) => match files.server_config(key) {
                    Ok(config) => {
                        live.set(config);
                        *now = Some(files);
                        applied.push(key);
                    }
                    // The listener keeps its certificate; check-config shows the same error.
                    Err(e) => tracing::error!(error = %e, "certificate not reloaded"),
                },
                (None, None) => {}
                // HTTP to HTTPS or back is another listener.
                _ => restart.push(key),
            }
        }
        (applied, restart)
    }
}
