//! `xtls trust`, `known` and `forget`: the bots' keys a person keeps, as the commands leave
//! them in `known_bots`.

use std::os::unix::fs::PermissionsExt;

mod common;
use common::{ok_json, temp_dir, xtls};

const BOT: &str = "weather@bots.example.org";

fn fingerprint(byte: u8) -> String {
    vec![format!("{byte:02X}"); 32].join(":")
}

#[test]
fn a_pinned_key_is_listed_replaced_with_a_word_and_forgotten() {
    let dir = temp_dir("known-cycle");
    let listed = ok_json(xtls(&dir, &["known", "--json"]));
    assert_eq!(listed, serde_json::json!([]), "nothing known at first");

    let first = ok_json(xtls(&dir, &["trust", BOT, &fingerprint(0xAB), "--json"]));
    assert_eq!(first["was"], "new");
    assert_eq!(first["trusted"]["how"], "verified");
    let file = dir.join("known_bots");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Lower case is the same fingerprint.
    let again = ok_json(xtls(
        &dir,
        &["trust", BOT, &fingerprint(0xAB).to_lowercase(), "--json"],
    ));
    assert_eq!(again["was"], "known");

    // Another key for the same bot replaces the old one, and says which.
    let out = xtls(&dir, &["trust", BOT, &fingerprint(0xCD)]);
    assert!(out.status.success());
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(
        said.contains(&fingerprint(0xAB)) && said.contains(&fingerprint(0xCD)),
        "{said}"
    );
    let listed = ok_json(xtls(&dir, &["known", "--json"]));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["jid"], BOT);
    assert_eq!(listed[0]["spki_sha256"], fingerprint(0xCD));

    let forgotten = ok_json(xtls(&dir, &["forget", BOT, "--json"]));
    assert_eq!(forgotten["forgotten"]["spki_sha256"], fingerprint(0xCD));
    let listed = ok_json(xtls(&dir, &["known", "--json"]));
    assert_eq!(listed, serde_json::json!([]));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_is_a_usage_error_and_a_damaged_file_is_named() {
    let dir = temp_dir("known-bad");
    for args in [
        vec!["trust", BOT, "AB:CD"],
        vec!["trust", "not a jid", &*fingerprint(1)],
        vec!["forget", "bots.example.org"],
    ] {
        let out = xtls(&dir, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    assert!(!dir.join("known_bots").exists(), "nothing written");

    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("known_bots"),
        "weather@bots.example.org nonsense\n",
    )
    .unwrap();
    let out = xtls(&dir, &["known"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("known_bots line 1"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
