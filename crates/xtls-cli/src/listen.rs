//! `xtls listen`: stay online and accept the tunnels that bots and people open to you; print
//! what arrives, and send the lines you type to whoever spoke last.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use minidom::Element;
use xtls::stanza::{checked_chat_message, ns};
use xtls::tunnel::{CloseReason, Event, TrustVerdict, bare};

use crate::client::Happening;
use crate::known::{How, KnownBots};
use crate::talk::{self, Fail, LoginArgs, Online, Outcome};
use crate::verify::{Step, Verification};

/// Runs `xtls listen` until the input ends or the connection is lost; returns the exit status.
pub async fn run(
    login: &LoginArgs,
    dir: &Path,
    announce: &[String],
    timeout: Duration,
    json: bool,
) -> Outcome {
    let result = talk::online(login, dir, timeout, async |online| {
        listen(online, announce, json).await
    })
    .await;
    match result {
        Ok(outcome) => outcome,
        Err(fail) => {
            if json {
                line(serde_json::json!({"event": "error", "error": fail.message}));
            } else {
                eprintln!("xtls: {}", fail.message);
            }
            fail.outcome
        }
    }
}

async fn listen(online: &mut Online, announce: &[String], json: bool) -> Result<Outcome, Fail> {
    let jid = online.client.jid();
    // Read afresh for every tunnel: a key remembered a moment ago is pinned for the next.
    let path = online.known.path().to_path_buf();
    online.client.accept_tunnels(Box::new(move |peer| {
        let known = KnownBots::load(&path).ok()?;
        Some(talk::policy_for(&known, bare(peer)))
    }));
    online.client.read_input(crate::chat::stdin_lines());
    // Directed presence: those told may reach us at our bare JID. The server tells them we
    // went away when the session ends (RFC 6121 §4.6.3).
    for to in announce {
        online.client.announce(to).await.map_err(talk::lost)?;
    }
    if json {
        line(serde_json::json!({"event": "online", "jid": jid, "announced": announce}));
    } else {
        if !announce.is_empty() {
            println!("Told {} that you are available.", announce.join(", "));
        }
        println!(
            "Listening as {jid}. Tunnels that bots and people open to this address are \
             accepted; lines you type go to whoever wrote last. End with Ctrl-D."
        );
    }
    let mut last: Option<String> = None;
    let mut verifications: HashMap<String, Verification> = HashMap::new();
    loop {
        match online.client.next().await.map_err(talk::lost)? {
            Happening::Tunnel(peer, event) => match event {
                Event::Established(established) => {
                    let spki = established.peer.spki_sha256.clone();
                    let standing = remember(
                        &mut online.known,
                        &peer,
                        spki.as_ref(),
                        established.peer.trust,
                    )?;
                    let spki = spki.map(|s| s.to_string()).unwrap_or_default();
                    if json {
                        line(serde_json::json!({
                            "event": "opened", "peer": peer, "spki_sha256": spki, "key": standing,
                        }));
                    } else {
                        let words = match standing {
                            "new" => "NEW: first meeting, remembered",
                            "verified" => "verified",
                            _ => "known, not verified",
                        };
                        println!("{peer} opened a tunnel; key {spki} — {words}");
                    }
                }
                Event::Stanza(stanza) if stanza.name() == "message" => {
                    if let Some(body) = body(&stanza) {
                        if json {
                            line(
                                serde_json::json!({"event": "message", "peer": peer, "body": body}),
                            );
                        } else {
                            println!("{peer}: {}", talk::on_screen(&body));
                        }
                        last = Some(peer);
                    }
                }
                Event::Stanza(stanza) if stanza.name() == "iq" => {
                    let verification = verifications.entry(peer.clone()).or_default();
                    let (steps, spki) = match online.client.tunnel(&peer) {
                        Some(tunnel) => {
                            let tunnel = &*tunnel;
                            let export = |out: &mut [u8], label: &[u8], context: &[u8]| {
                                tunnel.export_keying_material(out, label, context)
                            };
                            let spki = tunnel
                                .established()
                                .and_then(|e| e.peer.spki_sha256.as_ref())
                                .map(|f| f.to_string())
                                .unwrap_or_default();
                            (verification.on_iq(&stanza, &export), spki)
                        }
                        None => (None, String::new()),
                    };
                    match steps {
                        None => answer_unknown_request(online, &peer, &stanza).await?,
                        Some(steps) => {
                            for step in steps {
                                show_step(online, &peer, &spki, step, json).await?;
                            }
                        }
                    }
                }
                Event::Closed(reason) => {
                    verifications.remove(&peer);
                    if let Some((presented, _)) = reason.identity_change() {
                        let warning = format!(
                            "{peer} tried to open a tunnel with a key that is NOT the one you \
                             know for it ({presented}); it was refused. If its owner really \
                             changed it, accept it with: xtls trust {} {presented}",
                            bare(&peer)
                        );
                        if json {
                            line(serde_json::json!({
                                "event": "refused", "peer": peer, "reason": "key_changed",
                                "spki_sha256": presented.to_string(),
                            }));
                        } else {
                            println!("WARNING: {warning}");
                        }
                    } else if json {
                        line(
                            serde_json::json!({"event": "closed", "peer": peer, "reason": reason.code()}),
                        );
                    } else if reason != CloseReason::Replaced {
                        println!("The tunnel with {peer} ended ({reason}).");
                    }
                }
                _ => {}
            },
            Happening::Input(Some(text)) => {
                let Some(peer) = last.clone() else {
                    println!("No one has written yet: nothing to answer.");
                    continue;
                };
                match checked_chat_message(&text, "chat") {
                    Ok(message) => match online
                        .client
                        .send(&peer, message)
                        .await
                        .map_err(talk::lost)?
                    {
                        Ok(_) => {}
                        Err(why) => println!("Not sent to {peer}: {why}."),
                    },
                    Err(e) => println!("Not sent: {e}."),
                }
            }
            Happening::Input(None) => return Ok(Outcome::Delivered),
            _ => {}
        }
    }
}

/// Records a first meeting in `known_bots`; returns how the key stands: new, known, verified.
fn remember(
    known: &mut KnownBots,
    peer: &str,
    spki: Option<&xtls::Fingerprint>,
    trust: TrustVerdict,
) -> Result<&'static str, Fail> {
    let Some(spki) = spki else {
        return Ok("none");
    };
    if trust == TrustVerdict::TofuNew {
        *known = talk::remember_first_meeting(known.path(), bare(peer), spki)?;
        return Ok("new");
    }
    Ok(match known.get(bare(peer)) {
        Some(e) if e.how == How::Verified => "verified",
        _ => "known",
    })
}

/// Carries out one step of a verification a peer started, and tells the person.
async fn show_step(
    online: &mut Online,
    peer: &str,
    spki: &str,
    step: Step,
    json: bool,
) -> Result<(), Fail> {
    match step {
        Step::Send(stanza) => {
            let _ = online.client.send(peer, stanza).await.map_err(talk::lost)?;
        }
        Step::Code(code) if json => line(serde_json::json!({
            "event": "sas", "peer": peer, "sas28x5": code.sas28x5, "decimal": code.decimal,
            "spki_sha256": spki,
        })),
        Step::Code(code) => println!(
            "{peer} compares a short authentication string with you: {code}. If it shows the \
             same code, its key {spki} is the one you talk to: mark it verified with \
             `xtls trust {} {spki}`.",
            bare(peer)
        ),
        Step::Failed(why) if json => {
            line(serde_json::json!({"event": "sas_failed", "peer": peer, "error": why}))
        }
        Step::Failed(why) => println!("Verification with {peer} failed: {why}"),
        // Only the side that types a code starts pairing; a peer cannot make us pair.
        Step::Paired => {}
    }
    Ok(())
}

/// Answers an inner IQ request nothing here handles (docs/protocol.md §1.9 rule 7).
async fn answer_unknown_request(
    online: &mut Online,
    peer: &str,
    stanza: &Element,
) -> Result<(), Fail> {
    if let Some(reply) = crate::chat::unhandled_request(stanza) {
        let _ = online.client.send(peer, reply).await.map_err(talk::lost)?;
    }
    Ok(())
}

fn body(message: &Element) -> Option<String> {
    if message.attr("type") == Some("error") {
        return None;
    }
    message.get_child("body", ns::CLIENT).map(|b| b.text())
}

fn line(value: serde_json::Value) {
    println!("{value}");
}
