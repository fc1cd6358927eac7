//! The user's XMPP session: c2s login the way clients do it (STARTTLS or direct TLS checked
//! against the system's roots or a CA file, SASL SCRAM, resource binding), then stanzas in and
//! out as `minidom` elements for the engine.
//!
//! tokio-xmpp supplies the XML stream, STARTTLS negotiation, SASL and SRV lookup; this module
//! drives those pieces itself rather than through `tokio_xmpp::Client`, which reconnects
//! forever and hides why a login failed. A command here wants one session, and a person
//! wants to hear "wrong password", not wait on a silent retry loop.

use std::borrow::Cow;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use minidom::Element;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_xmpp::connect::DnsConfig;
use tokio_xmpp::error::{AuthError, Error as XmppError};
use tokio_xmpp::jid::{BareJid, FullJid, Jid};
use tokio_xmpp::parsers::bind::{BindQuery, BindResponse};
use tokio_xmpp::parsers::iq::{Iq, IqPayload};
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::parsers::stream_features::StreamFeatures;
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, RawStanzaHeader, ReadError, RecvFeaturesError, StreamElementError,
    StreamHeader, Timeouts, XmppStream, XmppStreamElement, initiate_stream,
};
use tokio_xmpp::{Stanza, client_login};

/// The XML namespace of client streams.
const JABBER_CLIENT: &str = "jabber:client";

/// How to reach and log into the user's account.
#[derive(Clone)]
pub struct Account {
    /// The account, e.g. `alice@example.org`.
    pub jid: BareJid,
    /// Its password.
    pub password: String,
    /// Where the server listens, when not found by SRV records: `host` or `host:port`.
    pub server: Option<String>,
    /// TLS from the first byte (XEP-0368) instead of STARTTLS.
    pub direct_tls: bool,
    /// PEM certificates to trust instead of the system's roots (a private server's CA).
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("jid", &self.jid)
            .field("password", &"(hidden)")
            .field("server", &self.server)
            .field("direct_tls", &self.direct_tls)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Why the login did not succeed, in words for the person at the keyboard.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The CA file could not be used.
    #[error("{path}: {problem}")]
    CaFile {
        /// The file given.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The system's trusted roots could not be read.
    #[error("no trusted root certificates found on this system; give --ca-file FILE")]
    NoRoots,
    /// The server could not be found or reached.
    #[error("cannot reach the server for {domain}{at}: {reason}")]
    Unreachable {
        /// The account's domain.
        domain: String,
        /// " at host:port" when the address was given.
        at: String,
        /// What failed.
        reason: String,
    },
    /// The server does not offer TLS, so the password is not sent.
    #[error(
        "the server for {0} does not offer TLS (STARTTLS); your password was not sent. \
         If it speaks TLS from the first byte, try --direct-tls"
    )]
    NoTls(String),
    /// The TLS handshake with the server failed (often: its certificate is not trusted).
    #[error("TLS with the server for {domain} failed: {reason}{hint}")]
    Tls {
        /// The account's domain.
        domain: String,
        /// What rustls said.
        reason: String,
        /// What to try.
        hint: &'static str,
    },
    /// The server refused the account's credentials.
    #[error("the server refused the login for {jid}: {reason}")]
    Refused {
        /// The account.
        jid: String,
        /// The SASL failure in words.
        reason: String,
    },
    /// The server ended the stream or broke the protocol.
    #[error("the server for {domain} broke off the login: {reason}")]
    Protocol {
        /// The account's domain.
        domain: String,
        /// What happened.
        reason: String,
    },
    /// Nothing came back in time.
    #[error("the login to {0} did not finish within {1} s")]
    Timeout(String, u64),
}

/// A logged-in session: stanzas in and out.
pub struct Connection {
    stream: XmppStream<BufStream<TlsStream<TcpStream>>>,
    jid: FullJid,
    pings: u64,
}

/// What [`Connection::recv`] yields.
#[derive(Debug)]
pub enum Incoming {
    /// A stanza, as an element of namespace `jabber:client`.
    Stanza(Element),
    /// A stanza that could not be parsed; it is skipped.
    Invalid,
    /// An IQ request that could not be parsed: it still gets its one answer (`bad-request`).
    InvalidRequest {
        /// Its `id`.
        id: String,
        /// Its sender.
        from: String,
    },
}

/// How long the stream may be silent before we ping the server, and how long the answer may
/// take before the connection is counted lost.
const TIMEOUTS: Timeouts = Timeouts {
    read_timeout: Duration::from_secs(60),
    response_timeout: Duration::from_secs(30),
};

impl Connection {
    /// Connects, secures, authenticates and binds a resource, within `limit`.
    pub async fn login(account: &Account, limit: Duration) -> Result<Connection, LoginError> {
        let domain = account.jid.domain().to_string();
        match tokio::time::timeout(limit, login(account)).await {
            Ok(result) => result,
            Err(_) => Err(LoginError::Timeout(domain, limit.as_secs())),
        }
    }

    /// The full JID the server bound for this session.
    pub fn jid(&self) -> &FullJid {
        &self.jid
    }

    /// Sends one stanza. One that is not a valid stanza (an address that is no JID, say) is
    /// not sent and is reported as `InvalidInput`; the connection stays usable.
    pub async fn send(&mut self, mut stanza: Element) -> io::Result<()> {
        for attr in ["from", "to"] {
            if stanza.attr(attr) == Some("") {
                xtls::stanza::remove_attr(&mut stanza, attr);
            }
        }
        let stanza = Stanza::try_from(stanza).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("not a stanza: {e}"))
        })?;
        self.stream.send(&XmppStreamElement::Stanza(stanza)).await
    }

    /// The next stanza from the server. A silent stream is kept alive with a ping to the
    /// server; `Err` means the connection is gone.
    pub async fn recv(&mut self) -> io::Result<Incoming> {
        loop {
            let Some(item) = self.stream.next().await else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            };
            match item {
                Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(stanza))) => {
                    return Ok(Incoming::Stanza(Element::from(stanza)));
                }
                Ok(FallibleStreamElement::Ok(XmppStreamElement::StreamError(e))) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("the server ended the stream: {e}"),
                    ));
                }
                Ok(FallibleStreamElement::Ok(_)) => {}
                Ok(FallibleStreamElement::Err(StreamElementError::InvalidStanza {
                    name,
                    header:
                        RawStanzaHeader {
                            from: Some(from),
                            id: Some(id),
                            type_: Some(type_),
                            ..
                        },
                    ..
                })) if name.to_string() == "iq" && (type_ == "get" || type_ == "set") => {
                    return Ok(Incoming::InvalidRequest { id, from });
                }
                Ok(FallibleStreamElement::Err(_)) => return Ok(Incoming::Invalid),
                Err(ReadError::SoftTimeout) => self.ping().await?,
                Err(ReadError::HardError(e)) => return Err(e),
                Err(ReadError::ParseError(e)) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
                }
                Err(ReadError::StreamFooterReceived) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the stream",
                    ));
                }
            }
        }
    }

    /// Ends the stream politely (`</stream:stream>`) and waits briefly for the server's end.
    pub async fn close(mut self) {
        let close = SinkExt::<&XmppStreamElement>::close(&mut self.stream);
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
    }

    /// A XEP-0199 ping to our server, so that a quiet link proves alive.
    async fn ping(&mut self) -> io::Result<()> {
        self.pings += 1;
        let iq = Iq::from_get(
            format!("keepalive-{}", self.pings),
            tokio_xmpp::parsers::ping::Ping,
        )
        .with_to(Jid::from(self.jid.domain().to_owned()));
        self.stream
            .send(&XmppStreamElement::Stanza(Stanza::Iq(iq)))
            .await
    }
}

type Plain = BufStream<TcpStream>;
type Secure = BufStream<TlsStream<TcpStream>>;

async fn login(account: &Account) -> Result<Connection, LoginError> {
    let domain = account.jid.domain().to_string();
    let tls = tls_config(account.ca_file.as_deref())?;
    let tcp = connect_tcp(account).await?;
    let header = || StreamHeader {
        to: Some(Cow::Owned(domain.clone())),
        from: None,
        id: None,
    };
    let protocol = |reason: String| LoginError::Protocol {
        domain: domain.clone(),
        reason,
    };
    let secure = if account.direct_tls {
        handshake(&tls, &domain, tcp).await?
    } else {
        let (features, mut stream) = open_stream(tcp, header(), &domain).await?;
        if !features.can_starttls() {
            return Err(LoginError::NoTls(domain));
        }
        starttls(&mut stream).await.map_err(&protocol)?;
        let tcp = stream.into_inner().into_inner();
        handshake(&tls, &domain, tcp).await?
    };
    let (features, stream) = open_stream(secure, header(), &domain).await?;
    let creds = sasl::common::Credentials::default()
        .with_username(account.jid.node().map(|n| n.as_str()).unwrap_or_default())
        .with_password(account.password.clone());
    let stream = client_login(stream, features.sasl_mechanisms, creds)
        .await
        .map_err(|e| auth_error(&account.jid, e))?;
    let stream = stream
        .send_header(header())
        .await
        .map_err(|e| protocol(e.to_string()))?;
    let (features, stream) = stream
        .recv_features::<FallibleStreamElement>()
        .await
        .map_err(|e| features_error(&domain, e))?;
    bind(stream, &features, &account.jid)
        .await
        .map_err(protocol)
}

/// Sends our stream header on `io` and reads the server's features.
async fn open_stream<Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    io: Io,
    header: StreamHeader<'static>,
    domain: &str,
) -> Result<(StreamFeatures, XmppStream<BufStream<Io>>), LoginError> {
    let stream = initiate_stream(BufStream::new(io), JABBER_CLIENT, header, TIMEOUTS)
        .await
        .map_err(|e| LoginError::Protocol {
            domain: domain.to_owned(),
            reason: e.to_string(),
        })?;
    stream
        .recv_features::<FallibleStreamElement>()
        .await
        .map_err(|e| features_error(domain, e))
}

/// The rustls client configuration: TLS 1.2 and 1.3 with the system's roots or the CA file.
fn tls_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, LoginError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let ca_error = |problem: String| LoginError::CaFile {
                path: path.to_path_buf(),
                problem,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_error(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("holds no PEM certificate".into()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| ca_error(format!("a certificate is not usable: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(LoginError::NoRoots);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LoginError::Tls {
            domain: String::new(),
            reason: e.to_string(),
            hint: "",
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Opens the TCP connection: the address given, or the domain's SRV records (falling back to
/// the domain itself on the standard port).
async fn connect_tcp(account: &Account) -> Result<TcpStream, LoginError> {
    let domain = account.jid.domain().as_str();
    let (config, at) = match &account.server {
        Some(server) => {
            let default_port = if account.direct_tls { 5223 } else { 5222 };
            let (host, port) = split_host_port(server, default_port);
            let config = if host.parse::<std::net::IpAddr>().is_ok() {
                DnsConfig::addr(&join_host_port(&host, port))
            } else {
                DnsConfig::no_srv(&host, port)
            };
            (config, format!(" at {server}"))
        }
        None if account.direct_tls => (DnsConfig::srv_xmpps(domain), String::new()),
        None => (DnsConfig::srv_default_client(domain), String::new()),
    };
    config.resolve().await.map_err(|e| LoginError::Unreachable {
        domain: domain.to_owned(),
        at,
        reason: e.to_string(),
    })
}

/// `host`, `host:port`, `[v6]:port` or a bare IPv6 address, split.
fn split_host_port(server: &str, default_port: u16) -> (String, u16) {
    if let Some(rest) = server.strip_prefix('[')
        && let Some((host, tail)) = rest.split_once(']')
    {
        let port = tail
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default_port);
        return (host.to_owned(), port);
    }
    match server.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host.to_owned(), port),
            Err(_) => (server.to_owned(), default_port),
        },
        _ => (server.to_owned(), default_port),
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `<starttls/>`, then waits for `<proceed/>`.
async fn starttls(stream: &mut XmppStream<Plain>) -> Result<(), String> {
    stream
        .send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
            starttls::Request,
        )))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match stream.next().await {
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Starttls(
                starttls::Nonza::Proceed(_),
            )))) => return Ok(()),
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Starttls(_)))) => {
                return Err("the server refused STARTTLS".into());
            }
            Some(Ok(_)) | Some(Err(ReadError::SoftTimeout)) => {}
            Some(Err(e)) => return Err(format!("during STARTTLS: {e}")),
            None => return Err("the connection closed during STARTTLS".into()),
        }
    }
}

/// The TLS handshake, the certificate checked against the account's domain.
async fn handshake(
    config: &Arc<ClientConfig>,
    domain: &str,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, LoginError> {
    let name = ServerName::try_from(domain.to_owned()).map_err(|e| LoginError::Tls {
        domain: domain.to_owned(),
        reason: e.to_string(),
        hint: "",
    })?;
    TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| {
            let reason = e.to_string();
            let hint = if reason.contains("certificate") {
                " (for a server with a private CA, give its certificate with --ca-file FILE)"
            } else {
                ""
            };
            LoginError::Tls {
                domain: domain.to_owned(),
                reason,
                hint,
            }
        })
}

/// Resource binding (RFC 6120 §7): the server picks the resource.
async fn bind(
    mut stream: XmppStream<Secure>,
    features: &StreamFeatures,
    account: &BareJid,
) -> Result<Connection, String> {
    if !features.can_bind() {
        return Err("the server offers no resource binding".into());
    }
    let request = Iq::from_set("bind", BindQuery::new(None));
    stream
        .send(&XmppStreamElement::Stanza(Stanza::Iq(request)))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match stream.next().await {
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(Stanza::Iq(iq)))))
                if iq.id() == "bind" =>
            {
                let jid = match iq.into_payload() {
                    IqPayload::Result(Some(payload)) => BindResponse::try_from(payload)
                        .map(FullJid::from)
                        .map_err(|e| format!("unreadable bind answer: {e}"))?,
                    IqPayload::Error(e) => return Err(format!("resource binding refused: {e:?}")),
                    _ => return Err("the bind answer names no JID".into()),
                };
                if jid.to_bare() != *account {
                    return Err(format!(
                        "the server bound {jid}, not an address of {account}"
                    ));
                }
                return Ok(Connection {
                    stream,
                    jid,
                    pings: 0,
                });
            }
            Some(Ok(_)) | Some(Err(ReadError::SoftTimeout)) => {}
            Some(Err(e)) => return Err(format!("during resource binding: {e}")),
            None => return Err("the connection closed during resource binding".into()),
        }
    }
}

fn features_error(domain: &str, e: RecvFeaturesError) -> LoginError {
    LoginError::Protocol {
        domain: domain.to_owned(),
        reason: e.to_string(),
    }
}

fn auth_error(jid: &BareJid, e: XmppError) -> LoginError {
    let reason = match e {
        XmppError::Auth(AuthError::Fail(condition)) => {
            use tokio_xmpp::parsers::sasl::DefinedCondition as C;
            match condition {
                C::NotAuthorized => "wrong user name or password".to_owned(),
                C::AccountDisabled => "the account is disabled".to_owned(),
                C::CredentialsExpired => "the password has expired".to_owned(),
                C::EncryptionRequired => "the server wants a stronger encryption".to_owned(),
                other => format!("{other:?}"),
            }
        }
        XmppError::Auth(AuthError::NoMechanism) => {
            "the server offers no sign-in method this client knows (SCRAM or PLAIN)".to_owned()
        }
        other => other.to_string(),
    };
    LoginError::Refused {
        jid: jid.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_are_split_for_names_and_both_ip_families() {
        assert_eq!(
            split_host_port("example.org", 5222),
            ("example.org".into(), 5222)
        );
        assert_eq!(
            split_host_port("example.org:5223", 5222),
            ("example.org".into(), 5223)
        );
        assert_eq!(
            split_host_port("127.0.0.1:1234", 5222),
            ("127.0.0.1".into(), 1234)
        );
        assert_eq!(split_host_port("[::1]:1234", 5222), ("::1".into(), 1234));
        assert_eq!(split_host_port("[::1]", 5222), ("::1".into(), 5222));
        assert_eq!(split_host_port("::1", 5222), ("::1".into(), 5222));
        assert_eq!(join_host_port("::1", 5), "[::1]:5");
    }

    #[test]
    fn an_empty_ca_file_is_refused_with_its_name() {
        let dir = std::env::temp_dir().join(format!("xtls-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "").unwrap();
        let err = tls_config(Some(&path)).err().unwrap();
        assert!(err.to_string().contains("empty.pem"), "{err}");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
