//! The user's own XTLS identity: a key and a self-signed certificate whose XmppAddr is the
//! account's bare JID, kept in the configuration directory and made on first use.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use xtls::certs::{BotIdentity, CertError, PeerCertInfo, normalize_bare, pem_encode};

/// Why the identity could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The private key can be read by other users.
    #[error(
        "{path} can be read by other users (mode {mode:o}): run `chmod 600 {path}`, and make a \
         new key if anyone else may have read it"
    )]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A stored file is not what it should be.
    #[error("{path}: {problem}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The key or certificate could not be made.
    #[error("cannot make a key: {0}")]
    Generate(#[from] CertError),
}

/// The identity as stored, and what its certificate says.
pub struct Stored {
    /// The account's bare JID.
    pub jid: String,
    /// Fingerprints and validity of the certificate.
    pub info: PeerCertInfo,
    /// Where the private key is.
    pub key_file: PathBuf,
    /// Where the certificate is.
    pub cert_file: PathBuf,
    /// Whether it was made by this call.
    pub created: bool,
    /// The key and certificate.
    pub identity: BotIdentity,
}

/// The normalized bare JID of `jid` (a resource is dropped), or None when it is no JID.
pub fn bare_jid(jid: &str) -> Option<String> {
    let parsed = jid::Jid::new(jid).ok()?;
    parsed.node()?;
    normalize_bare(parsed.to_bare().as_str())
}

/// Loads `bare_jid`'s identity from `dir`, or makes and stores a new one.
pub fn load_or_create(dir: &Path, bare_jid: &str) -> Result<Stored, IdentityError> {
    let home = dir.join(bare_jid);
    let key_file = home.join("key.pem");
    let cert_file = home.join("cert.pem");
    let created = !key_file.exists();
    if created {
        create_private_dir(dir)?;
        create_private_dir(&home)?;
        let identity = BotIdentity::generate(bare_jid)?;
        // The certificate first: a key without its certificate is never left behind as
        // "made", since the key is what `created` is judged by.
        write_new(&cert_file, identity.cert_pem().as_bytes(), 0o644)?;
        write_new(
            &key_file,
            pem_encode("PRIVATE KEY", identity.key_der()).as_bytes(),
            0o600,
        )?;
    }
    let mode = fs::metadata(&key_file)
        .map_err(|source| io(&key_file, source))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(IdentityError::TooOpen {
            path: key_file,
            mode: mode & 0o777,
        });
    }
    let key = PrivatePkcs8KeyDer::from_pem_file(&key_file).map_err(|e| damaged(&key_file, e))?;
    let cert = CertificateDer::from_pem_file(&cert_file).map_err(|e| damaged(&cert_file, e))?;
    let identity = BotIdentity::from_der(bare_jid, cert.to_vec(), key.secret_pkcs8_der().to_vec())
        .map_err(|e| damaged(&cert_file, e))?;
    let info = PeerCertInfo::parse(identity.cert_der()).map_err(|e| damaged(&cert_file, e))?;
    if !info.names(bare_jid) {
        return Err(damaged(
            &cert_file,
            format!(
                "the certificate names {:?}, not {bare_jid}",
                info.xmpp_addrs
            ),
        ));
    }
    Ok(Stored {
        jid: bare_jid.to_owned(),
        info,
        key_file,
        cert_file,
        created,
        identity,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    fs::create_dir_all(dir).map_err(|source| io(dir, source))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| io(dir, source))
}

/// Writes a new file of the identity (see [`crate::files::write_atomic`]).
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    crate::files::write_atomic(path, contents, mode).map_err(|(path, source)| io(&path, source))
}

fn io(path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn damaged(path: &Path, problem: impl std::fmt::Display) -> IdentityError {
    IdentityError::Damaged {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}
