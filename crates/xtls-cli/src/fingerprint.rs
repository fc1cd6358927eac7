//! `xtls fingerprint PEER`: the key a peer announces in its service discovery, compared with
//! the one in `known_bots`.

use std::path::Path;
use std::time::Duration;

use crate::known::{Entry, How};
use crate::talk::{self, Announced, Fail, LoginArgs, Outcome};

/// How the announced key compares with `known_bots`.
enum Match {
    /// The peer is not in `known_bots`.
    Unknown,
    /// The announced key is the one on file.
    Same(Entry),
    /// The key on file is the one announced as next (a rotation under way).
    Next(Entry),
    /// Neither.
    Differs(Entry),
}

/// Runs `xtls fingerprint`; returns the exit status.
pub async fn run(
    login: &LoginArgs,
    dir: &Path,
    peer: &str,
    timeout: Duration,
    json: bool,
) -> Outcome {
    let result = async {
        let mut known = None;
        let announced = talk::online(login, dir, timeout, async |online| {
            known = online.known.get(xtls::tunnel::bare(peer)).cloned();
            talk::discover(&mut online.client, peer).await
        })
        .await?;
        let Some(spki) = announced.spki_sha256.clone() else {
            return Err(Fail::new(
                Outcome::NoXtls,
                format!("{peer} supports XTLS but announces no key fingerprint"),
            ));
        };
        let matched = match known.as_ref() {
            None => Match::Unknown,
            Some(e) if e.spki_sha256 == spki => Match::Same(e.clone()),
            Some(e) if announced.next_spki_sha256.as_ref() == Some(&e.spki_sha256) => {
                Match::Next(e.clone())
            }
            Some(e) => Match::Differs(e.clone()),
        };
        Ok((announced, matched))
    }
    .await;
    match result {
        Ok((announced, matched)) => {
            report(peer, &announced, &matched, json);
            match matched {
                Match::Differs(_) => Outcome::KeyChanged,
                _ => Outcome::Delivered,
            }
        }
        Err(fail) => {
            if json {
                let value = serde_json::json!({
                    "peer": peer,
                    "outcome": crate::send::outcome_name(fail.outcome),
                    "error": fail.message,
                });
                println!("{value:#}");
            } else {
                eprintln!("xtls: {}", fail.message);
            }
            fail.outcome
        }
    }
}

fn report(peer: &str, announced: &Announced, matched: &Match, json: bool) {
    let spki = announced
        .spki_sha256
        .as_ref()
        .map(|f| f.to_string())
        .unwrap_or_default();
    let next = announced.next_spki_sha256.as_ref().map(|f| f.to_string());
    if json {
        let (known, word) = match matched {
            Match::Unknown => (None, "unknown"),
            Match::Same(e) => (Some(e), "same"),
            Match::Next(e) => (Some(e), "next"),
            Match::Differs(e) => (Some(e), "differs"),
        };
        let value = serde_json::json!({
            "peer": peer,
            "spki_sha256": spki,
            "cert_sha256": announced.cert_sha256,
            "not_after": announced.not_after,
            "next_spki_sha256": next,
            "known": known.map(|e| serde_json::json!({
                "spki_sha256": e.spki_sha256.to_string(),
                "how": e.how.to_string(),
                "since": e.since,
            })),
            "matches": word,
        });
        println!("{value:#}");
        return;
    }
    println!("{peer} announces, in its service discovery:");
    println!("  key (SPKI SHA-256):  {spki}");
    if let Some(cert) = &announced.cert_sha256 {
        println!("  certificate SHA-256: {cert}");
    }
    if let Some(not_after) = &announced.not_after {
        println!("  valid until:         {not_after}");
    }
    if let Some(next) = &next {
        println!("  next key:            {next} (a rotation is under way)");
    }
    match matched {
        Match::Unknown => println!(
            "You have no key on file for it: the first tunnel will remember the key it presents."
        ),
        Match::Same(e) => println!(
            "This is the key you know ({} since {}).",
            match e.how {
                How::Verified => "verified",
                How::Tofu => "first met, not verified,",
            },
            e.since
        ),
        Match::Next(e) => println!(
            "The key you know (since {}) is announced as its next key.",
            e.since
        ),
        Match::Differs(e) => println!(
            "WARNING: this is NOT the key you know ({}, {} since {}).",
            e.spki_sha256, e.how, e.since
        ),
    }
    println!(
        "The servers relay this announcement and could change it: only a fingerprint from the \
         operator, or the key checked in the tunnel (xtls send, xtls chat), proves who it is."
    );
}
