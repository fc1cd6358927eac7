//! `xtls`: talk to XMPP bots, and to people, through end-to-end encrypted XTLS tunnels.

mod chat;
mod client;
mod files;
mod fingerprint;
mod identity;
mod known;
mod listen;
mod send;
mod talk;
mod verify;
mod xmpp;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use identity::{IdentityError, Stored};
use known::{Entry, How, KnownBots, Verdict};
use talk::{LoginArgs, Outcome};

const EXAMPLES: &str = "\
Examples:
  xtls whoami --jid alice@example.org         your key's fingerprints (made on first use)
  XTLS_JID=alice@example.org xtls whoami --json
  xtls trust weather@bots.example.org 3F:A0:...:9A
                                              pin a bot's key its operator gave you
  xtls known                                  the bots whose keys you know
  xtls forget weather@bots.example.org        after a key change you have checked
  xtls chat --jid alice@example.org weather@bots.example.org
                                              chat; /sas to compare a code, /quit to leave
  xtls fingerprint --jid alice@example.org weather@bots.example.org
                                              the key it announces, against the one you know
  xtls listen --jid alice@example.org --announce weather@bots.example.org
                                              accept tunnels bots and people open to you
  XTLS_PASSWORD=... xtls send --jid alice@example.org weather@bots.example.org 'forecast'
                                              one message; prints the answer

Exit status of send: 0 delivered (and answered), 1 failure (login, network, files),
2 wrong usage, 3 refused by the peer, 4 the peer does not speak XTLS or does not exist,
5 the peer's key is not the one you know, 6 no answer in time.

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
    /// Pin a bot's key by the fingerprint you got from its operator (marked verified)
    Trust {
        /// The bot, e.g. weather@bots.example.org
        bot: String,
        /// The SHA-256 fingerprint of its key (SPKI), colon-separated hex
        fingerprint: String,
    },
    /// List the bots whose keys you know, and how you came to know them
    Known,
    /// Forget a bot's key: the next tunnel to it is a first meeting again
    Forget {
        /// The bot, e.g. weather@bots.example.org
        bot: String,
    },
    /// Chat through a tunnel, line by line; /sas and /pair check the peer's key
    Chat {
        #[command(flatten)]
        login: LoginArgs,
        /// The bot (weather@bots.example.org) or a person's full JID (bob@example.org/laptop)
        #[arg(value_parser = peer_jid)]
        peer: String,
        /// Pair with this code from the peer's operator as soon as the tunnel is open
        #[arg(long, value_name = "CODE")]
        pair: Option<String>,
        /// Seconds the login and the tunnel's opening may take
        #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = seconds)]
        timeout: Duration,
    },
    /// Show the key a bot announces in its service discovery, compared with the one you know
    Fingerprint {
        #[command(flatten)]
        login: LoginArgs,
        /// The bot, e.g. weather@bots.example.org
        #[arg(value_parser = peer_jid)]
        peer: String,
        /// Seconds the login and the question may take
        #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = seconds)]
        timeout: Duration,
    },
    /// Stay online and accept the tunnels bots and people open to you; print what arrives
    Listen {
        #[command(flatten)]
        login: LoginArgs,
        /// Tell this bot you are available (directed presence), so that it can reach you at
        /// your bare JID; repeat for several
        #[arg(long, value_name = "JID", value_parser = peer_jid)]
        announce: Vec<String>,
        /// Seconds the login may take
        #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = seconds)]
        timeout: Duration,
    },
    /// Send one message through a tunnel and print the answer
    Send {
        #[command(flatten)]
        login: LoginArgs,
        /// The bot (weather@bots.example.org) or a person's full JID (bob@example.org/laptop)
        #[arg(value_parser = peer_jid)]
        peer: String,
        /// The message
        text: String,
        /// Exit once the message is delivered, without waiting for an answer
        #[arg(long)]
        no_wait: bool,
        /// Seconds the exchange may take, login included
        #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = seconds)]
        timeout: Duration,
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
    let known_file = dir.join("known_bots");
    match cli.command {
        Command::Trust { bot, fingerprint } => {
            let Some(bot) = identity::bare_jid(&bot) else {
                eprintln!("xtls: '{bot}' is not a bot's JID like weather@bots.example.org");
                return ExitCode::from(USAGE);
            };
            let Some(spki_sha256) = known::parse_spki(&fingerprint) else {
                eprintln!(
                    "xtls: '{fingerprint}' is not a SHA-256 fingerprint (32 colon-separated hex \
                     pairs, as `xtls whoami` and the bot's operator show them)"
                );
                return ExitCode::from(USAGE);
            };
            let entry = Entry {
                jid: bot,
                spki_sha256,
                how: How::Verified,
                since: now(),
            };
            known_bots(&known_file, |known| {
                let verdict = known.check(&entry.jid, &entry.spki_sha256);
                known.remember(entry.clone());
                report_trust(&entry, &verdict, cli.json);
                true
            })
        }
        Command::Known => known_bots(&known_file, |known| {
            report_known(known.entries(), cli.json);
            false
        }),
        Command::Forget { bot } => {
            let Some(bot) = identity::bare_jid(&bot) else {
                eprintln!("xtls: '{bot}' is not a bot's JID like weather@bots.example.org");
                return ExitCode::from(USAGE);
            };
            known_bots(&known_file, |known| {
                let old = known.forget(&bot);
                report_forget(&bot, old.as_ref(), cli.json);
                old.is_some()
            })
        }
        Command::Send {
            login,
            peer,
            text,
            no_wait,
            timeout,
        } => {
            let args = send::SendArgs {
                peer,
                text,
                wait: !no_wait,
                timeout,
                deadline: std::time::Instant::now() + timeout,
            };
            let outcome = runtime().block_on(send::run(&login, &dir, args, cli.json));
            exit(outcome)
        }
        Command::Chat {
            login,
            peer,
            pair,
            timeout,
        } => {
            let args = chat::ChatArgs {
                peer,
                pair,
                timeout,
            };
            exit(runtime().block_on(chat::run(&login, &dir, args)))
        }
        Command::Fingerprint {
            login,
            peer,
            timeout,
        } => exit(runtime().block_on(fingerprint::run(&login, &dir, &peer, timeout, cli.json))),
        Command::Listen {
            login,
            announce,
            timeout,
        } => exit(runtime().block_on(listen::run(&login, &dir, &announce, timeout, cli.json))),
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

/// A peer's JID, normalized; a resource is kept (a person's client), a bare JID stays bare.
fn peer_jid(s: &str) -> Result<String, String> {
    jid::Jid::new(s)
        .ok()
        .filter(|jid| jid.node().is_some())
        .map(|jid| jid.to_string())
        .ok_or_else(|| format!("'{s}' is not a JID like weather@bots.example.org"))
}

/// A number of seconds, at least one.
fn seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
        _ => Err(format!("'{s}' is not a whole number of seconds above zero")),
    }
}

/// The single-threaded runtime of the commands that go online.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn exit(outcome: Outcome) -> ExitCode {
    ExitCode::from(outcome as u8)
}

/// Loads `known_bots`, runs `act` on it, and saves it when `act` says it changed it.
fn known_bots(path: &std::path::Path, act: impl FnOnce(&mut KnownBots) -> bool) -> ExitCode {
    match known::update(path, act) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtls: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Now, RFC 3339 in UTC.
fn now() -> String {
    let now = time::OffsetDateTime::now_utc();
    xtls::certs::rfc3339(now.replace_nanosecond(0).unwrap_or(now))
}

fn entry_json(e: &Entry) -> serde_json::Value {
    serde_json::json!({
        "jid": e.jid,
        "spki_sha256": e.spki_sha256.to_string(),
        "how": e.how.to_string(),
        "since": e.since,
    })
}

fn report_trust(entry: &Entry, before: &Verdict, json: bool) {
    if json {
        let (was, replaced) = match before {
            Verdict::New => ("new", None),
            Verdict::Known(old) => ("known", Some(entry_json(old))),
            Verdict::Changed(old) => ("changed", Some(entry_json(old))),
        };
        let value = serde_json::json!({
            "trusted": entry_json(entry),
            "was": was,
            "replaced": replaced,
        });
        println!("{value:#}");
        return;
    }
    match before {
        Verdict::Known(old) => println!(
            "{}: this key was known since {} ({}); it is now marked verified.",
            entry.jid, old.since, old.how
        ),
        Verdict::Changed(old) => println!(
            "{}: the key known since {} ({}), {}, is replaced by {}, marked verified.",
            entry.jid, old.since, old.how, old.spki_sha256, entry.spki_sha256
        ),
        Verdict::New => println!(
            "{}: key {} pinned, marked verified.",
            entry.jid, entry.spki_sha256
        ),
    }
}

fn report_known(entries: &[Entry], json: bool) {
    if json {
        let list: Vec<_> = entries.iter().map(entry_json).collect();
        println!("{:#}", serde_json::Value::Array(list));
        return;
    }
    if entries.is_empty() {
        println!("No bot's key is known yet.");
        return;
    }
    for e in entries {
        println!("{}  {}  {} since {}", e.jid, e.spki_sha256, e.how, e.since);
    }
}

fn report_forget(bot: &str, old: Option<&Entry>, json: bool) {
    if json {
        println!(
            "{:#}",
            serde_json::json!({ "forgotten": old.map(entry_json) })
        );
        return;
    }
    match old {
        Some(old) => println!(
            "{bot}: forgot key {} ({} since {}); the next tunnel to it is a first meeting.",
            old.spki_sha256, old.how, old.since
        ),
        None => println!("{bot}: no key was known."),
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
