//! `known_bots`: the bots' keys the user has met or checked, one line each, like ssh's
//! `known_hosts`. A bot is known by its bare JID and the SHA-256 of its key (SPKI), which
//! is what the component's operator publishes and what survives a certificate's renewal.
//!
//! ```text
//! # JID  SPKI-SHA-256  how  since
//! weather@bots.example.org 3F:...:9A verified 2026-12-05T07:00:00Z
//! ```
//!
//! `how` is `tofu` (accepted on first use) or `verified` (compared out of band).

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use xtls::certs::Fingerprint;

/// How a key came to be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// Accepted on first use, unchecked.
    Tofu,
    /// Compared with a fingerprint obtained out of band.
    Verified,
}

impl How {
    fn as_str(self) -> &'static str {
        match self {
            How::Tofu => "tofu",
            How::Verified => "verified",
        }
    }

    fn parse(s: &str) -> Option<How> {
        match s {
            "tofu" => Some(How::Tofu),
            "verified" => Some(How::Verified),
            _ => None,
        }
    }
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One known bot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The bot's bare JID.
    pub jid: String,
    /// SHA-256 of its key (SPKI).
    pub spki_sha256: Fingerprint,
    /// How the key came to be known.
    pub how: How,
    /// Since when, RFC 3339.
    pub since: String,
}

/// What `known_bots` says of a key a bot presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The bot is not in the file.
    New,
    /// The key is the one on file.
    Known(Entry),
    /// The bot is on file with another key.
    Changed(Entry),
}

/// Why `known_bots` could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KnownError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A line is not `JID FINGERPRINT HOW SINCE`.
    #[error("{path} line {line}: {problem}; fix or delete that line")]
    BadLine {
        /// The file.
        path: PathBuf,
        /// Its number, from 1.
        line: usize,
        /// What is wrong.
        problem: String,
    },
}

/// The parsed file and where it lives.
pub struct KnownBots {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl KnownBots {
    /// Reads `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<KnownBots, KnownError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(KnownError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mut entries: Vec<Entry> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |problem: &str| KnownError::BadLine {
                path: path.to_path_buf(),
                line: n + 1,
                problem: problem.to_owned(),
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [jid, spki, how, since] = fields[..] else {
                return Err(bad("expected four fields: JID FINGERPRINT HOW SINCE"));
            };
            let jid = crate::identity::bare_jid(jid)
                .filter(|bare| bare == jid)
                .ok_or_else(|| bad("not a bare JID"))?;
            let spki_sha256 = parse_spki(spki).ok_or_else(|| bad("not a SHA-256 fingerprint"))?;
            let how = How::parse(how).ok_or_else(|| bad("HOW is neither tofu nor verified"))?;
            if entries.iter().any(|e| e.jid == jid) {
                return Err(bad("a second line for this bot"));
            }
            entries.push(Entry {
                jid,
                spki_sha256,
                how,
                since: since.to_owned(),
            });
        }
        Ok(KnownBots {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// Every known bot, in file order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The file it was read from and is saved to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entry for `jid`, if it is known.
    pub fn get(&self, jid: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.jid == jid)
    }

    /// What the file says of `jid` presenting the key `spki_sha256`.
    pub fn check(&self, jid: &str, spki_sha256: &Fingerprint) -> Verdict {
        match self.entries.iter().find(|e| e.jid == jid) {
            None => Verdict::New,
            Some(e) if &e.spki_sha256 == spki_sha256 => Verdict::Known(e.clone()),
            Some(e) => Verdict::Changed(e.clone()),
        }
    }

    /// Records `entry`, replacing what was on file for its bot; returns what was.
    pub fn remember(&mut self, entry: Entry) -> Option<Entry> {
        match self.entries.iter_mut().find(|e| e.jid == entry.jid) {
            Some(e) => Some(std::mem::replace(e, entry)),
            None => {
                self.entries.push(entry);
                None
            }
        }
    }

    /// Removes `jid`; returns what was on file.
    pub fn forget(&mut self, jid: &str) -> Option<Entry> {
        let pos = self.entries.iter().position(|e| e.jid == jid)?;
        Some(self.entries.remove(pos))
    }

    /// Writes the file through a temporary name, readable by the user alone.
    pub fn save(&self) -> Result<(), KnownError> {
        let io = |path: &Path, source| KnownError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let mut text = String::from("# JID  SPKI-SHA-256  how (tofu|verified)  since\n");
        for e in &self.entries {
            text.push_str(&format!(
                "{} {} {} {}\n",
                e.jid, e.spki_sha256, e.how, e.since
            ));
        }
        crate::files::write_atomic(&self.path, text.as_bytes(), 0o600)
            .map_err(|(path, e)| io(&path, e))
    }
}

/// Reads `path` afresh while holding `<path>.lock`, lets `change` edit it, and saves it when
/// `change` says it changed: two `xtls` processes (a `listen` and a `trust` in another
/// terminal) never write over each other's decisions. Returns the file as it now is.
pub fn update(
    path: &Path,
    change: impl FnOnce(&mut KnownBots) -> bool,
) -> Result<KnownBots, KnownError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let io = |source| KnownError::Io {
        path: lock_path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io)?;
    }
    let lock = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io)?;
    lock.lock().map_err(io)?;
    let mut known = KnownBots::load(path)?;
    if change(&mut known) {
        known.save()?;
    }
    Ok(known)
}

/// A SHA-256 fingerprint in the colon form (`3F:A0:...`), case-insensitive.
pub fn parse_spki(s: &str) -> Option<Fingerprint> {
    Fingerprint::parse(s).filter(|f| f.as_bytes().len() == 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(byte: u8) -> Fingerprint {
        parse_spki(&vec![format!("{byte:02X}"); 32].join(":")).unwrap()
    }

    fn entry(jid: &str, byte: u8, how: How) -> Entry {
        Entry {
            jid: jid.into(),
            spki_sha256: fp(byte),
            how,
            since: "2026-12-05T07:00:00Z".into(),
        }
    }

    fn temp_file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtls-known-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir.join("known_bots")
    }

    #[test]
    fn new_known_and_changed_keys_survive_a_save_and_a_load() {
        let path = temp_file("roundtrip");
        let mut known = KnownBots::load(&path).unwrap();
        assert!(
            known.entries().is_empty(),
            "a missing file is an empty list"
        );
        assert_eq!(
            known.check("weather@bots.example.org", &fp(1)),
            Verdict::New
        );
        assert_eq!(
            known.remember(entry("weather@bots.example.org", 1, How::Tofu)),
            None
        );
        assert_eq!(
            known.remember(entry("news@bots.example.org", 2, How::Verified)),
            None
        );
        known.save().unwrap();
        let mode = fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        let known = KnownBots::load(&path).unwrap();
        assert_eq!(known.entries().len(), 2);
        assert!(matches!(
            known.check("weather@bots.example.org", &fp(1)),
            Verdict::Known(Entry { how: How::Tofu, .. })
        ));
        assert_eq!(
            known.check("news@bots.example.org", &fp(3)),
            Verdict::Changed(entry("news@bots.example.org", 2, How::Verified))
        );
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn remembering_replaces_and_forgetting_removes() {
        let mut known = KnownBots::load(&temp_file("replace")).unwrap();
        known.remember(entry("a@b.example", 1, How::Tofu));
        let old = known.remember(entry("a@b.example", 2, How::Verified));
        assert_eq!(old, Some(entry("a@b.example", 1, How::Tofu)));
        assert_eq!(known.entries().len(), 1);
        assert_eq!(
            known.forget("a@b.example"),
            Some(entry("a@b.example", 2, How::Verified))
        );
        assert_eq!(known.forget("a@b.example"), None);
    }

    #[test]
    fn a_bad_line_is_named_with_its_number() {
        let path = temp_file("bad");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let good = format!(
            "weather@bots.example.org {} tofu 2026-12-05T07:00:00Z",
            fp(1)
        );
        for (line, problem) in [
            ("weather@bots.example.org", "four fields"),
            (
                &*format!("Weather@bots.example.org {} tofu x", fp(1)),
                "bare JID",
            ),
            ("weather@bots.example.org AB:CD tofu x", "SHA-256"),
            (
                &*format!("weather@bots.example.org {} maybe x", fp(1)),
                "neither",
            ),
            (&*good, "second line"),
        ] {
            fs::write(&path, format!("# comment\n{good}\n{line}\n")).unwrap();
            let e = KnownBots::load(&path).err().expect(line).to_string();
            assert!(e.contains("line 3") && e.contains(problem), "{line}: {e}");
        }
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
