//! `xtls send BOT TEXT`: one message through a tunnel, the answer printed, an exit status a
//! script can branch on.

use std::path::Path;
use std::time::{Duration, Instant};

use xtls::stanza::checked_chat_message;
use xtls::tunnel::{CloseReason, Event};

use crate::client::Happening;
use crate::talk::{self, Fail, LoginArgs, Online, Opened, Outcome};

/// What `xtls send` was asked.
pub struct SendArgs {
    /// The peer (a bot's bare JID, or a person's full JID).
    pub peer: String,
    /// The message body.
    pub text: String,
    /// Wait for an answer after delivery.
    pub wait: bool,
    /// How long the whole exchange may take, login included.
    pub timeout: Duration,
    /// When that time is up.
    pub deadline: Instant,
}

/// What came of it.
struct Sent {
    opened: Opened,
    reply: Option<String>,
}

/// Runs `xtls send`; returns the exit status.
pub async fn run(login: &LoginArgs, dir: &Path, args: SendArgs, json: bool) -> Outcome {
    let work = async |online: &mut Online| exchange(online, &args, json).await;
    let result = talk::online(login, dir, args.timeout, work).await;
    match result {
        Ok(sent) => {
            report(&args.peer, &sent, json);
            Outcome::Delivered
        }
        Err(fail) => {
            if json {
                let value = serde_json::json!({
                    "peer": args.peer,
                    "outcome": outcome_name(fail.outcome),
                    "error": fail.message,
                });
                println!("{value:#}");
            } else {
                eprintln!("xtls: {}", fail.message);
            }
            fail.outcome
        }
    }
}

async fn exchange(online: &mut Online, args: &SendArgs, json: bool) -> Result<Sent, Fail> {
    let deadline = args.deadline;
    let peer = args.peer.as_str();
    let message = checked_chat_message(&args.text, "chat")
        .map_err(|e| Fail::new(Outcome::Usage, format!("the message cannot be sent: {e}")))?;
    talk::discover(&mut online.client, peer).await?;
    let opened = talk::open(online, peer, deadline - Instant::now()).await?;
    if !json {
        eprintln!("{}", talk::key_line(peer, &opened));
    }
    let mark = match online
        .client
        .send(peer, message)
        .await
        .map_err(talk::lost)?
    {
        Ok(mark) => mark,
        Err(why) => {
            return Err(Fail::new(Outcome::Refused, format!("not sent: {why}")));
        }
    };
    online.client.set_deadline(Some(deadline));
    let mut delivered = false;
    let reply = loop {
        match online.client.next().await.map_err(talk::lost)? {
            Happening::Tunnel(p, Event::Acknowledged(m)) if p == peer && m == mark => {
                delivered = true;
                if !args.wait {
                    break None;
                }
            }
            Happening::Tunnel(p, Event::Stanza(stanza))
                if p == peer && stanza.name() == "message" =>
            {
                if stanza.attr("type") == Some("error") {
                    let condition = stanza
                        .get_child("error", xtls::stanza::ns::CLIENT)
                        .and_then(|e| e.children().next())
                        .map(|c| c.name().to_owned())
                        .unwrap_or_else(|| "undefined-condition".into());
                    return Err(Fail::new(
                        Outcome::Refused,
                        format!("{peer} refused the message ({condition})"),
                    ));
                }
                if let Some(body) = stanza.get_child("body", xtls::stanza::ns::CLIENT) {
                    break Some(body.text());
                }
            }
            Happening::Tunnel(p, Event::Stanza(stanza)) if p == peer && stanza.name() == "iq" => {
                // Nothing here answers the peer's requests, but each gets its one answer.
                if let Some(reply) = crate::chat::unhandled_request(&stanza) {
                    let _ = online.client.send(peer, reply).await.map_err(talk::lost)?;
                }
            }
            Happening::Tunnel(p, Event::Closed(reason)) if p == peer => {
                let outcome = match reason {
                    CloseReason::Timeout(_) => Outcome::Timeout,
                    _ => Outcome::Refused,
                };
                let fate = if delivered {
                    "after the message was delivered, before any answer"
                } else {
                    "before the message was delivered"
                };
                return Err(Fail::new(
                    outcome,
                    format!("the tunnel to {peer} closed {fate}: {reason}"),
                ));
            }
            Happening::Deadline => {
                let fate = if delivered {
                    "was delivered, but no answer came"
                } else {
                    "was not acknowledged"
                };
                return Err(Fail::new(
                    Outcome::Timeout,
                    format!("the message {fate} within {} s", args.timeout.as_secs()),
                ));
            }
            _ => {}
        }
    };
    // Anything more the peer says while the tunnel closes goes after the answer.
    let mut reply = reply;
    for late in talk::close(online, peer).await {
        match reply.as_mut() {
            Some(text) => {
                text.push('\n');
                text.push_str(&late);
            }
            None => reply = Some(late),
        }
    }
    Ok(Sent { opened, reply })
}

fn report(peer: &str, sent: &Sent, json: bool) {
    if json {
        let value = serde_json::json!({
            "peer": peer,
            "outcome": "delivered",
            "reply": sent.reply,
            "spki_sha256": sent.opened.spki_sha256.to_string(),
            "key": talk::standing(&sent.opened),
            "tls_version": sent.opened.established.tls_version,
        });
        println!("{value:#}");
        return;
    }
    match &sent.reply {
        Some(reply) => println!("{reply}"),
        None => eprintln!("Delivered to {peer}."),
    }
}

/// The outcome's name in JSON.
pub fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Failed => "failed",
        Outcome::Usage => "usage",
        Outcome::Refused => "refused",
        Outcome::NoXtls => "no_xtls",
        Outcome::KeyChanged => "key_changed",
        Outcome::Timeout => "timeout",
    }
}
