//! `xtls`: talk to XMPP bots, and to people, through end-to-end encrypted XTLS tunnels.

mod identity;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use identity::{IdentityError, Stored};

const EXAMPLES: &str = "\
Examples:
  xtls whoami --jid alice@example.org         your key's fingerprints (made on first use)
  XTLS_JID=alice@example.org xtls whoami --json

Your key lives in the configuration directory (~/.config/xtls on Linux, or --config-dir),
readable by you alone. Give its fingerprint to the people and bot operators you talk to, so
they can check that a tunnel really ends at you.";

/// Talk to XMPP bots and people through end-to-end encrypted XTLS tunnels.
#[derive(Parser)]
#[command(name = "xtls", version, about, after_help = EXAMPLES)]
struct Cli {
    /// Where your key and the bots you know are kept [default: ~/.config/xtls on Linux]
    #[arg(long, global = true, env = "XTLS_CONFIG_DIR", value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// Print JSON for scripts instead of text
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show your own XTLS key's fingerprints; the key is made on first use
    Whoami {
        /// Your account, e.g. alice@example.org (a resource, if given, is ignored)
        #[arg(long, env = "XTLS_JID", value_name = "JID")]
        jid: String,
    },
}

/// Exit status for a mistake in how `xtls` was called (clap uses it too).
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(dir) = cli.config_dir.clone().or_else(default_config_dir) else {
        eprintln!("xtls: no home directory to keep your key in; give --config-dir DIR");
        return ExitCode::from(USAGE);
    };
    match cli.command {
        Command::Whoami { jid } => {
            let Some(bare) = identity::bare_jid(&jid) else {
                eprintln!("xtls: '{jid}' is not a JID like alice@example.org");
                return ExitCode::from(USAGE);
            };
            match identity::load_or_create(&dir, &bare) {
                Ok(stored) => {
                    print_whoami(&stored, cli.json);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("xtls: {e}");
                    ExitCode::from(match e {
                        IdentityError::TooOpen { .. } => USAGE,
                        _ => 1,
                    })
                }
            }
        }
    }
}

/// `~/.config/xtls` on Linux, what the platform expects elsewhere.
fn default_config_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "xtls").map(|d| d.config_dir().to_path_buf())
}

fn print_whoami(stored: &Stored, json: bool) {
    let info = &stored.info;
    if json {
        let value = serde_json::json!({
            "jid": stored.jid,
            "spki_sha256": info.fingerprints.spki_sha256.to_string(),
            "cert_sha256": info.fingerprints.cert_sha256.to_string(),
            "not_after": info.not_after,
            "key_file": stored.key_file,
            "cert_file": stored.cert_file,
            "created": stored.created,
        });
        println!("{value:#}");
        return;
    }
    println!("{}", stored.jid);
    println!(
        "  key fingerprint (SPKI SHA-256): {}",
        info.fingerprints.spki_sha256
    );
    println!(
        "  certificate SHA-256:            {}",
        info.fingerprints.cert_sha256
    );
    println!("  certificate valid until:        {}", info.not_after);
    if stored.created {
        println!(
            "A new key was made for this account and kept in {} (readable by you alone).",
            stored.key_file.display()
        );
    }
    println!(
        "Give the key fingerprint to the people and bot operators you talk to: it is how they \
         check that a tunnel ends at you."
    );
}
