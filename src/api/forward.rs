//! Requests about a bot that another instance runs (`instances.mode = "shared"`): passed to
//! that instance's admin API (`instances.advertise_url`) and its answer passed back, streamed,
//! so that sends, tunnel opens, event streams and every other call about a bot behave the same
//! on whichever instance the caller reached.

use std::sync::LazyLock;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AdminState, ApiError};
use xtls::certs::normalize_bare;

/// Marks a request one instance passed to another; such a request is never passed on again.
pub const FORWARDED_BY: &str = "x-xtls-forwarded-by";

/// How long a request waits for the instance that runs the bot to be known.
const FIND_OWNER: Duration = Duration::from_secs(3);

/// The client requests are passed on with: no proxy from the environment, no redirects
/// followed, a bounded connect; no overall deadline, since event streams last, and a read
/// deadline longer than the longest long poll (60 s).
static CLIENT: LazyLock<reqwest::Client> = LazyLock::new(|| {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(3))
        .read_timeout(Duration::from_secs(90))
        .build()
        .expect("the forwarding client builds")
});

/// Where this layer sits: its requests' paths are under this prefix, which it does not see.
const NESTED_UNDER: &str = "/v1";

/// What a request (its path under `/v1`) is about, for finding the instance that runs it.
#[derive(Debug, PartialEq, Eq)]
enum Subject<'a> {
    /// `/bots/{jid}` and everything under it (a JID or a localpart), except the route probe,
    /// which asks about the instance that answers.
    Bot(&'a str),
    /// `/tunnels/{id}` and everything under it: the bot that runs the tunnel.
    Tunnel(&'a str),
    /// `POST /tunnels`: the bot named in the body.
    BotInBody,
}

fn subject<'a>(method: &Method, path: &'a str) -> Option<Subject<'a>> {
    if let Some(rest) = path.strip_prefix("/bots/") {
        let (jid, tail) = rest.split_once('/').unwrap_or((rest, ""));
        return (!jid.is_empty() && tail != "route").then_some(Subject::Bot(jid));
    }
    if let Some(rest) = path.strip_prefix("/tunnels/") {
        let id = rest.split('/').next().unwrap_or_default();
        return (!id.is_empty()).then_some(Subject::Tunnel(id));
    }
    (path == "/tunnels" && method == Method::POST).then_some(Subject::BotInBody)
}

/// Passes a request about a bot another instance runs to that instance; every other request
/// goes on to the handlers here.
pub async fn to_owner(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let shared = state.bots.shared();
    if !shared.owners.is_shared() {
        return next.run(request).await;
    }
    let (request, named) = match bot_named(&state, request).await {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    // A bot by bare JID or by localpart.
    let Some(jid) = named.and_then(|named| match named.contains('@') {
        true => normalize_bare(&named),
        false => normalize_bare(&format!("{named}@{}", shared.domain)),
    }) else {
        return next.run(request).await;
    };
    // A bot token reaches its own bot only: refused here, before anything is asked about
    // another bot.
    if let Some(caller) = request.extensions().get::<super::Caller>()
        && let Err(refused) = caller.may_act_for(&jid)
    {
        return refused.into_response();
    }
    // Passed on by another instance, which read the store: the bot is this one's (or being
    // claimed by it). Never passed on again.
    if request.headers().contains_key(FORWARDED_BY) {
        return next.run(request).await;
    }
    match owner_url(&state, &jid).await {
        Ok(None) => next.run(request).await,
        Ok(Some(url)) => {
            tracing::debug!(bot = jid, to = url, path = %request.uri().path(), "request passed to the instance that runs the bot");
            pass_on(&state, &url, request)
                .await
                .unwrap_or_else(IntoResponse::into_response)
        }
        Err(e) => e.into_response(),
    }
}

/// The bot a request is about, if any, as named (the request back, its body read when the
/// bot is named there).
async fn bot_named(
    state: &AdminState,
    request: Request,
) -> Result<(Request, Option<String>), ApiError> {
    let path = request.uri().path().to_owned();
    let decode = |raw: &str| {
        percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .ok()
            .map(|s| s.into_owned())
    };
    match subject(request.method(), &path) {
        None => Ok((request, None)),
        Some(Subject::Bot(raw)) => Ok((request, decode(raw))),
        Some(Subject::Tunnel(raw)) => {
            let Some(id) = decode(raw) else {
                return Ok((request, None));
            };
            let store = &state.bots.shared().store;
            let tunnel = store.tunnel(&id.into()).await?;
            Ok((request, tunnel.map(|t| t.bot)))
        }
        Some(Subject::BotInBody) => {
            let (parts, body) = request.into_parts();
            // The body was read (and capped) before this layer.
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .map_err(|_| ApiError::Invalid("the request body ended early".into()))?;
            let bot = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("bot")?.as_str().map(str::to_owned));
            Ok((Request::from_parts(parts, Body::from(bytes)), bot))
        }
    }
}

/// Where requests about `jid` go: `None` to answer here (the store says this instance runs
/// the bot, or there is no such bot), else the admin API of the instance that runs it. A bot
/// no live instance has claimed is probed, so that the instance its stanzas reach claims it.
async fn owner_url(state: &AdminState, jid: &str) -> Result<Option<String>, ApiError> {
    let shared = state.bots.shared();
    let store = &shared.store;
    let me = store.instance_id().unwrap_or_default().to_owned();
    let deadline = tokio::time::Instant::now() + FIND_OWNER;
    let mut probed = false;
    loop {
        let Some(owner) = store.bot_owner(jid).await? else {
            // No such bot: one deleted through another instance is dropped here too.
            state.bots.forget(jid);
            return Ok(None);
        };
        match (owner.instance, owner.admin_url) {
            // Claimed by this instance: answered here once it runs the bot.
            (Some(id), _) if id == me && shared.owners.holds(jid) => return Ok(None),
            (Some(id), _) if id == me => {}
            (Some(_), Some(url)) => return Ok(Some(url)),
            (Some(id), None) => {
                return Err(ApiError::Unavailable(format!(
                    "bot {jid} is run by instance {id}, which advertises no admin address \
                     (instances.advertise_url)"
                )));
            }
            (None, _) => {}
        }
        if !probed && !shared.owners.holds(jid) {
            probed = true;
            state.bots.probe(jid);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::Unavailable(format!(
                "no instance runs bot {jid} yet: the server routes its stanzas to no connected \
                 instance, or the one it routes them to is still taking it over"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Headers that belong to one connection, not to the request (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::HOST,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::CONTENT_LENGTH,
    header::PROXY_AUTHORIZATION,
];

/// `headers` without those of one connection: the fixed ones, and those `Connection` names.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut kept = headers.clone();
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        kept.remove(name.as_str());
    }
    for name in HOP_BY_HOP {
        kept.remove(name);
    }
    kept.remove("keep-alive");
    kept
}

/// Sends `request` to the instance at `base`, and streams its answer back.
async fn pass_on(state: &AdminState, base: &str, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let url = format!("{}{NESTED_UNDER}{path}", base.trim_end_matches('/'));
    // The body was read (and capped) before this layer.
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|_| ApiError::Invalid("the request body ended early".into()))?;
    let me = state
        .bots
        .shared()
        .store
        .instance_id()
        .unwrap_or_default()
        .to_owned();
    let answer = CLIENT
        .request(parts.method, &url)
        .headers(end_to_end(&parts.headers))
        .header(FORWARDED_BY, me)
        .body(body)
        .send()
        .await
        .map_err(|e| {
            tracing::warn!(to = base, error = %e, "cannot pass a request to the instance that runs the bot");
            ApiError::Unavailable(format!(
                "the instance that runs this bot does not answer at {base}; try again"
            ))
        })?;
    let mut response = Response::builder().status(answer.status());
    if let Some(headers) = response.headers_mut() {
        *headers = end_to_end(answer.headers());
    }
    let stream = futures_util::stream::unfold(answer, |mut answer| async move {
        match answer.chunk().await {
            Ok(Some(chunk)) => Some((Ok::<_, reqwest::Error>(chunk), answer)),
            Ok(None) => None,
            Err(e) => Some((Err(e), answer)),
        }
    });
    response
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_about_a_bot_are_found_by_their_path() {
        let get = Method::GET;
        let found = |path| subject(&get, path);
        assert_eq!(
            found("/bots/echo@b.example"),
            Some(Subject::Bot("echo@b.example"))
        );
        assert_eq!(
            found("/bots/echo@b.example/messages"),
            Some(Subject::Bot("echo@b.example"))
        );
        assert_eq!(found("/bots/echo/events"), Some(Subject::Bot("echo")));
        assert_eq!(found("/bots/echo@b.example/route"), None);
        assert_eq!(found("/bots"), None);
        assert_eq!(found("/bots/"), None);
        assert_eq!(found("/tunnels/t1"), Some(Subject::Tunnel("t1")));
        assert_eq!(
            found("/tunnels/t1/sas/confirm"),
            Some(Subject::Tunnel("t1"))
        );
        assert_eq!(found("/tunnels"), None);
        assert_eq!(subject(&Method::POST, "/tunnels"), Some(Subject::BotInBody));
        assert_eq!(found("/instances"), None);
    }

    #[test]
    fn connection_headers_stay_behind() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "a:1".parse().unwrap());
        headers.insert(header::CONNECTION, "close, x-hop".parse().unwrap());
        headers.insert("x-hop", "1".parse().unwrap());
        headers.insert(header::PROXY_AUTHORIZATION, "Basic x".parse().unwrap());
        headers.insert(header::AUTHORIZATION, "Bearer t".parse().unwrap());
        headers.insert("idempotency-key", "k1".parse().unwrap());
        let kept = end_to_end(&headers);
        assert_eq!(kept.len(), 2);
        assert!(kept.contains_key(header::AUTHORIZATION) && kept.contains_key("idempotency-key"));
    }
}
