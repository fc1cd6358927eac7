//! One user's connection: it owns its tunnels (one per bot) and runs the phases the
//! controller asks for, echoing messages in plain or through the tunnels.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use minidom::Element;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use xtls::stanza::{DefinedCondition, ErrorType, Iq, ns, set_attr};
use xtls::tunnel::{
    BotCredentials, Event, PeerPolicy, State, Tunnel, TunnelConfig, TunnelKey, TunnelParams, bare,
};
use xtls::xml::{XmlEvent, to_bytes};

use crate::c2s::Session;

/// How the echoes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Plain chat messages through the server.
    Plain,
    /// Chat messages inside the XTLS tunnels.
    Xtls,
}

/// What the controller asks of a connection.
pub enum Cmd {
    /// Open a tunnel to every bot, at most as many handshakes at once as `permits` allows.
    Open {
        permits: Arc<Semaphore>,
        reply: oneshot::Sender<OpenResult>,
    },
    /// Echo messages until `until`, `in_flight` outstanding per bot.
    Echo {
        mode: Mode,
        in_flight: usize,
        until: Instant,
        reply: oneshot::Sender<EchoResult>,
    },
    /// Close every tunnel and wait for the answers.
    Close { reply: oneshot::Sender<usize> },
}

/// The outcome of [`Cmd::Open`].
#[derive(Debug, Default)]
pub struct OpenResult {
    /// Handshake times (from `start` sent to open) of the tunnels that opened.
    pub handshakes: Vec<Duration>,
    /// Tunnels that did not open, with the reason.
    pub failures: Vec<String>,
}

/// The outcome of [`Cmd::Echo`].
#[derive(Debug, Default)]
pub struct EchoResult {
    /// Round trips of the echoes that came back.
    pub rtts: Vec<Duration>,
    /// Messages sent that did not come back (error, closed tunnel, or still out at the end).
    pub lost: u64,
    /// When the last echo came back.
    pub last: Option<Instant>,
}

/// The fixed setup of one connection.
pub struct Setup {
    /// Bot JIDs, one tunnel each.
    pub bots: Vec<String>,
    /// The user's TLS identity.
    pub creds: BotCredentials,
    /// Tunnel timers and limits (window, chunk size).
    pub tunnel: TunnelConfig,
    /// Body text length of each message.
    pub body_len: usize,
    /// Index of this connection, for unique ids.
    pub index: usize,
}

struct Pair {
    bot: String,
    tunnel: Option<Tunnel>,
    started: Option<Instant>,
    permit: Option<OwnedSemaphorePermit>,
    out: usize,
}

enum Phase {
    Idle,
    Opening {
        permits: Arc<Semaphore>,
        next: usize,
        pending: usize,
        result: OpenResult,
        reply: oneshot::Sender<OpenResult>,
    },
    Echo {
        mode: Mode,
        until: Instant,
        grace: Instant,
        result: EchoResult,
        reply: oneshot::Sender<EchoResult>,
    },
    Closing {
        deadline: Instant,
        reply: oneshot::Sender<usize>,
    },
}

struct Conn {
    setup: Setup,
    jid: String,
    pairs: Vec<Pair>,
    by_bot: HashMap<String, usize>,
    /// Messages in flight: id → (pair, sent at).
    sent: HashMap<u64, (usize, Instant)>,
    next_id: u64,
    body: String,
    out: Vec<u8>,
    phase: Phase,
}

/// Runs one connection until the controller drops its command channel.
pub async fn run(
    session: Session,
    setup: Setup,
    mut cmds: mpsc::Receiver<Cmd>,
) -> anyhow::Result<()> {
    let Session {
        stream,
        mut reader,
        jid,
    } = session;
    let (mut rd, mut wr) = stream.into_split();
    let pairs = setup
        .bots
        .iter()
        .map(|b| Pair {
            bot: b.clone(),
            tunnel: None,
            started: None,
            permit: None,
            out: 0,
        })
        .collect();
    let by_bot = setup
        .bots
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, b)| (b, i))
        .collect();
    let body = "x".repeat(setup.body_len);
    let mut conn = Conn {
        setup,
        jid,
        pairs,
        by_bot,
        sent: HashMap::new(),
        next_id: 0,
        body,
        out: Vec::with_capacity(64 * 1024),
        phase: Phase::Idle,
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_timers = Instant::now();
    loop {
        tokio::select! {
            read = rd.read(&mut buf) => {
                let n = read?;
                if n == 0 {
                    anyhow::bail!("{}: the server closed the connection", conn.jid);
                }
                reader.feed(&buf[..n])?;
                let now = Instant::now();
                while let Some(event) = reader.next_event() {
                    match event {
                        XmlEvent::Element(el) => conn.on_stanza(now, el),
                        XmlEvent::End => anyhow::bail!("{}: the server closed the stream", conn.jid),
                        XmlEvent::Header(_) | XmlEvent::Skipped { .. } => {}
                    }
                }
            }
            cmd = cmds.recv(), if matches!(conn.phase, Phase::Idle) => {
                let Some(cmd) = cmd else { return Ok(()) };
                conn.start(Instant::now(), cmd);
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if now.duration_since(last_timers) >= Duration::from_millis(100) {
                    last_timers = now;
                    conn.timers(now);
                }
                conn.progress(now);
            }
        }
        if !conn.out.is_empty() {
            wr.write_all(&conn.out).await?;
            conn.out.clear();
        }
    }
}

impl Conn {
    fn start(&mut self, now: Instant, cmd: Cmd) {
        match cmd {
            Cmd::Open { permits, reply } => {
                self.phase = Phase::Opening {
                    permits,
                    next: 0,
                    pending: 0,
                    result: OpenResult::default(),
                    reply,
                };
            }
            Cmd::Echo {
                mode,
                in_flight,
                until,
                reply,
            } => {
                self.phase = Phase::Echo {
                    mode,
                    until,
                    grace: until + Duration::from_secs(30),
                    result: EchoResult::default(),
                    reply,
                };
                for i in 0..self.pairs.len() {
                    if mode == Mode::Xtls && !self.is_open(i) {
                        continue;
                    }
                    for _ in 0..in_flight {
                        self.send_message(now, mode, i);
                    }
                }
            }
            Cmd::Close { reply } => {
                for pair in &mut self.pairs {
                    if let Some(t) = pair.tunnel.as_mut().filter(|t| !t.is_gone()) {
                        t.close(now);
                    }
                }
                self.flush_all(now);
                self.phase = Phase::Closing {
                    deadline: now + Duration::from_secs(30),
                    reply,
                };
            }
        }
        self.progress(now);
    }

    fn is_open(&self, i: usize) -> bool {
        self.pairs[i]
            .tunnel
            .as_ref()
            .is_some_and(|t| t.state() == State::Open)
    }

    /// Starts handshakes while permits last, and finishes a phase that is done.
    fn progress(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Idle => {}
            Phase::Opening { .. } => {
                loop {
                    let Phase::Opening {
                        permits,
                        next,
                        pending,
                        ..
                    } = &mut self.phase
                    else {
                        unreachable!()
                    };
                    if *next >= self.pairs.len() {
                        break;
                    }
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        break;
                    };
                    let i = *next;
                    *next += 1;
                    *pending += 1;
                    let pair = &mut self.pairs[i];
                    let params = TunnelParams {
                        config: self.setup.tunnel.clone(),
                        key: TunnelKey {
                            local: self.jid.clone(),
                            peer: pair.bot.clone(),
                        },
                        creds: self.setup.creds.clone(),
                        policy: PeerPolicy::default(),
                        id_prefix: format!("l{}-{}-{:08x}-", self.setup.index, i, rand_u32()),
                    };
                    pair.tunnel = Some(Tunnel::initiate(now, params));
                    pair.started = Some(now);
                    pair.permit = Some(permit);
                    self.flush(now, i);
                }
                let Phase::Opening { next, pending, .. } = &self.phase else {
                    unreachable!()
                };
                if *next == self.pairs.len() && *pending == 0 {
                    let Phase::Opening { result, reply, .. } =
                        std::mem::replace(&mut self.phase, Phase::Idle)
                    else {
                        unreachable!()
                    };
                    let _ = reply.send(result);
                }
            }
            Phase::Echo { grace, .. } => {
                let outstanding: usize = self.pairs.iter().map(|p| p.out).sum();
                if outstanding == 0 || now >= *grace {
                    let Phase::Echo {
                        mut result, reply, ..
                    } = std::mem::replace(&mut self.phase, Phase::Idle)
                    else {
                        unreachable!()
                    };
                    result.lost += outstanding as u64;
                    for p in &mut self.pairs {
                        p.out = 0;
                    }
                    self.sent.clear();
                    let _ = reply.send(result);
                }
            }
            Phase::Closing { deadline, .. } => {
                let live = self
                    .pairs
                    .iter()
                    .filter(|p| p.tunnel.as_ref().is_some_and(|t| !t.is_gone()))
                    .count();
                if live == 0 || now >= *deadline {
                    let Phase::Closing { reply, .. } =
                        std::mem::replace(&mut self.phase, Phase::Idle)
                    else {
                        unreachable!()
                    };
                    let _ = reply.send(live);
                }
            }
        }
    }

    fn send_message(&mut self, now: Instant, mode: Mode, i: usize) {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = Element::builder("message", ns::CLIENT)
            .append(
                Element::builder("body", ns::CLIENT)
                    .append(self.body.as_str())
                    .build(),
            )
            .build();
        set_attr(&mut msg, "type", "chat");
        set_attr(&mut msg, "id", &id.to_string());
        match mode {
            Mode::Plain => {
                set_attr(&mut msg, "to", &self.pairs[i].bot);
                self.out.extend_from_slice(&to_bytes(&msg));
            }
            Mode::Xtls => {
                let Some(t) = self.pairs[i].tunnel.as_mut() else {
                    return;
                };
                if t.send(now, msg).is_err() {
                    if let Phase::Echo { result, .. } = &mut self.phase {
                        result.lost += 1;
                    }
                    return;
                }
                self.flush(now, i);
            }
        }
        self.pairs[i].out += 1;
        self.sent.insert(id, (i, now));
    }

    fn on_stanza(&mut self, now: Instant, el: Element) {
        let from = el.attr("from").unwrap_or_default();
        let Some(&i) = self.by_bot.get(bare(from)) else {
            return;
        };
        match el.name() {
            "message" => {
                if el.attr("type") == Some("error") {
                    self.echo_failed(el.attr("id"));
                } else {
                    self.echo_received(now, Mode::Plain, el.attr("id"));
                }
            }
            "iq" => {
                let Ok(iq) = Iq::parse(&el) else { return };
                match self.pairs[i].tunnel.as_mut() {
                    Some(t) if !t.is_gone() => t.handle_iq(now, &iq),
                    _ => {
                        if iq.type_.is_request() {
                            let reply =
                                iq.error(ErrorType::Cancel, DefinedCondition::ItemNotFound, "");
                            self.out.extend_from_slice(&to_bytes(&reply));
                        }
                        return;
                    }
                }
                self.flush(now, i);
            }
            _ => {}
        }
    }

    /// Takes the message `id` off the books: its pair and when it was sent.
    fn settle(&mut self, id: Option<&str>) -> Option<(usize, Instant)> {
        let (i, at) = self.sent.remove(&id?.parse().ok()?)?;
        self.pairs[i].out -= 1;
        Some((i, at))
    }

    fn echo_received(&mut self, now: Instant, mode: Mode, id: Option<&str>) {
        let Some((i, at)) = self.settle(id) else {
            return;
        };
        if let Phase::Echo {
            until,
            result,
            mode: phase_mode,
            ..
        } = &mut self.phase
        {
            result.rtts.push(now - at);
            result.last = Some(now);
            if now < *until && *phase_mode == mode {
                self.send_message(now, mode, i);
            }
        }
    }

    fn echo_failed(&mut self, id: Option<&str>) {
        if self.settle(id).is_none() {
            return;
        }
        if let Phase::Echo { result, .. } = &mut self.phase {
            result.lost += 1;
        }
    }

    /// Writes what pair `i`'s tunnel wants sent and handles its events.
    fn flush(&mut self, now: Instant, i: usize) {
        let Some(t) = self.pairs[i].tunnel.as_mut() else {
            return;
        };
        while let Some(el) = t.poll_transmit() {
            self.out.extend_from_slice(&to_bytes(&el));
        }
        let mut events = Vec::new();
        while let Some(ev) = t.poll_event() {
            events.push(ev);
        }
        for ev in events {
            match ev {
                Event::Established(_) => {
                    let pair = &mut self.pairs[i];
                    pair.permit = None;
                    if let Phase::Opening {
                        pending, result, ..
                    } = &mut self.phase
                    {
                        *pending -= 1;
                        result.handshakes.push(now - pair.started.unwrap_or(now));
                    }
                }
                Event::Stanza(s) => {
                    if s.name() == "message" {
                        self.echo_received(now, Mode::Xtls, s.attr("id"));
                    }
                }
                Event::Closed(reason) => {
                    let pair = &mut self.pairs[i];
                    let was_opening = pair.permit.take().is_some();
                    if let Phase::Opening {
                        pending, result, ..
                    } = &mut self.phase
                        && was_opening
                    {
                        *pending -= 1;
                        result
                            .failures
                            .push(format!("{}: {}", pair.bot, reason.code()));
                    }
                    // Messages still inside the tunnel are lost.
                    let lost: Vec<u64> = self
                        .sent
                        .iter()
                        .filter(|(_, (p, _))| *p == i)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in lost {
                        self.echo_failed(Some(&id.to_string()));
                    }
                }
                Event::Writable | Event::Acknowledged(_) | Event::Unanswered(_) => {}
            }
        }
    }

    fn flush_all(&mut self, now: Instant) {
        for i in 0..self.pairs.len() {
            self.flush(now, i);
        }
    }

    fn timers(&mut self, now: Instant) {
        for i in 0..self.pairs.len() {
            let Some(t) = self.pairs[i].tunnel.as_mut() else {
                continue;
            };
            if t.poll_timeout().is_some_and(|at| at <= now) {
                t.handle_timeout(now);
                self.flush(now, i);
            }
        }
    }
}

fn rand_u32() -> u32 {
    rand::random()
}
