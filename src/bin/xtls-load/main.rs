//! `xtls-load`: logs many users into a real XMPP server, opens XTLS tunnels from each to many
//! bots of an xtls-component, and measures echo traffic through the tunnels against plain
//! chat messages echoed by the same bots through the same server, in the same run.
//!
//! Method and figures: docs/performance.md. The bots must use the `echo` handler, which
//! answers a message inside a tunnel through the tunnel and a plain message in plain.

mod c2s;
mod conn;
mod procstat;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokio::sync::{Semaphore, mpsc, oneshot};
use xtls::certs::BotIdentity;
use xtls::tunnel::{BotCredentials, TunnelConfig};

use conn::{Cmd, EchoResult, Mode, OpenResult};
use procstat::Usage;

/// Command line of `xtls-load`.
#[derive(Debug, Parser)]
#[command(
    name = "xtls-load",
    version,
    about = "Echo load through XTLS tunnels and in plain, through a real XMPP server"
)]
struct Args {
    /// The server's c2s address (plaintext: loopback only).
    #[arg(long, default_value = "127.0.0.1:5222")]
    server: String,
    /// The users' domain.
    #[arg(long, default_value = "localhost")]
    host: String,
    /// Number of users, named <user-prefix><n>@<host> from 0; each is one c2s connection.
    #[arg(long, default_value_t = 10)]
    users: usize,
    /// Localpart prefix of the users.
    #[arg(long, default_value = "load")]
    user_prefix: String,
    /// The users' password (all the same).
    #[arg(long, env = "XTLS_LOAD_PASSWORD", hide_env_values = true)]
    password: String,
    /// The component domain of the bots.
    #[arg(long, default_value = "bots.localhost")]
    bot_domain: String,
    /// Number of bots, named <bot-prefix><n>@<bot-domain> from 0; every user talks to every bot.
    #[arg(long, default_value_t = 10)]
    bots: usize,
    /// Localpart prefix of the bots.
    #[arg(long, default_value = "echo")]
    bot_prefix: String,
    /// Messages in flight per user and bot, one pair of phases (plain, XTLS) per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    in_flight: Vec<usize>,
    /// Seconds of each echo phase.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Length of each message's body text, in bytes (about 60 bytes of markup come on top).
    #[arg(long, default_value_t = 140)]
    size: usize,
    /// Tunnel handshakes in progress at once, over all users.
    #[arg(long, default_value_t = 32)]
    handshakes: usize,
    /// Unacknowledged `data` IQs per tunnel on the users' side (spec §1.13).
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Skip the plain phases.
    #[arg(long)]
    no_plain: bool,
    /// Seconds to hold the tunnels open and idle after opening them, then report memory.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Pid of the component, for its CPU time and memory.
    #[arg(long)]
    component_pid: Option<u32>,
    /// Pid of the server, for its CPU time.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write the report as JSON to this file too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Leave the c2s sockets as client libraries do (Nagle on, no TCP_NODELAY): what an
    /// ordinary client looks like to the server, instead of the tuned default.
    #[arg(long)]
    ordinary_sockets: bool,
    /// A label copied into the report (e.g. the server configuration).
    #[arg(long, default_value = "")]
    label: String,
}

/// Resource use of the component and the server over one phase.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Cost {
    component_cpu_s: f64,
    server_cpu_s: f64,
    component_rss_kib: u64,
    component_peak_rss_kib: u64,
}

/// One echo phase in the report.
#[derive(Debug, serde::Serialize)]
struct EchoPhase {
    mode: Mode,
    in_flight: usize,
    pairs: usize,
    echoes: usize,
    lost: u64,
    seconds: f64,
    msgs_per_s: f64,
    rtt_ms: Percentiles,
    cost: Cost,
    /// CPU microseconds per echo.
    component_us_per_echo: f64,
    server_us_per_echo: f64,
}

/// The handshake phase in the report.
#[derive(Debug, serde::Serialize)]
struct OpenPhase {
    tunnels: usize,
    failed: usize,
    failures: Vec<String>,
    seconds: f64,
    handshakes_per_s: f64,
    handshake_ms: Percentiles,
    cost: Cost,
    /// Component RSS before and after opening, and the growth per open tunnel.
    rss_before_kib: u64,
    rss_after_kib: u64,
    bytes_per_tunnel: f64,
    /// After holding the tunnels idle for `--hold` seconds.
    rss_after_hold_kib: Option<u64>,
}

/// Ratios of one in-flight value, XTLS against plain, from the same run.
#[derive(Debug, serde::Serialize)]
struct Ratio {
    in_flight: usize,
    throughput_xtls_over_plain: f64,
    p99_xtls_over_plain: f64,
    /// Component CPU per tunneled echo over server CPU per tunneled echo.
    component_over_server_cpu: f64,
    bottleneck: &'static str,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Percentiles {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

/// The whole report.
#[derive(Debug, serde::Serialize)]
struct Report {
    label: String,
    users: usize,
    bots: usize,
    size: usize,
    window: usize,
    duration_s: f64,
    login_s: f64,
    open: Option<OpenPhase>,
    echo: Vec<EchoPhase>,
    ratios: Vec<Ratio>,
    component_peak_rss_kib: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run(&args))?;
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

struct Meter {
    component: Option<u32>,
    server: Option<u32>,
}

impl Meter {
    fn snapshot(&self) -> (Option<Usage>, Option<Usage>) {
        (
            self.component.and_then(procstat::usage),
            self.server.and_then(procstat::usage),
        )
    }

    fn cost(&self, before: (Option<Usage>, Option<Usage>)) -> Cost {
        let after = self.snapshot();
        let cpu = |b: Option<Usage>, a: Option<Usage>| match (b, a) {
            (Some(b), Some(a)) => a.cpu_s - b.cpu_s,
            _ => f64::NAN,
        };
        Cost {
            component_cpu_s: cpu(before.0, after.0),
            server_cpu_s: cpu(before.1, after.1),
            component_rss_kib: after.0.map(|u| u.rss_kib).unwrap_or(0),
            component_peak_rss_kib: after.0.map(|u| u.peak_rss_kib).unwrap_or(0),
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.users > 0 && args.bots > 0,
        "--users and --bots must be at least 1"
    );
    anyhow::ensure!(args.window > 0, "--window must be at least 1");
    let meter = Meter {
        component: args.component_pid,
        server: args.server_pid,
    };
    let bots: Vec<String> = (0..args.bots)
        .map(|n| format!("{}{n}@{}", args.bot_prefix, args.bot_domain))
        .collect();
    let tunnel = TunnelConfig {
        window: args.window,
        // The tool keeps tunnels open for the whole run however long it idles.
        idle_timeout: None,
        ..TunnelConfig::default()
    };

    // Log every user in, a few at a time (each login is several round trips).
    let t0 = Instant::now();
    let mut handles = Vec::new();
    let logins = Arc::new(Semaphore::new(16));
    for n in 0..args.users {
        let user = format!("{}{n}", args.user_prefix);
        let (server, host, password) = (
            args.server.clone(),
            args.host.clone(),
            args.password.clone(),
        );
        let logins = logins.clone();
        let nodelay = !args.ordinary_sockets;
        handles.push(tokio::spawn(async move {
            let _permit = logins.acquire_owned().await?;
            let identity = BotIdentity::generate(&format!("{user}@{host}"))?;
            let creds = BotCredentials::new(identity)?;
            let session = c2s::login(&server, &host, &user, &password, "load", nodelay).await?;
            anyhow::Ok((session, creds))
        }));
    }
    let mut conns = Vec::new();
    let mut tasks = Vec::new();
    for (index, handle) in handles.into_iter().enumerate() {
        let (session, creds) = handle.await??;
        let (tx, rx) = mpsc::channel(4);
        let setup = conn::Setup {
            bots: bots.clone(),
            creds,
            tunnel: tunnel.clone(),
            body_len: args.size,
            index,
        };
        tasks.push(tokio::spawn(conn::run(session, setup, rx)));
        conns.push(tx);
    }
    let login_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "xtls-load: {} users logged in in {login_s:.2} s",
        args.users
    );

    let pairs = args.users * args.bots;
    let mut echo = Vec::new();
    let duration = Duration::from_secs_f64(args.duration);

    // Plain phases first for every in-flight value: they need no tunnel.
    if !args.no_plain {
        for &k in &args.in_flight {
            echo.push(echo_phase(&conns, &meter, Mode::Plain, k, duration, pairs).await?);
        }
    }

    // Open every tunnel.
    let before = meter.snapshot();
    let rss_before = before.0.map(|u| u.rss_kib).unwrap_or(0);
    let permits = Arc::new(Semaphore::new(args.handshakes.max(1)));
    let t = Instant::now();
    let mut opened = OpenResult::default();
    for r in ask_all(&conns, |reply| Cmd::Open {
        permits: permits.clone(),
        reply,
    })
    .await?
    {
        opened.handshakes.extend(r.handshakes);
        opened.failures.extend(r.failures);
    }
    let seconds = t.elapsed().as_secs_f64();
    let cost = meter.cost(before);
    let tunnels = opened.handshakes.len();
    let mut open = OpenPhase {
        tunnels,
        failed: opened.failures.len(),
        failures: opened.failures.iter().take(10).cloned().collect(),
        seconds,
        handshakes_per_s: tunnels as f64 / seconds,
        handshake_ms: percentiles(&mut opened.handshakes),
        cost,
        rss_before_kib: rss_before,
        rss_after_kib: cost.component_rss_kib,
        bytes_per_tunnel: (cost.component_rss_kib as f64 - rss_before as f64) * 1024.0
            / tunnels.max(1) as f64,
        rss_after_hold_kib: None,
    };
    eprintln!(
        "xtls-load: {tunnels} tunnels open in {seconds:.2} s ({} failed)",
        open.failed
    );
    if args.hold > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
        open.rss_after_hold_kib = meter.snapshot().0.map(|u| u.rss_kib);
        if let Some(after) = open.rss_after_hold_kib {
            open.bytes_per_tunnel =
                (after as f64 - rss_before as f64) * 1024.0 / tunnels.max(1) as f64;
        }
    }

    for &k in &args.in_flight {
        echo.push(echo_phase(&conns, &meter, Mode::Xtls, k, duration, tunnels).await?);
    }

    // Close the tunnels politely, then log out by dropping the connections.
    let unclosed: usize = match ask_all(&conns, |reply| Cmd::Close { reply }).await {
        Ok(counts) => counts.iter().sum(),
        Err(e) => {
            eprintln!("xtls-load: closing: {e:#}");
            0
        }
    };
    if unclosed > 0 {
        eprintln!("xtls-load: {unclosed} tunnels did not confirm their close");
    }
    drop(conns);
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            eprintln!("xtls-load: connection: {e:#}");
        }
    }

    let ratios = args
        .in_flight
        .iter()
        .filter_map(|&k| {
            let plain = echo
                .iter()
                .find(|e| e.mode == Mode::Plain && e.in_flight == k)?;
            let xtls = echo
                .iter()
                .find(|e| e.mode == Mode::Xtls && e.in_flight == k)?;
            let ratio = xtls.component_us_per_echo / xtls.server_us_per_echo;
            Some(Ratio {
                in_flight: k,
                throughput_xtls_over_plain: xtls.msgs_per_s / plain.msgs_per_s,
                p99_xtls_over_plain: xtls.rtt_ms.p99 / plain.rtt_ms.p99,
                component_over_server_cpu: ratio,
                bottleneck: if ratio < 1.0 { "server" } else { "component" },
            })
        })
        .collect();
    Ok(Report {
        label: args.label.clone(),
        users: args.users,
        bots: args.bots,
        size: args.size,
        window: args.window,
        duration_s: args.duration,
        login_s,
        open: Some(open),
        echo,
        ratios,
        component_peak_rss_kib: meter.snapshot().0.map(|u| u.peak_rss_kib),
    })
}

/// Sends every connection the command `make` builds and waits for all their answers.
async fn ask_all<T>(
    conns: &[mpsc::Sender<Cmd>],
    make: impl Fn(oneshot::Sender<T>) -> Cmd,
) -> anyhow::Result<Vec<T>> {
    let mut waits = Vec::new();
    for c in conns {
        let (reply, rx) = oneshot::channel();
        c.send(make(reply)).await.context("a connection ended")?;
        waits.push(rx);
    }
    let mut answers = Vec::new();
    for w in waits {
        answers.push(w.await.context("a connection ended before answering")?);
    }
    Ok(answers)
}

async fn echo_phase(
    conns: &[mpsc::Sender<Cmd>],
    meter: &Meter,
    mode: Mode,
    in_flight: usize,
    duration: Duration,
    pairs: usize,
) -> anyhow::Result<EchoPhase> {
    let before = meter.snapshot();
    let start = Instant::now();
    let until = start + duration;
    let mut all = EchoResult::default();
    for r in ask_all(conns, |reply| Cmd::Echo {
        mode,
        in_flight,
        until,
        reply,
    })
    .await?
    {
        all.rtts.extend(r.rtts);
        all.lost += r.lost;
        all.last = all.last.max(r.last);
    }
    let cost = meter.cost(before);
    let seconds = all
        .last
        .map(|l| l.duration_since(start).as_secs_f64())
        .unwrap_or(duration.as_secs_f64());
    let echoes = all.rtts.len();
    let per_echo = |cpu: f64| cpu * 1e6 / echoes.max(1) as f64;
    let phase = EchoPhase {
        mode,
        in_flight,
        pairs,
        echoes,
        lost: all.lost,
        seconds,
        msgs_per_s: echoes as f64 / seconds,
        rtt_ms: percentiles(&mut all.rtts),
        cost,
        component_us_per_echo: per_echo(cost.component_cpu_s),
        server_us_per_echo: per_echo(cost.server_cpu_s),
    };
    eprintln!(
        "xtls-load: {:?} x{in_flight}: {:.0} msg/s, p99 {:.2} ms",
        mode, phase.msgs_per_s, phase.rtt_ms.p99
    );
    Ok(phase)
}

fn percentiles(samples: &mut [Duration]) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e3
    };
    Percentiles {
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
        max: at(1.0),
    }
}

fn print_report(r: &Report) {
    println!(
        "\n{} users x {} bots, body {} B, window {}, {} s per phase{}",
        r.users,
        r.bots,
        r.size,
        r.window,
        r.duration_s,
        if r.label.is_empty() {
            String::new()
        } else {
            format!(" [{}]", r.label)
        }
    );
    if let Some(o) = &r.open {
        println!(
            "open: {} tunnels in {:.2} s = {:.0} handshakes/s (p50 {:.1} ms, p99 {:.1} ms), {} failed; \
             component CPU {:.2} s, server CPU {:.2} s; RSS {} -> {} KiB = {:.0} B per tunnel",
            o.tunnels,
            o.seconds,
            o.handshakes_per_s,
            o.handshake_ms.p50,
            o.handshake_ms.p99,
            o.failed,
            o.cost.component_cpu_s,
            o.cost.server_cpu_s,
            o.rss_before_kib,
            o.rss_after_hold_kib.unwrap_or(o.rss_after_kib),
            o.bytes_per_tunnel
        );
        for f in &o.failures {
            println!("  failed: {f}");
        }
    }
    println!(
        "{:<6} {:>9} {:>6} {:>8} {:>5} {:>9} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "mode",
        "in-flight",
        "pairs",
        "echoes",
        "lost",
        "msg/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "comp us/e",
        "serv us/e"
    );
    for e in &r.echo {
        println!(
            "{:<6} {:>9} {:>6} {:>8} {:>5} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>10.1} {:>10.1}",
            format!("{:?}", e.mode).to_lowercase(),
            e.in_flight,
            e.pairs,
            e.echoes,
            e.lost,
            e.msgs_per_s,
            e.rtt_ms.p50,
            e.rtt_ms.p95,
            e.rtt_ms.p99,
            e.component_us_per_echo,
            e.server_us_per_echo
        );
    }
    for q in &r.ratios {
        println!(
            "in-flight {}: XTLS/plain throughput {:.2}, p99 {:.2}; component/server CPU per tunneled echo {:.2} (bottleneck: {})",
            q.in_flight,
            q.throughput_xtls_over_plain,
            q.p99_xtls_over_plain,
            q.component_over_server_cpu,
            q.bottleneck
        );
    }
    if let Some(p) = r.component_peak_rss_kib {
        println!("component peak RSS: {p} KiB");
    }
}
