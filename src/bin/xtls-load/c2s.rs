//! A minimal XMPP client stream for load generation: plaintext c2s on loopback, SASL PLAIN,
//! resource binding. Nothing else (no TLS, no roster, no presence): the load tool measures
//! the component, and the server's client features only add noise.

use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use minidom::Element;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xtls::xml::{StreamReader, XmlEvent, XmlLimits, to_bytes};

const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const NS_STREAM: &str = "http://etherx.jabber.org/streams";

/// A logged-in client stream: its socket, its reader (past the stream header) and its full JID.
pub struct Session {
    /// The connection to the server.
    pub stream: TcpStream,
    /// The reader of the server's stream, positioned after the bound resource.
    pub reader: StreamReader,
    /// The full JID the server bound.
    pub jid: String,
}

/// Reader limits for the server's stream: generous, the server is trusted here.
pub fn reader() -> StreamReader {
    StreamReader::new(XmlLimits {
        max_element_bytes: 4 * 1024 * 1024,
        max_depth: 64,
    })
}

/// Connects to `server`, authenticates `user@host` with SASL PLAIN and binds `resource`; with
/// `nodelay`, TCP_NODELAY on the socket (the load tool's default; client libraries leave it
/// off).
pub async fn login(
    server: &str,
    host: &str,
    user: &str,
    password: &str,
    resource: &str,
    nodelay: bool,
) -> anyhow::Result<Session> {
    let mut stream = TcpStream::connect(server)
        .await
        .with_context(|| format!("connecting to {server}"))?;
    stream.set_nodelay(nodelay)?;
    let mut reader = reader();
    let mut buf = vec![0u8; 16 * 1024];

    open_stream(&mut stream, host).await?;
    let features = next_element(&mut stream, &mut reader, &mut buf).await?;
    let plain = features
        .get_child("mechanisms", NS_SASL)
        .is_some_and(|m| m.children().any(|c| c.text() == "PLAIN"));
    if !plain {
        bail!(
            "{server} does not offer SASL PLAIN without TLS (c2s_require_encryption = false and allow_unencrypted_plain_auth = true are needed on loopback)"
        );
    }
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    let auth = format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{credentials}</auth>");
    stream.write_all(auth.as_bytes()).await?;
    let answer = next_element(&mut stream, &mut reader, &mut buf).await?;
    if answer.name() != "success" {
        bail!(
            "authentication of {user}@{host} failed: <{}/>",
            answer.name()
        );
    }

    // RFC 6120 §6.4.6: a fresh stream after SASL.
    let mut reader = self::reader();
    open_stream(&mut stream, host).await?;
    let _features = next_element(&mut stream, &mut reader, &mut buf).await?;
    let bind = format!(
        "<iq xmlns='jabber:client' type='set' id='bind'><bind xmlns='{NS_BIND}'><resource>{resource}</resource></bind></iq>"
    );
    stream.write_all(bind.as_bytes()).await?;
    let answer = next_element(&mut stream, &mut reader, &mut buf).await?;
    let jid = answer
        .get_child("bind", NS_BIND)
        .and_then(|b| b.get_child("jid", NS_BIND))
        .map(|j| j.text())
        .filter(|_| answer.attr("type") == Some("result"))
        .with_context(|| {
            format!(
                "binding a resource for {user}@{host} failed: {}",
                String::from_utf8_lossy(&to_bytes(&answer))
            )
        })?;
    Ok(Session {
        stream,
        reader,
        jid,
    })
}

async fn open_stream(stream: &mut TcpStream, host: &str) -> anyhow::Result<()> {
    let header = format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='{NS_STREAM}' to='{host}' version='1.0'>"
    );
    stream.write_all(header.as_bytes()).await?;
    Ok(())
}

/// Reads the next depth-1 element of the stream, within 10 seconds.
async fn next_element(
    stream: &mut TcpStream,
    reader: &mut StreamReader,
    buf: &mut [u8],
) -> anyhow::Result<Element> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        while let Some(event) = reader.next_event() {
            match event {
                XmlEvent::Element(el) if el.name() == "error" && el.ns() == NS_STREAM => {
                    bail!("stream error: {}", String::from_utf8_lossy(&to_bytes(&el)));
                }
                XmlEvent::Element(el) => return Ok(el),
                XmlEvent::End => bail!("the server closed the stream"),
                XmlEvent::Header(_) | XmlEvent::Skipped { .. } => {}
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read(buf))
            .await
            .context("no answer from the server within 10 s")??;
        if n == 0 {
            bail!("the server closed the connection");
        }
        reader.feed(&buf[..n])?;
    }
}
