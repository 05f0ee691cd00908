//! Offline commands: work directly on a volume file or block device through `nbdcrypt::luks2`,
//! without a running daemon. Modelled on cryptsetup's `luksFormat`, `luksAddKey`,
//! `luksKillSlot`, `luksChangeKey`, `luksDump`, `luksHeaderBackup/Restore` and
//! `open --test-passphrase`.
//!
//! Each command lives in its own file (`format`, `keys`, `dump`, `header`); this file holds the
//! clap enum, the dispatch and what they share: opening a volume, turning `FormatError`s into
//! messages that name the path, the KDF options, and the exit codes.

mod clevis;
mod dump;
mod enroll;
mod format;
mod header;
mod keys;
mod pin;
mod policy;
mod reencrypt;
mod upstream;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};

use nbdcrypt::audit::{AuditEvent, AuditEventKind, AuditLog};
use nbdcrypt::crypto::kdf::{benchmark_pbkdf2, MAX_ARGON2_CPUS_CREATE};
use nbdcrypt::luks2::{
    benchmark_argon2id, FormatError, HashAlg, KdfParams, Luks2Header, RepairNeeded, VolumeIo,
};

use crate::secret_input::io_reason;

/// Exit status 0: success.
pub const EXIT_OK: u8 = 0;
// Exit status 1 (any other error) is `main`'s: `run` returns those errors.
/// The passphrase or key file opened no keyslot (cryptsetup's code for this is 2, "no
/// permission"). NOTE for the merge with the online commands: their table (`exit.rs` on main)
/// uses 2 for usage errors and 3 for a wrong secret; changing this one constant (and `NO_KEY`
/// in `tests/offline_cli.rs`) moves the offline commands to that table, help texts included.
pub const EXIT_NO_KEY: u8 = crate::exit::WRONG_SECRET;

/// The exit-code table for `--help` texts.
pub fn exit_codes() -> String {
    let usage = if EXIT_NO_KEY == 2 {
        ", bad arguments"
    } else {
        ""
    };
    let mut t = format!(
        "Exit status:\n  0  success\n  1  error (missing file, not a LUKS2 volume, permission \
         denied{usage}, ...)\n"
    );
    if EXIT_NO_KEY != 2 {
        t.push_str("  2  usage error (bad flags or arguments)\n");
    }
    t.push_str(&format!(
        "  {EXIT_NO_KEY}  wrong passphrase: no key available with this passphrase"
    ));
    t
}

/// What cryptsetup prints for a passphrase that opens nothing.
pub const NO_KEY_MESSAGE: &str = "no key available with this passphrase";

/// A command's examples followed by the exit-code table.
fn help(examples: &str) -> String {
    format!(
        "{examples}\n\n{SECRET_HELP}\n\n{}\n\n{}",
        upstream::UPSTREAM_HELP,
        exit_codes()
    )
}

const SECRET_HELP: &str = "\
Passphrases: with --key-file F the file's bytes are used as-is (newlines included; `-` reads all
of standard input). Without it, nbdcryptctl asks on the terminal (echo off; new passphrases
twice), or, when standard input is not a terminal, reads one line of it (without the newline).";

/// Commands that work on a volume file or block device directly (no daemon needed).
#[derive(Subcommand, Debug)]
pub enum OfflineCommand {
    /// Create a new LUKS2 volume (aes-xts-plain64) on a file or block device.
    #[command(long_about = format::ABOUT, after_help = help(format::EXAMPLES))]
    Format(format::FormatArgs),
    /// Add a passphrase in a new keyslot (needs an existing passphrase).
    #[command(long_about = keys::ADD_ABOUT, after_help = help(keys::ADD_EXAMPLES))]
    AddKey(keys::AddKeyArgs),
    /// Wipe and remove a keyslot (needs the passphrase of another keyslot).
    #[command(long_about = keys::REMOVE_ABOUT, after_help = help(keys::REMOVE_EXAMPLES))]
    RemoveKey(keys::RemoveKeyArgs),
    /// Change the passphrase of a keyslot, keeping its number.
    #[command(long_about = keys::CHANGE_ABOUT, after_help = help(keys::CHANGE_EXAMPLES))]
    ChangeKey(keys::ChangeKeyArgs),
    /// Show the LUKS2 header: segment, keyslots, tokens (never secrets).
    #[command(long_about = dump::ABOUT, after_help = help(dump::EXAMPLES))]
    Dump(dump::DumpArgs),
    /// Save the LUKS2 header and keyslots to a file.
    #[command(long_about = header::BACKUP_ABOUT, after_help = help(header::BACKUP_EXAMPLES))]
    HeaderBackup(header::BackupArgs),
    /// Replace the LUKS2 header and keyslots with a backup.
    #[command(long_about = header::RESTORE_ABOUT, after_help = help(header::RESTORE_EXAMPLES))]
    HeaderRestore(header::RestoreArgs),
    /// Check a passphrase: print the keyslot it opens (exit 0) or fail with exit 3.
    #[command(long_about = keys::TEST_ABOUT, after_help = help(keys::TEST_EXAMPLES))]
    TestKey(keys::TestKeyArgs),
    /// Add a keyslot unlocked by AWS KMS, a PKCS#11 HSM, clevis (Tang, TPM2) or a quorum of them.
    #[command(long_about = enroll::ENROLL_ABOUT, after_help = help(enroll::ENROLL_EXAMPLES))]
    Enroll(enroll::EnrollArgs),
    /// Remove a KMS/HSM enrolment: its token, then its keyslot.
    #[command(long_about = enroll::UNENROLL_ABOUT, after_help = help(enroll::UNENROLL_EXAMPLES))]
    Unenroll(enroll::UnenrollArgs),
    /// Re-seal a KMS/HSM enrolment under a new (or the same) key, crash-safely.
    #[command(long_about = enroll::REKEY_ABOUT, after_help = help(enroll::REKEY_EXAMPLES))]
    Rekey(enroll::RekeyArgs),
    /// Check the KMS/HSM tokens: unseal, open the keyslot, print it (exit 0) or why not (exit 1).
    #[command(long_about = enroll::TEST_TOKEN_ABOUT, after_help = help(enroll::TEST_TOKEN_EXAMPLES))]
    TestToken(enroll::TestTokenArgs),
    /// Print or write the config lines that pin the volume (UUID, volume-key digest) in nbdcryptd.
    #[command(long_about = pin::ABOUT, after_help = help(pin::EXAMPLES))]
    Pin(pin::PinArgs),
    /// Replace the volume key and re-encrypt every sector (crash-safe, cryptsetup-compatible).
    #[command(long_about = reencrypt::ABOUT, after_help = help(reencrypt::EXAMPLES))]
    Reencrypt(reencrypt::ReencryptArgs),
    /// Print the volume's unlock policy in words (or --json): what opens each keyslot.
    #[command(long_about = policy::ABOUT, after_help = help(policy::EXAMPLES))]
    Policy(policy::PolicyArgs),
}

/// Runs one offline command. A wrong passphrase is reported here (message on stderr, exit 3);
/// every other failure is returned for `main` to print (exit 1).
/// Run a key-changing command and record it in `--audit-log` (opened first, so a bad path fails
/// before anything changes): volume UUID, keyslot, this process, and the error if it failed.
fn audited(
    log: Option<&Path>,
    kind: AuditEventKind,
    volume: &Path,
    body: impl FnOnce() -> anyhow::Result<Option<u32>>,
) -> anyhow::Result<()> {
    let log = match log {
        Some(p) => Some(
            AuditLog::open(p)
                .map_err(|e| anyhow!("cannot open the audit log {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let result = body();
    if let Some(log) = log {
        let mut event = AuditEvent::new(kind).this_process();
        if let Ok(v) = Volume::open(volume, false) {
            if let Ok((h, _)) = Luks2Header::read_metadata_only(&v.io) {
                event = event.volume(h.uuid());
            }
        }
        match &result {
            Ok(Some(slot)) => event = event.keyslot(*slot),
            Ok(None) => {}
            Err(e) => event = event.failed(format!("{e:#}")),
        }
        if let Err(e) = log.record(&event) {
            eprintln!("nbdcryptctl: warning: cannot write the audit log: {e}");
        }
    }
    result.map(|_| ())
}

pub fn run(cmd: OfflineCommand) -> anyhow::Result<ExitCode> {
    // Passphrases and volume keys are in memory: keep them out of core dumps.
    let _ = nbdcrypt::sys::disable_core_dumps();
    let _ = COMMAND.set(cmd.name());
    let result = match cmd {
        OfflineCommand::Format(a) => format::run(a),
        OfflineCommand::AddKey(a) => {
            let (log, vol) = (a.audit_log.clone(), a.volume.clone());
            audited(log.as_deref(), AuditEventKind::AddKey, &vol, || {
                keys::add(a)
            })
        }
        OfflineCommand::RemoveKey(a) => {
            let (log, vol) = (a.audit_log.clone(), a.volume.clone());
            audited(log.as_deref(), AuditEventKind::RemoveKey, &vol, || {
                keys::remove(a)
            })
        }
        OfflineCommand::ChangeKey(a) => {
            // A changed passphrase is a keyslot replaced: recorded as add_key of that slot.
            let (log, vol) = (a.audit_log.clone(), a.volume.clone());
            audited(log.as_deref(), AuditEventKind::AddKey, &vol, || {
                keys::change(a)
            })
        }
        OfflineCommand::Dump(a) => dump::run(a),
        OfflineCommand::HeaderBackup(a) => {
            let (log, vol) = (a.audit_log.clone(), a.volume.clone());
            audited(log.as_deref(), AuditEventKind::HeaderBackup, &vol, || {
                header::backup(a).map(|()| None)
            })
        }
        OfflineCommand::HeaderRestore(a) => {
            let (log, vol) = (a.audit_log.clone(), a.volume.clone());
            audited(log.as_deref(), AuditEventKind::HeaderRestore, &vol, || {
                header::restore(a).map(|()| None)
            })
        }
        OfflineCommand::TestKey(a) => keys::test(a),
        OfflineCommand::Enroll(a) => enroll::enroll(a),
        OfflineCommand::Unenroll(a) => enroll::unenroll(a),
        OfflineCommand::Rekey(a) => enroll::rekey(a),
        OfflineCommand::TestToken(a) => enroll::test_token(a),
        OfflineCommand::Pin(a) => pin::run(a),
        OfflineCommand::Reencrypt(a) => reencrypt::run(a),
        OfflineCommand::Policy(a) => policy::run(a),
    };
    match result {
        Ok(()) => Ok(ExitCode::from(EXIT_OK)),
        Err(e) if e.downcast_ref::<NoKey>().is_some() => {
            eprintln!("nbdcryptctl: {e}");
            Ok(ExitCode::from(EXIT_NO_KEY))
        }
        Err(e) => Err(e),
    }
}

impl OfflineCommand {
    /// The command's name on the command line, for messages.
    fn name(&self) -> &'static str {
        match self {
            OfflineCommand::Format(_) => "format",
            OfflineCommand::AddKey(_) => "add-key",
            OfflineCommand::RemoveKey(_) => "remove-key",
            OfflineCommand::ChangeKey(_) => "change-key",
            OfflineCommand::Dump(_) => "dump",
            OfflineCommand::HeaderBackup(_) => "header-backup",
            OfflineCommand::HeaderRestore(_) => "header-restore",
            OfflineCommand::TestKey(_) => "test-key",
            OfflineCommand::Enroll(_) => "enroll",
            OfflineCommand::Unenroll(_) => "unenroll",
            OfflineCommand::Rekey(_) => "rekey",
            OfflineCommand::TestToken(_) => "test-token",
            OfflineCommand::Pin(_) => "pin",
            OfflineCommand::Reencrypt(_) => "reencrypt",
            OfflineCommand::Policy(_) => "policy",
        }
    }
}

/// The offline command this process runs (set once by `run`), for the message of a refused claim.
static COMMAND: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The passphrase opened no keyslot: exit 3.
#[derive(Debug)]
pub(crate) struct NoKey(pub String);

impl std::fmt::Display for NoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoKey {}

// ---- opening a volume ---------------------------------------------------------------------------

/// An open volume with the path (or upstream URI) it came from, for messages.
pub(crate) struct Volume {
    pub path: PathBuf,
    /// A local file or block device (claimed when opened for writing), or an upstream NBD
    /// export (no claim, no header lock: best effort, see [`UPSTREAM_HELP`]).
    pub io: VolumeIo,
}

impl Volume {
    /// Opens an existing volume file or block device, read-only or read-write; or, for a
    /// libnbd-style URI (`nbd+unix:///export?socket=PATH`, `nbds://host/export?...`), connects
    /// to that upstream NBD export.
    pub fn open(path: &Path, write: bool) -> anyhow::Result<Volume> {
        if let Some(uri) = upstream::uri_of(path) {
            let io = VolumeIo::open_upstream(uri, write, false).map_err(|e| anyhow!("{e}"))?;
            if write {
                upstream::warn_unlocked(uri);
            }
            return Ok(Volume {
                path: path.to_path_buf(),
                io,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| anyhow!("cannot open {}: {}", path.display(), io_reason(&e)))?;
        let meta = file
            .metadata()
            .map_err(|e| anyhow!("cannot stat {}: {}", path.display(), io_reason(&e)))?;
        if meta.is_dir() {
            bail!(
                "{} is a directory, not a volume file or block device",
                path.display()
            );
        }
        if write {
            claim(&file, path)?;
        }
        Ok(Volume {
            path: path.to_path_buf(),
            io: VolumeIo::Local(file),
        })
    }

    /// The local file or block device, for commands that need one (`reencrypt`); an error
    /// naming the URI for an upstream NBD export.
    pub fn local(&self) -> anyhow::Result<&File> {
        self.io.local_file().ok_or_else(|| {
            anyhow!(
                "{}: this command needs a local file or block device, not an NBD export",
                self.path.display()
            )
        })
    }

    /// Reads the header of a volume whose data follows it. For commands that write, a stale or
    /// damaged header copy is rewritten from the good one first (as cryptsetup does); read-only
    /// commands only warn.
    pub fn header(&self, write: bool) -> anyhow::Result<Luks2Header> {
        let (hdr, repair) = Luks2Header::read(&self.io).map_err(|e| self.explain(e))?;
        self.handle_repair(&hdr, repair, write)?;
        Ok(hdr)
    }

    /// Like [`header`](Self::header), but also accepts a detached header file (for `dump`).
    pub fn header_metadata_only(&self) -> anyhow::Result<Luks2Header> {
        let (hdr, repair) =
            Luks2Header::read_metadata_only(&self.io).map_err(|e| self.explain(e))?;
        self.handle_repair(&hdr, repair, false)?;
        Ok(hdr)
    }

    fn handle_repair(
        &self,
        hdr: &Luks2Header,
        repair: RepairNeeded,
        write: bool,
    ) -> anyhow::Result<()> {
        let which = match repair {
            RepairNeeded::None => return Ok(()),
            RepairNeeded::Primary => "primary",
            RepairNeeded::Secondary => "secondary",
        };
        if write {
            hdr.repair(&self.io, repair).map_err(|e| self.explain(e))?;
            eprintln!(
                "nbdcryptctl: {}: the {which} header copy was damaged or stale; rewrote it from the \
                 other copy",
                self.path.display()
            );
        } else {
            eprintln!(
                "nbdcryptctl: warning: {}: the {which} header copy is damaged or stale (the other \
                 copy is used); any command that writes the header repairs it",
                self.path.display()
            );
        }
        Ok(())
    }

    /// Turns a library error into a message naming the path; a wrong passphrase becomes
    /// [`NoKey`] (exit 3).
    pub fn explain(&self, e: FormatError) -> anyhow::Error {
        let p = self.path.display();
        match e {
            FormatError::WrongPassphrase => anyhow::Error::new(NoKey(NO_KEY_MESSAGE.into())),
            FormatError::NoValidHeader {
                ref primary,
                ref secondary,
            } => {
                let magic = |e: &FormatError| matches!(e, FormatError::BadMagic { .. });
                let version = |e: &FormatError| match e {
                    FormatError::UnsupportedVersion { version, .. } => Some(*version),
                    _ => None,
                };
                if let Some(v) = version(primary) {
                    if v == 1 {
                        anyhow!(
                            "{p} is a LUKS1 volume; only LUKS2 is supported (convert it with \
                             `cryptsetup convert --type luks2 {p}`)"
                        )
                    } else {
                        anyhow!("{p}: unsupported LUKS version {v} (only LUKS2)")
                    }
                } else if magic(primary) && magic(secondary) {
                    anyhow!("{p} is not a LUKS2 volume (no LUKS2 header found)")
                } else {
                    anyhow!(
                        "{p}: no valid LUKS2 header copy (primary: {primary}; secondary: \
                         {secondary}); restore a backup with `nbdcryptctl header-restore`"
                    )
                }
            }
            FormatError::DetachedHeader { reason } => anyhow!(
                "{p} has a detached LUKS2 header ({reason}); nbdcryptctl needs the header and the \
                 data on the same file or device"
            ),
            FormatError::Lock { source, .. } => {
                anyhow!("{p}: cannot lock the header: {}", io_reason(&source))
            }
            FormatError::Io { op, offset, source } => {
                anyhow!(
                    "{p}: i/o error {op} at offset {offset}: {}",
                    io_reason(&source)
                )
            }
            other => anyhow!("{p}: {other}"),
        }
    }
}

/// Takes the daemon's claim on the volume (the same OFD lock nbdcryptd holds while it serves it)
/// for as long as `file` stays open, or refuses: a command that writes the header of a served
/// volume would leave the daemon writing under a key the header no longer holds. Holding the
/// claim (not just probing it) also keeps a daemon that starts meanwhile from serving the volume.
pub(crate) fn claim(file: &File, path: &Path) -> anyhow::Result<()> {
    let p = path.display();
    let claimed = match nbdcrypt::block::file::try_claim(file, false) {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(claimed)) => claimed,
        Err(e) => bail!(
            "{p}: cannot claim the volume for this command: {}",
            io_reason(&e)
        ),
    };
    let command = COMMAND.get().copied().unwrap_or("this command");
    let who = if claimed.holders.is_empty() {
        "another process (not ours to inspect: an nbdcryptd of another user?)".to_owned()
    } else {
        let each: Vec<String> = claimed
            .holders
            .iter()
            .map(|h| format!("pid {} ({})", h.pid, printable(&h.cmdline.join(" "))))
            .collect();
        each.join(", ")
    };
    let control = claimed.holders.iter().find_map(|h| {
        let mut args = h.cmdline.iter();
        while let Some(a) = args.next() {
            if a == "--control" {
                return args.next().map(|s| printable(s));
            }
            if let Some(v) = a.strip_prefix("--control=") {
                return Some(printable(v));
            }
        }
        None
    });
    let control = control.unwrap_or_else(|| "SOCK".to_owned());
    let how = match command {
        "rekey" => format!(
            "re-seal the tokens through the daemon with `nbdcryptctl rekey --control {control}` \
             (same KMS/HSM key), or stop the daemon first to rekey to a new key"
        ),
        _ => format!(
            "there is no online `{command}`: stop the daemon first (`nbdcryptctl lock --control \
             {control}` is not enough: a locked daemon still holds the volume), then run it again"
        ),
    };
    bail!(
        "{p} is in use by a running nbdcryptd: {who}; refusing to {command} it offline, which would \
         change the header under the daemon.\nTo change it: {how}"
    )
}

/// `s` with terminal control characters and other non-printing characters escaped (`\e`, `\n`,
/// `\u{9b}`...) and backslashes doubled, so text from a header or another process cannot move
/// the cursor, recolour or retitle the terminal, or fake extra lines.
pub(crate) fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x1b' => out.push_str("\\e"),
            c if c.is_control() || is_invisible(c) => {
                out.push_str(&format!("\\u{{{:x}}}", u32::from(c)))
            }
            c => out.push(c),
        }
    }
    out
}

/// Format characters that reorder or hide text (bidi overrides, zero-width marks, ...).
fn is_invisible(c: char) -> bool {
    matches!(u32::from(c), 0x200b..=0x200f | 0x202a..=0x202e | 0x2060..=0x2069 | 0xfeff)
}

// ---- key derivation options ---------------------------------------------------------------------

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PbkdfType {
    Argon2id,
    Argon2i,
    Pbkdf2,
}

/// KDF of a new keyslot, as cryptsetup's options.
#[derive(Args, Debug, Clone)]
pub struct PbkdfArgs {
    /// Key derivation function of the new keyslot.
    #[arg(
        long,
        value_enum,
        default_value = "argon2id",
        help_heading = "Key derivation"
    )]
    pub pbkdf: PbkdfType,
    /// Argon2 memory cost in KiB (default: benchmarked, at most 1 GiB and half the RAM).
    #[arg(long, value_name = "KiB", help_heading = "Key derivation")]
    pub pbkdf_memory: Option<u32>,
    /// Argon2 threads (lanes), 1..4 (default: min(4, CPUs)).
    #[arg(long, value_name = "N", help_heading = "Key derivation")]
    pub pbkdf_parallel: Option<u32>,
    /// Time the KDF should take to open the keyslot, in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 2000,
        help_heading = "Key derivation"
    )]
    pub iter_time: u64,
    /// Skip the benchmark: pbkdf2 iterations, or argon2 time cost (passes).
    #[arg(long, value_name = "N", help_heading = "Key derivation")]
    pub pbkdf_force_iterations: Option<u32>,
}

/// Default argon2 memory cap: 1 GiB, but at most half the RAM (as cryptsetup).
fn default_argon2_memory_kib() -> u32 {
    const CAP: u32 = 1024 * 1024;
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
    });
    match total_kib {
        Some(t) => u32::try_from(t / 2).unwrap_or(CAP).clamp(32, CAP),
        None => CAP,
    }
}

impl PbkdfArgs {
    /// Checks what can be checked before asking for any passphrase: ranges, and the whole KDF
    /// when it is forced (no benchmark needed).
    pub fn precheck(&self) -> anyhow::Result<()> {
        if self.pbkdf_force_iterations.is_some() {
            self.resolve(64).map(|_| ())
        } else {
            self.check_ranges()
        }
    }

    fn check_ranges(&self) -> anyhow::Result<()> {
        if self.iter_time == 0 {
            bail!("--iter-time must be at least 1 ms");
        }
        if let Some(p) = self.pbkdf_parallel {
            if !(1..=MAX_ARGON2_CPUS_CREATE).contains(&p) {
                bail!("--pbkdf-parallel {p} is outside 1..={MAX_ARGON2_CPUS_CREATE}");
            }
        }
        if self.pbkdf == PbkdfType::Pbkdf2
            && (self.pbkdf_memory.is_some() || self.pbkdf_parallel.is_some())
        {
            bail!("--pbkdf-memory and --pbkdf-parallel apply to argon2 only, not pbkdf2");
        }
        Ok(())
    }

    /// Resolves the options into keyslot KDF parameters, benchmarking (with progress on stderr)
    /// unless `--pbkdf-force-iterations` is given. `key_len` is the volume key length in bytes.
    pub fn resolve(&self, key_len: usize) -> anyhow::Result<KdfParams> {
        self.check_ranges()?;
        let target = Duration::from_millis(self.iter_time);
        let cpus = self.pbkdf_parallel.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(1))
                .unwrap_or(1)
                .clamp(1, MAX_ARGON2_CPUS_CREATE)
        });
        let params = match (self.pbkdf, self.pbkdf_force_iterations) {
            (PbkdfType::Pbkdf2, Some(n)) => KdfParams::Pbkdf2 {
                hash: HashAlg::Sha256,
                iterations: n,
            },
            (PbkdfType::Pbkdf2, None) => {
                eprintln!(
                    "benchmarking key derivation (pbkdf2-sha256, {} ms)…",
                    self.iter_time
                );
                KdfParams::Pbkdf2 {
                    hash: HashAlg::Sha256,
                    iterations: benchmark_pbkdf2(HashAlg::Sha256, target, key_len),
                }
            }
            (kind, Some(time)) => argon2(
                kind,
                time,
                self.pbkdf_memory.unwrap_or_else(default_argon2_memory_kib),
                cpus,
            ),
            (kind, None) => {
                let max_mem = self.pbkdf_memory.unwrap_or_else(default_argon2_memory_kib);
                eprintln!(
                    "benchmarking key derivation ({}, up to {} MiB, {} ms)…",
                    if kind == PbkdfType::Argon2i {
                        "argon2i"
                    } else {
                        "argon2id"
                    },
                    max_mem / 1024,
                    self.iter_time
                );
                let KdfParams::Argon2id {
                    time, memory_kib, ..
                } = benchmark_argon2id(target, max_mem)
                    .map_err(|e| anyhow!("key derivation benchmark failed: {e}"))?
                else {
                    bail!("key derivation benchmark returned a non-argon2id result");
                };
                argon2(kind, time, memory_kib, cpus)
            }
        };
        params
            .check_creatable()
            .map_err(|e| anyhow!("{e} (cryptsetup would refuse to open such a keyslot)"))?;
        Ok(params)
    }

    /// PBKDF2-SHA256 iterations of the volume-key digest: benchmarked to 125 ms like
    /// cryptsetup, or the minimum (1000) when the KDF is forced.
    pub fn digest_iterations(&self) -> u32 {
        if self.pbkdf_force_iterations.is_some() {
            1000
        } else {
            benchmark_pbkdf2(HashAlg::Sha256, Duration::from_millis(125), 32)
        }
    }
}

fn argon2(kind: PbkdfType, time: u32, memory_kib: u32, cpus: u32) -> KdfParams {
    if kind == PbkdfType::Argon2i {
        KdfParams::Argon2i {
            time,
            memory_kib,
            cpus,
        }
    } else {
        KdfParams::Argon2id {
            time,
            memory_kib,
            cpus,
        }
    }
}

/// One line describing a KDF, e.g. `argon2id (time 4, memory 1048576 KiB, 2 threads)`.
pub(crate) fn describe_kdf(k: &KdfParams) -> String {
    match *k {
        KdfParams::Pbkdf2 { hash, iterations } => {
            format!("pbkdf2 ({hash}, {iterations} iterations)")
        }
        KdfParams::Argon2i {
            time,
            memory_kib,
            cpus,
        }
        | KdfParams::Argon2id {
            time,
            memory_kib,
            cpus,
        } => format!(
            "{} (time {time}, memory {memory_kib} KiB, {cpus} thread{})",
            k.type_name(),
            if cpus == 1 { "" } else { "s" }
        ),
    }
}

/// `--yes` or a typed `YES` on the terminal; otherwise an error.
pub(crate) fn confirmed(yes: bool, question: &str) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if crate::secret_input::confirm(question)? {
        Ok(())
    } else {
        bail!("not confirmed; nothing was changed")
    }
}

/// `16777216 bytes (16 MiB)`.
pub(crate) fn bytes_human(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, unit) in UNITS {
        if n >= unit {
            let v = n as f64 / unit as f64;
            return if n.is_multiple_of(unit) {
                format!("{n} bytes ({} {name})", n / unit)
            } else {
                format!("{n} bytes ({v:.1} {name})")
            };
        }
    }
    format!("{n} bytes")
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn printable_neutralises_terminal_controls_and_keeps_text() {
        assert_eq!(printable("plain label ü"), "plain label ü");
        assert_eq!(printable("a\x1b[2Jb\nc\r\td"), "a\\e[2Jb\\nc\\r\\td");
        assert_eq!(printable("\u{9b}31m\x07\u{7f}"), "\\u{9b}31m\\u{7}\\u{7f}");
        // Bidi overrides and zero-width characters could make text read differently.
        assert_eq!(printable("x\u{202e}y\u{200b}"), "x\\u{202e}y\\u{200b}");
        // Backslashes are doubled, so an escape in the output always means a control character.
        assert_eq!(printable("\\e"), "\\\\e");
    }
}
