//! `xtls whoami` as a person runs it: the key is made once, kept private, and shown the same
//! way every time.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

mod common;
use common::{ok_json, temp_dir, xtls};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use xtls::certs::PeerCertInfo;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_key_is_made_once_kept_private_and_its_fingerprint_is_the_certificates() {
    let dir = temp_dir("whoami-once");
    let first = ok_json(xtls(
        &dir,
        &["whoami", "--jid", "Alice@Example.org/laptop", "--json"],
    ));
    assert_eq!(first["jid"], "alice@example.org", "bare and normalized");
    assert_eq!(first["created"], true);
    let key_file = PathBuf::from(first["key_file"].as_str().unwrap());
    let cert_file = PathBuf::from(first["cert_file"].as_str().unwrap());
    assert_eq!(mode(&key_file), 0o600);
    assert_eq!(mode(key_file.parent().unwrap()), 0o700);
    assert_eq!(mode(&dir), 0o700);

    // What is printed is what the certificate on disk says, and it names the account.
    let cert = CertificateDer::from_pem_file(&cert_file).unwrap();
    let info = PeerCertInfo::parse(&cert).unwrap();
    assert_eq!(
        first["spki_sha256"],
        info.fingerprints.spki_sha256.to_string()
    );
    assert_eq!(
        first["cert_sha256"],
        info.fingerprints.cert_sha256.to_string()
    );
    assert!(info.names("alice@example.org"), "{:?}", info.xmpp_addrs);

    // The second run keeps the key.
    let second = ok_json(xtls(
        &dir,
        &["whoami", "--jid", "alice@example.org", "--json"],
    ));
    assert_eq!(second["created"], false);
    assert_eq!(second["spki_sha256"], first["spki_sha256"]);

    // The text form says the same in words.
    let text = xtls(&dir, &["whoami", "--jid", "alice@example.org"]);
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains(first["spki_sha256"].as_str().unwrap()),
        "{text}"
    );
    assert!(!text.contains("new key"), "{text}");
    // No part of the private key is ever printed.
    let key_pem = std::fs::read_to_string(&key_file).unwrap();
    let key_line = key_pem.lines().nth(1).unwrap();
    assert!(!text.contains(key_line));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_key_others_can_read_is_refused_with_the_command_that_fixes_it() {
    let dir = temp_dir("whoami-open");
    let first = ok_json(xtls(
        &dir,
        &["whoami", "--jid", "bob@example.org", "--json"],
    ));
    let key_file = PathBuf::from(first["key_file"].as_str().unwrap());
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = xtls(&dir, &["whoami", "--jid", "bob@example.org"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("chmod 600"), "{err}");
    assert!(out.stdout.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn what_is_not_a_jid_is_a_usage_error() {
    let dir = temp_dir("whoami-bad");
    for bad in ["example.org", "not a jid@@", ""] {
        let out = xtls(&dir, &["whoami", "--jid", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not a JID"),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(!dir.exists(), "nothing is written for a bad JID");
}
