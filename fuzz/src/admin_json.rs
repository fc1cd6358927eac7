//! Target `admin_json`: the admin API's JSON request bodies through the real axum router
//! (`admin::app`), in process, with the admin token.
//!
//! Input: one control byte (which route, which `Content-Type`), then the body. Routes: `POST
//! /v1/bots`, `PUT /v1/bots/fuzz/webhook`, `POST /v1/bots/fuzz/messages`, `POST /v1/tunnels`,
//! `POST /v1/bots/fuzz/deliveries/retry` and `.../drop`, `PATCH /v1/bots/fuzz`, `PUT
//! /v1/bots/fuzz/peers/{peer}` and `PUT .../keys/{spki}`. A control byte whose low nibble is
//! 0xf feeds the body to `webhook::reply_stanzas` instead (a webhook's synchronous answer)
//! and serializes the stanzas it makes.
//!
//! The fixture is built once per process: a real store in a temporary directory, the bot
//! table with one bot (`fuzz`), the router with the default admin limits but a
//! 2 KiB body limit. Then the bot's
//! driver is stopped and the store closed, so nothing a request does can last: a body that
//! passes every check the handler makes ends in 500 at the handler's first store write (or its
//! first command to the stopped driver), and the fuzzer cannot fill a disk or start tunnels.
//! Everything before that point is the real code: host and token middleware, body limits,
//! the `Json` extractor with `deny_unknown_fields`, and each handler's own validation (JIDs,
//! URLs, webhook secrets, stanzas through `parse_stanza`).
//!
//! Invariants: no panic; the status is one the route documents (422 for what is not valid,
//! 500 only past validation, 404/409 where the route has them); an error body is
//! problem+json whose `status` matches and a 500 says nothing of its cause; a body that is not
//! JSON, or whose required string fields are missing, is never past validation.

use std::sync::OnceLock;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use serde_json::Value;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tower::ServiceExt as _;
use xtls::tunnel::{PeerAuth, TunnelConfig};
use xtls_component::api::AllowedHosts;
use xtls_component::api::{AdminState, app};
use xtls_component::config::{
    AdminConfig, EventsConfig, Handler, LimitsConfig, Secret, WebhooksConfig,
};
use xtls_component::link::LinkStatus;
use xtls_component::session::{BotTable, NewBot, Shared};
use xtls_component::store::Store;

const TOKEN: &str = "fuzz-admin-token";
const DOMAIN: &str = "bots.example.org";
/// `admin.max_body_bytes` here: small, so the fuzzer meets the limit too.
const MAX_BODY: usize = 2048;

struct Fixture {
    runtime: Runtime,
    router: Router,
    /// Kept so the channels the state holds stay open.
    _keep: (mpsc::Receiver<minidom::Element>, watch::Sender<LinkStatus>),
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a tokio runtime");
        let (router, keep) = runtime.block_on(async {
            let dir = std::env::temp_dir().join(format!("xtls-fuzz-admin-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a temporary directory");
            let store = Store::open(&format!("sqlite://{}/fuzz.db", dir.display()))
                .await
                .expect("the store opens");
            let (out_tx, out_rx) = mpsc::channel(16);
            let shared = Shared::new(
                store.clone(),
                xtls_component::session::Ownership::sole(),
                out_tx,
                TunnelConfig::default(),
                LimitsConfig::default(),
                DOMAIN.into(),
                &EventsConfig::default(),
                WebhooksConfig::default(),
            );
            let bots = BotTable::load(shared).await.expect("the bot table loads");
            bots.create(NewBot {
                localpart: "fuzz".into(),
                handler: Handler::Echo,
                peer_auth: PeerAuth::Required,
                trust: xtls_component::config::BotTrust::Tofu,
                encrypted_only: false,
            })
            .await
            .expect("the fuzz bot is created");
            // Nothing may last past this point (see the module docs).
            bots.stop_all().await;
            store.close().await;
            let _ = std::fs::remove_dir_all(&dir);
            let (link_tx, link_rx) = watch::channel(LinkStatus::Up);
            let admin = AdminConfig {
                max_body_bytes: MAX_BODY,
                ..AdminConfig::default()
            };
            let state = AdminState {
                bots,
                token: xtls_component::api::AdminToken::new(&Secret::new(TOKEN)),
                link: link_rx,
                limits: std::sync::Arc::new(xtls_component::api::HttpLimits::from(&admin)),
                allowed_hosts: std::sync::Arc::new(AllowedHosts::new(&[], admin.listen)),
                cors_origins: Vec::new(),
            };
            (app(state), (out_rx, link_tx))
        });
        Fixture {
            runtime,
            router,
            _keep: keep,
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    CreateBot,
    PutWebhook,
    PostMessage,
    OpenTunnel,
    RetryDead,
    DropDead,
    PatchBot,
    PutPeer,
    PutKey,
}

const ROUTES: [Route; 9] = [
    Route::CreateBot,
    Route::PutWebhook,
    Route::PostMessage,
    Route::OpenTunnel,
    Route::RetryDead,
    Route::DropDead,
    Route::PatchBot,
    Route::PutPeer,
    Route::PutKey,
];

impl Route {
    fn request(self) -> (Method, &'static str) {
        match self {
            Route::CreateBot => (Method::POST, "/v1/bots"),
            Route::PutWebhook => (Method::PUT, "/v1/bots/fuzz/webhook"),
            Route::PostMessage => (Method::POST, "/v1/bots/fuzz/messages"),
            Route::OpenTunnel => (Method::POST, "/v1/tunnels"),
            Route::RetryDead => (Method::POST, "/v1/bots/fuzz/deliveries/retry"),
            Route::DropDead => (Method::POST, "/v1/bots/fuzz/deliveries/drop"),
            Route::PatchBot => (Method::PATCH, "/v1/bots/fuzz"),
            Route::PutPeer => (Method::PUT, "/v1/bots/fuzz/peers/alice@example.net"),
            Route::PutKey => (
                Method::PUT,
                "/v1/bots/fuzz/peers/alice@example.net/keys/\
                 ab00000000000000000000000000000000000000000000000000000000000000",
            ),
        }
    }

    /// The statuses the route may answer here (the bot exists, the store is closed).
    fn allows(self, status: StatusCode) -> bool {
        let code = status.as_u16();
        code == 413
            || match self {
                // 409: the localpart of the existing bot.
                Route::CreateBot => matches!(code, 409 | 422 | 500),
                // 404: `bot` names no bot.
                Route::OpenTunnel => matches!(code, 404 | 422 | 500),
                Route::PutWebhook
                | Route::PostMessage
                | Route::RetryDead
                | Route::DropDead
                | Route::PatchBot
                | Route::PutPeer
                | Route::PutKey => matches!(code, 422 | 500),
            }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&control, body)) = data.split_first() else {
        return;
    };
    if control & 0x0f == 0x0f {
        webhook_reply(body);
        return;
    }
    let route = ROUTES[usize::from(control & 0x0f) % ROUTES.len()];
    let content_type = match control >> 4 {
        0 => None,
        1 => Some("text/plain"),
        2 => Some("application/json; charset=utf-8"),
        3 => Some("application/problem+json"),
        _ => Some("application/json"),
    };
    let (method, path) = route.request();
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "localhost:8347")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let request = request
        .body(Body::from(body.to_vec()))
        .expect("a valid request");
    let fixture = fixture();
    let (status, problem) = fixture.runtime.block_on(async {
        let response = fixture
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("a buffered body")
            .to_bytes();
        assert_eq!(
            content_type, "application/problem+json",
            "{status} without a problem body"
        );
        let problem: Value = serde_json::from_slice(&bytes).expect("a problem body is JSON");
        (status, problem)
    });
    assert!(
        route.allows(status),
        "{route:?} answered {status}: {problem}"
    );
    assert_eq!(
        status == StatusCode::PAYLOAD_TOO_LARGE,
        body.len() > MAX_BODY,
        "413 exactly for bodies over admin.max_body_bytes"
    );
    assert_eq!(
        problem["status"],
        status.as_u16(),
        "problem status mismatch"
    );
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        assert_eq!(
            problem["detail"], "internal error; see the component log",
            "a 500 leaked its cause"
        );
        assert_passed_validation(route, content_type, body);
    }
}

/// A webhook's answer (docs/bot-api.md): its `reply` becomes stanzas that go into a tunnel,
/// so each must serialize (the XML writer panics on characters XML cannot carry).
fn webhook_reply(body: &[u8]) {
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let reply = answer.get("reply").unwrap_or(&answer);
    if let Ok(stanzas) = xtls_component::delivery::webhook::reply_stanzas(reply) {
        for stanza in stanzas {
            assert!(matches!(stanza.name(), "message" | "presence" | "iq"));
            xtls::xml::to_bytes(&stanza);
        }
    }
}

/// What a body that reached the handler's first store write must look like. These are
/// consistency checks on the outcome, not a second validator: each is far weaker than the
/// handler's own rules.
fn assert_passed_validation(route: Route, content_type: Option<&str>, body: &[u8]) {
    // axum's `Json` takes application/json and any application/*+json (RFC 6839).
    assert!(
        content_type.is_some_and(|c| {
            let essence = c.split(';').next().unwrap_or_default().trim();
            essence == "application/json"
                || essence.starts_with("application/") && essence.ends_with("+json")
        }),
        "{route:?} accepted Content-Type {content_type:?}"
    );
    let value: Value = serde_json::from_slice(body).expect("an accepted body is JSON");
    // serde's derived structs also take their fields as a JSON array, in declaration order
    // (`[[1, 2]]` is `{"seq": [1, 2]}`): only objects are checked further.
    if value.is_array() {
        return;
    }
    let object = value
        .as_object()
        .expect("an accepted body is an object or an array");
    let string = |key: &str| object.get(key).and_then(Value::as_str);
    match route {
        Route::CreateBot => {
            let localpart = string("localpart").expect("localpart");
            assert!(!localpart.is_empty() && !localpart.contains(['@', '/']));
        }
        Route::PutWebhook => {
            let url = string("url").expect("url").to_ascii_lowercase();
            assert!(url.trim_start().starts_with("http"), "webhook url {url}");
        }
        Route::PostMessage => {
            assert!(string("to").is_some());
            let body = object.get("body").is_some_and(|v| !v.is_null());
            let stanza = object.get("stanza").is_some_and(|v| !v.is_null());
            assert!(body ^ stanza, "exactly one of body and stanza");
        }
        Route::OpenTunnel => {
            assert!(string("bot").is_some());
            assert!(string("peer").expect("peer").contains('/'));
        }
        Route::RetryDead | Route::DropDead => {
            assert!(
                object
                    .get("seq")
                    .is_none_or(|s| s.is_null() || s.is_array())
            );
        }
        Route::PatchBot => {
            let named = |key: &str| object.get(key).is_some_and(|v| !v.is_null());
            assert!(
                named("encrypted_only") || named("trust"),
                "PATCH names a change"
            );
        }
        Route::PutPeer => {
            // Absent or null clears the peer's own mode.
            assert!(
                object
                    .get("trust")
                    .is_none_or(|t| t.is_null() || t.is_string())
            );
        }
        Route::PutKey => {
            // `compared`, when given, is this key (any case, colons or not) and goes with
            // `verified` true or absent.
            if let Some(compared) = object.get("compared").filter(|v| !v.is_null()) {
                let hex: String = compared
                    .as_str()
                    .expect("compared is a string")
                    .chars()
                    .filter(|c| *c != ':')
                    .collect();
                assert!(hex.eq_ignore_ascii_case(&format!("ab{}", "0".repeat(62))));
                assert_ne!(object.get("verified"), Some(&Value::Bool(false)));
            }
        }
    }
}
