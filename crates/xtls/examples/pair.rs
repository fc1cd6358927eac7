//! Two tunnels against each other in memory: Alice's client opens a tunnel to a bot, sends one
//! chat message, the bot answers, Alice closes. Every IQ that would cross the XMPP servers is
//! printed, with the plaintext each side sees.
//!
//! Run with `cargo run -p xtls --example pair`.

use std::time::Instant;

use minidom::Element;
use xtls::stanza::{Iq, IqType, chat_message};
use xtls::tunnel::{BotCredentials, Event, StartDecision, classify_request, decide_start};
use xtls::xml::to_bytes;
use xtls::{BotIdentity, PeerPolicy, Tunnel, TunnelConfig, TunnelKey, TunnelParams};

const ALICE: &str = "alice@example.net/laptop";
const BOT: &str = "weather@bots.example.org";

fn params(local: &str, peer: &str, cert_jid: &str, prefix: &str) -> TunnelParams {
    let identity = BotIdentity::generate(cert_jid).expect("key generation");
    println!(
        "{local}: key SPKI SHA-256 {}",
        identity.info.fingerprints.spki_sha256
    );
    TunnelParams {
        config: TunnelConfig::default(),
        key: TunnelKey {
            local: local.into(),
            peer: peer.into(),
        },
        creds: BotCredentials::new(identity).expect("credentials"),
        policy: PeerPolicy::default(),
        id_prefix: prefix.into(),
    }
}

/// Prints and returns what `tunnel` wants to send, and prints its events.
fn drain(name: &str, tunnel: &mut Tunnel) -> Vec<Element> {
    let mut out = Vec::new();
    while let Some(iq) = tunnel.poll_transmit() {
        let xml = String::from_utf8_lossy(&to_bytes(&iq)).into_owned();
        let shown = if xml.len() > 160 {
            format!("{}… ({} bytes)", &xml[..160], xml.len())
        } else {
            xml
        };
        println!("{name} → {shown}");
        out.push(iq);
    }
    while let Some(event) = tunnel.poll_event() {
        match event {
            Event::Established(e) => println!(
                "{name}: established, {} {}, peer key {:?} ({:?})",
                e.tls_version,
                e.cipher_suite,
                e.peer.spki_sha256.map(|f| f.to_string()),
                e.peer.trust
            ),
            Event::Stanza(s) => println!(
                "{name}: received {}",
                String::from_utf8_lossy(&to_bytes(&s))
            ),
            other => println!("{name}: {other:?}"),
        }
    }
    out
}

fn main() {
    let now = Instant::now();
    let mut alice = Tunnel::initiate(now, params(ALICE, BOT, "alice@example.net", "a1-"));
    let bot_params = params(BOT, ALICE, BOT, "b1-");
    let mut bot: Option<Tunnel> = None;

    let mut said = false;
    let mut answered = false;
    let mut closing = false;
    for _ in 0..100 {
        let mut moved = false;
        for el in drain("alice", &mut alice) {
            moved = true;
            let iq = Iq::parse(&el).expect("tunnels send IQs");
            // The bot's owner routes by key: a `start` makes a tunnel, the rest goes to it.
            if iq.type_ == IqType::Set
                && let Ok(xtls::stanza::XtlsElement::Start { offer }) = classify_request(&iq)
            {
                assert_eq!(decide_start(bot.as_ref()), StartDecision::Accept);
                bot = Some(
                    Tunnel::accept(now, bot_params.clone(), &iq, offer.as_ref())
                        .expect("the bot accepts"),
                );
            } else if let Some(bot) = bot.as_mut() {
                bot.handle_iq(now, &iq);
            }
        }
        if let Some(b) = bot.as_mut() {
            for el in drain("bot  ", b) {
                moved = true;
                alice.handle_iq(now, &Iq::parse(&el).expect("tunnels send IQs"));
            }
        }
        let both_open = bot.as_ref().is_some_and(|b| b.established().is_some())
            && alice.established().is_some();
        if both_open && !said {
            said = true;
            alice
                .send(now, chat_message("Weather in Paris?", "chat"))
                .expect("the tunnel is open");
            moved = true;
        }
        if let Some(b) = bot.as_mut()
            && b.stats().stanzas_in == 1
            && !answered
        {
            answered = true;
            b.send(now, chat_message("Sunny, 21 °C.", "chat"))
                .expect("the tunnel is open");
            moved = true;
        }
        if answered && alice.stats().stanzas_in == 1 && !closing {
            closing = true;
            alice.close(now);
            moved = true;
        }
        if !moved {
            break;
        }
    }
    println!(
        "alice: gone {}, bot: gone {}",
        alice.is_gone(),
        bot.as_ref().is_some_and(Tunnel::is_gone)
    );
}
