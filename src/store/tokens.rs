//! Bot tokens, stored hashed.

use super::db::query;
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::{Store, StoreError};

/// A bot token as listed (never the token itself).
#[derive(Serialize, ToSchema)]
pub struct TokenInfo {
    /// The token's id.
    id: String,
    /// When it was created (RFC 3339).
    created_at: String,
}

impl Store {
    /// Stores a bot token's hash.
    pub async fn insert_token(
        &self,
        id: &str,
        bot: &str,
        token: &str,
        created_at: &str,
    ) -> Result<(), StoreError> {
        query("INSERT INTO bot_tokens (id, bot_jid, sha256, created_at) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(bot)
            .bind(token_hash(token))
            .bind(created_at)
            .execute(self.writer())
            .await?;
        Ok(())
    }

    /// The bot a token belongs to, and the token's id.
    pub async fn token_bot(&self, token: &str) -> Result<Option<(String, String)>, StoreError> {
        let row = query("SELECT bot_jid, id FROM bot_tokens WHERE sha256 = $1")
            .bind(token_hash(token))
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// A bot's tokens (ids and creation times only).
    pub async fn tokens(&self, bot: &str) -> Result<Vec<TokenInfo>, StoreError> {
        let rows =
            query("SELECT id, created_at FROM bot_tokens WHERE bot_jid = $1 ORDER BY created_at")
                .bind(bot)
                .fetch_all(self.pool())
                .await?;
        Ok(rows
            .iter()
            .map(|r| TokenInfo {
                id: r.get("id"),
                created_at: r.get("created_at"),
            })
            .collect())
    }

    /// Revokes a token; `false` when the bot has no such token.
    pub async fn delete_token(&self, bot: &str, id: &str) -> Result<bool, StoreError> {
        let done = query("DELETE FROM bot_tokens WHERE bot_jid = $1 AND id = $2")
            .bind(bot)
            .bind(id)
            .execute(self.writer())
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// What a bot token is stored as.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_as_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
