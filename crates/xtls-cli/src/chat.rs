//! `xtls chat PEER`: a line chat through a tunnel, with the peer's key shown first and
//! checked on request (`/sas`, `/pair CODE`).

use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use minidom::Element;
use tokio::sync::mpsc;
use xtls::sas::SasCode;
use xtls::stanza::{DefinedCondition, ErrorType, Iq, checked_chat_message, ns};
use xtls::tunnel::{CloseReason, Event, bare};

use crate::client::Happening;
use crate::talk::{self, Fail, LoginArgs, Online, Opened, Outcome};
use crate::verify::{Step, Verification};

/// What `xtls chat` was asked.
pub struct ChatArgs {
    /// The peer (a bot's bare JID, or a person's full JID).
    pub peer: String,
    /// A pairing code to use as soon as the tunnel is open.
    pub pair: Option<String>,
    /// How long the login and the tunnel's opening may take.
    pub timeout: Duration,
}

const HELP: &str = "Type a message and press Enter. Commands: /sas compare a short code with \
the peer, /pair CODE use a pairing code its operator gave you, /key show its key, /quit leave.";

/// Runs `xtls chat`; returns the exit status.
pub async fn run(login: &LoginArgs, dir: &Path, args: ChatArgs) -> Outcome {
    let result = talk::online(login, dir, args.timeout, async |online| {
        chat(online, &args).await
    })
    .await;
    match result {
        Ok(outcome) => outcome,
        Err(fail) => {
            eprintln!("xtls: {}", fail.message);
            fail.outcome
        }
    }
}

struct Chat<'a> {
    online: &'a mut Online,
    peer: String,
    peer_bare: String,
    own_bare: String,
    opened: Opened,
    verification: Verification,
    /// A code is on screen and the person's yes or no is awaited.
    comparing: Option<SasCode>,
}

async fn chat(online: &mut Online, args: &ChatArgs) -> Result<Outcome, Fail> {
    let peer = args.peer.clone();
    println!("Looking up {peer}...");
    talk::discover(&mut online.client, &peer).await?;
    let opened = talk::open(online, &peer, args.timeout).await?;
    let own = online.client.jid();
    println!(
        "Tunnel open to {peer} ({}, you are {own}).",
        opened.established.tls_version
    );
    println!("{}", talk::key_line(&peer, &opened));
    println!("{HELP}");
    let policy = talk::policy_for(&online.known, bare(&peer));
    let accepted_peer = peer.clone();
    online.client.accept_tunnels(Box::new(move |from| {
        (from == accepted_peer).then(|| policy.clone())
    }));
    online.client.read_input(stdin_lines());
    let mut chat = Chat {
        peer_bare: bare(&peer).to_owned(),
        own_bare: bare(&own).to_owned(),
        online,
        peer,
        opened,
        verification: Verification::default(),
        comparing: None,
    };
    if let Some(code) = &args.pair {
        chat.start_pair(code).await?;
    }
    chat.run().await
}

impl Chat<'_> {
    async fn run(&mut self) -> Result<Outcome, Fail> {
        loop {
            let happening = self.online.client.next().await.map_err(talk::lost)?;
            match happening {
                Happening::Input(Some(line)) => {
                    if let Some(outcome) = self.on_line(line.trim_end()).await? {
                        return Ok(outcome);
                    }
                }
                Happening::Input(None) => return self.quit().await,
                Happening::Tunnel(p, event) if p == self.peer => {
                    if let Some(outcome) = self.on_event(event).await? {
                        return Ok(outcome);
                    }
                }
                Happening::Accepted(p) => println!("{p} opened a new tunnel to you."),
                Happening::Plain(message)
                    if bare(message.attr("from").unwrap_or("")) == self.peer_bare =>
                {
                    if let Some(body) = body(&message) {
                        println!(
                            "{} [NOT ENCRYPTED, outside the tunnel]: {}",
                            self.peer,
                            talk::on_screen(&body)
                        );
                    }
                }
                _ => {}
            }
        }
    }

    async fn on_line(&mut self, line: &str) -> Result<Option<Outcome>, Fail> {
        if let Some(code) = self.comparing.take() {
            match line.to_ascii_lowercase().as_str() {
                "y" | "yes" => {
                    self.verified("the short authentication strings matched")?;
                    return Ok(None);
                }
                "n" | "no" => {
                    println!(
                        "The codes differ: someone may be in the middle. Closing the tunnel; \
                         {}'s key stays as it was.",
                        self.peer
                    );
                    let late = talk::close(self.online, &self.peer).await;
                    self.show_late(late);
                    return Ok(Some(Outcome::KeyChanged));
                }
                _ => {
                    println!("Answer yes or no: does {} show {code}?", self.peer);
                    self.comparing = Some(code);
                    return Ok(None);
                }
            }
        }
        let (command, rest) = line.split_once(' ').unwrap_or((line, ""));
        match command {
            "" => {}
            "/quit" | "/q" => return self.quit().await.map(Some),
            "/help" => println!("{HELP}"),
            "/key" => println!("{}", talk::key_line(&self.peer, &self.opened)),
            "/sas" => {
                let request = self.verification.start_sas();
                self.send_inner(request).await?;
                println!(
                    "Exchanging a short authentication string with {}...",
                    self.peer
                );
            }
            "/pair" if !rest.trim().is_empty() => self.start_pair(rest.trim()).await?,
            "/pair" => println!("Give the code: /pair XXXXX-XXXXX"),
            c if c.starts_with('/') && !c.starts_with("//") => {
                println!("Unknown command {c}. {HELP}");
            }
            _ => {
                // "//text" sends "/text".
                let text = line
                    .strip_prefix('/')
                    .filter(|t| t.starts_with('/'))
                    .unwrap_or(line);
                match checked_chat_message(text, "chat") {
                    Ok(message) => self.send_inner(message).await?,
                    Err(e) => println!("Not sent: {e}."),
                }
            }
        }
        Ok(None)
    }

    async fn start_pair(&mut self, code: &str) -> Result<(), Fail> {
        let request = self
            .verification
            .start_pair(code, &self.own_bare, &self.peer_bare);
        self.send_inner(request).await?;
        println!("Pairing with {} using the code...", self.peer);
        Ok(())
    }

    async fn send_inner(&mut self, stanza: Element) -> Result<(), Fail> {
        match self
            .online
            .client
            .send(&self.peer, stanza)
            .await
            .map_err(talk::lost)?
        {
            Ok(_) => {}
            Err(why) => println!("Not sent: {why}."),
        }
        Ok(())
    }

    async fn on_event(&mut self, event: Event) -> Result<Option<Outcome>, Fail> {
        match event {
            Event::Stanza(stanza) if stanza.name() == "iq" => self.on_inner_iq(&stanza).await?,
            Event::Stanza(stanza) if stanza.name() == "message" => {
                if stanza.attr("type") == Some("error") {
                    println!(
                        "({} could not take a message: {})",
                        self.peer,
                        condition(&stanza)
                    );
                } else if let Some(body) = body(&stanza) {
                    println!("{}: {}", self.peer, talk::on_screen(&body));
                }
            }
            Event::Established(established) => {
                // The peer opened a new tunnel in place of the old one.
                if let Some(spki) = established.peer.spki_sha256.clone() {
                    self.opened.spki_sha256 = spki;
                }
                self.opened.established = established;
                println!("{}", talk::key_line(&self.peer, &self.opened));
            }
            Event::Closed(reason) => {
                let (outcome, words) = match &reason {
                    CloseReason::Local => (Outcome::Delivered, "closed".to_owned()),
                    CloseReason::PeerClosed => {
                        (Outcome::Delivered, format!("closed by {}", self.peer))
                    }
                    CloseReason::Replaced => return Ok(None),
                    other => (Outcome::Refused, format!("ended: {other}")),
                };
                println!("The tunnel to {} {words}.", self.peer);
                return Ok(Some(outcome));
            }
            _ => {}
        }
        Ok(None)
    }

    async fn on_inner_iq(&mut self, stanza: &Element) -> Result<(), Fail> {
        let steps = {
            let client = &mut self.online.client;
            let Some(tunnel) = client.tunnel(&self.peer) else {
                return Ok(());
            };
            let tunnel = &*tunnel;
            let export = |out: &mut [u8], label: &[u8], context: &[u8]| {
                tunnel.export_keying_material(out, label, context)
            };
            self.verification.on_iq(stanza, &export)
        };
        let Some(steps) = steps else {
            if let Some(reply) = unhandled_request(stanza) {
                self.send_inner(reply).await?;
            }
            return Ok(());
        };
        for step in steps {
            match step {
                Step::Send(stanza) => self.send_inner(stanza).await?,
                Step::Code(code) => {
                    println!("Short authentication string: {code}");
                    println!(
                        "Does {} show the same code (ask its operator, or look at its screen)? \
                         yes/no",
                        self.peer
                    );
                    self.comparing = Some(code);
                }
                Step::Failed(why) => println!("Verification failed: {why}"),
                Step::Paired => self.verified("paired with the code its operator gave you")?,
            }
        }
        Ok(())
    }

    /// Records the peer's key as verified in `known_bots`.
    fn verified(&mut self, how: &str) -> Result<(), Fail> {
        let path = self.online.known.path().to_path_buf();
        self.online.known =
            talk::remember_verified(&path, &self.peer_bare, &self.opened.spki_sha256)?;
        self.opened.known = self.online.known.get(&self.peer_bare).cloned();
        println!("{}'s key is now verified ({how}).", self.peer);
        Ok(())
    }

    /// Shows what the peer wrote while the tunnel was closing.
    fn show_late(&self, bodies: Vec<String>) {
        for body in bodies {
            println!("{}: {}", self.peer, talk::on_screen(&body));
        }
    }

    async fn quit(&mut self) -> Result<Outcome, Fail> {
        println!("Closing the tunnel...");
        let late = talk::close(self.online, &self.peer).await;
        self.show_late(late);
        println!("Closed.");
        Ok(Outcome::Delivered)
    }
}

/// The answer to an inner IQ request nothing here handles: it still gets its one answer
/// (docs/protocol.md §1.9 rule 7). `None` for anything but a request.
pub fn unhandled_request(stanza: &Element) -> Option<Element> {
    let iq = Iq::parse(stanza).ok().filter(|iq| iq.type_.is_request())?;
    let mut reply = iq.error(ErrorType::Cancel, DefinedCondition::ServiceUnavailable, "");
    xtls::stanza::remove_attr(&mut reply, "from");
    xtls::stanza::remove_attr(&mut reply, "to");
    Some(reply)
}

/// The person's lines, read on a thread of their own (stdin blocks).
pub fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn body(message: &Element) -> Option<String> {
    message.get_child("body", ns::CLIENT).map(|b| b.text())
}

fn condition(stanza: &Element) -> String {
    stanza
        .get_child("error", ns::CLIENT)
        .and_then(|e| e.children().find(|c| c.name() != "text"))
        .map(|c| c.name().to_owned())
        .unwrap_or_else(|| "undefined-condition".into())
}
