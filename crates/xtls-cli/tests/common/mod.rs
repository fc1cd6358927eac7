//! What the command tests share: a private configuration directory and running `xtls`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh, not yet existing directory under the system's temporary one.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xtls-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs `xtls --config-dir DIR ARGS...` with no account taken from the environment.
pub fn xtls(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtls"))
        .arg("--config-dir")
        .arg(dir)
        .args(args)
        .env_remove("XTLS_JID")
        .output()
        .expect("xtls runs")
}

/// Its JSON, once it succeeded.
pub fn ok_json(out: Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}
