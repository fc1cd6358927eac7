//! The admin and bot API in process: `api::app(state)` called with `oneshot`, each test on a
//! fresh migrated store of each backend (a SQLite file, a PostgreSQL database), for every
//! route's success and problem cases. The bots' drivers
//! run for real; what they would write to the XMPP server is read from their outbound channel
//! and answered by the test. The Python suite (`tests/e2e/`) covers the same API over HTTP
//! through real servers.

#[path = "common/database.rs"]
#[macro_use]
mod database;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use minidom::Element;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt as _;

use xtls::stanza::{Iq, ns};
use xtls::tunnel::TunnelConfig;
use xtls_component::api::{AdminState, AdminToken, AllowedHosts, HttpLimits, app};
use xtls_component::config::{AdminConfig, EventsConfig, LimitsConfig, Secret, WebhooksConfig};
use xtls_component::link::LinkStatus;
use xtls_component::session::{BotTable, Shared};
use xtls_component::store::Store;

use database::TestDb;

const ADMIN: &str = "admin-token-for-tests";
const DOMAIN: &str = "bots.example.org";

/// One component's API over a fresh store, and what its bots send to the server.
struct Api {
    router: Router,
    bots: BotTable,
    out: mpsc::Receiver<Element>,
    link: watch::Sender<LinkStatus>,
    _db: TestDb,
}

/// An answer: status, headers, and the body as JSON (`Null` when empty or not JSON).
struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Api {
    async fn new(db: TestDb) -> Api {
        let store = Store::open(&db.url).await.unwrap();
        store
            .register_instance(Some("http://127.0.0.1:8347"))
            .await
            .unwrap();
        let (out_tx, out) = mpsc::channel(256);
        let shared = Shared::new(
            store,
            xtls_component::session::Ownership::sole(),
            out_tx,
            TunnelConfig::default(),
            LimitsConfig::default(),
            DOMAIN.into(),
            &EventsConfig::default(),
            WebhooksConfig::default(),
        );
        let bots = BotTable::load(shared).await.unwrap();
        let (link, link_rx) = watch::channel(LinkStatus::Up);
        bots.broadcast_link(true).await;
        let admin = AdminConfig::default();
        let state = AdminState {
            bots: bots.clone(),
            token: AdminToken::new(&Secret::new(ADMIN.to_owned())),
            link: link_rx,
            limits: Arc::new(HttpLimits::from(&admin)),
            allowed_hosts: Arc::new(AllowedHosts::new(&[], admin.listen)),
            cors_origins: Vec::new(),
        };
        Api {
            router: app(state),
            bots,
            out,
            link,
            _db: db,
        }
    }

    /// Sends a request with `Host: localhost` and, when given, a bearer token and a JSON body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        }
        .unwrap();
        self.send(request).await
    }

    async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.call(method, path, Some(ADMIN), body).await
    }

    /// Creates an `api` bot and returns its JID.
    async fn bot(&self, localpart: &str) -> String {
        let a = self
            .admin(
                Method::POST,
                "/v1/bots",
                Some(json!({ "localpart": localpart })),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        a.body["jid"].as_str().unwrap().to_owned()
    }

    /// The next stanza a bot writes to the server.
    async fn next_out(&mut self) -> Element {
        tokio::time::timeout(Duration::from_secs(10), self.out.recv())
            .await
            .expect("the bot writes to the server")
            .expect("the channel is open")
    }

    /// Answers the disco#info query a bot just sent, with or without the XTLS feature.
    async fn answer_disco(&mut self, bot: &str, xtls: bool) {
        let request = self.next_out().await;
        let iq = Iq::parse(&request).unwrap();
        assert!(iq.children[0].is("query", ns::DISCO_INFO), "{request:?}");
        let mut query = Element::bare("query", ns::DISCO_INFO);
        if xtls {
            query.append_child(
                Element::builder("feature", ns::DISCO_INFO)
                    .attr(xtls::stanza::name("var"), ns::XTLS)
                    .build(),
            );
        }
        let answer = iq.result(Some(query));
        self.bots.by_jid(bot).unwrap().try_deliver(answer).unwrap();
    }

    /// Proves the bot wrote nothing more so far: a disco#info query sent to it now must be
    /// answered by the very next stanza out (a bot's driver handles and writes in order).
    async fn nothing_more_from(&mut self, bot: &str) {
        let query: Element = format!(
            "<iq xmlns='jabber:client' type='get' id='barrier' from='barrier@example.net/x' to='{bot}'>\
             <query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
        )
        .parse()
        .unwrap();
        self.bots.by_jid(bot).unwrap().try_deliver(query).unwrap();
        let next = self.next_out().await;
        assert_eq!(
            (next.attr("id"), next.attr("type")),
            (Some("barrier"), Some("result")),
            "the bot wrote something first: {next:?}"
        );
    }

    /// Waits until `bot`'s log has committed at least `seq` events.
    async fn committed(&self, bot: &str, seq: u64) {
        let mut events = self.bots.by_jid(bot).unwrap().events.clone();
        tokio::time::timeout(Duration::from_secs(10), events.wait_for(|s| *s >= seq))
            .await
            .expect("the events are committed")
            .expect("the bot runs");
    }

    async fn close(self) {
        self.bots.stop_all().await;
        self.bots.shared().store.close().await;
    }
}

fn is_problem(a: &Answer, status: StatusCode) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(
        a.headers[header::CONTENT_TYPE],
        "application/problem+json",
        "{}",
        a.body
    );
    assert_eq!(a.body["status"], status.as_u16(), "{}", a.body);
    assert!(a.body["detail"].is_string(), "{}", a.body);
}

on_each_backend!(
    health_readiness_and_metrics,
    tokens_hosts_and_unknown_routes,
    bots_are_created_read_and_deleted,
    bot_tokens_reach_their_own_bot_only,
    peers_keys_are_managed_and_every_decision_is_audited,
    the_session_table_and_tunnels_opened_by_the_api,
    messages_events_and_their_problems,
    webhooks_and_deliveries,
    a_rotation_is_announced_then_active_and_the_old_certificate_retired,
);

async fn health_readiness_and_metrics(db: TestDb) {
    let api = Api::new(db).await;
    let a = api.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(
        (a.status, a.body.clone()),
        (StatusCode::OK, json!({"status": "ok"}))
    );

    let a = api.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["ready"], true);
    api.link
        .send(LinkStatus::Connecting(Some(
            "i/o: Connection refused".into(),
        )))
        .unwrap();
    let a = api.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.body["component"]["ok"], false);
    assert_eq!(a.body["component"]["problem"], "i/o: Connection refused");
    assert_eq!(a.body["store"]["ok"], true);

    // The instances serving the store: this one, just registered.
    let a = api.admin(Method::GET, "/v1/instances", None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let listed = a.body["instances"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{}", a.body);
    assert_eq!(listed[0]["id"], a.body["this"]);
    assert_eq!(listed[0]["pid"], std::process::id());
    assert_eq!(listed[0]["admin_url"], "http://127.0.0.1:8347");
    assert!(listed[0]["heartbeat_age_ms"].as_i64().unwrap() < 60_000);
    is_problem(
        &api.call(Method::GET, "/v1/instances", None, None).await,
        StatusCode::UNAUTHORIZED,
    );

    is_problem(
        &api.call(Method::GET, "/metrics", None, None).await,
        StatusCode::UNAUTHORIZED,
    );
    let a = api.admin(Method::GET, "/metrics", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    api.close().await;
}

async fn tokens_hosts_and_unknown_routes(db: TestDb) {
    let api = Api::new(db).await;
    let a = api.call(Method::GET, "/v1/bots", None, None).await;
    is_problem(&a, StatusCode::UNAUTHORIZED);
    assert_eq!(a.headers[header::WWW_AUTHENTICATE], "Bearer");
    is_problem(
        &api.call(Method::GET, "/v1/bots", Some("not-the-token"), None)
            .await,
        StatusCode::UNAUTHORIZED,
    );
    let a = api.admin(Method::GET, "/v1/no-such-route", None).await;
    is_problem(&a, StatusCode::NOT_FOUND);
    assert_eq!(a.body["detail"], "route not found");

    let request = Request::builder()
        .uri("/v1/bots")
        .header(header::HOST, "evil.example")
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
        .body(Body::empty())
        .unwrap();
    is_problem(&api.send(request).await, StatusCode::MISDIRECTED_REQUEST);
    // Probes answer any Host.
    let request = Request::builder()
        .uri("/healthz")
        .header(header::HOST, "10.0.0.7:8347")
        .body(Body::empty())
        .unwrap();
    assert_eq!(api.send(request).await.status, StatusCode::OK);

    let a = api.admin(Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(a.status, StatusCode::OK);
    let paths: Vec<&str> = a.body["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/bots",
        "/v1/bots/{jid}",
        "/v1/bots/{jid}/certificate",
        "/v1/bots/{jid}/certificate/rotate",
        "/v1/bots/{jid}/peers",
        "/v1/bots/{jid}/events",
        "/v1/bots/{jid}/webhook",
        "/v1/bots/{jid}/deliveries",
        "/v1/bots/{jid}/deliveries/retry",
        "/v1/bots/{jid}/deliveries/drop",
        "/v1/bots/{jid}/messages",
        "/v1/bots/{jid}/messages/{id}",
        "/v1/bots/{jid}/tokens",
        "/v1/bots/{jid}/tokens/{id}",
        "/v1/tunnels",
        "/v1/tunnels/{id}",
        "/v1/openapi.json",
    ] {
        assert!(paths.contains(&path), "{path} missing from {paths:?}");
    }
    assert!(
        a.body["components"]["schemas"]["BotEvent"]["oneOf"].is_array(),
        "the bot events are documented"
    );
    api.close().await;
}

async fn bots_are_created_read_and_deleted(db: TestDb) {
    let mut api = Api::new(db).await;
    let a = api
        .admin(
            Method::POST,
            "/v1/bots",
            Some(json!({"localpart": "Weather", "handler": "echo", "trust": "pinned"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(a.body["jid"], "weather@bots.example.org");
    assert_eq!(
        (&a.body["handler"], &a.body["peer_auth"], &a.body["trust"]),
        (&json!("echo"), &json!("required"), &json!("manual")),
        "`pinned` is the earlier name of `manual`"
    );
    let spki = a.body["fingerprints"]["spki_sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(spki.len(), 32 * 3 - 1, "colon hex of SHA-256: {spki}");

    for (body, status) in [
        (json!({"localpart": "weather"}), StatusCode::CONFLICT),
        (
            json!({"localpart": "a/b"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (json!({"localpart": ""}), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"localpart": "x", "colour": "blue"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"localpart": "x", "handler": "webhook"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        is_problem(
            &api.admin(Method::POST, "/v1/bots", Some(body)).await,
            status,
        );
    }

    let a = api.admin(Method::GET, "/v1/bots", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body.as_array().unwrap().len(), 1);
    for name in [
        "weather",
        "weather@bots.example.org",
        "WEATHER@bots.example.org",
    ] {
        let a = api
            .admin(Method::GET, &format!("/v1/bots/{name}"), None)
            .await;
        assert_eq!(a.status, StatusCode::OK, "{name}: {}", a.body);
        assert_eq!(a.body["fingerprints"]["spki_sha256"], spki.as_str());
    }
    is_problem(
        &api.admin(Method::GET, "/v1/bots/nobody", None).await,
        StatusCode::NOT_FOUND,
    );

    let a = api
        .admin(Method::GET, "/v1/bots/weather/certificate", None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["spki_sha256"], spki.as_str());
    // The certificate digests also in the form offers carry (docs/protocol.md §2.4).
    for (colons, offer) in [("cert_sha1", "sha1"), ("cert_sha256", "sha256")] {
        let plain = a.body[colons]
            .as_str()
            .unwrap()
            .replace(':', "")
            .to_lowercase();
        assert_eq!(a.body["offer"][offer], plain.as_str(), "{colons}");
    }
    assert_eq!(a.body["offer"]["sha1"].as_str().unwrap().len(), 40);
    assert!(
        a.body["pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(
        !a.body.to_string().contains("PRIVATE KEY"),
        "the key never leaves"
    );
    let a = api.admin(Method::GET, "/v1/bots/weather/peers", None).await;
    assert_eq!((a.status, a.body), (StatusCode::OK, json!([])));

    // The clear-text policy of a running bot: changed, shown, and applied by its driver.
    for (body, status) in [
        (
            json!({"encrypted_only": "yes"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (json!({"handler": "api"}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({"trust": "ca"}), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        is_problem(
            &api.admin(Method::PATCH, "/v1/bots/weather", Some(body))
                .await,
            status,
        );
    }
    is_problem(
        &api.admin(
            Method::PATCH,
            "/v1/bots/nobody",
            Some(json!({"encrypted_only": true})),
        )
        .await,
        StatusCode::NOT_FOUND,
    );
    let a = api
        .admin(
            Method::PATCH,
            "/v1/bots/weather",
            Some(json!({"encrypted_only": true})),
        )
        .await;
    assert_eq!(
        (a.status, &a.body["encrypted_only"]),
        (StatusCode::OK, &json!(true))
    );
    let a = api.admin(Method::GET, "/v1/bots/weather", None).await;
    assert_eq!(a.body["encrypted_only"], true);
    // The trust mode alone: the clear-text policy stays.
    let a = api
        .admin(
            Method::PATCH,
            "/v1/bots/weather",
            Some(json!({"trust": "verified_only"})),
        )
        .await;
    assert_eq!(
        (a.status, &a.body["trust"], &a.body["encrypted_only"]),
        (StatusCode::OK, &json!("verified_only"), &json!(true))
    );
    // A trust decision like any other: audited, with no peer.
    let log = api.admin(Method::GET, "/v1/audit?bot=weather", None).await;
    let entry = &log.body["entries"][0];
    assert_eq!(
        (
            &entry["action"],
            &entry["peer"],
            &entry["trust"],
            &entry["actor"]
        ),
        (
            &json!("trust_set"),
            &Value::Null,
            &json!("verified_only"),
            &json!("admin")
        ),
        "{}",
        log.body
    );
    let clear: Element = "<message xmlns='jabber:client' type='chat' id='p1' \
        from='alice@example.net/phone' to='weather@bots.example.org'><body>hi</body></message>"
        .parse()
        .unwrap();
    api.bots
        .by_jid("weather@bots.example.org")
        .unwrap()
        .try_deliver(clear)
        .unwrap();
    let refused = api.next_out().await;
    assert_eq!(refused.attr("type"), Some("error"), "{refused:?}");
    assert!(
        refused
            .get_child("error", ns::CLIENT)
            .unwrap()
            .has_child("policy-violation", ns::STANZAS)
    );

    let a = api.admin(Method::DELETE, "/v1/bots/weather", None).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    is_problem(
        &api.admin(Method::DELETE, "/v1/bots/weather", None).await,
        StatusCode::NOT_FOUND,
    );
    is_problem(
        &api.admin(Method::GET, "/v1/bots/weather/certificate", None)
            .await,
        StatusCode::NOT_FOUND,
    );
    api.close().await;
}

async fn bot_tokens_reach_their_own_bot_only(db: TestDb) {
    let api = Api::new(db).await;
    let weather = api.bot("weather").await;
    api.bot("news").await;
    let a = api
        .admin(Method::POST, "/v1/bots/weather/tokens", None)
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(a.body["bot"], weather.as_str());
    let token = a.body["token"].as_str().unwrap().to_owned();
    let id = a.body["id"].as_str().unwrap().to_owned();
    assert!(token.starts_with("xtb_"));

    let own = api
        .call(Method::GET, "/v1/bots/weather/events", Some(&token), None)
        .await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.body);
    for path in [
        "/v1/bots",
        "/v1/bots/news/events",
        "/v1/bots/weather/tokens",
        "/v1/tunnels",
        "/metrics",
    ] {
        is_problem(
            &api.call(Method::GET, path, Some(&token), None).await,
            StatusCode::FORBIDDEN,
        );
    }

    let a = api
        .admin(Method::GET, "/v1/bots/weather/tokens", None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body[0]["id"], id.as_str());
    assert!(
        !a.body.to_string().contains(&token),
        "only the hash is kept"
    );
    let path = format!("/v1/bots/weather/tokens/{id}");
    assert_eq!(
        api.admin(Method::DELETE, &path, None).await.status,
        StatusCode::NO_CONTENT
    );
    is_problem(
        &api.admin(Method::DELETE, &path, None).await,
        StatusCode::NOT_FOUND,
    );
    is_problem(
        &api.call(Method::GET, "/v1/bots/weather/events", Some(&token), None)
            .await,
        StatusCode::UNAUTHORIZED,
    );
    is_problem(
        &api.admin(Method::POST, "/v1/bots/nobody/tokens", None)
            .await,
        StatusCode::NOT_FOUND,
    );
    api.close().await;
}

async fn peers_keys_are_managed_and_every_decision_is_audited(db: TestDb) {
    let api = Api::new(db).await;
    api.bot("weather").await;
    api.bot("news").await;
    let issued = api
        .admin(Method::POST, "/v1/bots/weather/tokens", None)
        .await;
    let token = issued.body["token"].as_str().unwrap().to_owned();
    let token_id = issued.body["id"].as_str().unwrap().to_owned();
    let laptop = "AB:".repeat(31) + "AB";
    let phone_plain = "cd".repeat(32);
    let phone = "CD:".repeat(31) + "CD";
    let keys = "/v1/bots/weather/peers/Alice@Example.net/keys";

    let empty = api.call(Method::GET, keys, Some(&token), None).await;
    assert_eq!(
        (empty.status, empty.body.clone()),
        (StatusCode::OK, json!([]))
    );
    // The bot's backend approves alice's laptop; the operator verifies her phone, saying
    // which fingerprint they compared (pasted as plain hex).
    let a = api
        .call(
            Method::PUT,
            &format!("{keys}/{laptop}"),
            Some(&token),
            Some(json!({})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(
        (a.body["peer"].as_str(), a.body["verified"].as_bool()),
        (Some("alice@example.net"), Some(false))
    );
    let a = api
        .admin(
            Method::PUT,
            &format!("{keys}/{phone_plain}"),
            Some(json!({"compared": phone_plain})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(a.body["verified"], true);
    assert_eq!(a.body["verified_by"], "admin");
    assert_eq!(a.body["compared"], phone.as_str());
    let a = api
        .call(
            Method::PUT,
            &format!("{keys}/{laptop}"),
            Some(&token),
            Some(json!({"verified": true})),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let listed = api.call(Method::GET, keys, Some(&token), None).await;
    assert_eq!(listed.body.as_array().unwrap().len(), 2);
    // Approving a verified key again leaves it verified (and audits nothing).
    let again = api
        .call(
            Method::PUT,
            &format!("{keys}/{phone}"),
            Some(&token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (again.status, &again.body["verified"]),
        (StatusCode::OK, &json!(true))
    );

    // Problems: a fingerprint that is not one, a comparison with another key, another bot.
    for (path, body) in [
        (format!("{keys}/AB:CD"), json!({})),
        (format!("{keys}/{laptop}"), json!({"compared": phone})),
        (
            format!("{keys}/{laptop}"),
            json!({"compared": laptop, "verified": false}),
        ),
        (format!("{keys}/{laptop}"), json!({"trusted": true})),
    ] {
        is_problem(
            &api.call(Method::PUT, &path, Some(&token), Some(body)).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    is_problem(
        &api.call(
            Method::GET,
            "/v1/bots/news/peers/alice@example.net/keys",
            Some(&token),
            None,
        )
        .await,
        StatusCode::FORBIDDEN,
    );
    is_problem(
        &api.admin(
            Method::GET,
            "/v1/bots/weather/peers/not%20a%20jid/keys",
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
    );

    let removed = api
        .call(
            Method::DELETE,
            &format!("{keys}/{laptop}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
    is_problem(
        &api.call(
            Method::DELETE,
            &format!("{keys}/{laptop}"),
            Some(&token),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
    );

    // A peer's own trust mode: set, shown beside the bot's, cleared.
    let peer = "/v1/bots/weather/peers/alice@example.net";
    let a = api
        .call(
            Method::PUT,
            peer,
            Some(&token),
            Some(json!({"trust": "verified_only"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        (&a.body["trust"], &a.body["effective_trust"]),
        (&json!("verified_only"), &json!("verified_only"))
    );
    assert_eq!(a.body["keys"].as_array().unwrap().len(), 1);
    let a = api
        .admin(Method::PUT, peer, Some(json!({"trust": null})))
        .await;
    assert_eq!(
        (&a.body["trust"], &a.body["effective_trust"]),
        (&Value::Null, &json!("tofu"))
    );
    is_problem(
        &api.admin(Method::PUT, peer, Some(json!({"trust": "ca"})))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    );

    // The audit log: who did what, newest first; a bot token sees its own bot's only.
    let log = api.admin(Method::GET, "/v1/audit?bot=weather", None).await;
    assert_eq!(log.status, StatusCode::OK, "{}", log.body);
    let seen: Vec<(String, String)> = log.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let by_token = format!("bot-token:{token_id}");
    assert_eq!(
        seen,
        [
            ("trust_set".to_owned(), "admin".to_owned()),
            ("trust_set".to_owned(), by_token.clone()),
            ("removed".to_owned(), by_token.clone()),
            ("verified".to_owned(), by_token.clone()),
            ("verified".to_owned(), "admin".to_owned()),
            ("approved".to_owned(), by_token.clone()),
        ]
    );
    assert_eq!(log.body["entries"][4]["compared"], phone.as_str());
    assert_eq!(log.body["entries"][1]["trust"], "verified_only");
    // The bot's backend hears of each decision in its event log too.
    api.committed("weather@bots.example.org", 4).await;
    let events = api
        .call(
            Method::GET,
            "/v1/bots/weather/events?after=0",
            Some(&token),
            None,
        )
        .await;
    let decisions: Vec<&str> = events.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "peer.key_decision")
        .map(|e| e["data"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["approved", "verified", "verified", "removed"]);
    let own = api.call(Method::GET, "/v1/audit", Some(&token), None).await;
    assert_eq!(own.body["entries"].as_array().unwrap().len(), 6);
    is_problem(
        &api.call(Method::GET, "/v1/audit?bot=news", Some(&token), None)
            .await,
        StatusCode::FORBIDDEN,
    );
    is_problem(
        &api.admin(Method::GET, "/v1/audit?limit=0", None).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    api.close().await;
}

async fn the_session_table_and_tunnels_opened_by_the_api(db: TestDb) {
    let mut api = Api::new(db).await;
    let weather = api.bot("weather").await;
    let a = api.admin(Method::GET, "/v1/tunnels", None).await;
    assert_eq!((a.status, a.body), (StatusCode::OK, json!([])));
    for query in ["state=half-open", "limit=many"] {
        is_problem(
            &api.admin(Method::GET, &format!("/v1/tunnels?{query}"), None)
                .await,
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    let unknown = "/v1/tunnels/0123456789abcdef";
    is_problem(
        &api.admin(Method::GET, unknown, None).await,
        StatusCode::NOT_FOUND,
    );
    is_problem(
        &api.admin(Method::DELETE, unknown, None).await,
        StatusCode::NOT_FOUND,
    );
    for (body, status) in [
        (
            json!({"bot": "weather", "peer": "alice@example.net"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"bot": "weather", "peer": "not a jid@@"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"bot": "nobody", "peer": "alice@example.net/phone"}),
            StatusCode::NOT_FOUND,
        ),
    ] {
        is_problem(
            &api.admin(Method::POST, "/v1/tunnels", Some(body)).await,
            status,
        );
    }

    // Open one: the bot asks the peer's disco#info first, then sends its start.
    let router = api.router.clone();
    let opening = tokio::spawn(async move {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/tunnels")
            .header(header::HOST, "localhost")
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"bot": "weather", "peer": "alice@example.net/phone"}).to_string(),
            ))
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice::<Value>(&bytes).unwrap())
    });
    api.answer_disco(&weather, true).await;
    let start = api.next_out().await;
    assert!(start.has_child("start", ns::XTLS), "{start:?}");
    let (status, body) = opening.await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "opening");
    let id = body["tunnel_id"].as_str().unwrap().to_owned();

    let a = api
        .admin(
            Method::GET,
            "/v1/tunnels?state=starting&peer=alice@example.net",
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body.as_array().unwrap().len(), 1, "{}", a.body);
    assert_eq!(a.body[0]["role"], "initiator");
    assert_eq!(a.body[0]["peer_identity"]["trust"], "pending");
    let a = api
        .admin(Method::GET, &format!("/v1/tunnels/{id}"), None)
        .await;
    assert_eq!((a.status, &a.body["id"]), (StatusCode::OK, &json!(id)));

    // Closing a tunnel that has not started: `<close/>` at once, then it is history.
    let a = api
        .admin(Method::DELETE, &format!("/v1/tunnels/{id}"), None)
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    assert_eq!(a.body["state"], "closing");
    let close = api.next_out().await;
    assert!(close.has_child("close", ns::XTLS), "{close:?}");
    // tunnel.opened, then tunnel.failed once it is gone.
    api.committed(&weather, 2).await;
    let a = api
        .admin(Method::GET, &format!("/v1/tunnels/{id}"), None)
        .await;
    assert_eq!(
        (a.status, &a.body["state"]),
        (StatusCode::OK, &json!("closed"))
    );
    assert_eq!(a.body["close_reason"], "local_close");
    is_problem(
        &api.admin(Method::DELETE, &format!("/v1/tunnels/{id}"), None)
            .await,
        StatusCode::CONFLICT,
    );
    api.close().await;
}

async fn messages_events_and_their_problems(db: TestDb) {
    let mut api = Api::new(db).await;
    let weather = api.bot("weather").await;
    let a = api
        .admin(Method::GET, "/v1/bots/weather/events", None)
        .await;
    assert_eq!(
        (a.status, a.body),
        (
            StatusCode::OK,
            json!({"events": [], "cursor": 0, "last_seq": 0})
        )
    );
    is_problem(
        &api.admin(Method::GET, "/v1/bots/weather/events?after=first", None)
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    let request = Request::builder()
        .uri("/v1/bots/weather/events")
        .header(header::HOST, "localhost")
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
        .header("last-event-id", "yesterday")
        .body(Body::empty())
        .unwrap();
    is_problem(&api.send(request).await, StatusCode::UNPROCESSABLE_ENTITY);
    // The same route as Server-Sent Events: the answer is a stream (only its head is read).
    let request = Request::builder()
        .uri("/v1/bots/weather/events")
        .header(header::HOST, "localhost")
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
        .header(header::ACCEPT, "text/event-stream")
        .body(Body::empty())
        .unwrap();
    let response = api.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    drop(response);

    for (body, status) in [
        (
            json!({"to": "bob@example.net/pc"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"to": "bob@example.net/pc", "body": "a", "stanza": "<message/>"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"to": "news@bots.example.org", "body": "hi"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"to": "@@", "body": "hi"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"to": "bob@example.net/pc", "body": "bell\u{7}"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"to": "bob@example.net/pc", "stanza": "<message><unclosed></message>"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        is_problem(
            &api.admin(Method::POST, "/v1/bots/weather/messages", Some(body))
                .await,
            status,
        );
    }

    // A message to a client without XTLS: accepted, then settled as no_xtls_support.
    let router = api.router.clone();
    let send = |key: &'static str| {
        let router = router.clone();
        async move {
            let request = Request::builder()
                .method(Method::POST)
                .uri("/v1/bots/weather/messages")
                .header(header::HOST, "localhost")
                .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
                .header(header::CONTENT_TYPE, "application/json")
                .header("idempotency-key", key)
                .body(Body::from(
                    json!({"to": "bob@example.net/pc", "body": "sunny"}).to_string(),
                ))
                .unwrap();
            let response = router.oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap())
        }
    };
    let first = tokio::spawn(send("order-42"));
    api.answer_disco(&weather, false).await;
    let (status, first) = first.await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    assert_eq!(first["status"], "no_xtls_support");
    let id = first["id"].as_str().unwrap().to_owned();
    // The same key answers the first request's message; nothing is sent again.
    let (status, again) = send("order-42").await;
    assert_eq!((status, &again["id"]), (StatusCode::ACCEPTED, &json!(id)));
    api.nothing_more_from(&weather).await;

    let a = api
        .admin(
            Method::GET,
            &format!("/v1/bots/weather/messages/{id}"),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["status"], "no_xtls_support");
    let history: Vec<&str> = a.body["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["accepted", "no_xtls_support"]);
    is_problem(
        &api.admin(Method::GET, "/v1/bots/weather/messages/msg_none", None)
            .await,
        StatusCode::NOT_FOUND,
    );

    // Its events, once committed: the disco failure and the status change.
    api.committed(&weather, 2).await;
    let a = api
        .admin(Method::GET, "/v1/bots/weather/events?after=0", None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        (&a.body["cursor"], &a.body["last_seq"]),
        (&json!(0), &json!(2))
    );
    let mut kinds: Vec<String> = Vec::new();
    let events = a.body["events"].as_array().unwrap().clone();
    for e in &events {
        kinds.push(e["type"].as_str().unwrap().to_owned());
        let envelope: xtls_component::delivery::event::EventEnvelope =
            serde_json::from_value(e.clone()).expect("every event is a documented BotEvent");
        assert_eq!(envelope.bot, weather);
    }
    assert_eq!(kinds, ["tunnel.failed", "delivery.status"]);
    assert_eq!(events[1]["data"]["status"], "no_xtls_support");
    api.close().await;
}

async fn webhooks_and_deliveries(db: TestDb) {
    let api = Api::new(db).await;
    api.bot("weather").await;
    is_problem(
        &api.admin(Method::GET, "/v1/bots/weather/webhook", None)
            .await,
        StatusCode::NOT_FOUND,
    );
    for body in [
        json!({"url": "not a url"}),
        json!({"url": "ftp://hooks.example/x"}),
        json!({"url": "http://hooks.example/x", "secret": "hunter2"}),
        json!({"url": "http://hooks.example/x", "retries": 3}),
        // Internal addresses are closed to webhooks unless webhooks.allowed_networks lists them.
        json!({"url": "http://127.0.0.1:8080/hook"}),
        json!({"url": "http://[::1]/hook"}),
        json!({"url": "http://169.254.169.254/latest/meta-data"}),
        json!({"url": "http://10.0.0.5/hook"}),
    ] {
        is_problem(
            &api.admin(Method::PUT, "/v1/bots/weather/webhook", Some(body.clone()))
                .await,
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    // Out-of-range numbers are brought into range, and the answer shows what applies.
    let a = api
        .admin(
            Method::PUT,
            "/v1/bots/weather/webhook",
            Some(json!({"url": "http://192.0.2.1:9/x", "timeout_ms": 5, "max_in_flight": 0})),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        (&a.body["timeout_ms"], &a.body["max_in_flight"]),
        (&json!(100), &json!(1))
    );
    let a = api
        .admin(
            Method::PUT,
            "/v1/bots/weather/webhook",
            Some(json!({"url": "http://192.0.2.1:9/hook"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let secret = a.body["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "generated and shown once");
    let a = api
        .admin(Method::GET, "/v1/bots/weather/webhook", None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["secret_set"], true);
    assert!(a.body.get("secret").is_none(), "never shown again");
    assert!(!a.body.to_string().contains(&secret));

    let a = api
        .admin(Method::GET, "/v1/bots/weather/deliveries", None)
        .await;
    assert_eq!(
        (a.status, a.body),
        (StatusCode::OK, json!({"attempts": [], "dead_letters": []}))
    );
    for action in ["retry", "drop"] {
        let path = format!("/v1/bots/weather/deliveries/{action}");
        let a = api.admin(Method::POST, &path, Some(json!({}))).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        is_problem(
            &api.admin(Method::POST, &path, Some(json!({"seq": "all"})))
                .await,
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    assert_eq!(
        api.admin(Method::DELETE, "/v1/bots/weather/webhook", None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    is_problem(
        &api.admin(Method::DELETE, "/v1/bots/weather/webhook", None)
            .await,
        StatusCode::NOT_FOUND,
    );
    api.close().await;
}

async fn a_rotation_is_announced_then_active_and_the_old_certificate_retired(db: TestDb) {
    let api = Api::new(db).await;
    api.bot("weather").await;
    let path = "/v1/bots/weather/certificate";
    let before = api.admin(Method::GET, path, None).await.body;
    assert_eq!(before["next"], Value::Null);
    assert_eq!(before["retired"], json!([]));

    // No body: the configured overlap (14 days), the key kept.
    let a = api
        .admin(Method::POST, &format!("{path}/rotate"), None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let next = &a.body["next"];
    assert_eq!(a.body["cert_sha256"], before["cert_sha256"], "still active");
    assert_eq!(
        next["spki_sha256"], before["spki_sha256"],
        "the key is kept"
    );
    assert_ne!(next["cert_sha256"], before["cert_sha256"]);
    assert_eq!(next["new_key"], false);
    assert!(
        next["pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(next["active_at"].as_str().unwrap() > next["announced_at"].as_str().unwrap());
    assert_eq!(api.admin(Method::GET, path, None).await.body, a.body);

    // Active at once, with a new key.
    let body = json!({"overlap_secs": 0, "new_key": true});
    let a = api
        .admin(Method::POST, &format!("{path}/rotate"), Some(body))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["next"], Value::Null);
    assert_ne!(a.body["spki_sha256"], before["spki_sha256"]);
    let retired = a.body["retired"].as_array().unwrap();
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0]["cert_sha256"], before["cert_sha256"]);
    assert!(retired[0]["retired_at"].is_string());
    let bot = api.admin(Method::GET, "/v1/bots/weather", None).await.body;
    assert_eq!(bot["fingerprints"]["spki_sha256"], a.body["spki_sha256"]);

    // Both decisions are in the audit log, the admin named.
    let audit = api.admin(Method::GET, "/v1/audit", None).await.body;
    let actions: Vec<_> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    assert!(
        actions.contains(&("certificate_activated", "admin")),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("certificate_rotated", "admin")),
        "{actions:?}"
    );

    for bad in [
        json!({"overlap_secs": -1}),
        json!({"overlap_secs": 3650 * 86400}),
        json!({"new_key": "yes"}),
        json!({"keep": true}),
    ] {
        is_problem(
            &api.admin(Method::POST, &format!("{path}/rotate"), Some(bad))
                .await,
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    is_problem(
        &api.admin(Method::POST, "/v1/bots/nobody/certificate/rotate", None)
            .await,
        StatusCode::NOT_FOUND,
    );
    let token = api
        .admin(Method::POST, "/v1/bots/weather/tokens", None)
        .await
        .body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    is_problem(
        &api.call(Method::POST, &format!("{path}/rotate"), Some(&token), None)
            .await,
        StatusCode::FORBIDDEN,
    );
    api.close().await;
}
