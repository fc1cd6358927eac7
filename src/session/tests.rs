//! Driver tests against a real SQLite store: a bot table, its drivers, and peers built on the
//! engine crate, with the stanzas the drivers write read from their outbound channel.

use std::sync::atomic::Ordering;
use std::time::Duration;

use minidom::Element;
use tokio::sync::mpsc;

use super::*;
use crate::config::{BotTrust, EventsConfig, Handler, LimitsConfig, WebhooksConfig};
use crate::store::{MessageStatus, OutMsg, Store};
use xtls::certs::BotIdentity;
use xtls::stanza::xtls::XtlsElement;
use xtls::stanza::{Iq, IqType, name, ns};
use xtls::tunnel::{
    BotCredentials, CloseReason, Event, PeerAuth, PeerPolicy, State, Tunnel, TunnelConfig,
    TunnelKey, TunnelParams, classify_request,
};

async fn table(limits: LimitsConfig) -> (BotTable, mpsc::Receiver<Element>, std::path::PathBuf) {
    table_with(limits, TunnelConfig::default()).await
}

/// A table whose tunnels get `tunnel` (the `[tunnel]` settings).
async fn table_with(
    limits: LimitsConfig,
    tunnel: TunnelConfig,
) -> (BotTable, mpsc::Receiver<Element>, std::path::PathBuf) {
    let (dir, url) = temp_store("xtls-session");
    let store = Store::open(&url).await.unwrap();
    let (out, rx) = mpsc::channel(64);
    let shared = shared_parts(store, super::Ownership::sole(), out, tunnel, limits);
    (BotTable::load(shared).await.unwrap(), rx, dir)
}

/// A fresh directory for a SQLite store, and the store's URL in it.
fn temp_store(prefix: &str) -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/t.db", dir.display());
    (dir, url)
}

/// The drivers' shared parts for the test domain, with default events and webhooks.
fn shared_parts(
    store: Store,
    owners: super::Ownership,
    out: mpsc::Sender<Element>,
    tunnel: TunnelConfig,
    limits: LimitsConfig,
) -> Arc<Shared> {
    Shared::new(
        store,
        owners,
        out,
        tunnel,
        limits,
        "bots.example.org".into(),
        &EventsConfig::default(),
        WebhooksConfig::default(),
    )
}

fn start(from: &str, id: &str) -> Element {
    format!(
        "<iq xmlns='jabber:client' type='set' id='{id}' from='{from}' to='echo@bots.example.org'><start xmlns='urn:xmpp:tmp:xtls'/></iq>"
    )
    .parse()
    .unwrap()
}

async fn next(rx: &mut mpsc::Receiver<Element>) -> Iq {
    let el = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the driver answers")
        .expect("channel open");
    Iq::parse(&el).unwrap()
}

#[tokio::test]
async fn limits_answer_resource_constraint_wait_and_unknown_tunnels_item_not_found() {
    let limits = LimitsConfig {
        tunnels_per_peer: 1,
        ..LimitsConfig::default()
    };
    let (bots, mut rx, dir) = table(limits).await;
    let bot = new_bot(&bots, "Echo", Handler::Echo, BotTrust::Tofu).await;
    assert_eq!(
        bot.record.jid, "echo@bots.example.org",
        "localparts are normalized"
    );
    assert!(matches!(
        bots.create(NewBot {
            localpart: "echo".into(),
            handler: Handler::Echo,
            peer_auth: PeerAuth::Required,
            trust: BotTrust::Tofu,
            encrypted_only: false,
        })
        .await,
        Err(BotError::Duplicate(_))
    ));

    bot.try_deliver(start("alice@example.net/a", "s1")).unwrap();
    let proceed = next(&mut rx).await;
    assert_eq!((proceed.type_, proceed.id.as_str()), (IqType::Result, "s1"));
    assert_eq!(bots.shared().table.snapshot().len(), 1);

    // A second tunnel for the same bare JID exceeds tunnels_per_peer = 1.
    bot.try_deliver(start("alice@example.net/b", "s2")).unwrap();
    let refused = next(&mut rx).await;
    assert_eq!(refused.error_condition(), "resource-constraint");
    let error = refused
        .children
        .iter()
        .find(|c| c.name() == "error")
        .unwrap();
    assert_eq!(error.attr("type"), Some("wait"));

    // A reload raises the cap: the next start opens, and the queue size stays as it was.
    bots.shared().reload_limits(&LimitsConfig {
        tunnels_per_peer: 2,
        bot_queue: 7,
        ..LimitsConfig::default()
    });
    assert_eq!(bots.shared().limits.get().bot_queue, 1024);
    bot.try_deliver(start("alice@example.net/c", "s3")).unwrap();
    let proceed = next(&mut rx).await;
    assert_eq!((proceed.type_, proceed.id.as_str()), (IqType::Result, "s3"));

    // data and close for a key with no tunnel.
    for payload in [
        "<data xmlns='urn:xmpp:tmp:xtls'>AAAA</data>",
        "<close xmlns='urn:xmpp:tmp:xtls'/>",
    ] {
        let el: Element = format!(
            "<iq xmlns='jabber:client' type='set' id='d' from='bob@example.net/x' to='echo@bots.example.org'>{payload}</iq>"
        )
        .parse()
        .unwrap();
        bot.try_deliver(el).unwrap();
        assert_eq!(next(&mut rx).await.error_condition(), "item-not-found");
    }

    // Deleting the bot tells the peer and empties the session table.
    assert!(bots.delete("echo@bots.example.org").await.unwrap());
    let close = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(close.has_child("close", ns::XTLS));
    assert!(bots.shared().table.snapshot().is_empty());
    let history = bots
        .shared()
        .store
        .list_tunnels(&Default::default(), 10)
        .await
        .unwrap();
    assert_eq!(history[0].state, State::Closed);
    assert!(
        history[0]
            .close_reason
            .as_deref()
            .unwrap()
            .starts_with("bot_deleted")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// The `api` bot weather@bots.example.org.
async fn api_bot(bots: &BotTable) -> BotHandle {
    new_bot(bots, "weather", Handler::Api, BotTrust::Tofu).await
}

/// A bot that requires peer certificates and accepts stanzas in clear.
async fn new_bot(bots: &BotTable, localpart: &str, handler: Handler, trust: BotTrust) -> BotHandle {
    bots.create(NewBot {
        localpart: localpart.into(),
        handler,
        peer_auth: PeerAuth::Required,
        trust,
        encrypted_only: false,
    })
    .await
    .unwrap()
}

/// alice@example.net/phone's engine, with a tunnel to the bot open.
async fn open_peer(bot: &BotHandle, rx: &mut mpsc::Receiver<Element>) -> Tunnel {
    open_peer_as("alice@example.net/phone", bot, rx).await
}

/// The engine of `full_jid` (a new key), with a tunnel to the bot open.
async fn open_peer_as(full_jid: &str, bot: &BotHandle, rx: &mut mpsc::Receiver<Element>) -> Tunnel {
    let mut peer = Tunnel::initiate(
        std::time::Instant::now(),
        TunnelParams {
            config: TunnelConfig::default(),
            key: TunnelKey {
                local: full_jid.into(),
                peer: bot.record.jid.clone(),
            },
            creds: BotCredentials::new(
                BotIdentity::generate(xtls::tunnel::bare(full_jid)).unwrap(),
            )
            .unwrap(),
            policy: PeerPolicy::default(),
            id_prefix: "alice-".into(),
        },
    );
    until_open(&mut peer, bot, rx).await;
    peer
}

/// The peer writes a chat message with `body` and its `data` IQ reaches the bot at once
/// (nothing of the peer's may be in flight); returns that IQ's id.
fn peer_sends(peer: &mut Tunnel, bot: &BotHandle, body: &str) -> String {
    let message: Element =
        format!("<message xmlns='jabber:client' type='chat'><body>{body}</body></message>")
            .parse()
            .unwrap();
    peer.send(std::time::Instant::now(), message).unwrap();
    let data = peer.poll_transmit().expect("a data IQ at once");
    let id = data.attr("id").unwrap().to_owned();
    bot.try_deliver(data).unwrap();
    id
}

/// Feeds the peer's stanzas to the bot and the bot's to the peer until the peer is open.
async fn until_open(peer: &mut Tunnel, bot: &BotHandle, rx: &mut mpsc::Receiver<Element>) {
    for _ in 0..100 {
        while let Some(el) = peer.poll_transmit() {
            bot.try_deliver(el).unwrap();
        }
        if peer.state() == State::Open {
            return;
        }
        let el = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the driver answers")
            .expect("channel open");
        peer.handle_iq(std::time::Instant::now(), &Iq::parse(&el).unwrap());
    }
    panic!("the tunnel never opened");
}

#[tokio::test]
async fn an_api_bot_commits_events_before_acknowledging_data() {
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    let bot = api_bot(&bots).await;
    let store = bots.shared().store.clone();
    let mut peer = open_peer(&bot, &mut rx).await;

    let data_id = peer_sends(&mut peer, &bot, "forecast?");
    loop {
        let el = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        if el.attr("id") == Some(data_id.as_str()) {
            assert_eq!(el.attr("type"), Some("result"));
            break;
        }
        peer.handle_iq(std::time::Instant::now(), &Iq::parse(&el).unwrap());
        while let Some(el) = peer.poll_transmit() {
            bot.try_deliver(el).unwrap();
        }
    }
    // The acknowledgement left only after the event was committed.
    let events = store
        .read_events(&bot.record.jid, 0, 100, false)
        .await
        .unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "tunnel.opened",
            "tunnel.established",
            "peer.identity_new",
            "message.received"
        ]
    );
    let received = &events[3];
    assert_eq!(received.data["body"], "forecast?");
    assert_eq!(received.peer.as_deref(), Some("alice@example.net/phone"));
    assert_eq!(received.data["identity"]["trust"], "tofu_new");
    assert!(
        received.data["stanza"]
            .as_str()
            .unwrap()
            .contains("from='alice@example.net/phone'"),
        "routing restored: {}",
        received.data["stanza"]
    );
    assert_eq!(*bot.events.borrow(), 4);
    assert_eq!(store.cursor(&bot.record.jid).await.unwrap(), 0);
    assert_eq!(store.ack_through(&bot.record.jid, 3).await.unwrap(), 3);
    std::fs::remove_dir_all(dir).unwrap();
}

async fn recv(rx: &mut mpsc::Receiver<Element>) -> Element {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the driver sends")
        .expect("channel open")
}

/// How long a test waits for something that must happen before it calls the driver stuck.
/// A guard against a hang, never a claim: nothing is concluded from it running out.
const STUCK: Duration = Duration::from_secs(10);

/// Waits until the bot's log holds an event `wanted` accepts: read again at every commit
/// (the bot's committed-seq watch), never by sleeping.
async fn event_where(
    bot: &BotHandle,
    store: &Store,
    wanted: impl Fn(&crate::store::EventRecord) -> bool,
) -> crate::store::EventRecord {
    let mut committed = bot.events.clone();
    loop {
        let events = store
            .read_events(&bot.record.jid, 0, 1000, false)
            .await
            .unwrap();
        if let Some(e) = events.into_iter().find(|e| wanted(e)) {
            return e;
        }
        tokio::time::timeout(STUCK, committed.changed())
            .await
            .expect("the driver commits the event")
            .expect("the bot runs");
    }
}

/// A disco#info query to the bot.
fn disco_query(bot: &BotHandle, id: &str, from: &str) -> Element {
    format!(
        "<iq xmlns='jabber:client' type='get' id='{id}' from='{from}' to='{}'>\
         <query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
        bot.record.jid
    )
    .parse()
    .unwrap()
}

/// Proves the driver wrote nothing more so far: a disco#info query sent now must be answered
/// by the very next stanza out, since a driver handles its commands and writes in order.
async fn nothing_more_before_a_barrier(bot: &BotHandle, rx: &mut mpsc::Receiver<Element>) {
    bot.try_deliver(disco_query(bot, "barrier", "barrier@example.net/x"))
        .unwrap();
    let next = recv(rx).await;
    assert_eq!(
        (next.attr("id"), next.attr("type")),
        (Some("barrier"), Some("result")),
        "the driver wrote something before the barrier: {next:?}"
    );
}

/// Moves stanzas between `peer` and the bot until `done` says so; wakes on every stanza the
/// bot writes and on every commit of its log.
async fn exchange_until(
    peer: &mut Tunnel,
    bot: &BotHandle,
    rx: &mut mpsc::Receiver<Element>,
    mut done: impl AsyncFnMut(&mut Tunnel) -> bool,
) {
    let mut committed = bot.events.clone();
    loop {
        while let Some(el) = peer.poll_transmit() {
            bot.try_deliver(el).unwrap();
        }
        if done(peer).await {
            return;
        }
        tokio::select! {
            el = rx.recv() => {
                let el = el.expect("channel open");
                peer.handle_iq(std::time::Instant::now(), &Iq::parse(&el).unwrap());
            }
            changed = committed.changed() => changed.expect("the bot runs"),
            _ = tokio::time::sleep(STUCK) => panic!("the exchange stalled"),
        }
    }
}

fn disco_answer(request: &Element, xtls: bool) -> Element {
    let iq = Iq::parse(request).unwrap();
    assert!(iq.children[0].is("query", ns::DISCO_INFO));
    let mut q = Element::bare("query", ns::DISCO_INFO);
    if xtls {
        q.append_child(
            Element::builder("feature", ns::DISCO_INFO)
                .attr(name("var"), ns::XTLS)
                .build(),
        );
    }
    iq.result(Some(q))
}

#[tokio::test]
async fn a_bot_opens_a_tunnel_after_disco_and_reports_the_peer_acknowledgement() {
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    bots.shared().link_up.store(true, Ordering::Relaxed);
    let bot = api_bot(&bots).await;
    let store = bots.shared().store.clone();
    let alice = "alice@example.net/phone";
    let msg = |id: &str, to: &str| OutMsg {
        id: id.into(),
        to: to.into(),
        stanza: xtls::stanza::chat_message("sunny", "chat"),
        reopen: false,
    };

    // A client without XTLS: no start is ever sent.
    let m0 = msg("msg_0", "bob@example.net/pc");
    store
        .insert_message(&bot.record.jid, &m0, None)
        .await
        .unwrap();
    let submitting = tokio::spawn({
        let bot = bot.clone();
        async move { bot.submit(m0).await }
    });
    let disco = recv(&mut rx).await;
    assert_eq!(disco.attr("to"), Some("bob@example.net/pc"));
    bot.try_deliver(disco_answer(&disco, false)).unwrap();
    assert_eq!(
        submitting.await.unwrap().unwrap().status,
        MessageStatus::NoXtlsSupport
    );
    // Nothing follows a negative disco answer: no start before the barrier's answer.
    nothing_more_before_a_barrier(&bot, &mut rx).await;

    // A client with XTLS: disco, start, handshake, the message, its acknowledgement.
    let m1 = msg("msg_1", alice);
    store
        .insert_message(&bot.record.jid, &m1, None)
        .await
        .unwrap();
    let submitting = tokio::spawn({
        let bot = bot.clone();
        async move { bot.submit(m1).await }
    });
    let disco = recv(&mut rx).await;
    bot.try_deliver(disco_answer(&disco, true)).unwrap();
    let outcome = submitting.await.unwrap().unwrap();
    assert_eq!(outcome.status, MessageStatus::Opening);
    let start = Iq::parse(&recv(&mut rx).await).unwrap();
    let Ok(XtlsElement::Start { offer }) = classify_request(&start) else {
        panic!("a start follows the disco answer")
    };
    let mut peer = Tunnel::accept(
        std::time::Instant::now(),
        TunnelParams {
            config: TunnelConfig::default(),
            key: TunnelKey {
                local: alice.into(),
                peer: bot.record.jid.clone(),
            },
            creds: BotCredentials::new(BotIdentity::generate("alice@example.net").unwrap())
                .unwrap(),
            policy: PeerPolicy::default(),
            id_prefix: "alice-".into(),
        },
        &start,
        offer.as_ref(),
    )
    .unwrap();
    let mut got = None;
    exchange_until(&mut peer, &bot, &mut rx, async |peer: &mut Tunnel| {
        while let Some(ev) = peer.poll_event() {
            if let Event::Stanza(s) = ev {
                got = Some(s);
            }
        }
        let message = store.message(&bot.record.jid, "msg_1").await.unwrap();
        got.is_some() && message.unwrap().status == MessageStatus::Acknowledged
    })
    .await;
    let got = got.expect("the message arrived through the tunnel");
    assert_eq!(got.get_child("body", ns::CLIENT).unwrap().text(), "sunny");
    assert_eq!(got.attr("from"), Some(bot.record.jid.as_str()));
    let record = store
        .message(&bot.record.jid, "msg_1")
        .await
        .unwrap()
        .unwrap();
    let history: Vec<&str> = record
        .history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["accepted", "opening", "sent", "acknowledged"]);
    assert!(record.tunnel_id.is_some());
    // The driver settles the message, then commits its event with the next batch: wait
    // for the event rather than read the log the instant the status changed.
    event_where(&bot, &store, |e| {
        e.kind == "delivery.status" && e.data["status"] == "acknowledged"
    })
    .await;
    let kinds: Vec<String> = store
        .read_events(&bot.record.jid, 0, 100, false)
        .await
        .unwrap()
        .into_iter()
        .map(|e| format!("{}:{}", e.kind, e.data["status"].as_str().unwrap_or("")))
        .collect();
    assert!(
        kinds.contains(&"delivery.status:no_xtls_support".to_owned()),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"delivery.status:acknowledged".to_owned()),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"tunnel.established:".to_owned()),
        "{kinds:?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_changed_peer_key_raises_the_event_the_metric_and_the_message_status() {
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    bots.shared().link_up.store(true, Ordering::Relaxed);
    let bot = api_bot(&bots).await;
    let store = bots.shared().store.clone();
    // First use pins the key of alice@example.net/phone.
    let _phone = open_peer(&bot, &mut rx).await;
    let pinned = store
        .pins(&bot.record.jid, "alice@example.net")
        .await
        .unwrap();
    assert_eq!(pinned.len(), 1);

    // The bot writes to her laptop, which answers its start with another key.
    let laptop = "alice@example.net/laptop";
    let m = OutMsg {
        id: "msg_1".into(),
        to: laptop.into(),
        stanza: xtls::stanza::chat_message("sunny", "chat"),
        reopen: false,
    };
    store
        .insert_message(&bot.record.jid, &m, None)
        .await
        .unwrap();
    let submitting = tokio::spawn({
        let bot = bot.clone();
        async move { bot.submit(m).await }
    });
    let disco = recv(&mut rx).await;
    bot.try_deliver(disco_answer(&disco, true)).unwrap();
    assert_eq!(
        submitting.await.unwrap().unwrap().status,
        MessageStatus::Opening
    );
    let start = Iq::parse(&recv(&mut rx).await).unwrap();
    let Ok(XtlsElement::Start { offer }) = classify_request(&start) else {
        panic!("a start follows the disco answer")
    };
    let new_key = BotIdentity::generate("alice@example.net").unwrap();
    let presented = new_key.info.fingerprints.spki_sha256.clone();
    let mut peer = Tunnel::accept(
        std::time::Instant::now(),
        TunnelParams {
            config: TunnelConfig::default(),
            key: TunnelKey {
                local: laptop.into(),
                peer: bot.record.jid.clone(),
            },
            creds: BotCredentials::new(new_key).unwrap(),
            policy: PeerPolicy::default(),
            id_prefix: "laptop-".into(),
        },
        &start,
        offer.as_ref(),
    )
    .unwrap();
    exchange_until(&mut peer, &bot, &mut rx, async |_: &mut Tunnel| {
        let message = store.message(&bot.record.jid, "msg_1").await.unwrap();
        message.unwrap().status == MessageStatus::IdentityChanged
    })
    .await;
    assert_eq!(bots.shared().metrics.identity_changes.get(), 1);
    // The status is settled before the batch holding the event commits: wait for it.
    let changed = event_where(&bot, &store, |e| e.kind == "peer.identity_changed").await;
    assert_eq!(changed.data["peer"], "alice@example.net");
    assert_eq!(changed.data["presented_spki_sha256"], presented.to_string());
    assert_eq!(
        changed.data["pinned_spki_sha256"],
        serde_json::json!([pinned[0].to_string()])
    );
    // The changed key was not pinned beside the old one.
    assert_eq!(
        store
            .pins(&bot.record.jid, "alice@example.net")
            .await
            .unwrap(),
        pinned
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn two_first_handshakes_of_one_peer_pin_one_key_and_the_other_is_a_changed_key() {
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    bots.shared().link_up.store(true, Ordering::Relaxed);
    let bot = api_bot(&bots).await;
    let store = bots.shared().store.clone();
    // Two devices of alice, each with its own key, start before either handshake ends: both
    // begin with no pin, so both are first use until one of them is stored.
    let device = |resource: &str| {
        Tunnel::initiate(
            std::time::Instant::now(),
            TunnelParams {
                config: TunnelConfig::default(),
                key: TunnelKey {
                    local: format!("alice@example.net/{resource}"),
                    peer: bot.record.jid.clone(),
                },
                creds: BotCredentials::new(BotIdentity::generate("alice@example.net").unwrap())
                    .unwrap(),
                policy: PeerPolicy::default(),
                id_prefix: format!("{resource}-"),
            },
        )
    };
    let mut peers = [device("phone"), device("laptop")];
    let mut changed = None;
    for _ in 0..400 {
        for peer in &mut peers {
            while let Some(el) = peer.poll_transmit() {
                bot.try_deliver(el).unwrap();
            }
        }
        changed = store
            .read_events(&bot.record.jid, 0, 1000, false)
            .await
            .unwrap()
            .into_iter()
            .find(|e| e.kind == "peer.identity_changed");
        if changed.is_some() {
            break;
        }
        let Ok(Some(el)) = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await else {
            continue;
        };
        let to = el.attr("to").unwrap_or_default().to_owned();
        let peer = peers
            .iter_mut()
            .find(|p| p.key().local == to)
            .expect("the bot writes to one of the devices");
        peer.handle_iq(std::time::Instant::now(), &Iq::parse(&el).unwrap());
    }
    let changed = changed.expect("the second key is reported as a changed key");
    let pinned = store
        .pins(&bot.record.jid, "alice@example.net")
        .await
        .unwrap();
    assert_eq!(pinned.len(), 1, "one key pinned, not both");
    assert_eq!(
        changed.data["pinned_spki_sha256"],
        serde_json::json!([pinned[0].to_string()])
    );
    assert_ne!(changed.data["presented_spki_sha256"], pinned[0].to_string());
    assert_eq!(bots.shared().metrics.identity_changes.get(), 1);
    let audit = store.audit_log(Some(&bot.record.jid), 10).await.unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0].spki_sha256, Some(pinned[0].to_string()));
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn crossing_starts_get_conflict_or_proceed_even_past_the_start_rate() {
    // One start per peer and minute: the peer's own first start uses it up.
    let limits = LimitsConfig {
        start_burst_per_peer: 1,
        starts_per_peer_per_minute: 1,
        ..LimitsConfig::default()
    };
    let (bots, mut rx, dir) = table(limits).await;
    bots.shared().link_up.store(true, Ordering::Relaxed);
    let bot = api_bot(&bots).await;
    let start_to_bot = |from: &str, id: &str| -> Element {
        format!(
            "<iq xmlns='jabber:client' type='set' id='{id}' from='{from}' to='{}'>\
             <start xmlns='urn:xmpp:tmp:xtls'/></iq>",
            bot.record.jid
        )
        .parse()
        .unwrap()
    };
    // The tie-break (spec §1.14): the JID that sorts first wins. Against alice the bot's JID
    // sorts last, so it gives way (proceed); against zed it wins (conflict).
    for (peer, other, answer) in [
        (
            "alice@example.net/laptop",
            "alice@example.net/phone",
            "result",
        ),
        ("zed@example.net/laptop", "zed@example.net/phone", "error"),
    ] {
        bot.try_deliver(start_to_bot(other, "own")).unwrap();
        assert_eq!(
            next(&mut rx).await.type_,
            IqType::Result,
            "{other}'s own start"
        );
        bot.try_deliver(start_to_bot(other, "flood")).unwrap();
        let refused = next(&mut rx).await;
        assert_eq!(
            refused.error_condition(),
            "resource-constraint",
            "the rate holds"
        );

        // The bot opens a tunnel to another resource; its start crosses the peer's.
        let opening = tokio::spawn({
            let (bot, peer) = (bot.clone(), peer.to_owned());
            async move { bot.open(peer).await }
        });
        let disco = recv(&mut rx).await;
        bot.try_deliver(disco_answer(&disco, true)).unwrap();
        assert_eq!(
            opening.await.unwrap().unwrap().status,
            MessageStatus::Opening
        );
        let ours = recv(&mut rx).await;
        assert!(ours.has_child("start", ns::XTLS), "{ours:?}");
        bot.try_deliver(start_to_bot(peer, "crossing")).unwrap();
        let theirs = next(&mut rx).await;
        assert_eq!(
            (theirs.id.as_str(), theirs.type_.as_str()),
            ("crossing", answer)
        );
        if answer == "error" {
            assert_eq!(theirs.error_condition(), "conflict");
        } else {
            assert!(theirs.children[0].is("proceed", ns::XTLS), "{theirs:?}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_close_then_a_start_in_one_batch_end_the_old_tunnel_before_the_new_one() {
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    let bot = api_bot(&bots).await;
    let _peer = open_peer(&bot, &mut rx).await;
    let old = bots.shared().table.snapshot()[0].id.clone();
    let iq = |id: &str, payload: &str| -> Element {
        format!(
            "<iq xmlns='jabber:client' type='set' id='{id}' from='alice@example.net/phone' to='{}'>{payload}</iq>",
            bot.record.jid
        )
        .parse()
        .unwrap()
    };
    // Both queued before the driver runs again: it handles them in one batch.
    bot.try_deliver(iq("c1", "<close xmlns='urn:xmpp:tmp:xtls'/>"))
        .unwrap();
    bot.try_deliver(iq("s2", "<start xmlns='urn:xmpp:tmp:xtls'/>"))
        .unwrap();
    let closed = next(&mut rx).await;
    assert_eq!(closed.id, "c1");
    assert!(closed.children[0].is("closed", ns::XTLS), "{closed:?}");
    let proceed = next(&mut rx).await;
    assert_eq!((proceed.id.as_str(), proceed.type_), ("s2", IqType::Result));
    // The old tunnel is history with its reason; only the new one is live.
    let live = bots.shared().table.snapshot();
    assert_eq!(live.len(), 1);
    assert_ne!(live[0].id, old);
    let row = bots.shared().store.tunnel(&old).await.unwrap().unwrap();
    assert_eq!(row.state, State::Closed);
    assert_eq!(row.close_reason.as_deref(), Some("peer_close"));
    event_where(&bot, &bots.shared().store, |e| {
        e.kind == "tunnel.closed" && e.tunnel_id.as_ref() == Some(&old)
    })
    .await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_tunnel_request_refused_for_a_full_queue_ends_the_tunnel_at_once() {
    let limits = LimitsConfig {
        bot_queue: 4,
        ..LimitsConfig::default()
    };
    let (bots, mut rx, dir) = table(limits).await;
    let bot = api_bot(&bots).await;
    let _peer = open_peer(&bot, &mut rx).await;
    let tunnel = bots.shared().table.snapshot()[0].id.clone();
    // Fill the bot's queue while its driver cannot run (this test holds the only thread).
    let mut queued = 0;
    loop {
        let query: Element = format!(
            "<iq xmlns='jabber:client' type='get' id='q{queued}' from='carol@example.net/x' to='{}'>\
             <query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
            bot.record.jid
        )
        .parse()
        .unwrap();
        if bot.try_deliver(query).is_err() {
            break;
        }
        queued += 1;
    }
    assert_eq!(queued, 4);
    let data: Element = format!(
        "<iq xmlns='jabber:client' type='set' id='d1' from='alice@example.net/phone' to='{}'>\
         <data xmlns='urn:xmpp:tmp:xtls'>FwMDAAEA</data></iq>",
        bot.record.jid
    )
    .parse()
    .unwrap();
    // What the router does with it: the queue is full, so it answers resource-constraint
    // and tells the bot which tunnel it refused.
    assert!(matches!(
        bot.try_deliver(data.clone()),
        Err(mpsc::error::TrySendError::Full(_))
    ));
    bot.tunnel_refused(&data);
    // The peer now holds the tunnel for gone (spec §1.11): so does the bot, at once.
    let closed = event_where(&bot, &bots.shared().store, |e| {
        e.kind == "tunnel.closed" && e.tunnel_id.as_ref() == Some(&tunnel)
    })
    .await;
    assert_eq!(closed.data["code"], "overloaded");
    assert!(bots.shared().table.snapshot().is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn messages_in_clear_reach_the_bot_marked_or_are_refused_by_policy() {
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    let store = bots.shared().store.clone();
    let open = api_bot(&bots).await;
    let strict = bots
        .create(NewBot {
            localpart: "strict".into(),
            handler: Handler::Api,
            peer_auth: PeerAuth::Required,
            trust: BotTrust::Tofu,
            encrypted_only: true,
        })
        .await
        .unwrap();
    let clear = |to: &str| -> Element {
        format!(
            "<message xmlns='jabber:client' type='chat' id='c1' from='alice@example.net/phone' to='{to}'>\
             <body>in clear</body></message>"
        )
        .parse()
        .unwrap()
    };
    // Spec §1.9 rule 8: delivered, marked as sent in clear.
    open.try_deliver(clear(&open.record.jid)).unwrap();
    let event = event_where(&open, &store, |e| e.kind == "message.received").await;
    assert_eq!(event.data["encrypted"], false);
    assert_eq!(event.data["body"], "in clear");
    assert_eq!(event.data["identity"], serde_json::Value::Null);
    assert_eq!(event.tunnel_id, None);
    assert_eq!(event.peer.as_deref(), Some("alice@example.net/phone"));

    // encrypted_only: refused with an error that says how to get through.
    strict.try_deliver(clear(&strict.record.jid)).unwrap();
    let refused = recv(&mut rx).await;
    assert_eq!(
        (refused.name(), refused.attr("id"), refused.attr("type")),
        ("message", Some("c1"), Some("error"))
    );
    let error = refused.get_child("error", ns::CLIENT).unwrap();
    assert!(
        error.has_child("policy-violation", ns::STANZAS),
        "{refused:?}"
    );
    assert_eq!(error.attr("type"), Some("modify"));
    assert!(xtls::xml::to_bytes(error).windows(4).any(|w| w == b"XTLS"));
    // Events are committed before the step's stanzas are written: none was logged.
    let events = store
        .read_events(&strict.record.jid, 0, 100, false)
        .await
        .unwrap();
    assert!(events.is_empty(), "{events:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn after_a_reconnect_the_bot_announces_itself_before_the_paced_closes() {
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    bots.broadcast_link(true).await;
    let bot = api_bot(&bots).await;
    let _peer = open_peer(&bot, &mut rx).await;
    // A peer that only said it is available is told too.
    let available: Element = format!(
        "<presence xmlns='jabber:client' from='carol@example.net/tablet' to='{}'/>",
        bot.record.jid
    )
    .parse()
    .unwrap();
    bot.try_deliver(available).unwrap();
    nothing_more_before_a_barrier(&bot, &mut rx).await;

    bots.broadcast_link(false).await;
    bots.broadcast_link(true).await;
    let mut presences = Vec::new();
    let close = loop {
        let el = recv(&mut rx).await;
        if el.name() == "presence" {
            assert_eq!(el.attr("type"), None, "available: {el:?}");
            assert_eq!(el.attr("from"), Some(bot.record.jid.as_str()));
            presences.push(el.attr("to").unwrap().to_owned());
        } else {
            break el;
        }
    };
    presences.sort();
    assert_eq!(presences, ["alice@example.net", "carol@example.net"]);
    assert!(
        close.has_child("close", ns::XTLS),
        "then the close: {close:?}"
    );
    assert_eq!(close.attr("to"), Some("alice@example.net/phone"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_bots_inner_iq_left_unanswered_when_the_tunnel_closes_fails_locally() {
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    bots.broadcast_link(true).await;
    let bot = api_bot(&bots).await;
    let store = bots.shared().store.clone();
    let mut peer = open_peer(&bot, &mut rx).await;
    let ask = |id: &str| OutMsg {
        id: id.into(),
        to: "alice@example.net/phone".into(),
        stanza:
            "<iq xmlns='jabber:client' type='get' id='q1'><query xmlns='jabber:iq:version'/></iq>"
                .parse()
                .unwrap(),
        reopen: false,
    };
    let m = ask("msg_q");
    store
        .insert_message(&bot.record.jid, &m, None)
        .await
        .unwrap();
    assert_eq!(bot.submit(m).await.unwrap().status, MessageStatus::Sent);
    // The peer takes the request and closes without answering it.
    exchange_until(&mut peer, &bot, &mut rx, async |peer: &mut Tunnel| {
        let mut asked = false;
        while let Some(ev) = peer.poll_event() {
            asked |= matches!(&ev, Event::Stanza(s) if s.attr("id") == Some("q1"));
        }
        asked
    })
    .await;
    peer.close(std::time::Instant::now());
    exchange_until(&mut peer, &bot, &mut rx, async |peer: &mut Tunnel| {
        while peer.poll_event().is_some() {}
        peer.is_gone()
    })
    .await;
    let local = event_where(&bot, &store, |e| {
        e.kind == "iq.received" && e.data["local"] == true
    })
    .await;
    let xml = local.data["stanza"].as_str().unwrap();
    assert!(
        xml.contains("id='q1'") && xml.contains("recipient-unavailable"),
        "{xml}"
    );
    assert_eq!(local.peer.as_deref(), Some("alice@example.net/phone"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn stopping_closes_tunnels_with_close_notify_then_close() {
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    let bot = api_bot(&bots).await;
    let mut peer = open_peer(&bot, &mut rx).await;
    let stopped = tokio::spawn({
        let bot = bot.clone();
        async move { bot.stop(CloseReason::Shutdown).await }
    });
    let mut saw_close = false;
    let mut data_before_close = false;
    let mut closed = None;
    for _ in 0..50 {
        while let Some(el) = peer.poll_transmit() {
            bot.try_deliver(el).unwrap();
        }
        while let Some(ev) = peer.poll_event() {
            if let Event::Closed(reason) = ev {
                closed = Some(reason);
            }
        }
        if closed.is_some() {
            break;
        }
        let el = tokio::time::timeout(STUCK, rx.recv())
            .await
            .expect("the stopping driver closes the tunnel")
            .expect("channel open");
        saw_close |= el.has_child("close", ns::XTLS);
        data_before_close |= !saw_close && el.has_child("data", ns::XTLS);
        peer.handle_iq(std::time::Instant::now(), &Iq::parse(&el).unwrap());
    }
    while let Some(el) = peer.poll_transmit() {
        bot.try_deliver(el).unwrap();
    }
    assert!(saw_close, "the bot sent <close/>");
    assert!(
        data_before_close,
        "close_notify travelled in a data IQ before <close/>"
    );
    assert_eq!(
        closed,
        Some(CloseReason::PeerClosed),
        "the peer saw a graceful close (close_notify first, then <close/>)"
    );
    tokio::time::timeout(STUCK, stopped)
        .await
        .expect("the driver stops once its tunnels are closed")
        .unwrap();
    let events = bots
        .shared()
        .store
        .read_events(&bot.record.jid, 0, 100, false)
        .await
        .unwrap();
    let last = events.last().unwrap();
    assert_eq!(
        (last.kind.as_str(), last.data["code"].as_str()),
        ("tunnel.closed", Some("shutdown")),
        "the close was logged before the driver stopped"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// The fields of the bot's disco#info form (XEP-0128), by name.
async fn disco_fields(
    bot: &BotHandle,
    rx: &mut mpsc::Receiver<Element>,
) -> std::collections::HashMap<String, String> {
    bot.try_deliver(disco_query(bot, "disco", "alice@example.net/phone"))
        .unwrap();
    let answer = loop {
        let el = recv(rx).await;
        if el.attr("id") == Some("disco") {
            break el;
        }
    };
    let query = answer.get_child("query", ns::DISCO_INFO).unwrap();
    let form = query.get_child("x", "jabber:x:data").unwrap();
    form.children()
        .filter_map(|f| {
            let value = f.get_child("value", "jabber:x:data")?.text();
            Some((f.attr("var")?.to_owned(), value))
        })
        .collect()
}

#[tokio::test]
async fn a_rotation_is_announced_then_activated_and_tunnels_keep_working_across_it() {
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    bots.shared()
        .certificates
        .set(crate::config::CertificatesConfig {
            validity_days: 1,
            overlap_secs: 3600,
            ..Default::default()
        });
    let bot = api_bot(&bots).await;
    let store = bots.shared().store.clone();
    let first = bot.identity.clone();
    let prints = |id: &BotIdentity| id.info.fingerprints.clone();
    // Valid for a day, an hour of overlap: nothing is due.
    assert_eq!(bots.rotate_due().await.unwrap(), (0, 0));

    // Announced: shown in disco#info beside the active one, which new tunnels still get.
    let hour = Rotation {
        overlap: Duration::from_secs(3600),
        new_key: false,
    };
    let bot = bots
        .rotate(&bot.record.jid, hour, "admin")
        .await
        .unwrap()
        .unwrap();
    let next = bot.next.clone().expect("a next certificate is announced");
    assert_eq!(
        prints(&next.identity).spki_sha256,
        prints(&first).spki_sha256,
        "key kept"
    );
    assert_ne!(
        prints(&next.identity).cert_sha256,
        prints(&first).cert_sha256
    );
    let disco = disco_fields(&bot, &mut rx).await;
    assert_eq!(disco["cert-sha256"], prints(&first).cert_sha256.to_string());
    assert_eq!(
        disco["next-cert-sha256"],
        prints(&next.identity).cert_sha256.to_string()
    );
    assert_eq!(disco["next-active-at"], next.active_at);
    // A restart finds the rotation where it was.
    let (out, _restarted_rx) = mpsc::channel(64);
    let restarted = BotTable::load(shared_parts(
        store.clone(),
        super::Ownership::sole(),
        out,
        TunnelConfig::default(),
        LimitsConfig::default(),
    ))
    .await
    .unwrap();
    let reloaded = restarted.by_jid(&bot.record.jid).unwrap();
    assert_eq!(reloaded.identity.cert_der(), first.cert_der());
    let again = reloaded
        .next
        .clone()
        .expect("the announced certificate survives a restart");
    assert_eq!(again.identity.cert_der(), next.identity.cert_der());
    assert_eq!(again.active_at, next.active_at);
    restarted.stop_all().await;

    let mut peer = open_peer(&bot, &mut rx).await;
    let seen = peer.established().unwrap().peer.cert_der.clone();
    assert_eq!(seen.as_deref(), Some(first.cert_der().as_ref()));
    assert_eq!(
        bots.rotate_due().await.unwrap(),
        (0, 0),
        "the overlap has not ended"
    );

    // A rotation with no overlap (and a new key) replaces the announced one and is active at
    // once; the tunnel opened before keeps its certificate and keeps working.
    let now = Rotation {
        overlap: Duration::ZERO,
        new_key: true,
    };
    let bot = bots
        .rotate(&bot.record.jid, now, "admin")
        .await
        .unwrap()
        .unwrap();
    assert!(bot.next.is_none());
    assert_ne!(
        prints(&bot.identity).spki_sha256,
        prints(&first).spki_sha256
    );
    assert_eq!(bot.fingerprints, prints(&bot.identity));
    let disco = disco_fields(&bot, &mut rx).await;
    assert_eq!(
        disco["spki-sha256"],
        prints(&bot.identity).spki_sha256.to_string()
    );
    assert!(!disco.contains_key("next-cert-sha256"));
    let retired = store.retired_certificates(&bot.record.jid).await.unwrap();
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].cert_der, first.cert_der().to_vec());

    let message: Element =
        "<message xmlns='jabber:client' type='chat'><body>still here?</body></message>"
            .parse()
            .unwrap();
    peer.send(std::time::Instant::now(), message).unwrap();
    let store2 = store.clone();
    let jid = bot.record.jid.clone();
    exchange_until(&mut peer, &bot, &mut rx, async |_| {
        let events = store2.read_events(&jid, 0, 100, false).await.unwrap();
        events
            .iter()
            .any(|e| e.kind == "message.received" && e.data["body"] == "still here?")
    })
    .await;

    // An overlap longer than the validity left makes the new certificate due: rotated
    // automatically, with the key kept, active no later than the old one expires.
    bots.shared()
        .certificates
        .set(crate::config::CertificatesConfig {
            validity_days: 1,
            overlap_secs: 2 * 86400,
            ..Default::default()
        });
    assert_eq!(bots.rotate_due().await.unwrap(), (0, 1));
    let bot = bots.by_jid(&bot.record.jid).unwrap();
    let next = bot.next.clone().expect("rotated automatically");
    assert_eq!(
        prints(&next.identity).spki_sha256,
        bot.fingerprints.spki_sha256
    );
    assert!(
        next.active_at <= bot.identity.info.not_after,
        "{} > {}",
        next.active_at,
        bot.identity.info.not_after
    );
    assert_eq!(
        bots.rotate_due().await.unwrap(),
        (0, 0),
        "once, not at every check"
    );
    let audit = store.audit_log(Some(&bot.record.jid), 10).await.unwrap();
    let actors: Vec<_> = audit
        .iter()
        .map(|e| (e.action.as_str(), e.actor.as_str()))
        .filter(|(action, _)| action.starts_with("certificate_"))
        .collect();
    assert_eq!(
        actors,
        [
            ("certificate_rotated", "component"),
            ("certificate_activated", "admin"),
            ("certificate_rotated", "admin"),
            ("certificate_rotated", "admin"),
        ]
    );

    // An overlap that ends: the check activates the announcement then, and only then.
    let second = Rotation {
        overlap: Duration::from_secs(1),
        new_key: false,
    };
    let bot = bots
        .rotate(&bot.record.jid, second, "admin")
        .await
        .unwrap()
        .unwrap();
    let next = bot.next.clone().unwrap();
    let active_at = time::OffsetDateTime::parse(
        &next.active_at,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    while time::OffsetDateTime::now_utc() <= active_at {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bots.rotate_due().await.unwrap(), (1, 0));
    let bot = bots.by_jid(&bot.record.jid).unwrap();
    assert_eq!(bot.identity.cert_der(), next.identity.cert_der());
    assert!(bot.next.is_none());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Moves stanzas until the peer's engine reports an inner stanza; returns it.
async fn peer_receives(
    peer: &mut Tunnel,
    bot: &BotHandle,
    rx: &mut mpsc::Receiver<Element>,
) -> Element {
    let mut got = None;
    exchange_until(peer, bot, rx, async |peer| {
        while let Some(event) = peer.poll_event() {
            if let Event::Stanza(stanza) = event {
                got = Some(stanza);
                return true;
            }
        }
        false
    })
    .await;
    got.expect("a stanza")
}

/// The peer's exporter output for a SAS context, as its code.
fn peer_code(peer: &Tunnel, context: &[u8]) -> xtls::sas::SasCode {
    let mut out = [0u8; xtls::sas::EXPORT_LEN];
    peer.export_keying_material(&mut out, xtls::sas::EXPORTER_LABEL, context)
        .unwrap();
    xtls::sas::SasCode::from_export(&out)
}

/// An inner IQ set from the peer carrying one payload.
fn inner_set(id: &str, payload: Element) -> Element {
    let mut iq: Element = format!("<iq xmlns='jabber:client' type='set' id='{id}'/>")
        .parse()
        .unwrap();
    iq.append_child(payload);
    iq
}

#[tokio::test]
async fn a_short_authentication_string_matches_on_both_ends_and_confirming_verifies_the_key() {
    use crate::store::{SasSide, SasState};
    use xtls::sas::{Answerer, Committer, SasMessage};
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    let bot = api_bot(&bots).await;
    let store = bots.shared().store.clone();
    let mut peer = open_peer(&bot, &mut rx).await;
    let id = bots.shared().table.snapshot()[0].id.clone();
    let status = || bots.shared().table.get(&id).unwrap().sas.unwrap();
    let now = std::time::Instant::now;

    // The peer starts: it commits, the bot answers with its nonce, the peer reveals.
    let (mut committer, commit) = Committer::start(rand::random());
    peer.send(now(), inner_set("c1", commit.to_element()))
        .unwrap();
    let answer = peer_receives(&mut peer, &bot, &mut rx).await;
    assert_eq!(
        (answer.attr("type"), answer.attr("id")),
        (Some("result"), Some("c1"))
    );
    let nonce = SasMessage::parse(answer.children().next().unwrap())
        .unwrap()
        .unwrap();
    let (reveal, context) = committer.on_nonce(nonce).unwrap();
    assert_eq!(status().state, SasState::Exchanging);
    peer.send(now(), inner_set("r1", reveal.to_element()))
        .unwrap();
    let ack = peer_receives(&mut peer, &bot, &mut rx).await;
    assert_eq!(
        (ack.attr("type"), ack.attr("id")),
        (Some("result"), Some("r1"))
    );
    let ours = peer_code(&peer, &context);
    let shown = status();
    assert_eq!(
        (shown.state, shown.started_by),
        (SasState::Ready, SasSide::Peer)
    );
    assert_eq!(shown.sas28x5.as_deref(), Some(ours.sas28x5.as_str()));
    assert_eq!(shown.decimal.as_deref(), Some(ours.decimal.as_str()));

    // Confirmed: the key is verified, the decision audited with the code.
    let wrong = SasRequest::Confirm {
        actor: "admin".into(),
        code: Some("aaaaa".into()),
    };
    assert_eq!(bots.sas(&id, wrong).await, Err(SasRefusal::WrongCode));
    let confirm = SasRequest::Confirm {
        actor: "admin".into(),
        code: Some(ours.decimal.clone()),
    };
    assert_eq!(
        bots.sas(&id, confirm).await.unwrap().state,
        SasState::Confirmed
    );
    let pins = store
        .peer_pins(&bot.record.jid, "alice@example.net")
        .await
        .unwrap();
    assert!(pins[0].verified, "{pins:?}");
    assert_eq!(
        pins[0].compared.as_deref(),
        Some(format!("sas:{}", ours.sas28x5).as_str())
    );
    let again = SasRequest::Confirm {
        actor: "admin".into(),
        code: None,
    };
    assert!(matches!(
        bots.sas(&id, again).await,
        Err(SasRefusal::Conflict(_))
    ));

    // The bot starts: the peer answers, the bot reveals; the peer checks the commitment.
    assert_eq!(
        bots.sas(&id, SasRequest::Start).await.unwrap().state,
        SasState::Exchanging
    );
    let commit = peer_receives(&mut peer, &bot, &mut rx).await;
    let iq = xtls::stanza::Iq::parse(&commit).unwrap();
    let message = SasMessage::parse(&iq.children[0]).unwrap().unwrap();
    let (answerer, nonce) = Answerer::on_commit(message, rand::random()).unwrap();
    peer.send(now(), iq.result(Some(nonce.to_element())))
        .unwrap();
    let reveal = peer_receives(&mut peer, &bot, &mut rx).await;
    let iq = xtls::stanza::Iq::parse(&reveal).unwrap();
    let context = answerer
        .on_reveal(SasMessage::parse(&iq.children[0]).unwrap().unwrap())
        .unwrap();
    peer.send(now(), iq.result(None)).unwrap();
    let shown = status();
    assert_eq!(
        (shown.state, shown.started_by),
        (SasState::Ready, SasSide::Bot)
    );
    assert_eq!(shown.sas28x5, Some(peer_code(&peer, &context).sas28x5));
    // None of the exchange reached the bot's backend as a stanza; each step is an event.
    let events = store
        .read_events(&bot.record.jid, 0, 100, false)
        .await
        .unwrap();
    assert!(
        !events.iter().any(|e| e.kind == "iq.received"),
        "{events:?}"
    );
    let sas_events: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "tunnel.sas")
        .map(|e| e.data["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        sas_events,
        ["exchanging", "ready", "confirmed", "exchanging", "ready"]
    );

    // A revealed nonce that does not match its commitment: refused, and the exchange failed.
    let (_, commit) = Committer::start([1; 32]);
    peer.send(now(), inner_set("c2", commit.to_element()))
        .unwrap();
    peer_receives(&mut peer, &bot, &mut rx).await;
    peer.send(
        now(),
        inner_set("r2", SasMessage::Reveal([2; 32]).to_element()),
    )
    .unwrap();
    let refused = peer_receives(&mut peer, &bot, &mut rx).await;
    let iq = xtls::stanza::Iq::parse(&refused).unwrap();
    assert_eq!(iq.error_condition(), "not-acceptable");
    let shown = status();
    assert_eq!(
        (shown.state, shown.started_by),
        (SasState::Failed, SasSide::Peer)
    );
    assert!(shown.error.unwrap().contains("commitment"));
    let reject = SasRequest::Reject {
        actor: "admin".into(),
    };
    assert!(
        matches!(bots.sas(&id, reject).await, Err(SasRefusal::Conflict(_))),
        "nothing to decide on"
    );
    // An exchange the peer never answers does not block the next one.
    assert_eq!(
        bots.sas(&id, SasRequest::Start).await.unwrap().state,
        SasState::Exchanging
    );
    assert_eq!(
        bots.sas(&id, SasRequest::Start).await.unwrap().state,
        SasState::Exchanging
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_pairing_code_admits_a_key_the_bot_would_refuse_and_a_wrong_one_closes_the_tunnel() {
    use xtls::pair::{CHANNEL_BINDING_LABEL, Claimant, PairMessage};
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    let bot = new_bot(&bots, "vault", Handler::Api, BotTrust::Manual).await;
    let store = bots.shared().store.clone();
    let pairings = &bots.shared().pairings;
    let minted = pairings.mint(
        &bot.record.jid,
        "alice@example.net",
        Duration::from_secs(600),
        "admin",
    );
    let now = std::time::Instant::now;

    // Admitted for pairing only: a message before pairing does not reach the bot.
    let mut peer = open_peer(&bot, &mut rx).await;
    let id = bots.shared().table.snapshot()[0].id.clone();
    let trust = || bots.shared().table.get(&id).unwrap().peer_identity.trust;
    assert_eq!(trust(), crate::store::PeerTrust::Pairing);
    let early: Element = "<message xmlns='jabber:client'><body>too early</body></message>"
        .parse()
        .unwrap();
    peer.send(now(), early).unwrap();
    // What the bot sends meanwhile waits: never into a tunnel whose key is not trusted yet.
    let waiting = OutMsg {
        id: "msg_paired".into(),
        to: "alice@example.net/phone".into(),
        stanza: xtls::stanza::chat_message("for alice only", "chat"),
        reopen: false,
    };
    store
        .insert_message(&bot.record.jid, &waiting, None)
        .await
        .unwrap();
    let submitted = bot.submit(waiting).await.unwrap();
    assert_eq!(submitted.status, MessageStatus::Queued, "{submitted:?}");

    let (claimant, pake) = Claimant::start(
        &minted.code.to_lowercase(),
        "alice@example.net",
        &bot.record.jid,
    );
    peer.send(now(), inner_set("p1", pake.to_element()))
        .unwrap();
    let answer = peer_receives(&mut peer, &bot, &mut rx).await;
    assert_eq!(
        (answer.attr("type"), answer.attr("id")),
        (Some("result"), Some("p1"))
    );
    let theirs = PairMessage::parse(answer.children().next().unwrap())
        .unwrap()
        .unwrap();
    let mut cb = [0u8; 32];
    peer.export_keying_material(&mut cb, CHANNEL_BINDING_LABEL, b"")
        .unwrap();
    let (claimed, confirm) = claimant.on_pake(theirs, &cb).unwrap();
    peer.send(now(), inner_set("p2", confirm.to_element()))
        .unwrap();
    let answer = peer_receives(&mut peer, &bot, &mut rx).await;
    assert_eq!(
        (answer.attr("type"), answer.attr("id")),
        (Some("result"), Some("p2"))
    );
    let theirs = PairMessage::parse(answer.children().next().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        claimed.on_confirm(theirs),
        Ok(()),
        "the bot proved it knows the code"
    );
    // Paired: what waited goes now.
    let delivered = peer_receives(&mut peer, &bot, &mut rx).await;
    let body = delivered.get_child("body", ns::CLIENT).map(Element::text);
    assert_eq!(body.as_deref(), Some("for alice only"));
    assert_eq!(trust(), crate::store::PeerTrust::Pinned);
    let pins = store
        .peer_pins(&bot.record.jid, "alice@example.net")
        .await
        .unwrap();
    assert!(
        pins[0].verified && pins[0].compared.as_deref() == Some("pairing"),
        "{pins:?}"
    );
    assert!(
        !pairings.waiting(&bot.record.jid, "alice@example.net"),
        "spent"
    );

    // Paired: the tunnel carries the bot's stanzas now; the early one never reached it.
    let message: Element = "<message xmlns='jabber:client'><body>paired</body></message>"
        .parse()
        .unwrap();
    peer.send(now(), message).unwrap();
    let jid = bot.record.jid.clone();
    exchange_until(&mut peer, &bot, &mut rx, async |_| {
        let events = store.read_events(&jid, 0, 100, false).await.unwrap();
        events.iter().any(|e| e.kind == "message.received")
    })
    .await;
    let events = store.read_events(&jid, 0, 100, false).await.unwrap();
    let bodies: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "message.received")
        .map(|e| e.data["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["paired"]);

    // A wrong code: refused, the tunnel closed, nothing pinned, one attempt fewer.
    pairings.mint(
        &bot.record.jid,
        "carol@example.net",
        Duration::from_secs(600),
        "admin",
    );
    let mut carol = open_peer_as("carol@example.net/laptop", &bot, &mut rx).await;
    let (claimant, pake) = Claimant::start("00000-00000", "carol@example.net", &bot.record.jid);
    carol
        .send(now(), inner_set("w1", pake.to_element()))
        .unwrap();
    let answer = peer_receives(&mut carol, &bot, &mut rx).await;
    let theirs = PairMessage::parse(answer.children().next().unwrap())
        .unwrap()
        .unwrap();
    carol
        .export_keying_material(&mut cb, CHANNEL_BINDING_LABEL, b"")
        .unwrap();
    let (_, confirm) = claimant.on_pake(theirs, &cb).unwrap();
    carol
        .send(now(), inner_set("w2", confirm.to_element()))
        .unwrap();
    let refused = peer_receives(&mut carol, &bot, &mut rx).await;
    assert_eq!(
        xtls::stanza::Iq::parse(&refused).unwrap().error_condition(),
        "not-authorized"
    );
    exchange_until(&mut carol, &bot, &mut rx, async |carol| {
        carol.is_gone() || carol.state() == State::Closing
    })
    .await;
    assert!(
        store
            .peer_pins(&bot.record.jid, "carol@example.net")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        pairings.waiting(&bot.record.jid, "carol@example.net"),
        "two attempts left"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_echo_leaves_just_before_the_acknowledgement_of_what_it_answers() {
    // Through a server that leaves Nagle on, a bare `result` followed by a separate `data`
    // stalls the peer's client for its delayed ACK: the echo must not wait for the ack of
    // the previous echo, it leaves just before the result (Tunnel::poll_transmit).
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    let bot = new_bot(&bots, "echo", Handler::Echo, BotTrust::Tofu).await;
    let mut peer = open_peer(&bot, &mut rx).await;
    let now = std::time::Instant::now;
    let mut unacked_echoes = Vec::new();
    for n in 1..=3 {
        let id = peer_sends(&mut peer, &bot, &format!("m{n}"));
        // At once the echo, then the result: the previous echoes are still unacknowledged.
        let echo = recv(&mut rx).await;
        assert!(echo.has_child("data", ns::XTLS), "m{n}: {echo:?}");
        let result = recv(&mut rx).await;
        assert_eq!(
            (result.attr("id"), result.attr("type")),
            (Some(id.as_str()), Some("result"))
        );
        peer.handle_iq(now(), &Iq::parse(&result).unwrap());
        unacked_echoes.push(echo);
    }
    // The peer reads every echo, in order, once it takes them.
    for echo in &unacked_echoes {
        peer.handle_iq(now(), &Iq::parse(echo).unwrap());
    }
    let bodies: Vec<String> = std::iter::from_fn(|| peer.poll_event())
        .filter_map(|e| match e {
            Event::Stanza(s) => s.get_child("body", ns::CLIENT).map(|b| b.text()),
            _ => None,
        })
        .collect();
    assert_eq!(bodies, ["m1", "m2", "m3"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_api_bots_result_waits_for_the_backends_reply_and_leaves_behind_it() {
    // An HTTP backend answers after the step that acknowledged the peer's `data`: the result
    // waits for that reply (tunnel.ack_hold_ms; long here, so nothing depends on timing),
    // and leaves just behind it.
    let tunnel = TunnelConfig {
        ack_hold: Duration::from_secs(30),
        ..TunnelConfig::default()
    };
    let (bots, mut rx, dir) = table_with(LimitsConfig::default(), tunnel).await;
    bots.shared().link_up.store(true, Ordering::Relaxed);
    let bot = api_bot(&bots).await;
    let store = bots.shared().store.clone();
    let mut peer = open_peer(&bot, &mut rx).await;
    let alice = "alice@example.net/phone";
    let data_id = peer_sends(&mut peer, &bot, "forecast?");
    event_where(&bot, &store, |e| e.kind == "message.received").await;
    nothing_more_before_a_barrier(&bot, &mut rx).await;

    let reply = OutMsg {
        id: "msg_reply".into(),
        to: alice.into(),
        stanza: xtls::stanza::chat_message("sunny", "chat"),
        reopen: false,
    };
    store
        .insert_message(&bot.record.jid, &reply, None)
        .await
        .unwrap();
    bot.submit(reply).await.expect("the driver answers");
    let first = recv(&mut rx).await;
    assert!(
        first.has_child("data", ns::XTLS),
        "the reply first: {first:?}"
    );
    let second = recv(&mut rx).await;
    assert_eq!(
        (second.attr("id"), second.attr("type")),
        (Some(data_id.as_str()), Some("result"))
    );
    peer.handle_iq(std::time::Instant::now(), &Iq::parse(&first).unwrap());
    let bodies: Vec<String> = std::iter::from_fn(|| peer.poll_event())
        .filter_map(|e| match e {
            Event::Stanza(s) => s.get_child("body", ns::CLIENT).map(|b| b.text()),
            _ => None,
        })
        .collect();
    assert_eq!(bodies, ["sunny"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_idle_driver_parks_and_the_next_command_starts_it_again_as_the_bot_is_now() {
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    bots.shared().set_park_after(Duration::from_millis(100));
    let bot = new_bot(&bots, "echo", Handler::Echo, BotTrust::Tofu).await;
    let running = |bot: &BotHandle| bot.driver.is_running();
    assert!(!running(&bot), "a new bot starts no driver");

    bot.try_deliver(disco_query(&bot, "q1", "alice@example.net/phone"))
        .unwrap();
    assert_eq!(next(&mut rx).await.id, "q1");
    assert!(running(&bot));
    // The clear-text policy changes while it runs; it parks with it.
    bots.set_policy(
        &bot.record.jid,
        PolicyChange {
            encrypted_only: Some(true),
            trust: None,
        },
        "admin",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !running(&bot),
        "nothing to do for longer than park_after: parked"
    );

    // Woken by the next stanza (through the handle taken before the change), with the
    // policy it parked with: a message in clear is refused.
    let clear: Element = format!(
        "<message xmlns='jabber:client' id='m1' from='alice@example.net/phone' to='{}'><body>hi</body></message>",
        bot.record.jid
    )
    .parse()
    .unwrap();
    bot.try_deliver(clear).unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        refused.attr("type"),
        Some("error"),
        "{}",
        String::from(&refused)
    );
    assert!(running(&bot));

    // A live tunnel keeps its driver.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!running(&bot), "parked again");
    let peer = open_peer(&bot, &mut rx).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(running(&bot), "a driver with a tunnel does not park");
    assert_eq!(peer.state(), State::Open);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_route_probe_reports_whether_it_came_back() {
    let (bots, mut rx, dir) = table(LimitsConfig::default()).await;
    let shared = bots.shared().clone();
    assert_eq!(
        shared.probe_route("echo@bots.example.org").await,
        Err(RouteError::LinkDown)
    );
    shared.link_up.store(true, Ordering::Relaxed);

    // Came back: the router hands the probe over by its id.
    let probing = tokio::spawn({
        let shared = shared.clone();
        async move { shared.probe_route("echo@bots.example.org").await }
    });
    let probe = rx.recv().await.unwrap();
    assert_eq!(probe.attr("to"), Some("echo@bots.example.org"));
    assert_eq!(probe.attr("from"), Some("bots.example.org"));
    let id = crate::link::slot::route_probe_id(&probe, "bots.example.org")
        .unwrap()
        .to_owned();
    assert!(shared.routes.arrived(&id));
    assert!(probing.await.unwrap().unwrap().reaches_here);
    assert!(
        !shared.routes.arrived(&id),
        "each probe wakes its waiter once"
    );

    // Never came back: "not here" after the wait, and the entry is gone.
    let probing = tokio::spawn({
        let shared = shared.clone();
        async move { shared.probe_route("echo@bots.example.org").await }
    });
    let probe = rx.recv().await.unwrap();
    let id = crate::link::slot::route_probe_id(&probe, "bots.example.org")
        .unwrap()
        .to_owned();
    let route = probing.await.unwrap().unwrap();
    assert!(!route.reaches_here);
    assert!(route.waited >= ROUTE_WAIT);
    assert!(!shared.routes.arrived(&id), "a late probe reaches nobody");
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn with_a_shared_store_stanzas_wait_for_the_claim_and_a_refused_write_lets_the_bot_go() {
    let (dir, url) = temp_store("xtls-session-shared");
    let store = Store::open(&url).await.unwrap();
    let me = store.register_instance(None).await.unwrap();
    let (out, mut rx) = mpsc::channel(64);
    let shared = shared_parts(
        store.clone(),
        super::Ownership::shared(),
        out,
        TunnelConfig::default(),
        LimitsConfig::default(),
    );
    let bots = BotTable::load(shared).await.unwrap();
    let bot = new_bot(&bots, "echo", Handler::Echo, BotTrust::Tofu).await;
    let jid = bot.record.jid.clone();
    // Created here, probed: the instance the server routes it to claims it.
    let probe = rx.recv().await.unwrap();
    assert_eq!(
        (probe.name(), probe.attr("to")),
        ("message", Some(jid.as_str()))
    );
    let owners = &bots.shared().owners;
    assert!(!owners.holds(&jid));

    // A start for it waits, unanswered, until the claim is made and the bot taken over.
    let held = owners.admit(&jid, start("alice@example.net/a", "s1"));
    assert!(matches!(held, Admission::Held));
    assert!(rx.try_recv().is_err());
    let claimer = tokio::spawn(bots.clone().run_claims());
    let proceed = next(&mut rx).await;
    assert_eq!((proceed.type_, proceed.id.as_str()), (IqType::Result, "s1"));
    assert!(owners.holds(&jid));
    assert_eq!(
        owners.lease(&jid).unwrap().map(|l| (l.instance, l.epoch)),
        Some((me.clone(), 1))
    );

    // Another instance claims it: this one's next write is refused, and it lets the bot go.
    let other = Store::open(&url).await.unwrap();
    other.register_instance(None).await.unwrap();
    assert_eq!(other.claim_bot(&jid).await.unwrap().epoch, 2);
    let close: Element = "<iq xmlns='jabber:client' type='set' id='c1' from='alice@example.net/a' \
                          to='echo@bots.example.org'><close xmlns='urn:xmpp:tmp:xtls'/></iq>"
        .parse()
        .unwrap();
    let Admission::Deliver(close) = owners.admit(&jid, close) else {
        panic!("the bot runs here until a write is refused");
    };
    // The take-over replaced the handle made at creation (read again from the store).
    assert!(bot.try_deliver(close.clone()).is_err());
    let bot = bots.by_jid(&jid).unwrap();
    bot.try_deliver(close).unwrap();
    for _ in 0..100 {
        if !owners.holds(&jid) && !bot.driver.is_running() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!owners.holds(&jid), "the bot is let go");
    assert!(!bot.driver.is_running(), "its driver stopped");
    claimer.abort();
    std::fs::remove_dir_all(dir).ok();
}
