//! The session table's history: every tunnel, live and closed.

use super::db::{Row, query};
use serde::Serialize;

use super::{Store, StoreError, named};
use xtls::tunnel::{Role, State, TrustVerdict};

/// A tunnel's id in the session table, the API and the event log: 16 random hex digits.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    serde::Deserialize,
    sqlx::Type,
    utoipa::ToSchema,
)]
#[serde(transparent)]
#[sqlx(transparent)]
#[schema(value_type = String, example = "3685813dbdbe7a39")]
pub struct TunnelId(String);

impl TunnelId {
    /// A fresh random id.
    pub fn random() -> TunnelId {
        TunnelId(format!("{:016x}", rand::random::<u64>()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&TunnelId> for super::db::Value {
    fn from(id: &TunnelId) -> Self {
        id.as_str().into()
    }
}

impl From<&Option<TunnelId>> for super::db::Value {
    fn from(id: &Option<TunnelId>) -> Self {
        id.as_ref().map(TunnelId::as_str).into()
    }
}

impl From<String> for TunnelId {
    fn from(id: String) -> Self {
        TunnelId(id)
    }
}

impl From<&str> for TunnelId {
    fn from(id: &str) -> Self {
        TunnelId(id.to_owned())
    }
}

impl std::fmt::Display for TunnelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What is known of a peer's key in a tunnel row: nothing yet, or the handshake's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PeerTrust {
    /// The handshake has not judged the peer yet.
    #[default]
    Pending,
    /// No certificate was presented (allowed under `peer_auth = optional`).
    Unauthenticated,
    /// First use: the key was unknown and is now pinned.
    TofuNew,
    /// The key matched a pin.
    Pinned,
    /// Admitted only to pair with a code (the key is not trusted yet).
    Pairing,
}

impl From<TrustVerdict> for PeerTrust {
    fn from(v: TrustVerdict) -> Self {
        match v {
            TrustVerdict::Unauthenticated => PeerTrust::Unauthenticated,
            TrustVerdict::TofuNew => PeerTrust::TofuNew,
            TrustVerdict::Pinned => PeerTrust::Pinned,
            TrustVerdict::Pairing => PeerTrust::Pairing,
        }
    }
}

impl PeerTrust {
    /// The stable name (as in JSON and the store).
    pub fn as_str(self) -> &'static str {
        match self {
            PeerTrust::Pending => "pending",
            PeerTrust::Unauthenticated => TrustVerdict::Unauthenticated.as_str(),
            PeerTrust::TofuNew => TrustVerdict::TofuNew.as_str(),
            PeerTrust::Pinned => TrustVerdict::Pinned.as_str(),
            PeerTrust::Pairing => TrustVerdict::Pairing.as_str(),
        }
    }

    /// Reads the stored name; `NULL` (rows of early versions) is pending too.
    fn from_stored(name: Option<&str>) -> Result<PeerTrust, xtls::UnknownName> {
        match name {
            None | Some("pending") => Ok(PeerTrust::Pending),
            Some(verdict) => Ok(verdict.parse::<TrustVerdict>()?.into()),
        }
    }
}

/// The peer identity part of a tunnel row.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default, utoipa::ToSchema)]
pub struct PeerIdentityRecord {
    /// SPKI SHA-256 of the peer's key, colon hex; `None` before the handshake or without one.
    pub spki_sha256: Option<String>,
    /// What the handshake concluded of the key.
    pub trust: PeerTrust,
}

/// Where a tunnel's short authentication string exchange is (docs/verification.md).
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SasState {
    /// Nonces are being exchanged.
    Exchanging,
    /// Both nonces are in: the code is shown, awaiting a person's decision.
    Ready,
    /// Someone confirmed the codes match: the peer's key is verified.
    Confirmed,
    /// Someone said the codes differ: the tunnel was closed.
    Rejected,
    /// The exchange failed (a changed nonce, a refused message); `error` says why.
    Failed,
}

/// Which end started an exchange.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SasSide {
    /// The bot (over the API).
    Bot,
    /// The peer.
    Peer,
}

/// A live tunnel's short authentication string, as the API shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct SasStatus {
    /// Where the exchange is.
    pub state: SasState,
    /// Who started it.
    pub started_by: SasSide,
    /// The code as five base-28 characters (XEP-0116 `sas28x5`), once both nonces are in.
    pub sas28x5: Option<String>,
    /// The code as six decimal digits, once both nonces are in.
    pub decimal: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// One row of the session table, live or historical (the admin API's tunnel object).
#[derive(Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct TunnelRecord {
    /// Tunnel id.
    pub id: TunnelId,
    /// The bot's bare JID.
    pub bot: String,
    /// Our JID as the peer addresses it.
    pub local: String,
    /// The peer's JID.
    pub peer: String,
    /// Which end of the tunnel the bot is.
    pub role: Role,
    /// Where the tunnel is in its life (spec §1.14).
    pub state: State,
    /// Negotiated TLS version.
    pub tls_version: Option<String>,
    /// Negotiated cipher suite.
    pub cipher_suite: Option<String>,
    /// The peer's identity.
    pub peer_identity: PeerIdentityRecord,
    /// Inner stanzas received.
    pub stanzas_in: u64,
    /// Inner stanzas sent.
    pub stanzas_out: u64,
    /// TLS bytes received.
    pub bytes_in: u64,
    /// TLS bytes sent.
    pub bytes_out: u64,
    /// When the tunnel was created.
    pub opened_at: String,
    /// When the handshake finished.
    pub established_at: Option<String>,
    /// When it ended.
    pub closed_at: Option<String>,
    /// Why it ended.
    pub close_reason: Option<String>,
    /// The short authentication string exchange of a live tunnel, if one was started (not
    /// kept once the tunnel is closed).
    pub sas: Option<SasStatus>,
}

/// Field by field, so that `clone_from` reuses the strings' buffers: the live session table
/// refreshes a tunnel's row after every stanza that moves its counters.
impl Clone for TunnelRecord {
    fn clone(&self) -> Self {
        let mut copy = TunnelRecord::new(
            TunnelId(String::new()),
            "",
            &xtls::tunnel::TunnelKey {
                local: String::new(),
                peer: String::new(),
            },
            Role::Responder,
            State::Starting,
            String::new(),
        );
        copy.clone_from(self);
        copy
    }

    fn clone_from(&mut self, source: &Self) {
        let TunnelRecord {
            id,
            bot,
            local,
            peer,
            role,
            state,
            tls_version,
            cipher_suite,
            peer_identity,
            stanzas_in,
            stanzas_out,
            bytes_in,
            bytes_out,
            opened_at,
            established_at,
            closed_at,
            close_reason,
            sas,
        } = source;
        self.id.0.clone_from(&id.0);
        self.bot.clone_from(bot);
        self.local.clone_from(local);
        self.peer.clone_from(peer);
        self.role = *role;
        self.state = *state;
        self.tls_version.clone_from(tls_version);
        self.cipher_suite.clone_from(cipher_suite);
        let PeerIdentityRecord { spki_sha256, trust } = peer_identity;
        self.peer_identity.spki_sha256.clone_from(spki_sha256);
        self.peer_identity.trust = *trust;
        self.stanzas_in = *stanzas_in;
        self.stanzas_out = *stanzas_out;
        self.bytes_in = *bytes_in;
        self.bytes_out = *bytes_out;
        self.opened_at.clone_from(opened_at);
        self.established_at.clone_from(established_at);
        self.closed_at.clone_from(closed_at);
        self.close_reason.clone_from(close_reason);
        self.sas.clone_from(sas);
    }
}

impl TunnelRecord {
    /// A row for a tunnel that has just been created: no handshake facts, no counts yet.
    pub fn new(
        id: TunnelId,
        bot: &str,
        key: &xtls::tunnel::TunnelKey,
        role: Role,
        state: State,
        opened_at: String,
    ) -> TunnelRecord {
        TunnelRecord {
            id,
            bot: bot.to_owned(),
            local: key.local.clone(),
            peer: key.peer.clone(),
            role,
            state,
            tls_version: None,
            cipher_suite: None,
            peer_identity: PeerIdentityRecord::default(),
            stanzas_in: 0,
            stanzas_out: 0,
            bytes_in: 0,
            bytes_out: 0,
            opened_at,
            established_at: None,
            closed_at: None,
            close_reason: None,
            sas: None,
        }
    }
}

/// Filter for tunnel listings.
#[derive(Debug, Clone, Default)]
pub struct TunnelFilter {
    /// Only this bot.
    pub bot: Option<String>,
    /// Only this peer (full JID, or bare to match every resource).
    pub peer: Option<String>,
    /// Only this state.
    pub state: Option<State>,
}

impl TunnelFilter {
    /// Whether a row passes the filter.
    pub fn matches(&self, t: &TunnelRecord) -> bool {
        self.bot.as_ref().is_none_or(|b| *b == t.bot)
            && self
                .peer
                .as_ref()
                .is_none_or(|p| *p == t.peer || xtls::tunnel::bare(&t.peer) == p)
            && self.state.is_none_or(|s| s == t.state)
    }
}

impl Store {
    /// Inserts or replaces a tunnel row, naming this instance as the one that ran it (fenced by
    /// `lease` when given).
    pub async fn save_tunnel(
        &self,
        t: &TunnelRecord,
        lease: Option<&super::Lease>,
    ) -> Result<(), StoreError> {
        let save = query(
            "INSERT INTO tunnels (id, bot_jid, local_jid, peer, role, state, tls_version, cipher_suite, peer_spki, trust, \
             stanzas_in, stanzas_out, bytes_in, bytes_out, opened_at, established_at, closed_at, close_reason, instance_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) \
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, tls_version = excluded.tls_version, \
             cipher_suite = excluded.cipher_suite, peer_spki = excluded.peer_spki, trust = excluded.trust, \
             stanzas_in = excluded.stanzas_in, stanzas_out = excluded.stanzas_out, bytes_in = excluded.bytes_in, \
             bytes_out = excluded.bytes_out, established_at = excluded.established_at, closed_at = excluded.closed_at, \
             close_reason = excluded.close_reason",
        )
        .bind(&t.id)
        .bind(&t.bot)
        .bind(&t.local)
        .bind(&t.peer)
        .bind(t.role.as_str())
        .bind(t.state.as_str())
        .bind(&t.tls_version)
        .bind(&t.cipher_suite)
        .bind(&t.peer_identity.spki_sha256)
        .bind(t.peer_identity.trust.as_str())
        .bind(t.stanzas_in as i64)
        .bind(t.stanzas_out as i64)
        .bind(t.bytes_in as i64)
        .bind(t.bytes_out as i64)
        .bind(&t.opened_at)
        .bind(&t.established_at)
        .bind(&t.closed_at)
        .bind(&t.close_reason)
        .bind(self.instance_id());
        self.write_for(lease, save).await
    }

    /// Tunnel rows, newest first.
    pub async fn list_tunnels(
        &self,
        filter: &TunnelFilter,
        limit: i64,
    ) -> Result<Vec<TunnelRecord>, StoreError> {
        let rows = query(
            "SELECT * FROM tunnels WHERE ($1 IS NULL OR bot_jid = $1) AND ($2 IS NULL OR state = $2) \
             AND ($3 IS NULL OR peer = $3 OR substr(peer, 1, length($3) + 1) = $3 || '/') \
             ORDER BY opened_at DESC, id DESC LIMIT $4",
        )
        .bind(&filter.bot)
        .bind(filter.state.map(State::as_str))
        .bind(&filter.peer)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut tunnels = Vec::with_capacity(rows.len());
        for row in &rows {
            let t = tunnel_from_row(row)?;
            if filter.matches(&t) {
                tunnels.push(t);
            }
        }
        Ok(tunnels)
    }

    /// One tunnel row.
    pub async fn tunnel(&self, id: &TunnelId) -> Result<Option<TunnelRecord>, StoreError> {
        let row = query("SELECT * FROM tunnels WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(tunnel_from_row).transpose()
    }
}

fn tunnel_from_row(r: &Row) -> Result<TunnelRecord, StoreError> {
    let trust = PeerTrust::from_stored(r.try_get("trust")?)?;
    Ok(TunnelRecord {
        id: r.try_get("id")?,
        bot: r.try_get("bot_jid")?,
        local: r.try_get("local_jid")?,
        peer: r.try_get("peer")?,
        role: named(r, "role")?,
        state: named(r, "state")?,
        tls_version: r.try_get("tls_version")?,
        cipher_suite: r.try_get("cipher_suite")?,
        peer_identity: PeerIdentityRecord {
            spki_sha256: r.try_get("peer_spki")?,
            trust,
        },
        stanzas_in: r.try_get::<i64, _>("stanzas_in")? as u64,
        stanzas_out: r.try_get::<i64, _>("stanzas_out")? as u64,
        bytes_in: r.try_get::<i64, _>("bytes_in")? as u64,
        bytes_out: r.try_get::<i64, _>("bytes_out")? as u64,
        opened_at: r.try_get("opened_at")?,
        established_at: r.try_get("established_at")?,
        closed_at: r.try_get("closed_at")?,
        close_reason: r.try_get("close_reason")?,
        sas: None,
    })
}
