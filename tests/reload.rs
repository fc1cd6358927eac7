//! SIGHUP reloads the configuration in a running process: the admin token, limits, webhook
//! and certificate settings change at once, an invalid file changes nothing, settings that
//! take a restart are named, and the process goes on.

#![cfg(unix)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The status of `GET path` with a bearer token, or `None` when nothing answers.
fn status(addr: &str, path: &str, token: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

/// Waits (bounded) until `check` holds.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "{what} did not happen");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn config(dir: &std::path::Path, admin: &str, token: &str, bot_queue: u32) -> String {
    // The live settings follow the queue size, so one change touches both kinds.
    let (per_bot, max_age) = (bot_queue / 2, bot_queue * 60);
    format!(
        "[component]\ndomain = \"bots.example.org\"\nserver = \"127.0.0.1:9\"\nsecret = \"s3cret\"\n\
         [admin]\nlisten = \"{admin}\"\ntoken = \"{token}\"\n\
         [store]\nurl = \"sqlite://{}/store.db\"\n\
         [limits]\nbot_queue = {bot_queue}\ntunnels_per_bot = {per_bot}\n\
         [webhooks]\nmax_age_secs = {max_age}\n\
         [certificates]\noverlap_secs = {max_age}\n",
        dir.display()
    )
}

fn hangup(child: &Child) {
    // The shell's own `kill`: a bare Debian has no /bin/kill (procps) to run.
    let sent = Command::new("sh")
        .args(["-c", "kill -HUP \"$1\"", "sh", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[test]
fn sighup_applies_the_admin_token_and_names_what_takes_a_restart() {
    let dir = std::env::temp_dir().join(format!("xtls-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = free.local_addr().unwrap().to_string();
    drop(free);
    let file = dir.join("config.toml");
    std::fs::write(&file, config(&dir, &admin, "first-token-1", 1024)).unwrap();
    let mut child = common::Running::spawn(
        Command::new(env!("CARGO_BIN_EXE_xtls-component"))
            .args(["serve", "--config"])
            .arg(&file)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null()),
    );
    let rx = common::stderr_lines(&mut child);
    let mut log = String::new();
    let read_log = |log: &mut String| {
        while let Ok(line) = rx.try_recv() {
            log.push_str(&line);
            log.push('\n');
        }
    };

    eventually("the admin API answering", || {
        status(&admin, "/v1/bots", "first-token-1") == Some(200)
    });

    // A new token, new caps and webhook ages, a new queue depth: all apply but the depth,
    // which takes a restart.
    std::fs::write(&file, config(&dir, &admin, "second-token-2", 2048)).unwrap();
    hangup(&child);
    eventually("the new token admitted", || {
        status(&admin, "/v1/bots", "second-token-2") == Some(200)
    });
    assert_eq!(status(&admin, "/v1/bots", "first-token-1"), Some(401));
    eventually("the reload logged", || {
        read_log(&mut log);
        log.contains("configuration reloaded") && log.contains("take a restart")
    });
    assert!(
        log.contains("applied=admin.token, limits, webhooks, certificates")
            && log.contains("settings=limits.bot_queue"),
        "{log}"
    );

    // An invalid file: said so, and nothing changes.
    std::fs::write(&file, config(&dir, &admin, "short", 2048)).unwrap();
    hangup(&child);
    eventually("the refusal logged", || {
        read_log(&mut log);
        log.contains("the running one stays")
    });
    assert_eq!(status(&admin, "/v1/bots", "second-token-2"), Some(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP no longer ends the process"
    );
    assert!(
        !log.contains("second-token-2") && !log.contains("first-token-1"),
        "no token in the log: {log}"
    );

    drop(child);
    std::fs::remove_dir_all(&dir).unwrap();
}
