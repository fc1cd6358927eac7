//! Secrets at rest: the bots' private keys and the webhooks' signing secrets are sealed in the
//! store with a key the store file does not hold (ChaCha20-Poly1305 from ring, the crypto
//! provider the build already has), so a copy of the database alone yields none of them.
//!
//! A sealed value is `MAGIC || nonce || ciphertext || tag`, bound to its row and column by the
//! associated data (a key sealed for one bot does not open as another's). Text columns hold it
//! as `sealed:` and base64. Values written before a key was in use are plain; [`Store::use_key`]
//! seals them in place.

use std::sync::Arc;

use super::db::query;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::{Store, StoreError};

/// The first bytes of a sealed value.
const MAGIC: &[u8] = b"xk1\0";
/// The prefix of a sealed value in a text column.
const TEXT_PREFIX: &str = "sealed:";

/// The key that seals secrets in the store. Its text form (base64 of 32 bytes) is what the
/// key file holds.
pub struct StoreKey(LessSafeKey);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

/// Why a store key could not be read.
#[derive(Debug, thiserror::Error)]
#[error("not a store key: expected 32 bytes in base64")]
pub struct BadStoreKey;

impl StoreKey {
    /// A new random key and its text form.
    pub fn generate() -> (StoreKey, String) {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system's random source works");
        let text = B64.encode(bytes);
        (Self::from_bytes(&bytes), text)
    }

    /// A key from its text form (surrounding whitespace ignored).
    pub fn from_text(text: &str) -> Result<StoreKey, BadStoreKey> {
        let bytes = B64.decode(text.trim()).map_err(|_| BadStoreKey)?;
        if bytes.len() != 32 {
            return Err(BadStoreKey);
        }
        Ok(Self::from_bytes(&bytes))
    }

    fn from_bytes(bytes: &[u8]) -> StoreKey {
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("32 bytes fit ChaCha20");
        StoreKey(LessSafeKey::new(key))
    }

    /// Seals `plain` for the row and column that `context` names.
    pub fn seal(&self, context: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system's random source works");
        let mut sealed = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut sealed,
            )
            .expect("ChaCha20-Poly1305 seals any length the store holds");
        [MAGIC, &nonce, &sealed].concat()
    }

    /// Opens a value sealed for `context`; `None` when this key did not seal it there.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        let rest = sealed.strip_prefix(MAGIC)?;
        if rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

/// Whether a stored value is sealed.
pub fn is_sealed(value: &[u8]) -> bool {
    value.starts_with(MAGIC) || value.starts_with(TEXT_PREFIX.as_bytes())
}

/// The tables holding bots' private keys (`key_der`, one row per `bot_jid`).
const KEY_TABLES: [&str; 2] = ["bot_keys", "bot_next_keys"];

/// The associated data of a bot's private key: the same in both key tables, so activating a
/// next key moves its sealed bytes as they are.
fn key_context(bot: &str) -> String {
    format!("bot_keys.key_der:{bot}")
}

/// The associated data of a webhook's secret.
fn secret_context(bot: &str) -> String {
    format!("webhooks.secret:{bot}")
}

impl Store {
    /// Seals secrets with `key` from now on, and seals in place those written before
    /// (returned: how many); an error when the store's sealed values are not this key's.
    pub async fn use_key(&self, key: StoreKey) -> Result<u64, StoreError> {
        let mut tx = self.writer.begin().await?;
        let mut keys = Vec::new();
        for table in KEY_TABLES {
            for row in query(format!("SELECT bot_jid, key_der FROM {table}"))
                .fetch_all(&mut tx)
                .await?
            {
                keys.push((
                    table,
                    row.try_get::<String, _>(0)?,
                    row.try_get::<Vec<u8>, _>(1)?,
                ));
            }
        }
        let hooks = query("SELECT bot_jid, secret FROM webhooks")
            .fetch_all(&mut tx)
            .await?;
        let mut sealed_now = 0;
        for (table, bot, value) in &keys {
            if is_sealed(value) {
                key.open(&key_context(bot), value)
                    .ok_or_else(|| wrong_key(bot))?;
                continue;
            }
            query(format!(
                "UPDATE {table} SET key_der = $1 WHERE bot_jid = $2"
            ))
            .bind(key.seal(&key_context(bot), value))
            .bind(bot)
            .execute(&mut tx)
            .await?;
            sealed_now += 1;
        }
        for row in &hooks {
            let (bot, value): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            if is_sealed(value.as_bytes()) {
                open_text(Some(&key), &secret_context(&bot), &value)?;
                continue;
            }
            query("UPDATE webhooks SET secret = $1 WHERE bot_jid = $2")
                .bind(seal_text(&key, &secret_context(&bot), &value))
                .bind(&bot)
                .execute(&mut tx)
                .await?;
            sealed_now += 1;
        }
        tx.commit().await?;
        // Set once: a second call with another key would leave two keys in play.
        let _ = self.sealing.set(Arc::new(key));
        Ok(sealed_now)
    }

    /// Whether any secret in the store is sealed (then only its key opens it).
    pub async fn has_sealed_secrets(&self) -> Result<bool, StoreError> {
        let row = query(
            "SELECT EXISTS (SELECT 1 FROM bot_keys WHERE substr(key_der, 1, 4) = $1) \
             OR EXISTS (SELECT 1 FROM bot_next_keys WHERE substr(key_der, 1, 4) = $2) \
             OR EXISTS (SELECT 1 FROM webhooks WHERE secret LIKE 'sealed:%')",
        )
        .bind(MAGIC)
        .bind(MAGIC)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<bool, _>(0)?)
    }

    /// A bot's private key as it is to be stored.
    pub(super) fn seal_key(&self, bot: &str, key_der: &[u8]) -> Vec<u8> {
        match self.sealing.get() {
            Some(key) => key.seal(&key_context(bot), key_der),
            None => key_der.to_vec(),
        }
    }

    /// A bot's private key as stored, opened.
    pub(super) fn open_key(&self, bot: &str, stored: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        if !is_sealed(&stored) {
            return Ok(stored);
        }
        let key = self.sealing.get().ok_or_else(|| no_key(bot))?;
        key.open(&key_context(bot), &stored)
            .ok_or_else(|| wrong_key(bot))
    }

    /// A webhook secret as it is to be stored.
    pub(super) fn seal_secret(&self, bot: &str, secret: &str) -> String {
        match self.sealing.get() {
            Some(key) => seal_text(key, &secret_context(bot), secret),
            None => secret.to_owned(),
        }
    }

    /// A webhook secret as stored, opened.
    pub(super) fn open_secret(&self, bot: &str, stored: String) -> Result<String, StoreError> {
        if !is_sealed(stored.as_bytes()) {
            return Ok(stored);
        }
        open_text(
            self.sealing.get().map(|k| &**k),
            &secret_context(bot),
            &stored,
        )
    }
}

fn seal_text(key: &StoreKey, context: &str, plain: &str) -> String {
    format!(
        "{TEXT_PREFIX}{}",
        B64.encode(key.seal(context, plain.as_bytes()))
    )
}

fn open_text(key: Option<&StoreKey>, context: &str, stored: &str) -> Result<String, StoreError> {
    let bot = context.rsplit(':').next().unwrap_or_default();
    let key = key.ok_or_else(|| no_key(bot))?;
    let sealed = stored
        .strip_prefix(TEXT_PREFIX)
        .and_then(|b| B64.decode(b).ok())
        .ok_or_else(|| StoreError::Unreadable(format!("sealed secret of {bot} is malformed")))?;
    let plain = key.open(context, &sealed).ok_or_else(|| wrong_key(bot))?;
    String::from_utf8(plain)
        .map_err(|_| StoreError::Unreadable(format!("secret of {bot} is not text")))
}

fn no_key(bot: &str) -> StoreError {
    StoreError::Sealed(format!(
        "the secrets of {bot} are sealed and no store key is in use"
    ))
}

fn wrong_key(bot: &str) -> StoreError {
    StoreError::Sealed(format!(
        "the store key does not open the secrets of {bot}: this store was sealed with another key (store.key_file)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let (key, text) = StoreKey::generate();
        let sealed = key.seal("bot_keys.key_der:a@b", b"private");
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(7).any(|w| w == b"private"));
        assert_eq!(
            key.open("bot_keys.key_der:a@b", &sealed).unwrap(),
            b"private"
        );
        assert_eq!(
            key.open("bot_keys.key_der:c@b", &sealed),
            None,
            "bound to its row"
        );
        let (other, _) = StoreKey::generate();
        assert_eq!(other.open("bot_keys.key_der:a@b", &sealed), None);
        let again = StoreKey::from_text(&format!("  {text}\n")).unwrap();
        assert_eq!(
            again.open("bot_keys.key_der:a@b", &sealed).unwrap(),
            b"private"
        );
        assert!(StoreKey::from_text("c2hvcnQ=").is_err());
        assert_eq!(format!("{key:?}"), "StoreKey(..)");
    }
}
