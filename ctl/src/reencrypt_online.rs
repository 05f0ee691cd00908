//! `nbdcryptctl reencrypt --control SOCK`: online volume-key re-encryption inside a running
//! nbdcryptd (start, pause, resume, change the rate, follow progress). The offline form
//! (`nbdcryptctl reencrypt VOLUME`, no daemon) lives in `offline::reencrypt`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};

use nbdcrypt::control::client;
use nbdcrypt::control::proto::{
    ReencryptAction, ReencryptReport, ReencryptState, Request, Response, StartOptions,
};

use crate::exit::{self, Failure};
use crate::secret::{self, Source};

pub const ABOUT: &str = "\
Replace the volume key of a running nbdcryptd's volume and re-encrypt every sector under the
new key, while clients keep using the export (online; the offline form takes a VOLUME path).

The daemon makes a new random volume key and a keyslot for it opened by the same passphrase or
key file (asked for, or --key-file / --stdin), records the re-encryption in the LUKS2 header in
cryptsetup's format (`online-reencrypt-v2`, checksum resilience), and re-encrypts zone by zone
in the background: client I/O below the frontier uses the new key, above it the old key, and a
request inside the zone being rewritten waits for it (tens of milliseconds). When every zone is
done the old key and its keyslot are removed. --key-size and --sector-size change the cipher's
key size (AES-128/256-XTS) and the encryption sector size at the same time, online too: a
request across the frontier is split and each part uses its side's key and sector size.

Every keyslot of the old key is carried over to the new key: those the secret opens (same
secret), those of nbdcrypt's KMS/HSM tokens (re-sealed: a fresh secret sealed under the same
KMS/HSM key, through the daemon's provider settings), and those of clevis tokens (Tang/TPM2,
decrypted through the daemon's clevis settings; the token is bound to the new keyslot), and
quorum keyslots (`enroll --quorum K`: a fresh secret split K-of-N again among the same holders,
see below). With --token no secret is asked: the daemon opens the volume through its tokens. A
keyslot none of these opens (another passphrase, a quorum missing a holder) would be lost with
the old key, so the daemon refuses and names it, unless --drop-unopened says to drop it.

Quorums: every holder must open its share first, which also proves that nobody changed the
quorum's threshold or holders in the header. Machine shares (KMS, HSM, Tang, TPM2) are opened
and re-sealed through the daemon's own provider settings. A person's share is re-wrapped under
the same passphrase with a fresh salt, so the daemon needs that passphrase: before the start,
each person runs `nbdcryptctl reencrypt --control SOCK --share NAME` at their own terminal
(checked against their share at once; kept in locked memory until the start uses it, or for
the daemon's --share-timeout). The start then names any share still missing.

It is crash-safe: after a crash, kill -9 or power cut, restart nbdcryptd and unlock with the same
passphrase; the interrupted zone is recovered and the re-encryption continues by itself.
`cryptsetup reencrypt --resume-only` can also finish it offline.

Throttling: --max-rate caps the rate; on top of that the daemon backs off by itself (at most
about half of the device time) while clients are busy. Progress, rate and ETA: `nbdcryptctl
status`, or --wait here.";

pub const EXAMPLES: &str = "\
Examples:
  nbdcryptctl reencrypt --control /run/nbdcrypt/db.sock --key-file /etc/nbdcrypt/db.key
  nbdcryptctl reencrypt --control SOCK --max-rate 100M --wait     # start, follow to the end
  nbdcryptctl reencrypt --control SOCK --token                    # unlocked by KMS/HSM/clevis
  nbdcryptctl reencrypt --control SOCK --share alice              # alice, before a quorum carry
  nbdcryptctl reencrypt --control SOCK --pause
  nbdcryptctl reencrypt --control SOCK --resume --max-rate 50M
  nbdcryptctl reencrypt --control SOCK --status";

#[derive(Args, Debug)]
pub struct OnlineReencryptArgs {
    /// The control socket of the nbdcryptd serving the volume.
    #[arg(long, value_name = "SOCK", env = "NBDCRYPT_CONTROL")]
    pub control: PathBuf,

    /// Pause a running re-encryption (clients are unaffected; the position is kept).
    #[arg(long, conflicts_with_all = ["resume", "status", "key_file", "stdin"])]
    pub pause: bool,

    /// Resume a paused re-encryption.
    #[arg(long, conflicts_with_all = ["status", "key_file", "stdin"])]
    pub resume: bool,

    /// Only show the progress.
    #[arg(long, conflicts_with_all = ["key_file", "stdin", "max_rate"])]
    pub status: bool,

    /// Cap the re-encryption rate: bytes per second, with K/M/G suffixes (powers of 1024).
    /// With --pause/--resume or alone with a running re-encryption: change it.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_rate: Option<u64>,

    /// Read the secret from FILE, its bytes as-is ("-": standard input).
    #[arg(long, value_name = "FILE", conflicts_with = "stdin")]
    pub key_file: Option<PathBuf>,

    /// Read the passphrase from the first line of standard input.
    #[arg(long)]
    pub stdin: bool,

    /// After the request, follow the progress until the re-encryption finishes or fails.
    #[arg(long)]
    pub wait: bool,

    /// Start without a secret: the daemon opens the old key and carries every keyslot over
    /// through the volume's KMS/HSM/clevis tokens (for a volume unlocked by a token).
    #[arg(long, conflicts_with_all = ["key_file", "stdin", "pause", "resume", "status"])]
    pub token: bool,

    /// Start even if some keyslots of the old key cannot be carried over (no secret or token
    /// opens them): they are dropped with the old key. Without it the daemon refuses and names them.
    #[arg(long, conflicts_with_all = ["pause", "resume", "status"])]
    pub drop_unopened: bool,

    /// New volume key size in bits: 512 (AES-256-XTS) or 256 (AES-128-XTS). Default: as now.
    #[arg(long, value_name = "BITS", conflicts_with_all = ["pause", "resume", "status"])]
    pub key_size: Option<u32>,

    /// New encryption sector size: 512, 1024, 2048 or 4096. Default: as now. Clients may see a
    /// new minimum block size when they next connect.
    #[arg(long, value_name = "BYTES", conflicts_with_all = ["pause", "resume", "status"])]
    pub sector_size: Option<u32>,

    /// Give your passphrase for your share NAME of a quorum keyslot (asked for, or --stdin /
    /// --key-file), so the next start can carry the quorum over; it starts nothing itself.
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with_all = ["pause", "resume", "status", "token", "drop_unopened", "max_rate", "wait", "key_size", "sector_size"]
    )]
    pub share: Option<String>,
}

/// `nbdcryptctl reencrypt --control ...` as a command line of its own.
#[derive(Parser, Debug)]
#[command(
    name = "nbdcryptctl reencrypt",
    about = "Re-encrypt the running daemon's volume under a new volume key, online.",
    long_about = ABOUT,
    after_help = EXAMPLES
)]
struct OnlineCli {
    #[command(flatten)]
    args: OnlineReencryptArgs,
}

/// If argv is `nbdcryptctl reencrypt ... --control ...`, run the online form and return its
/// exit code; otherwise `None` (the offline `reencrypt VOLUME` and every other command).
pub fn dispatch() -> Option<std::process::ExitCode> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let online = argv.get(1).is_some_and(|a| a == "reencrypt")
        && argv[2..]
            .iter()
            .any(|a| a == "--control" || a.to_string_lossy().starts_with("--control="));
    if !online {
        return None;
    }
    let cli = match OnlineCli::try_parse_from(
        std::iter::once(std::ffi::OsString::from("nbdcryptctl reencrypt"))
            .chain(argv[2..].iter().cloned()),
    ) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return Some(std::process::ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            }));
        }
    };
    Some(match run(cli.args) {
        Ok(()) => std::process::ExitCode::from(exit::OK),
        Err(f) => {
            eprintln!("nbdcryptctl: {}", f.message);
            std::process::ExitCode::from(f.code)
        }
    })
}

/// "created 2026-03-01T10:00:00Z (97 days ago)": the volume key's age for `status`.
pub fn key_age(created_unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let age = now.saturating_sub(created_unix);
    let ago = match age {
        0..=119 => format!("{age} s ago"),
        120..=7199 => format!("{} minutes ago", age / 60),
        7200..=172_799 => format!("{} hours ago", age / 3600),
        _ => format!("{} days ago", age / 86400),
    };
    format!("created {} ({ago})", nbdcrypt::audit::rfc3339(created_unix))
}

/// "200M" -> 200 MiB/s.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim().trim_end_matches("/s").trim_end_matches(['B', 'b']);
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate like 200M (bytes per second)"))?;
    match n.checked_mul(mult) {
        Some(0) | None => Err("the rate must be positive and below 16 EiB/s".into()),
        Some(v) => Ok(v),
    }
}

pub fn run(a: OnlineReencryptArgs) -> Result<(), Failure> {
    if let Some(name) = &a.share {
        return stage_share(&a, name);
    }
    let rate_only = a.max_rate.is_some() && a.key_file.is_none() && !a.stdin && !a.token;
    let action = if a.pause {
        ReencryptAction::Pause
    } else if a.resume {
        ReencryptAction::Resume
    } else if a.status {
        ReencryptAction::Status
    } else if rate_only {
        // `--max-rate` alone changes the rate of an existing re-encryption, paused or not
        // (the daemon applies `max_rate` with pause and resume; neither changes the state here).
        match current_state(&a)? {
            Some(ReencryptState::Paused) => ReencryptAction::Pause,
            Some(_) => ReencryptAction::Resume,
            // Nothing to change: start one (asking for the secret).
            None => ReencryptAction::Start,
        }
    } else {
        ReencryptAction::Start
    };
    let secret = if action == ReencryptAction::Start && !a.token {
        let source = match (&a.key_file, a.stdin) {
            (Some(p), _) => Source::KeyFile(p.clone()),
            (None, true) => Source::StdinLine,
            (None, false) => Source::Tty {
                prompt: "Passphrase of the volume (its keyslot is carried to the new key): ".into(),
            },
        };
        Some(secret::read(&source)?)
    } else {
        None
    };
    let request = Request::Reencrypt {
        action,
        secret,
        max_rate: a.max_rate,
        start: StartOptions {
            drop_unopened: a.drop_unopened && action == ReencryptAction::Start,
            key_bits: a.key_size.filter(|_| action == ReencryptAction::Start),
            sector_size: a.sector_size.filter(|_| action == ReencryptAction::Start),
        },
    };
    let response = client::call(&a.control, &request).map_err(|e| Failure::error(e.to_string()));
    drop(request); // wipes the secret
    let report = match response? {
        Response::Ok(s) => s.reencrypt,
        Response::Error(e) => {
            let code = match e.kind {
                nbdcrypt::control::proto::ErrorKind::Busy => exit::TRY_LATER,
                nbdcrypt::control::proto::ErrorKind::WrongPassphrase => exit::WRONG_SECRET,
                _ => exit::ERROR,
            };
            return Err(Failure::new(code, e.message));
        }
    };
    match (action, &report) {
        (_, None) => println!("no re-encryption since the volume was unlocked"),
        (ReencryptAction::Start, Some(r)) => println!("re-encryption started: {}", line(r)),
        (ReencryptAction::Pause, Some(r)) => println!("re-encryption paused: {}", line(r)),
        (ReencryptAction::Resume, Some(r)) => println!("re-encryption running: {}", line(r)),
        (ReencryptAction::Status, Some(r)) => println!("{}", line(r)),
    }
    if a.wait {
        return follow(&a.control);
    }
    Ok(())
}

/// `--share NAME`: send the person's passphrase to be checked and staged.
fn stage_share(a: &OnlineReencryptArgs, name: &str) -> Result<(), Failure> {
    let source = match (&a.key_file, a.stdin) {
        (Some(p), _) => Source::KeyFile(p.clone()),
        (None, true) => Source::StdinLine,
        (None, false) => Source::Tty {
            prompt: format!("Passphrase of quorum share {name}: "),
        },
    };
    let request = Request::ReencryptShare {
        name: name.to_owned(),
        secret: secret::read(&source)?,
    };
    let response = client::call(&a.control, &request).map_err(|e| Failure::error(e.to_string()));
    drop(request); // wipes the passphrase
    match response? {
        Response::Ok(_) => {
            println!(
                "share {name:?} checked and staged: the next `nbdcryptctl reencrypt --control` \
                 start carries the quorum over with your share re-wrapped under this passphrase"
            );
            Ok(())
        }
        Response::Error(e) => {
            let code = match e.kind {
                nbdcrypt::control::proto::ErrorKind::Busy => exit::TRY_LATER,
                nbdcrypt::control::proto::ErrorKind::WrongPassphrase => exit::WRONG_SECRET,
                _ => exit::ERROR,
            };
            Err(Failure::new(code, e.message))
        }
    }
}

/// The state of a running or paused re-encryption, `None` if there is none.
fn current_state(a: &OnlineReencryptArgs) -> Result<Option<ReencryptState>, Failure> {
    let status =
        client::call(&a.control, &Request::Status).map_err(|e| Failure::error(e.to_string()))?;
    Ok(match status {
        Response::Ok(s) => s
            .reencrypt
            .map(|r| r.state)
            .filter(|st| matches!(st, ReencryptState::Running | ReencryptState::Paused)),
        Response::Error(_) => None,
    })
}

/// Poll until finished (exit 0) or failed (exit 1).
fn follow(control: &std::path::Path) -> Result<(), Failure> {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let r = match client::call(control, &Request::Status) {
            Ok(Response::Ok(s)) => s.reencrypt,
            Ok(Response::Error(e)) => return Err(Failure::error(e.message)),
            Err(e) => return Err(Failure::error(e.to_string())),
        };
        let Some(r) = r else {
            return Err(Failure::error(
                "the daemon no longer reports a re-encryption (locked or restarted?)",
            ));
        };
        eprintln!("{}", line(&r));
        match r.state {
            ReencryptState::Finished => return Ok(()),
            ReencryptState::Failed => {
                return Err(Failure::error(format!(
                    "re-encryption failed: {}",
                    r.error.unwrap_or_default()
                )))
            }
            _ => {}
        }
    }
}

/// "running 37.5 % (384.0 MiB of 1.0 GiB), 212.3 MiB/s, ETA 3 s".
pub fn line(r: &ReencryptReport) -> String {
    let pct = if r.total_bytes == 0 {
        100.0
    } else {
        r.done_bytes as f64 * 100.0 / r.total_bytes as f64
    };
    let mut s = format!(
        "{} {pct:.1} % ({} of {})",
        r.state,
        crate::online::human_bytes(r.done_bytes),
        crate::online::human_bytes(r.total_bytes)
    );
    if r.state == ReencryptState::Running {
        s.push_str(&format!(
            ", {}/s",
            crate::online::human_bytes(r.rate_bytes_per_sec)
        ));
        if let Some(eta) = r.eta_secs {
            s.push_str(&format!(", ETA {eta} s"));
        }
        if r.backing_off {
            s.push_str(", backing off for client I/O");
        }
    }
    if let Some(m) = r.max_rate {
        s.push_str(&format!(", max {}/s", crate::online::human_bytes(m)));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!(": {e}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_age_says_when_and_how_long_ago() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let s = key_age(now - 3 * 86400 - 5);
        assert!(
            s.starts_with("created 20") && s.ends_with("(3 days ago)"),
            "{s}"
        );
        assert!(key_age(now).ends_with("(0 s ago)"));
        assert!(key_age(now - 600).ends_with("(10 minutes ago)"));
        // A creation time in the future (clock skew, forged header) is not a negative age.
        assert!(key_age(now + 1000).ends_with("(0 s ago)"));
    }

    #[test]
    fn rates_take_binary_suffixes_and_refuse_zero() {
        assert_eq!(parse_rate("200M"), Ok(200 << 20));
        assert_eq!(parse_rate("64k"), Ok(64 << 10));
        assert_eq!(parse_rate("1G/s"), Ok(1 << 30));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("99999999999G").is_err());
    }
}
