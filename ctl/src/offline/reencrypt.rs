//! `nbdcryptctl reencrypt VOLUME`: replace the volume key and re-encrypt every sector, offline,
//! in cryptsetup's LUKS2 re-encryption format (so `cryptsetup reencrypt --resume-only` can
//! finish what we started and we can finish what cryptsetup started). The engine is
//! `nbdcrypt::luks2::reencrypt`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::Args;

use nbdcrypt::audit::{AuditEvent, AuditEventKind, AuditLog};
use nbdcrypt::crypto::keys::SecretBytes;
use nbdcrypt::luks2::reencrypt::{
    self, BlockIo, DirectFileIo, FileIo, KeyAge, Reencryption, Resilience, StartParams, ZoneIo,
};
use nbdcrypt::luks2::tokens::carry::{self, Carrier, SharePassphrases};
use nbdcrypt::luks2::tokens::quorum::{self, Holder, QuorumToken};
use nbdcrypt::luks2::Luks2Header;
use nbdcrypt::secret_file::{self, Kind};

use super::keys::KdfLimitArgs;
use super::{bytes_human, Volume};
use crate::secret_input::{read_existing, Source};

pub const ABOUT: &str = "\
Replace the volume key: a new random key, new keyslots for it opened by the same passphrases and
key files, every sector re-encrypted from the old key to the new one, then the old key and its
keyslots removed. Works on a volume no daemon serves (the command takes the same claim nbdcryptd
holds). On disk this is cryptsetup's LUKS2 re-encryption (requirement online-reencrypt-v2), so:

  * it is crash-safe: kill it, lose power, and the next `nbdcryptctl reencrypt VOLUME` resumes
    where it stopped (a zone half done is redone from the resilience data);
  * `cryptsetup reencrypt --resume-only VOLUME` can finish a re-encryption we started, and this
    command finishes one that cryptsetup started (mode reencrypt, forward, no data shift);
  * while it runs, other tools refuse the volume; nbdcryptd, unlocked with a passphrase or
    through its tokens, resumes an interrupted one online;
  * if it is cut between its last header commit and the wipe of the old keyslots, the next run
    of this command (or the next unlock in nbdcryptd) finishes the wipe.

Online, while nbdcryptd serves the volume and clients keep reading and writing:
`nbdcryptctl reencrypt --control SOCK [--key-file F] [--pause|--resume|--status] [--max-rate R]
[--wait]` (see `nbdcryptctl reencrypt --control SOCK --help`).

Every keyslot of the volume key is carried over to the new key, offline as online (the same code
in both): a passphrase or key file keyslot must be opened by one of the secrets given (one
--key-file per secret, or one passphrase asked on the terminal); nbdcrypt's KMS/HSM tokens are
re-sealed (a fresh secret sealed under the same KMS/HSM key for a new keyslot; give the same
--kms-*/--pkcs11-* options as for `enroll`, or --config); clevis tokens (Tang, TPM2) are opened
through the --tang-allow/--tpm2-tcti settings and bound to the new keyslot too; quorum keyslots
(`enroll --quorum K`) are re-split K-of-N to the same holders at the same indices. For a quorum
every holder must open its share first, which also proves nobody changed its threshold or
holders in the header (a changed quorum is refused, never copied): machine shares through the
options above, and each person types their share passphrase when asked at the terminal, in turn
(or, with no terminal, --share-passphrase-file NAME=FILE); their share is re-wrapped under the
same passphrase with a fresh salt. The old tokens go with the old key. A keyslot that none of
these opens would be lost, so the command refuses unless --drop-unopened says to drop it. The
audit log's start event says how each keyslot was carried (`carried`) and what was dropped.

Resuming (the same command again, or --resume-only) needs both keys, the old and the new. It
tries the --key-file secrets first; then each keyslot's tokens, through the same providers a
start uses (--config, or --kms-*/--pkcs11-*/--tang-allow/--tpm2-tcti: a token never picks a KMS
key, HSM object or Tang server outside them), so a volume with KMS/HSM/clevis tokens resumes
with no secret at all. A quorum keyslot needs K of its shares: the machine shares through those
options, then, while fewer than K are open, people's passphrases asked at the terminal in turn
or read from --share-passphrase-file NAME=FILE; shares beyond K must lie on the same
polynomial (a header edited to lower K is refused). Without --key-file the passphrase is asked
only when the tokens did not open both keys. Every key is checked against its own segment's
digest (old or new) and the re-encryption digest before anything is written; when the keys do
not open, it exits 3, names what each token said, and the volume is untouched.

Resilience (how a zone interrupted mid-way is recovered):
  checksum  (default) a hash of each 4 KiB of the zone's old ciphertext;
  journal   a copy of the whole zone (slower: every byte written twice);
  none      nothing: a crash inside a zone destroys that zone. Only when asked.";

pub const EXAMPLES: &str = "\
Examples:
  nbdcryptctl reencrypt /srv/vol.img                       # asks the passphrase
  nbdcryptctl reencrypt vol.img --key-file a.key --key-file b.key   # two keyslots, two secrets
  nbdcryptctl reencrypt vol.img --key-file a.key --sector-size 4096 --key-size 512
  nbdcryptctl reencrypt vol.img --key-file a.key --max-rate 200M    # at most 200 MiB/s
  nbdcryptctl reencrypt vol.img --key-file a.key --resume-only      # only finish a started one
  nbdcryptctl reencrypt vol.img --status                            # progress, no secret needed
  nbdcryptctl reencrypt vol.img --key-file a.key --config /etc/nbdcrypt/vol.toml  # + KMS/HSM/Tang
  nbdcryptctl reencrypt vol.img --key-file a.key --kms-allow-key ARN \\
      --share-passphrase-file alice=/run/alice.pass     # a quorum, no terminal
  nbdcryptctl reencrypt vol.img --resume-only --config /etc/nbdcrypt/vol.toml  # resume by tokens
  nbdcryptctl reencrypt vol.img --resume-only --kms-allow-key ARN \\
      --share-passphrase-file alice=/run/alice.pass     # resume a quorum: KMS + alice";

#[derive(Args, Debug)]
pub struct ReencryptArgs {
    /// Volume file or block device (no daemon may be serving it).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// A secret (passphrase or key file, bytes as-is; `-` = standard input). Repeat for the
    /// secrets of several keyslots. Without it, one passphrase is asked (on a resume, only
    /// when the tokens did not open both keys).
    #[arg(long, value_name = "FILE")]
    pub key_file: Vec<PathBuf>,
    /// New volume key size in bits: 512 (AES-256-XTS) or 256 (AES-128-XTS). Default: as now.
    #[arg(long, value_name = "BITS")]
    pub key_size: Option<u32>,
    /// New encryption sector size: 512, 1024, 2048 or 4096. Default: as now.
    #[arg(long, value_name = "BYTES")]
    pub sector_size: Option<u32>,
    /// checksum (default), journal, or none (a crash mid-zone loses the zone).
    #[arg(long, value_name = "MODE", default_value = "checksum")]
    pub resilience: String,
    /// Bytes per hot zone (K/M/G suffixes, powers of 1024). Default 64M (20M for none), capped
    /// by what the resilience area can protect.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub hotzone_size: Option<u64>,
    /// Limit the re-encryption rate, in bytes per second (K/M/G suffixes).
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub max_rate: Option<u64>,
    /// Only show the state of a re-encryption in progress (no secret needed, nothing changed).
    #[arg(long, conflicts_with_all = ["resume_only", "key_file"])]
    pub status: bool,
    /// Only resume a re-encryption already started (by us or by cryptsetup); never start one.
    /// Its keys come from --key-file, or the tokens and quorums (see above).
    #[arg(long, alias = "resume")]
    pub resume_only: bool,
    /// Drop the old key's keyslots that none of the given secrets opens (cryptsetup's
    /// behaviour). Without it such keyslots make the command refuse.
    #[arg(long)]
    pub drop_unopened: bool,
    /// Read and write the data area through the page cache. By default it bypasses the page
    /// cache (O_DIRECT) where the file system allows it (a disk file or a block device; tmpfs
    /// copies through its cache either way): half the memory copies, and the run does not
    /// evict everything else cached. The header always goes through the page cache.
    #[arg(long)]
    pub buffered: bool,
    /// Plain progress lines even on a terminal (they are plain when stderr is not a terminal).
    #[arg(long)]
    pub no_progress_bar: bool,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
    /// Append JSON lines (start, checkpoints, finish, failure) to this audit log.
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    #[command(flatten)]
    pub kdf_limits: KdfLimitArgs,
    /// The passphrase of a person's quorum share, from a file (its first line), when nobody
    /// can be asked at the terminal: NAME is the share's name (`nbdcryptctl policy VOLUME`
    /// lists them). Repeat for each person. On a terminal, each person not given here is asked
    /// in turn. Never the passphrase itself on the command line.
    #[arg(long, value_name = "NAME=FILE")]
    pub share_passphrase_file: Vec<String>,
    /// Where the KMS/HSM keys, Tang servers and TPM of the tokens live (to open and re-seal
    /// them): the same options as `enroll`, or --config with nbdcryptd's file.
    #[command(flatten)]
    pub location: super::enroll::KmsLocation,
}

/// `64M`, `1G`, `4096`: bytes, K/M/G/T = powers of 1024.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown suffix {c:?} (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a positive size (e.g. 64M)"))
}

struct Audit(Option<AuditLog>, String);

impl Audit {
    fn record(&self, phase: &str, extra: impl FnOnce(AuditEvent) -> AuditEvent) {
        if let Some(log) = &self.0 {
            let ev = extra(
                AuditEvent::new(AuditEventKind::Reencrypt)
                    .this_process()
                    .volume(&self.1)
                    .detail("phase", phase),
            );
            if let Err(e) = log.record(&ev) {
                eprintln!("nbdcryptctl: warning: cannot write the audit log: {e}");
            }
        }
    }
}

pub fn run(a: ReencryptArgs) -> anyhow::Result<()> {
    let resilience = Resilience::from_name(&a.resilience).ok_or_else(|| {
        anyhow!(
            "--resilience {:?}: use checksum, journal or none",
            a.resilience
        )
    })?;
    let key_size = match a.key_size {
        None => None,
        Some(512) => Some(64),
        Some(256) => Some(32),
        Some(n) => bail!("--key-size {n}: use 512 (AES-256-XTS) or 256 (AES-128-XTS)"),
    };
    let log = match &a.audit_log {
        Some(p) => Some(
            AuditLog::open(p)
                .map_err(|e| anyhow!("cannot open the audit log {}: {e}", p.display()))?,
        ),
        None => None,
    };
    if a.status {
        let vol = Volume::open(&a.volume, false)?;
        return match reencrypt::peek(&vol.io).map_err(|e| vol.explain(e))? {
            None => {
                println!("{}: no re-encryption in progress", vol.path.display());
                Ok(())
            }
            Some(st) => {
                println!(
                    "{}: re-encryption in progress: {} of {} done ({:.1}%), {} resilience, \
                     sector size {} -> {}{}",
                    vol.path.display(),
                    st.frontier,
                    st.data_size,
                    st.frontier as f64 * 100.0 / st.data_size.max(1) as f64,
                    st.resilience.name(),
                    st.old_sector_size,
                    st.new_sector_size,
                    if st.hot_len.is_some() {
                        "; a zone was interrupted by a crash and will be recovered on resume"
                    } else {
                        ""
                    }
                );
                Ok(())
            }
        };
    }
    let vol = Volume::open(&a.volume, true)?;
    // A re-encryption cut between its final commit and the end of its wipe: finish the wipe.
    match reencrypt::complete_pending_wipe(&vol.io).map_err(|e| vol.explain(e))? {
        reencrypt::PendingWipe::Nothing => {}
        reencrypt::PendingWipe::Wiped(n, bytes) => eprintln!(
            "{}: wiped {n} old keyslot area(s) ({}) an interrupted re-encryption left",
            vol.path.display(),
            bytes_human(bytes)
        ),
        reencrypt::PendingWipe::Refused(why) => eprintln!(
            "nbdcryptctl: warning: {}: the header asks to wipe keyslot areas outside what is \
             safe ({why}); nothing was written",
            vol.path.display()
        ),
    }
    let in_progress = reencrypt::peek(&vol.io).map_err(|e| vol.explain(e))?;
    let uuid = Luks2Header::read_metadata_only(&vol.io)
        .map(|(h, _)| h.uuid().to_string())
        .or_else(|_| {
            // A header in re-encryption is refused by the normal reader; its UUID is still
            // in the binary header.
            reencrypt_uuid(&vol)
        })
        .unwrap_or_default();
    let audit = Audit(log, uuid);
    if in_progress.is_none() && a.resume_only {
        bail!(
            "{}: no re-encryption in progress (nothing to resume)",
            vol.path.display()
        );
    }
    let limits = a.kdf_limits.limits();

    let result = (|| -> anyhow::Result<()> {
        let mut r = match &in_progress {
            Some(st) => {
                if !a.quiet {
                    eprintln!(
                        "{}: resuming the re-encryption at {} of {} ({} resilience{})",
                        vol.path.display(),
                        bytes_human(st.frontier),
                        bytes_human(st.data_size),
                        st.resilience.name(),
                        if st.hot_len.is_some() {
                            ", recovering an interrupted zone first"
                        } else {
                            ""
                        }
                    );
                }
                if a.resilience != "checksum" && st.resilience.name() != a.resilience {
                    eprintln!(
                        "nbdcryptctl: warning: --resilience {} ignored: the re-encryption in \
                         progress uses {}",
                        a.resilience,
                        st.resilience.name()
                    );
                }
                let (r, people_given) = open_resuming(&a, &vol, &limits)?;
                audit.record("resume", |e| {
                    let e = e.detail("frontier", r.frontier());
                    if people_given.is_empty() {
                        e
                    } else {
                        e.detail("share_passphrases", serde_json::Value::Object(people_given))
                    }
                });
                r
            }
            None => {
                let secrets = read_secrets(&a, &vol)?;
                start(&a, &vol, &secrets, &limits, resilience, key_size, &audit)?
            }
        };
        if let Some(z) = a.hotzone_size {
            r.set_hotzone(Some(z)).map_err(|e| vol.explain(e))?;
        }
        // Hashing and re-encryption of each zone on every core (nothing else runs here).
        r.set_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
        #[cfg(debug_assertions)]
        if let Some(n) = std::env::var("NBDCRYPT_TEST_REENCRYPT_STOP_AFTER_ZONES")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            // Test builds only: stop after n zones, as an interruption would.
            r.stop_after_zones(Some(n));
        }
        #[cfg(debug_assertions)]
        if let Some(n) = std::env::var("NBDCRYPT_TEST_REENCRYPT_CRASH_AFTER_ZONES")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Test builds only: n zones, then die inside the next one (after its hot-zone
            // commit, half of it written), as kill -9 or a power cut would.
            let (file_io, block_io);
            let io: &dyn ZoneIo = match vol.io.upstream() {
                Some(up) => {
                    block_io = BlockIo(&**up);
                    &block_io
                }
                None => {
                    file_io = FileIo(vol.local()?);
                    &file_io
                }
            };
            for _ in 0..n {
                r.step(&vol.io, io).map_err(|e| vol.explain(e))?;
            }
            r.step_then_crash_test(&vol.io, io)
                .map_err(|e| vol.explain(e))?;
            eprintln!("nbdcryptctl: test hook: simulated crash inside a zone");
            std::process::abort();
        }
        run_zones(&a, &vol, &mut r, &audit)?;
        let new_key = nbdcrypt::crypto::keys::VolumeKey::from_slice(r.new_key().expose_secret());
        let hdr = r
            .finish_dropping_orphans(&vol.io, carry::resealed_token)
            .map_err(|e| vol.explain(e))?;
        move_pin(&a, &vol, &hdr, &new_key);
        let age = KeyAge::of(&hdr).map(|k| nbdcrypt::audit::rfc3339(k.created_unix));
        audit.record("finish", |e| match &age {
            Some(t) => e.detail("key_created", t.as_str()),
            None => e,
        });
        if !a.quiet {
            eprintln!(
                "{}: re-encryption finished; the old volume key and its keyslots are gone",
                vol.path.display()
            );
        }
        Ok(())
    })();
    if let Err(e) = &result {
        audit.record("failed", |ev| ev.failed(format!("{e:#}")));
    }
    result
}

/// After the finish: the `--config` file's volume-key pin named the old key (it was checked at
/// the start or resume); it now names the new one, as the daemon does after an online run.
/// Without `--config`, a reminder: a daemon config pinning this volume's key must be updated.
fn move_pin(
    a: &ReencryptArgs,
    vol: &Volume,
    hdr: &Luks2Header,
    new_key: &nbdcrypt::crypto::keys::VolumeKey,
) {
    use nbdcrypt::seal::pin::{PinKeeper, Rotated};
    let p = vol.path.display();
    let Some(file) = &a.location.config else {
        if !a.quiet {
            eprintln!(
                "{p}: a daemon config that pins this volume's key (volume-key-digest) names the old \
                 key: update it with `nbdcryptctl pin {p} --key-file KEY --write FILE`"
            );
        }
        return;
    };
    let pin = match super::enroll::config_pin(&a.location) {
        Ok(pin) => pin,
        Err(e) => {
            eprintln!("{p}: {e:#}");
            return;
        }
    };
    match PinKeeper::new(pin, Some(file.clone())).rotate(hdr, new_key) {
        Ok(Rotated::InFile(f)) if !a.quiet => {
            eprintln!(
                "{p}: the pin in {} now names the new volume key",
                f.display()
            );
        }
        Ok(_) => {}
        Err(e) => eprintln!("nbdcryptctl: {p}: {e}"),
    }
}

/// UUID from the binary header (`Luks2Header` refuses a header in re-encryption).
fn reencrypt_uuid(vol: &Volume) -> Result<String, ()> {
    let mut bin = [0u8; 4096];
    nbdcrypt::luks2::HeaderIo::pread_exact(&vol.io, &mut bin, 0).map_err(|_| ())?;
    let field = &bin[168..208];
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let s = std::str::from_utf8(&field[..end]).map_err(|_| ())?;
    if s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        Ok(s.to_string())
    } else {
        Err(())
    }
}

fn read_secrets(a: &ReencryptArgs, vol: &Volume) -> anyhow::Result<Vec<SecretBytes>> {
    if a.key_file.iter().filter(|p| p.as_os_str() == "-").count() > 1 {
        bail!("only one --key-file can be `-` (standard input)");
    }
    if a.key_file.is_empty() {
        return Ok(vec![read_existing(
            &Source::Interactive,
            &format!("Enter passphrase for {}: ", vol.path.display()),
        )?]);
    }
    a.key_file
        .iter()
        .map(|p| read_existing(&Source::KeyFile(p.clone()), ""))
        .collect()
}

/// Opens both keys of the re-encryption in progress, each verified against its segment's digest
/// (and the re-encryption digest) before anything is written: with the `--key-file` secrets
/// alone first (nobody asked, no provider called), then through the keyslots' tokens with the
/// same providers a start uses (`--config`, `--kms-*`, `--pkcs11-*`, `--tang-allow`,
/// `--tpm2-tcti`; quorums with their machine shares and, while short of the threshold, people's
/// passphrases at the terminal or from `--share-passphrase-file`): the daemon's code
/// (`luks2::tokens::resume`). Without `--key-file`, the passphrase is asked only when the
/// tokens did not open both keys. Returns who gave a share passphrase (for the audit log).
fn open_resuming(
    a: &ReencryptArgs,
    vol: &Volume,
    limits: &nbdcrypt::luks2::KdfLimits,
) -> anyhow::Result<(Reencryption, serde_json::Map<String, serde_json::Value>)> {
    use nbdcrypt::luks2::tokens::resume::KeyFinder;
    use nbdcrypt::luks2::FormatError;
    let p = vol.path.display();
    let hdr = nbdcrypt::luks2::online::read_any_header(&vol.io).map_err(|e| vol.explain(e))?;
    // The volume pin of --config FILE: a header naming another volume is refused before any
    // provider is asked; the key is checked once opened.
    let pin = super::enroll::config_pin(&a.location)?;
    pin.check_uuid(hdr.uuid())
        .map_err(|e| anyhow!("{p}: {e}"))?;
    let check_pin = |r: &Reencryption| -> anyhow::Result<()> {
        // Mid-way the pin names the old key (`pin` refuses a volume in re-encryption, so it is
        // never re-pinned to the new key before the end). Trust passes to the new key through
        // the re-encryption digest, which binds both keys. A header whose *new* key is the
        // pinned one is a rollback to the middle of an earlier rotation: refused.
        pin.check_key(r.old_key()).map_err(|e| {
            if pin.check_key(r.new_key()).is_ok() {
                anyhow!(
                    "{p}: refused: this header is in the middle of a re-encryption *to* the pinned \
                     volume key, from another key: a header rolled back to an earlier rotation \
                     (restore the current header from a backup); nothing was written"
                )
            } else {
                anyhow!("{p}: {e}")
            }
        })
    };
    let given = if a.key_file.is_empty() {
        Vec::new()
    } else {
        read_secrets(a, vol)?
    };
    // "These secrets did not open both keys": go on to the next source. A keyslot over the KDF
    // limits (a header writer's easy move) is one such keyslot, not the end of the resume.
    let not_both = |e: &FormatError| {
        matches!(
            e,
            FormatError::InvalidParams(_)
                | FormatError::WrongVolumeKey
                | FormatError::WrongPassphrase
                | FormatError::KdfLimit { .. }
        )
    };
    if !given.is_empty() {
        match Reencryption::open(&vol.io, &given, limits) {
            Ok(r) => {
                check_pin(&r)?;
                return Ok((r, serde_json::Map::new()));
            }
            Err(e) if not_both(&e) => {}
            Err(e) => return Err(vol.explain(e)),
        }
    }
    let settings = super::enroll::seal_settings(&a.location)?;
    let mut people = LazyPeople(PeopleShares::lazy(a, &hdr, limits)?, vol);
    let mut finder = KeyFinder::new(&settings, limits, &mut people, Some(&pin));
    let mut r = finder.open(&vol.io, &given);
    let mut asked = None;
    if a.key_file.is_empty() && r.as_ref().is_err_and(not_both) {
        // The tokens alone did not: the passphrase (at the terminal, or a line on standard
        // input), tried with what the tokens gave (no provider is asked again).
        let tty = std::io::stdin().is_terminal();
        if tty && !finder.failures().is_empty() {
            eprintln!(
                "nbdcryptctl: the tokens did not open both keys ({})",
                finder.failures().join("; ")
            );
        }
        match read_existing(&Source::Interactive, &format!("Enter passphrase for {p}: ")) {
            Ok(pass) => r = finder.open(&vol.io, std::slice::from_ref(&pass)),
            Err(e) if !tty => asked = Some(e),
            Err(e) => return Err(e),
        }
    }
    let failures = finder.failures().to_vec();
    let unsealed: Vec<String> = finder.unsealed().iter().map(u32::to_string).collect();
    drop(finder);
    let people_given = people.0.audit_sources();
    match r {
        Ok(r) => {
            nbdcrypt::sys::scrub_stack();
            check_pin(&r)?;
            Ok((r, people_given))
        }
        Err(e) if not_both(&e) => {
            let mut msg = match e {
                FormatError::InvalidParams(m) => format!("{p}: {m}"),
                e => format!("{p}: {e}"),
            };
            if !failures.is_empty() {
                msg.push_str(&format!("; the tokens: {}", failures.join("; ")));
            }
            if !unsealed.is_empty() {
                msg.push_str(&format!(
                    "; the tokens of keyslot(s) {} gave secrets that did not open the key that \
                     keyslot's digest names (old or new; a header edited to move keyslots \
                     between the keys?)",
                    unsealed.join(", ")
                ));
            }
            if let Some(why) = asked {
                msg.push_str(&format!("; no passphrase either ({why:#})"));
            }
            msg.push_str(
                "; give the passphrase or --key-file of a keyslot of each key, or make the tokens \
                 reachable (--config, or the --kms-*/--pkcs11-*/--tang-allow/--tpm2-tcti options; \
                 people's quorum shares at the terminal or with --share-passphrase-file \
                 NAME=FILE). Nothing was written",
            );
            Err(anyhow::Error::new(super::NoKey(msg)))
        }
        Err(e) => Err(vol.explain(e)),
    }
}

fn start(
    a: &ReencryptArgs,
    vol: &Volume,
    secrets: &[SecretBytes],
    limits: &nbdcrypt::luks2::KdfLimits,
    resilience: Resilience,
    key_size: Option<u32>,
    audit: &Audit,
) -> anyhow::Result<Reencryption> {
    let hdr = vol.header(true)?;
    let seg = hdr.data_segment();
    let settings = super::enroll::seal_settings(&a.location)?;
    // People's passphrases first, each checked against its share at once (a typo is named
    // before anything else happens); then the shared carry (the same code the daemon runs
    // online) plans a new keyslot for every old one.
    let mut people = PeopleShares::ask(a, vol, &hdr, limits)?;
    let plan = Carrier {
        settings: &settings,
        limits,
        people: &mut people,
    }
    .plan(&vol.io, &hdr, secrets)
    .map_err(|e| anyhow!("{}: {e}", vol.path.display()))?;
    // Who gave a share passphrase, and how (never the passphrase): for the audit log.
    let people_given = people.audit_sources();
    drop(people);
    let Some(old_key) = plan.old_key else {
        // Say why the token-bound keyslots did not open either (a KMS out of reach, a share
        // passphrase missing), as the daemon does.
        let mut msg = super::NO_KEY_MESSAGE.to_owned();
        if !plan.cannot.is_empty() {
            let why: Vec<String> = plan
                .cannot
                .iter()
                .map(|(id, why)| format!("keyslot {id}: {why}"))
                .collect();
            msg = format!("{msg}; nor by its tokens: {}", why.join("; "));
        }
        return Err(anyhow::Error::new(super::NoKey(msg)));
    };
    // The volume pin of `--config FILE` (as the daemon and `rekey` check it): a replaced
    // header is refused before anything is written or sealed.
    super::enroll::config_pin(&a.location)?
        .check(&hdr, &old_key)
        .map_err(|e| anyhow!("{}: {e}", vol.path.display()))?;
    let unopened: Vec<u32> = plan.cannot.iter().map(|(id, _)| *id).collect();
    let named: Vec<String> = plan
        .cannot
        .iter()
        .map(|(id, why)| format!("keyslot {id} ({why})"))
        .collect();
    if !plan.cannot.is_empty() && !a.drop_unopened {
        bail!(
            "{}: {} cannot be carried over to the new key and would be lost with the old one: \
             {}. Give their secrets too (one --key-file each), make their tokens reachable (the \
             --kms-*/--pkcs11-*/--tang-allow/--tpm2-tcti options or --config), give each person's share \
             passphrase (at the terminal or --share-passphrase-file NAME=FILE), remove them \
             first, or pass --drop-unopened to drop them",
            vol.path.display(),
            if named.len() == 1 {
                "a keyslot"
            } else {
                "keyslots"
            },
            named.join("; ")
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let params = StartParams {
        key_size: key_size.or(seg.key_size).unwrap_or(64),
        sector_size: a.sector_size.unwrap_or(seg.sector_size),
        resilience,
        hotzone: a.hotzone_size,
        now_unix: now,
    };
    let kept: Vec<u32> = plan.slots.iter().map(|s| s.old_slot).collect();
    let resealed: Vec<u32> = plan
        .carried
        .iter()
        .filter(|(_, how)| how.starts_with("re-sealed"))
        .map(|(id, _)| *id)
        .collect();
    let carried: serde_json::Map<String, serde_json::Value> = plan
        .carried
        .iter()
        .map(|(id, how)| (id.to_string(), serde_json::Value::String(how.clone())))
        .collect();
    let dropped: serde_json::Map<String, serde_json::Value> = plan
        .cannot
        .iter()
        .map(|(id, why)| (id.to_string(), serde_json::Value::String(why.clone())))
        .collect();
    if !plan.cannot.is_empty() && !a.quiet {
        eprintln!(
            "nbdcryptctl: warning: {}: dropping {} (--drop-unopened)",
            vol.path.display(),
            named.join(", ")
        );
    }
    let r = Reencryption::start(&vol.io, hdr, old_key, plan.slots, &params)
        .map_err(|e| vol.explain(e))?;
    nbdcrypt::sys::scrub_stack();
    audit.record("start", |e| {
        let mut e = e
            .detail("resilience", resilience.name())
            .detail("key_bits", params.key_size * 8)
            .detail("sector_size", params.sector_size)
            .detail("old_keyslots", kept.clone())
            .detail("dropped_keyslots", unopened.clone())
            .detail("resealed_keyslots", resealed.clone())
            .detail("carried", serde_json::Value::Object(carried.clone()));
        if !dropped.is_empty() {
            e = e.detail("dropped", serde_json::Value::Object(dropped.clone()));
        }
        if !people_given.is_empty() {
            e = e.detail(
                "share_passphrases",
                serde_json::Value::Object(people_given.clone()),
            );
        }
        e
    });
    if !a.quiet {
        for (id, how) in &plan.carried {
            eprintln!("{}: keyslot {id}: {how}", vol.path.display());
        }
        eprintln!(
            "{}: re-encryption started: new {}-bit key, {}-byte sectors, {} resilience, {} per zone",
            vol.path.display(),
            params.key_size * 8,
            params.sector_size,
            resilience.name(),
            bytes_human(r.hotzone())
        );
    }
    Ok(r)
}

/// People's passphrases for their shares of the volume's quorums, offline. Each holder named by
/// a passphrase share of a quorum on a keyslot of the volume key is asked in turn at the
/// terminal (up to three tries), or read from `--share-passphrase-file NAME=FILE` (the first
/// line of FILE); every passphrase is checked against its share's tag at once, as
/// `reencrypt --control SOCK --share NAME` does online. Kept in locked memory, wiped on drop.
///
/// A start asks everyone first ([`PeopleShares::ask`]: a carry needs every holder); a resume
/// asks a person only when a quorum needs their share to reach its threshold
/// ([`PeopleShares::lazy`]), and each person once (the same passphrase opens their share of the
/// old and of the new quorum).
struct PeopleShares {
    checked: Vec<(String, SecretBytes)>,
    /// (share name, where its passphrase came from: `terminal` or `file`), for the audit log.
    sources: Vec<(String, &'static str)>,
    tty: bool,
    files: Vec<(String, PathBuf)>,
    /// The quorums (of the volume key; of both keys during a re-encryption).
    quorums: Vec<QuorumToken>,
    /// The header the shares are checked against (their tags bind its UUID).
    hdr: Luks2Header,
    limits: nbdcrypt::luks2::KdfLimits,
    /// Ask when a quorum asks ([`SharePassphrases::passphrase`]), not up front.
    lazy: bool,
    /// (share name, why): people whose passphrase failed in this run (lazy mode). They are not
    /// asked again for the next quorum naming them (a header may name a person in many).
    refused: Vec<(String, String)>,
}

impl PeopleShares {
    /// The quorums on keyslots `slots` of `hdr`, with `--share-passphrase-file` checked against
    /// their shares' names.
    fn new(
        a: &ReencryptArgs,
        hdr: &Luks2Header,
        slots: &[u32],
        limits: &nbdcrypt::luks2::KdfLimits,
        lazy: bool,
    ) -> anyhow::Result<PeopleShares> {
        let files = share_files(&a.share_passphrase_file)?;
        let quorums: Vec<QuorumToken> = quorum::tokens(hdr)
            .into_iter()
            .filter_map(|(_, q)| q.ok())
            .filter(|q| slots.contains(&q.keyslot))
            .collect();
        for (name, _) in &files {
            if !quorums.iter().any(|q| q.share_named(name).is_some()) {
                bail!(
                    "--share-passphrase-file {name}=...: {}",
                    quorum::QuorumError::UnknownShare(name.clone())
                );
            }
        }
        Ok(PeopleShares {
            checked: Vec::new(),
            sources: Vec::new(),
            tty: std::io::stdin().is_terminal(),
            files,
            quorums,
            hdr: hdr.clone(),
            limits: *limits,
            lazy,
            refused: Vec::new(),
        })
    }

    /// For a start: every person of the quorums on the volume key's keyslots, asked now.
    fn ask(
        a: &ReencryptArgs,
        vol: &Volume,
        hdr: &Luks2Header,
        limits: &nbdcrypt::luks2::KdfLimits,
    ) -> anyhow::Result<PeopleShares> {
        let data_slots: Vec<u32> = hdr
            .keyslots()
            .into_iter()
            .filter(|k| k.for_data)
            .map(|k| k.id)
            .collect();
        let mut out = PeopleShares::new(a, hdr, &data_slots, limits, false)?;
        let mut people = Vec::new();
        for (i, q) in out.quorums.iter().enumerate() {
            for s in &q.shares {
                if let Holder::Passphrase { name, .. } = &s.holder {
                    if !people.iter().any(|(_, n)| n == name) {
                        people.push((i, name.clone()));
                    }
                }
            }
        }
        for (i, name) in people {
            // Not on a terminal and not in a file: named by the carry, with what to do.
            out.obtain(vol, i, &name)?;
        }
        Ok(out)
    }

    /// For a resume: the people of the quorums on any keyslot of either key, asked when
    /// needed.
    fn lazy(
        a: &ReencryptArgs,
        hdr: &Luks2Header,
        limits: &nbdcrypt::luks2::KdfLimits,
    ) -> anyhow::Result<PeopleShares> {
        let slots: Vec<u32> = hdr.keyslots().into_iter().map(|k| k.id).collect();
        PeopleShares::new(a, hdr, &slots, limits, true)
    }

    /// Person `name`'s passphrase for their share of quorum `self.quorums[i]`, from their file
    /// or the terminal (three tries), checked at once; `None` when neither can give it. A wrong
    /// one is [`super::NoKey`] (exit 3).
    fn obtain(
        &mut self,
        vol: &Volume,
        i: usize,
        name: &str,
    ) -> anyhow::Result<Option<SecretBytes>> {
        if let Some((_, why)) = self.refused.iter().find(|(n, _)| n == name) {
            bail!("{why}");
        }
        let got = self.obtain_once(vol, i, name);
        if let (true, Err(e)) = (self.lazy, &got) {
            self.refused.push((name.to_owned(), format!("{e:#}")));
        }
        got
    }

    fn obtain_once(
        &mut self,
        vol: &Volume,
        i: usize,
        name: &str,
    ) -> anyhow::Result<Option<SecretBytes>> {
        if let Some((_, p)) = self.checked.iter().find(|(n, _)| n == name) {
            return Ok(Some(SecretBytes::from_slice(p.expose_secret())));
        }
        let Some(q) = self.quorums.get(i) else {
            return Ok(None);
        };
        let shown = super::printable(name);
        let from_file = self.files.iter().find(|(n, _)| n == name);
        let pass = if let Some((_, path)) = from_file {
            let pass = read_share_file(path)?;
            if let Err(e) = quorum::open_passphrase_share(&self.hdr, q, name, &pass, &self.limits) {
                if self.lazy {
                    // Named in the resume's own "no key" error.
                    bail!("{e} (read from {})", path.display());
                }
                return Err(wrong_share(vol, &e, path.display().to_string()));
            }
            pass
        } else if self.tty {
            let mut tries = 0;
            loop {
                let pass = read_existing(
                    &Source::Interactive,
                    &format!(
                        "Passphrase of quorum share {shown} (keyslot {}), for {shown} to type: ",
                        q.keyslot
                    ),
                )?;
                match quorum::open_passphrase_share(&self.hdr, q, name, &pass, &self.limits) {
                    Ok(_) => break pass,
                    Err(e @ quorum::QuorumError::WrongShare { .. }) if tries < 2 => {
                        tries += 1;
                        eprintln!("nbdcryptctl: {e}; try again");
                    }
                    Err(e) => return Err(wrong_share(vol, &e, "the terminal".into())),
                }
            }
        } else {
            return Ok(None);
        };
        self.checked.push((
            name.to_owned(),
            SecretBytes::from_slice(pass.expose_secret()),
        ));
        self.sources.push((
            shown,
            if from_file.is_some() {
                "file"
            } else {
                "terminal"
            },
        ));
        Ok(Some(pass))
    }

    /// Who gave a share passphrase, and how (never the passphrase): for the audit log.
    fn audit_sources(&self) -> serde_json::Map<String, serde_json::Value> {
        self.sources
            .iter()
            .map(|(n, how)| (n.clone(), serde_json::Value::String((*how).to_owned())))
            .collect()
    }
}

/// A share passphrase that does not open its share: exit 3, nothing changed.
fn wrong_share(vol: &Volume, e: &quorum::QuorumError, from: String) -> anyhow::Error {
    anyhow::Error::new(super::NoKey(format!(
        "{}: {e} (read from {from}); nothing was changed",
        vol.path.display()
    )))
}

/// [`PeopleShares`] in a resume: the volume, for messages.
struct LazyPeople<'a>(PeopleShares, &'a Volume);

impl SharePassphrases for LazyPeople<'_> {
    fn passphrase(&mut self, name: &str, keyslot: u32) -> Result<Option<SecretBytes>, String> {
        let Some(i) = self
            .0
            .quorums
            .iter()
            .position(|q| q.keyslot == keyslot && q.share_named(name).is_some())
        else {
            return Ok(None);
        };
        self.0.obtain(self.1, i, name).map_err(|e| format!("{e:#}"))
    }
    fn missing(&self, names: &[String]) -> String {
        self.0.missing(names)
    }
}

impl SharePassphrases for PeopleShares {
    fn passphrase(&mut self, name: &str, _keyslot: u32) -> Result<Option<SecretBytes>, String> {
        debug_assert!(
            !self.lazy,
            "a lazy PeopleShares is asked through LazyPeople"
        );
        Ok(self
            .checked
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| SecretBytes::from_slice(p.expose_secret())))
    }
    fn missing(&self, _names: &[String]) -> String {
        if self.tty {
            "each holder types it when asked".into()
        } else {
            "standard input is not a terminal, so nobody can be asked: give \
             --share-passphrase-file NAME=FILE for each"
                .into()
        }
    }
}

/// `--share-passphrase-file NAME=FILE`, parsed; a name given twice is refused.
fn share_files(args: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for arg in args {
        let Some((name, file)) = arg
            .split_once('=')
            .filter(|(n, f)| !n.is_empty() && !f.is_empty())
        else {
            bail!("--share-passphrase-file {arg:?}: use NAME=FILE (the share's name, a file with its holder's passphrase)");
        };
        if out.iter().any(|(n, _)| n == name) {
            bail!("--share-passphrase-file: share {name:?} given twice");
        }
        out.push((name.to_owned(), PathBuf::from(file)));
    }
    Ok(out)
}

/// A person's share passphrase from a file: its first line (without `\n` / `\r\n`), read by the
/// capped secret reader into locked memory.
fn read_share_file(path: &std::path::Path) -> anyhow::Result<SecretBytes> {
    let raw = secret_file::read_file(path, Kind::Passphrase).map_err(|e| match e {
        secret_file::Error::Io(e) => anyhow!(
            "cannot open share passphrase file {}: {}",
            path.display(),
            crate::secret_input::io_reason(&e)
        ),
        e => anyhow!("cannot read share passphrase file {}: {e}", path.display()),
    })?;
    let bytes = raw.expose_secret();
    let line = match bytes.iter().position(|&b| b == b'\n') {
        Some(i) => &bytes[..i],
        None => bytes,
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        bail!("share passphrase file {} is empty", path.display());
    }
    Ok(SecretBytes::from_slice(line))
}

fn run_zones(
    a: &ReencryptArgs,
    vol: &Volume,
    r: &mut Reencryption,
    audit: &Audit,
) -> anyhow::Result<()> {
    let (direct, buffered, block);
    // The data moves through the same device the header lives on: a local file (O_DIRECT
    // unless --buffered) or the upstream NBD export (its FLUSH makes each zone durable).
    let io: &dyn ZoneIo = match vol.io.upstream() {
        Some(up) => {
            block = BlockIo(&**up);
            &block
        }
        None if a.buffered => {
            buffered = FileIo(vol.local()?);
            &buffered
        }
        None => {
            direct = DirectFileIo::open(vol.local()?);
            &direct
        }
    };
    let total = r.data_size();
    let bar = !a.quiet && !a.no_progress_bar && std::io::stderr().is_terminal();
    let t0 = Instant::now();
    let f0 = r.frontier();
    let mut last_line = Instant::now();
    let mut next_checkpoint = total / 4;
    while next_checkpoint <= r.frontier() && next_checkpoint < total {
        next_checkpoint += total / 4;
    }
    loop {
        let done = r.step(&vol.io, io).map_err(|e| {
            if bar {
                eprintln!();
            }
            vol.explain(e)
        })?;
        if done.is_none() {
            break;
        }
        let f = r.frontier();
        let elapsed = t0.elapsed().as_secs_f64().max(1e-6);
        let rate = (f - f0) as f64 / elapsed;
        if let Some(max) = a.max_rate {
            // Sleep until the average rate since we began is back under the limit.
            let due = (f - f0) as f64 / max as f64;
            if due > elapsed {
                std::thread::sleep(Duration::from_secs_f64(due - elapsed));
            }
        }
        if f >= next_checkpoint && f < total {
            audit.record("checkpoint", |e| {
                e.detail("frontier", f).detail("data_size", total)
            });
            while next_checkpoint <= f {
                next_checkpoint += (total / 4).max(1);
            }
        }
        if a.quiet {
            continue;
        }
        let pct = if total == 0 {
            100.0
        } else {
            f as f64 * 100.0 / total as f64
        };
        let eta = if rate > 0.0 {
            (total - f) as f64 / rate
        } else {
            0.0
        };
        if bar {
            let width = 30usize;
            let filled = usize::try_from(f.saturating_mul(width as u64) / total.max(1))
                .unwrap_or(width)
                .min(width);
            eprint!(
                "\r[{}{}] {pct:5.1}% {:8.1} MiB/s  ETA {:4.0}s ",
                "#".repeat(filled),
                ".".repeat(width - filled.min(width)),
                rate / 1048576.0,
                eta
            );
            let _ = std::io::stderr().flush();
        } else if last_line.elapsed() >= Duration::from_secs(2) || f == total {
            last_line = Instant::now();
            eprintln!(
                "reencrypt: {pct:.1}% ({f} of {total} bytes), {:.1} MiB/s, ETA {eta:.0}s",
                rate / 1048576.0
            );
        }
    }
    if bar {
        eprintln!();
    }
    if !a.quiet {
        let secs = t0.elapsed().as_secs_f64();
        let bytes = r.frontier() - f0;
        eprintln!(
            "re-encrypted {} in {secs:.2}s ({:.1} MiB/s)",
            bytes_human(bytes),
            bytes as f64 / secs.max(1e-6) / 1048576.0
        );
    }
    let _ = vol;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }
}
