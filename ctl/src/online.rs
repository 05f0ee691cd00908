//! Online commands: talk to a running nbdcryptd over its control socket (`unlock`, `lock`,
//! `status`). Each sends one request and turns the answer into output and an exit code.

use std::path::PathBuf;

use clap::Args;

use nbdcrypt::control::client;
use nbdcrypt::control::proto::{
    ErrorKind, ErrorReply, Request, Response, StatusReport, VolumeState,
};
use nbdcrypt::control::DEFAULT_SOCKET;

use crate::exit::{self, Failure};
use crate::secret::{self, Source};

/// `--control`, shared by every online command.
#[derive(Args, Debug)]
pub struct ControlArg {
    /// The control socket of the nbdcryptd to talk to.
    #[arg(long, value_name = "SOCK", env = "NBDCRYPT_CONTROL", default_value = DEFAULT_SOCKET)]
    pub control: PathBuf,
}

pub const UNLOCK_ABOUT: &str = "\
Unlock the volume of a running nbdcryptd, so clients can attach to its export.

The passphrase is asked for on the terminal (not echoed) unless --key-file or --stdin says where
to read the secret. nbdcryptd tries it against every keyslot (or only --slot N). Key derivation
takes a few seconds by design.

After three wrong passphrases in a row nbdcryptd makes each further attempt wait (1 s, 2 s, 4 s,
... up to 30 s); the message says how long.";

pub const UNLOCK_EXAMPLES: &str = "\
Examples:
  nbdcryptctl unlock                                   # ask for the passphrase
  nbdcryptctl unlock --key-file /etc/nbdcrypt/vol.key  # the file's bytes are the key, as-is
  ssh keyhost cat vol.key | nbdcryptctl unlock --key-file -   # key bytes from a pipe
  printf '%s\\n' \"$PASS\" | nbdcryptctl unlock --stdin   # first line, newline dropped
  nbdcryptctl unlock --control /run/nbdcrypt/b.sock --slot 1
  nbdcryptctl unlock --token                           # KMS/HSM tokens (nbdcryptctl enroll)
  nbdcryptctl unlock --share alice                     # alice's share of a quorum";

#[derive(Args, Debug)]
pub struct UnlockArgs {
    #[command(flatten)]
    pub control: ControlArg,

    /// Read the key from FILE and use its bytes as-is, newlines included ("-": standard input).
    #[arg(long, value_name = "FILE", conflicts_with = "stdin")]
    pub key_file: Option<PathBuf>,

    /// Read the passphrase from the first line of standard input (the newline is not part of it).
    #[arg(long)]
    pub stdin: bool,

    /// Try only keyslot N (default: every keyslot).
    #[arg(long, value_name = "N", conflicts_with = "token")]
    pub slot: Option<u32>,

    /// Unlock with the volume's KMS/HSM tokens instead of a passphrase: the daemon unseals them
    /// (see `nbdcryptctl enroll`).
    #[arg(long, conflicts_with_all = ["key_file", "stdin"])]
    pub token: bool,

    /// Give your share of a quorum (`nbdcryptctl enroll --quorum K --passphrase-share NAME`):
    /// your passphrase is checked against your share's tag and kept by the daemon until the
    /// quorum is complete (or its timeout passes). One person, one terminal, one share.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["token", "slot"])]
    pub share: Option<String>,
}

pub const LOCK_ABOUT: &str = "\
Lock the volume: withdraw the export, flush, and wipe the key from nbdcryptd's memory.

Without --force the lock is refused while clients are attached; disconnect them first (for the
kernel client: umount, then nbd-client -d /dev/nbdX). With --force attached clients finish the
requests they have in flight, are flushed and disconnected; if they have not closed within 10 s
the command reports busy (exit 4) and the volume locks as soon as they do.";

pub const LOCK_EXAMPLES: &str = "\
Examples:
  nbdcryptctl lock
  nbdcryptctl lock --force     # disconnect attached clients first
  nbdcryptctl status           # state: locking while clients are still closing";

#[derive(Args, Debug)]
pub struct LockArgs {
    #[command(flatten)]
    pub control: ControlArg,

    /// Disconnect attached clients (after their in-flight requests) instead of refusing.
    #[arg(long)]
    pub force: bool,
}

pub const STATUS_ABOUT: &str = "\
Show whether the volume is locked or unlocked, the volume's identity, the export, attached
clients and I/O counters (since the last unlock).";

pub const STATUS_EXAMPLES: &str = "\
Examples:
  nbdcryptctl status
  nbdcryptctl status --json | jq -r .state      # locked | unlocking | unlocked | locking";

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub control: ControlArg,

    /// Print the status as one JSON object (the control protocol's status report).
    #[arg(long)]
    pub json: bool,
}

pub const WAIT_ABOUT: &str = "\
Wait until the daemon's volume is unlocked (by an operator or an automatic unlock), then exit 0.
For ordering: systemd's nbdcrypt-attach@.service runs it before nbd-client. The daemon not
running yet counts as locked. Exits 4 when the timeout passes first.";

pub const WAIT_EXAMPLES: &str = "\
Examples:
  nbdcryptctl wait-unlocked --timeout 600 --control /run/nbdcrypt/db.control.sock && nbd-client ...";

#[derive(Args, Debug)]
pub struct WaitArgs {
    #[command(flatten)]
    pub control: ControlArg,

    /// Give up after SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout: u64,
}

pub fn wait_unlocked(args: WaitArgs) -> Result<(), Failure> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.timeout);
    loop {
        if let Ok(Response::Ok(s)) = client::call(&args.control.control, &Request::Status) {
            if s.state == VolumeState::Unlocked {
                return Ok(());
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(Failure {
                code: crate::exit::TRY_LATER,
                message: format!("the volume was not unlocked within {} s", args.timeout),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

pub fn unlock(args: UnlockArgs) -> Result<(), Failure> {
    if let Some(name) = args.share.clone() {
        return crate::share::give(args, name);
    }
    if args.token {
        return match call(&args.control, &Request::UnlockToken)? {
            Response::Ok(s) => {
                println!(
                    "unlocked by token: export {:?}, {} ({})",
                    s.export_name,
                    human_bytes(s.size),
                    s.cipher
                );
                Ok(())
            }
            Response::Error(e) if e.kind == ErrorKind::AlreadyUnlocked => {
                eprintln!("nbdcryptctl: the volume is already unlocked; nothing to do");
                Ok(())
            }
            Response::Error(e) => Err(refusal(e)),
        };
    }
    let source = match (args.key_file, args.stdin) {
        (Some(path), _) => Source::KeyFile(path),
        (None, true) => Source::StdinLine,
        (None, false) => {
            // Before asking a person for a passphrase, make sure it can be used.
            let s = match call(&args.control, &Request::Status)? {
                Response::Ok(s) => s,
                Response::Error(e) => return Err(refusal(e)),
            };
            if s.state == VolumeState::Unlocked {
                eprintln!("nbdcryptctl: the volume is already unlocked; nothing to do");
                return Ok(());
            }
            Source::Tty {
                prompt: format!("Passphrase for nbdcrypt volume {}: ", s.volume_uuid),
            }
        }
    };
    let secret = secret::read(&source)?;
    let request = Request::Unlock {
        secret,
        slot: args.slot,
    };
    let response = call(&args.control, &request);
    drop(request); // wipes the secret
    match response? {
        Response::Ok(s) => {
            println!(
                "unlocked: export {:?}, {} ({}), {} clients attached",
                s.export_name,
                human_bytes(s.size),
                s.cipher,
                s.clients
            );
            Ok(())
        }
        Response::Error(e) if e.kind == ErrorKind::AlreadyUnlocked => {
            eprintln!("nbdcryptctl: the volume is already unlocked; nothing to do");
            Ok(())
        }
        Response::Error(e) => Err(refusal(e)),
    }
}

pub fn lock(args: LockArgs) -> Result<(), Failure> {
    match call(&args.control, &Request::Lock { force: args.force })? {
        Response::Ok(_) => {
            println!("locked: the export is withdrawn and the key wiped");
            Ok(())
        }
        Response::Error(e) if e.kind == ErrorKind::AlreadyLocked => {
            eprintln!("nbdcryptctl: the volume is already locked; nothing to do");
            Ok(())
        }
        Response::Error(e) => Err(refusal(e)),
    }
}

pub fn status(args: StatusArgs) -> Result<(), Failure> {
    match call(&args.control, &Request::Status)? {
        Response::Ok(s) if args.json => {
            // A plain struct of strings and integers serializes without fail.
            println!(
                "{}",
                serde_json::to_string_pretty(&s).expect("status serializes")
            );
            Ok(())
        }
        Response::Ok(s) => {
            print!("{}", status_table(&s));
            Ok(())
        }
        Response::Error(e) => Err(refusal(e)),
    }
}

pub(crate) fn call(control: &ControlArg, request: &Request) -> Result<Response, Failure> {
    client::call(&control.control, request).map_err(|e| Failure::error(e.to_string()))
}

/// The daemon's refusal as a message and an exit code. Every kind is listed, so a new one forces
/// a decision here.
pub(crate) fn refusal(e: ErrorReply) -> Failure {
    let code = match e.kind {
        ErrorKind::WrongPassphrase => exit::WRONG_SECRET,
        ErrorKind::RateLimited | ErrorKind::Busy => exit::TRY_LATER,
        ErrorKind::AlreadyUnlocked | ErrorKind::AlreadyLocked => exit::ERROR,
        ErrorKind::BadRequest | ErrorKind::PermissionDenied | ErrorKind::Internal => exit::ERROR,
        ErrorKind::TokenFailed => exit::ERROR,
        ErrorKind::ProviderUnreachable => exit::TRY_LATER,
        ErrorKind::Unknown => exit::ERROR,
    };
    Failure::new(code, e.message)
}

fn status_table(s: &StatusReport) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("state", s.state.to_string()),
        ("export", s.export_name.clone()),
        ("volume uuid", s.volume_uuid.clone()),
        ("cipher", s.cipher.clone()),
        ("sector size", s.sector_size.to_string()),
        (
            "size",
            format!("{} ({} bytes)", human_bytes(s.size), s.size),
        ),
        ("clients", s.clients.to_string()),
        (
            "reads",
            format!("{} ({})", s.reads, human_bytes(s.bytes_read)),
        ),
        (
            "writes",
            format!("{} ({})", s.writes, human_bytes(s.bytes_written)),
        ),
        ("flushes", s.flushes.to_string()),
        ("errors", s.errors.to_string()),
    ];
    if let Some(r) = &s.locked_reason {
        rows.push(("reason", r.clone()));
    }
    if let Some(r) = &s.reencrypt {
        rows.push(("reencrypt", crate::reencrypt_online::line(r)));
    }
    if let Some(u) = &s.upstream {
        rows.push(("upstream", u.clone()));
    }
    if let Some(t) = s.volume_key_created {
        rows.push(("volume key", crate::reencrypt_online::key_age(t)));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}{v}\n"))
        .collect()
}

/// 1536 -> "1.5 KiB".
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
    }

    #[test]
    fn status_table_is_aligned() {
        let s = StatusReport {
            state: VolumeState::Locked,
            volume_uuid: "u".into(),
            cipher: "aes-xts-plain64".into(),
            sector_size: 4096,
            size: 1 << 30,
            export_name: "vol".into(),
            clients: 0,
            reads: 0,
            writes: 0,
            bytes_read: 0,
            bytes_written: 0,
            flushes: 0,
            errors: 0,
            locked_reason: Some("locked by uid 0".into()),
            volume_key_created: None,
            reencrypt: None,
            metrics: None,
            upstream: None,
        };
        let t = status_table(&s);
        assert!(t.starts_with("state        locked\n"), "{t}");
        assert!(
            t.contains("size         1.0 GiB (1073741824 bytes)\n"),
            "{t}"
        );
        assert!(t.ends_with("reason       locked by uid 0\n"), "{t}");
    }

    #[test]
    fn refusals_map_to_documented_exit_codes() {
        let code = |kind| refusal(ErrorReply::new(kind, "m")).code;
        assert_eq!(code(ErrorKind::WrongPassphrase), 3);
        assert_eq!(code(ErrorKind::RateLimited), 4);
        assert_eq!(code(ErrorKind::Busy), 4);
        assert_eq!(code(ErrorKind::Internal), 1);
        assert_eq!(code(ErrorKind::PermissionDenied), 1);
    }
}
