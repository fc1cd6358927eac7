//! Bearer tokens: the admin token reaches everything, a bot token only its own bot.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use sha2::{Digest, Sha256};

use super::{AdminState, ApiError};

/// The admin token as the API keeps it: its SHA-256, like bot tokens, so the token itself is
/// not held in the server's memory after start-up.
/// Clones share one token, so a reload ([`AdminToken::replace`]) reaches every handler.
#[derive(Clone)]
pub struct AdminToken(std::sync::Arc<std::sync::RwLock<[u8; 32]>>);

impl AdminToken {
    /// Keeps the digest of `token`.
    pub fn new(token: &crate::config::Secret) -> AdminToken {
        AdminToken(std::sync::Arc::new(std::sync::RwLock::new(Self::digest(
            token.expose(),
        ))))
    }

    fn digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    /// From now on, `token` is the admin token (a configuration reload).
    pub fn replace(&self, token: &crate::config::Secret) {
        *self.0.write().expect("admin token lock") = Self::digest(token.expose());
    }

    /// Whether `presented` is the admin token (constant time).
    pub fn matches(&self, presented: &str) -> bool {
        let expected = *self.0.read().expect("admin token lock");
        same(&Self::digest(presented), &expected)
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who is calling: the operator (admin token) or one bot (a token of that bot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin token: everything.
    Admin,
    /// A bot token: that bot's events, messages, webhook, deliveries and peers' keys.
    Bot {
        /// The bot's bare JID.
        jid: String,
        /// The token's id (never the token).
        token: String,
    },
}

impl Caller {
    /// Who did it, for the audit log: `admin` or `bot-token:<id>`.
    pub fn actor(&self) -> String {
        match self {
            Caller::Admin => "admin".into(),
            Caller::Bot { token, .. } => format!("bot-token:{token}"),
        }
    }

    /// Allows the admin and the bot itself; 403 for any other bot.
    pub fn may_act_for(&self, bot_jid: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Bot { jid, .. } if jid == bot_jid => Ok(()),
            Caller::Bot { .. } => Err(ApiError::Forbidden),
        }
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(ApiError::Unauthorized)
    }
}

pub(super) async fn require_token(
    State(state): State<AdminState>,
    mut request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let caller = match presented {
        Some(token) if state.token.matches(&token) => Caller::Admin,
        Some(token) if token.starts_with(super::bot::TOKEN_PREFIX) => {
            match state.bots.shared().store.token_bot(&token).await {
                Ok(Some((jid, token))) => Caller::Bot { jid, token },
                Ok(None) => return ApiError::Unauthorized.into_response(),
                Err(e) => return ApiError::from(e).into_response(),
            }
        }
        _ => return ApiError::Unauthorized.into_response(),
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

pub(super) async fn require_admin(caller: Caller, request: Request, next: Next) -> Response {
    match caller {
        Caller::Admin => next.run(request).await,
        Caller::Bot { .. } => ApiError::Forbidden.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }

    #[test]
    fn the_admin_token_is_kept_as_a_digest() {
        let token = super::AdminToken::new(&crate::config::Secret::new("token-123456".to_owned()));
        assert!(token.matches("token-123456"));
        assert!(!token.matches("token-12345"));
        assert!(!token.matches(""));
        assert_eq!(format!("{token:?}"), "AdminToken(..)");
        let handlers = token.clone();
        token.replace(&crate::config::Secret::new("rotated-654321".to_owned()));
        assert!(handlers.matches("rotated-654321") && !handlers.matches("token-123456"));
    }
}
