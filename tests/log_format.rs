//! `log.format = "json"`: the running binary writes one JSON object per line on standard error.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn json_logs_are_one_object_per_line_with_the_event_fields() {
    let dir = std::env::temp_dir().join(format!("xtls-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A port nothing listens on: the component logs its start, then its reconnect attempts.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = closed.local_addr().unwrap();
    drop(closed);
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[component]\ndomain = \"bots.example.org\"\nserver = \"{server}\"\nsecret = \"s3cret\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"token-123456\"\n\
             [store]\nurl = \"sqlite://{}/store.db\"\n[log]\nformat = \"json\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let mut child = common::Running::spawn(
        Command::new(env!("CARGO_BIN_EXE_xtls-component"))
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null()),
    );
    let rx = common::stderr_lines(&mut child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut objects = Vec::new();
    while objects.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        let object: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        objects.push(object);
    }
    drop(child);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(objects.len() >= 3, "{objects:?}");
    for o in &objects {
        assert!(o["timestamp"].is_string(), "{o}");
        assert!(o["level"].is_string(), "{o}");
        assert!(o["message"].is_string(), "fields at the top level: {o}");
    }
    assert!(
        !objects
            .iter()
            .any(|o| o.to_string().contains("s3cret") || o.to_string().contains("token-123456")),
        "no secret in the log"
    );
}
