//! What the commands that go online share: the login options, the outcomes a script branches
//! on, asking a peer whether it speaks XTLS, and opening a tunnel whose key is judged against
//! `known_bots`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use minidom::Element;
use xtls::certs::Fingerprint;
use xtls::stanza::{IqType, ns};
use xtls::tunnel::{
    BotCredentials, CloseReason, Established, Event, PeerAuth, PeerPolicy, TrustMode, TrustVerdict,
};

use crate::client::{Client, DISCO_TIMEOUT, Happening};
use crate::identity;
use crate::known::{Entry, How, KnownBots};
use crate::xmpp::{Account, Connection};

/// How to reach and log into your account.
#[derive(clap::Args, Debug, Clone)]
pub struct LoginArgs {
    /// Your account, e.g. alice@example.org
    #[arg(long, env = "XTLS_JID", value_name = "JID")]
    pub jid: String,
    /// Read your password from FILE (else $XTLS_PASSWORD, else it is asked for)
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Where your server listens when DNS (SRV records) does not say: HOST or HOST:PORT
    #[arg(long, env = "XTLS_SERVER", value_name = "HOST[:PORT]")]
    pub server: Option<String>,
    /// Speak TLS from the first byte (XEP-0368, port 5223) instead of STARTTLS
    #[arg(long)]
    pub direct_tls: bool,
    /// Trust the CA certificates in FILE (PEM) instead of the system's: a private server
    #[arg(long, env = "XTLS_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// The exit statuses of the commands that talk to a peer; a script branches on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered (and answered, when an answer was awaited).
    Delivered = 0,
    /// Anything else went wrong: login, network, files.
    Failed = 1,
    /// The command was called wrongly.
    Usage = 2,
    /// The peer refused the tunnel or the message.
    Refused = 3,
    /// The peer does not speak XTLS, or does not exist.
    NoXtls = 4,
    /// The peer's key is not the one in `known_bots`.
    KeyChanged = 5,
    /// No answer in time.
    Timeout = 6,
}

/// A command's failure: its exit status and what to tell the person.
#[derive(Debug)]
pub struct Fail {
    /// The exit status.
    pub outcome: Outcome,
    /// The message, in words.
    pub message: String,
}

impl Fail {
    /// A failure of kind `outcome`.
    pub fn new(outcome: Outcome, message: impl Into<String>) -> Fail {
        Fail {
            outcome,
            message: message.into(),
        }
    }
}

/// Everything a command that goes online starts from.
pub struct Online {
    /// The session and its tunnels.
    pub client: Client,
    /// The bots whose keys we know.
    pub known: KnownBots,
}

/// Goes online, runs `work`, and logs out whatever came of it.
pub async fn online<T>(
    args: &LoginArgs,
    dir: &Path,
    limit: Duration,
    work: impl AsyncFnOnce(&mut Online) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let mut online = go_online(args, dir, limit).await?;
    let result = work(&mut online).await;
    online.client.logout().await;
    result
}

/// The account's bare JID, the identity's credentials, `known_bots`, then the login.
async fn go_online(args: &LoginArgs, dir: &Path, limit: Duration) -> Result<Online, Fail> {
    let Some(bare) = identity::bare_jid(&args.jid) else {
        return Err(Fail::new(
            Outcome::Usage,
            format!("'{}' is not a JID like alice@example.org", args.jid),
        ));
    };
    let stored = identity::load_or_create(dir, &bare).map_err(|e| {
        let outcome = match e {
            identity::IdentityError::TooOpen { .. } => Outcome::Usage,
            _ => Outcome::Failed,
        };
        Fail::new(outcome, e.to_string())
    })?;
    let creds = BotCredentials::new(stored.identity)
        .map_err(|e| Fail::new(Outcome::Failed, format!("your key cannot be used: {e}")))?;
    let known = KnownBots::load(&dir.join("known_bots"))
        .map_err(|e| Fail::new(Outcome::Failed, e.to_string()))?;
    let password = password(args)?;
    let account = Account {
        jid: bare
            .parse()
            .map_err(|e| Fail::new(Outcome::Usage, format!("'{bare}': {e}")))?,
        password,
        server: args.server.clone(),
        direct_tls: args.direct_tls,
        ca_file: args.ca_file.clone(),
    };
    let conn = Connection::login(&account, limit)
        .await
        .map_err(|e| Fail::new(Outcome::Failed, e.to_string()))?;
    Ok(Online {
        client: Client::new(conn, creds),
        known,
    })
}

/// The password: the file given, `$XTLS_PASSWORD`, or asked on the terminal.
fn password(args: &LoginArgs) -> Result<String, Fail> {
    if let Some(path) = &args.password_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Fail::new(Outcome::Failed, format!("{}: {e}", path.display())))?;
        return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
    }
    if let Ok(password) = std::env::var("XTLS_PASSWORD") {
        return Ok(password);
    }
    if !std::io::stdin().is_terminal() {
        return Err(Fail::new(
            Outcome::Usage,
            "no password: give --password-file FILE or set XTLS_PASSWORD",
        ));
    }
    rpassword::prompt_password(format!("Password for {}: ", args.jid))
        .map_err(|e| Fail::new(Outcome::Failed, format!("cannot read the password: {e}")))
}

/// What a peer's disco#info says of XTLS.
#[derive(Debug, Default)]
pub struct Announced {
    /// The XTLS feature is listed.
    pub xtls: bool,
    /// The key it announces (form field `spki-sha256`), if any.
    pub spki_sha256: Option<Fingerprint>,
    /// Its certificate's fingerprint (`cert-sha256`), if announced.
    pub cert_sha256: Option<String>,
    /// Its certificate's expiry (`not-after`), if announced.
    pub not_after: Option<String>,
    /// The next key during a rotation (`next-spki-sha256`), if announced.
    pub next_spki_sha256: Option<Fingerprint>,
}

/// Asks `peer` for disco#info (docs/protocol.md §1.4).
pub async fn discover(client: &mut Client, peer: &str) -> Result<Announced, Fail> {
    let query = Element::bare("query", ns::DISCO_INFO);
    let id = client.query(peer, query).await.map_err(lost)?;
    client.set_deadline(Some(Instant::now() + DISCO_TIMEOUT));
    loop {
        match client.next().await.map_err(lost)? {
            Happening::Answer(iq) if iq.id == id => {
                client.set_deadline(None);
                if iq.type_ == IqType::Error {
                    let condition = iq.error_condition();
                    let words = match condition.as_str() {
                        "item-not-found" | "remote-server-not-found" => {
                            format!("{peer} does not exist ({condition})")
                        }
                        "service-unavailable" | "feature-not-implemented" => format!(
                            "{peer} does not answer service discovery ({condition}): it is \
                             offline or does not support XTLS"
                        ),
                        "recipient-unavailable" | "remote-server-timeout" => {
                            return Err(Fail::new(
                                Outcome::Timeout,
                                format!("{peer} cannot be reached now ({condition}); try later"),
                            ));
                        }
                        _ => format!("{peer}'s server answered {condition}"),
                    };
                    return Err(Fail::new(Outcome::NoXtls, words));
                }
                let announced = iq
                    .children
                    .iter()
                    .find(|c| c.is("query", ns::DISCO_INFO))
                    .map(read_disco)
                    .unwrap_or_default();
                if !announced.xtls {
                    return Err(Fail::new(
                        Outcome::NoXtls,
                        format!(
                            "{peer} does not support XTLS (its service discovery does not list it)"
                        ),
                    ));
                }
                return Ok(announced);
            }
            Happening::Deadline => {
                return Err(Fail::new(
                    Outcome::Timeout,
                    format!(
                        "{peer} did not answer service discovery within {} s",
                        DISCO_TIMEOUT.as_secs()
                    ),
                ));
            }
            _ => {}
        }
    }
}

/// Reads the features and the `urn:xmpp:tmp:xtls` form of a disco#info `<query/>`.
pub fn read_disco(query: &Element) -> Announced {
    let mut announced = Announced {
        xtls: query
            .children()
            .any(|c| c.name() == "feature" && c.attr("var") == Some(ns::XTLS)),
        ..Announced::default()
    };
    let form = query.children().find(|x| {
        x.is("x", "jabber:x:data")
            && x.children().any(|f| {
                f.attr("var") == Some("FORM_TYPE") && field_value(f).as_deref() == Some(ns::XTLS)
            })
    });
    for field in form.iter().flat_map(|x| x.children()) {
        let value = field_value(field);
        match field.attr("var") {
            Some("spki-sha256") => {
                announced.spki_sha256 = value.as_deref().and_then(Fingerprint::parse)
            }
            Some("cert-sha256") => announced.cert_sha256 = value,
            Some("not-after") => announced.not_after = value,
            Some("next-spki-sha256") => {
                announced.next_spki_sha256 = value.as_deref().and_then(Fingerprint::parse)
            }
            _ => {}
        }
    }
    announced
}

fn field_value(field: &Element) -> Option<String> {
    field
        .children()
        .find(|v| v.name() == "value")
        .map(|v| v.text())
}

/// How a tunnel's peer was judged once it opened.
#[derive(Debug)]
pub struct Opened {
    /// What the handshake established.
    pub established: Established,
    /// The peer's key.
    pub spki_sha256: Fingerprint,
    /// What `known_bots` said before: `None` on a first meeting (now remembered as tofu).
    pub known: Option<Entry>,
}

/// The policy for a peer's key: its entry in `known_bots` pinned, or trust on first use.
pub fn policy_for(known: &KnownBots, peer_bare: &str) -> PeerPolicy {
    PeerPolicy {
        peer_auth: PeerAuth::Required,
        trust: TrustMode::Tofu,
        pins: known
            .get(peer_bare)
            .map(|e| vec![e.spki_sha256.clone()])
            .unwrap_or_default(),
        pinned_cert_names: Vec::new(),
        pairing: false,
    }
}

/// Opens a tunnel to `peer` and waits until it is open; a first meeting is remembered in
/// `known_bots` (tofu), a changed key ends it with [`Outcome::KeyChanged`].
pub async fn open(online: &mut Online, peer: &str, limit: Duration) -> Result<Opened, Fail> {
    let peer_bare = xtls::tunnel::bare(peer).to_owned();
    let policy = policy_for(&online.known, &peer_bare);
    online.client.open(peer, policy).await.map_err(lost)?;
    online.client.set_deadline(Some(Instant::now() + limit));
    loop {
        match online.client.next().await.map_err(lost)? {
            Happening::Tunnel(p, Event::Established(established)) if p == peer => {
                online.client.set_deadline(None);
                let Some(spki) = established.peer.spki_sha256.clone() else {
                    return Err(Fail::new(
                        Outcome::Refused,
                        format!("{peer} presented no key"),
                    ));
                };
                let before = online.known.get(&peer_bare).cloned();
                if established.peer.trust == TrustVerdict::TofuNew {
                    online.known = remember_first_meeting(online.known.path(), &peer_bare, &spki)?;
                }
                return Ok(Opened {
                    established,
                    spki_sha256: spki,
                    known: before,
                });
            }
            Happening::Tunnel(p, Event::Closed(reason)) if p == peer => {
                online.client.set_deadline(None);
                return Err(closed_early(&online.known, peer, &peer_bare, &reason));
            }
            Happening::Deadline => {
                return Err(Fail::new(
                    Outcome::Timeout,
                    format!(
                        "the tunnel to {peer} did not open within {} s",
                        limit.as_secs()
                    ),
                ));
            }
            _ => {}
        }
    }
}

/// Records a first meeting (tofu) unless the file meanwhile knows a key for the peer, which
/// it keeps: a pin is only ever set where none was. Returns the file as it now is.
pub fn remember_first_meeting(
    path: &Path,
    peer_bare: &str,
    spki: &Fingerprint,
) -> Result<KnownBots, Fail> {
    crate::known::update(path, |known| {
        if known.get(peer_bare).is_some() {
            return false;
        }
        known.remember(Entry {
            jid: peer_bare.to_owned(),
            spki_sha256: spki.clone(),
            how: How::Tofu,
            since: crate::now(),
        });
        true
    })
    .map_err(|e| Fail::new(Outcome::Failed, e.to_string()))
}

/// Records `peer_bare`'s key as verified. Returns the file as it now is.
pub fn remember_verified(
    path: &Path,
    peer_bare: &str,
    spki: &Fingerprint,
) -> Result<KnownBots, Fail> {
    crate::known::update(path, |known| {
        known.remember(Entry {
            jid: peer_bare.to_owned(),
            spki_sha256: spki.clone(),
            how: How::Verified,
            since: crate::now(),
        });
        true
    })
    .map_err(|e| Fail::new(Outcome::Failed, e.to_string()))
}

/// Why a tunnel that never opened ended, in words, with its exit status.
fn closed_early(known: &KnownBots, peer: &str, peer_bare: &str, reason: &CloseReason) -> Fail {
    if let Some((presented, _pinned)) = reason.identity_change() {
        let old = known.get(peer_bare);
        let since = old
            .map(|e| format!(" ({} since {})", e.how, e.since))
            .unwrap_or_default();
        let was = old
            .map(|e| e.spki_sha256.to_string())
            .unwrap_or_else(|| "(none)".into());
        return Fail::new(
            Outcome::KeyChanged,
            format!(
                "WARNING: THE KEY OF {peer} HAS CHANGED. Nothing was sent.\n\
                 \x20 the key you know{since}:\n\
                 \x20   {was}\n\
                 \x20 the key it presents now:\n\
                 \x20   {presented}\n\
                 Someone may be impersonating it, or its operator replaced the key. Ask the \
                 operator for the new fingerprint over a channel you trust, and compare. If it \
                 matches, accept it with:\n\
                 \x20 xtls trust {peer_bare} {presented}"
            ),
        );
    }
    let (outcome, words) = match reason {
        CloseReason::NotSupported(c) => (
            Outcome::NoXtls,
            format!("{peer} does not support XTLS ({c})"),
        ),
        CloseReason::Refused(c) => (Outcome::Refused, format!("{peer} refused the tunnel ({c})")),
        CloseReason::Busy(c) => (
            Outcome::Refused,
            format!("{peer} is busy; try again later ({c})"),
        ),
        CloseReason::PeerAlert(alert) if is_certificate_alert(alert) => (
            Outcome::Refused,
            format!(
                "{peer} refused your key during the handshake (TLS alert: {alert}): it knows \
                 another key for your account, or lets in only keys its operator approved; give \
                 its operator your fingerprint (xtls whoami), or use a pairing code (xtls chat \
                 --pair CODE)"
            ),
        ),
        CloseReason::PeerAlert(alert) => (
            Outcome::Refused,
            format!("the TLS handshake with {peer} failed (its TLS sent the alert {alert})"),
        ),
        CloseReason::CertificateRejected(e) => (
            Outcome::Refused,
            format!("{peer}'s certificate was refused: {e}"),
        ),
        CloseReason::Timeout(which) => (
            Outcome::Timeout,
            format!("{peer} did not answer in time ({which})"),
        ),
        other => (
            Outcome::Refused,
            format!("the tunnel to {peer} ended: {other}"),
        ),
    };
    Fail::new(outcome, words)
}

/// Closes the tunnel and waits a little for the peer's answer, so it ends cleanly on both
/// sides.
///
/// Returns the bodies of the messages the peer sent meanwhile: they were acknowledged to it,
/// so the caller shows them rather than lose them.
pub async fn close(online: &mut Online, peer: &str) -> Vec<String> {
    let mut late = Vec::new();
    if online.client.close(peer).await.is_err() {
        return late;
    }
    online
        .client
        .set_deadline(Some(Instant::now() + Duration::from_secs(5)));
    while online.client.any_live() {
        match online.client.next().await {
            Ok(Happening::Deadline) | Err(_) => break,
            Ok(Happening::Tunnel(p, Event::Stanza(stanza)))
                if p == peer
                    && stanza.name() == "message"
                    && stanza.attr("type") != Some("error") =>
            {
                if let Some(body) = stanza.get_child("body", ns::CLIENT) {
                    late.push(body.text());
                }
            }
            Ok(_) => {}
        }
    }
    online.client.set_deadline(None);
    late
}

/// A peer's text as it may reach the terminal: the lines after the first are indented, so
/// that no line can pass for one of ours or another sender's, and control characters (escape
/// sequences, bidirectional overrides) are shown as escapes instead of acting on the screen.
pub fn on_screen(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => shown.push_str("\n    "),
            '\t' => shown.push('\t'),
            c if c.is_control()
                || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}') =>
            {
                shown.extend(c.escape_unicode());
            }
            c => shown.push(c),
        }
    }
    shown
}

/// Whether a TLS alert is about our certificate (as opposed to a broken handshake).
fn is_certificate_alert(alert: &str) -> bool {
    [
        "BadCertificate",
        "CertificateUnknown",
        "CertificateRequired",
        "UnsupportedCertificate",
        "CertificateRevoked",
        "CertificateExpired",
        "AccessDenied",
    ]
    .iter()
    .any(|name| alert.contains(name))
}

/// The session ended under us.
pub fn lost(e: std::io::Error) -> Fail {
    Fail::new(
        Outcome::Failed,
        format!("the connection to your server was lost: {e}"),
    )
}

/// One line about the peer's key, for a person.
pub fn key_line(peer: &str, opened: &Opened) -> String {
    match &opened.known {
        Some(e) if e.how == How::Verified => format!(
            "{peer}: key {} — verified (since {})",
            opened.spki_sha256, e.since
        ),
        Some(e) => format!(
            "{peer}: key {} — known since {}, not verified (compare it with its operator, or run /sas in xtls chat)",
            opened.spki_sha256, e.since
        ),
        None => format!(
            "{peer}: key {} — NEW: first meeting, remembered. Compare this fingerprint with the one its operator publishes",
            opened.spki_sha256
        ),
    }
}

/// The key's standing as a word, for JSON.
pub fn standing(opened: &Opened) -> &'static str {
    match &opened.known {
        Some(e) if e.how == How::Verified => "verified",
        Some(_) => "known",
        None => "new",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn field(var: &str, value: &str) -> Element {
        let mut value_el = Element::bare("value", "jabber:x:data");
        value_el.append_text(value);
        Element::builder("field", "jabber:x:data")
            .attr(xtls::stanza::name("var"), var)
            .append(value_el)
            .build()
    }

    fn query(features: &[&str], fields: &[(String, String)]) -> Element {
        let mut query = Element::bare("query", ns::DISCO_INFO);
        for var in features {
            query.append_child(
                Element::builder("feature", ns::DISCO_INFO)
                    .attr(xtls::stanza::name("var"), *var)
                    .build(),
            );
        }
        let mut form = Element::builder("x", "jabber:x:data").build();
        form.append_child(field("FORM_TYPE", ns::XTLS));
        for (var, value) in fields {
            form.append_child(field(var, value));
        }
        query.append_child(form);
        query
    }

    #[test]
    fn a_peers_text_cannot_pose_as_another_line_or_drive_the_terminal() {
        assert_eq!(
            on_screen("ok\nweather@bots.example.org: your code is 1234"),
            "ok\n    weather@bots.example.org: your code is 1234"
        );
        assert_eq!(on_screen("\u{1b}[2Jhi\r"), "\\u{1b}[2Jhi\\u{d}");
        assert_eq!(on_screen("a\u{202E}b"), "a\\u{202e}b");
        assert_eq!(on_screen("plain words\tand tabs"), "plain words\tand tabs");
    }

    #[test]
    fn the_announced_key_and_the_feature_are_read_from_the_xtls_form() {
        let spki = "61:B7:1C:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:48:4E";
        let fields = [
            ("spki-sha256".to_owned(), spki.to_owned()),
            ("not-after".to_owned(), "2036-12-01T00:00:00Z".to_owned()),
        ];
        let read = read_disco(&query(&[ns::DISCO_INFO, ns::XTLS], &fields));
        assert!(read.xtls);
        assert_eq!(
            read.spki_sha256.map(|f| f.to_string()).as_deref(),
            Some(spki)
        );
        assert_eq!(read.not_after.as_deref(), Some("2036-12-01T00:00:00Z"));
        assert!(!read_disco(&query(&[ns::DISCO_INFO], &[])).xtls);
    }

    proptest! {
        /// Whatever a peer puts in its form, reading it never panics, and a key is taken only
        /// when it is a well-formed fingerprint.
        #[test]
        fn any_form_is_read_without_panic(
            fields in proptest::collection::vec(("[a-z-]{0,16}", "\\PC{0,120}"), 0..8),
        ) {
            let read = read_disco(&query(&[ns::XTLS], &fields));
            if let Some(spki) = read.spki_sha256 {
                prop_assert!(Fingerprint::parse(&spki.to_string()).is_some());
            }
        }
    }
}
