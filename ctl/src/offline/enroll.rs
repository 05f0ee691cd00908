//! Token commands: `enroll`, `unenroll`, `rekey`, `test-token`: keyslots whose secret is sealed
//! by AWS KMS (systemd-cryptenroll style: a random secret opens a keyslot, only its sealed form
//! is stored, in a LUKS2 token bound to the volume UUID and keyslot).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::{ArgGroup, Args};

use nbdcrypt::audit::{AuditEvent, AuditEventKind, AuditLog};
use nbdcrypt::control::proto::{Request, Response};
use nbdcrypt::crypto::keys::VolumeKey;
use nbdcrypt::luks2::tokens::enroll::{self as seal_enroll, EnrollError, Enrolled, UnenrollTarget};
use nbdcrypt::luks2::tokens::format::{self as token, ProviderKind};
use nbdcrypt::luks2::tokens::quorum;
use nbdcrypt::luks2::tokens::resolver;
use nbdcrypt::luks2::{KdfLimits, Luks2Header};
use nbdcrypt::seal::pin::VolumePin;
use nbdcrypt::seal::registry::{Provider, RawSettings, SettingFlags, PROVIDERS};
use nbdcrypt::seal::{SealProvider, SealSettings};

use super::Volume;
use crate::secret_input::{read_existing, read_new, Source};

pub const ENROLL_ABOUT: &str = "\
Add a keyslot that a machine opens without a person: AWS KMS (--kms), a PKCS#11 HSM (--pkcs11),
a Tang server or this machine's TPM2 in clevis's own token format (--tang, --tpm2, --sss), or a
quorum of holders (--quorum K: any K of the KMS keys, HSM keys, Tang servers, TPMs and people
given). An existing passphrase or key file unlocks the volume key first. Keep a passphrase
keyslot as a recovery key.

KMS and HSM: a random 32-byte secret opens a new keyslot (PBKDF2-SHA256, 1000 iterations; its
passphrase is the secret's base64, as systemd-cryptenroll does); the secret is stored only
encrypted by the KMS or HSM key, in a LUKS2 token bound to this volume's UUID and the keyslot
(KMS encryption context, AES-GCM additional data), so a copied token opens nothing. KMS
credentials come from the standard AWS chain (environment, profile, instance role); the region
from --kms-region or the standard chain. Prints the keyslot and the token id, then the lines for
nbdcryptd's config: the key to allow (kms-allow-key) and the volume pin (volume-uuid,
volume-key-digest) that makes the daemon refuse a replaced header.

Tang and TPM2 (clevis): the token is the one `clevis luks bind` writes, so `clevis luks unlock`
and systemd's initrd open the volume too; nbdcryptd opens it when its config allows that Tang
server's thumbprint (tang-allow) or names the TPM (tpm2-tcti). --sss K binds to several pins at
once, any K of which unlock.

With --quorum K the secret is split (Shamir, k-of-n) among every holder given: each --kms and
--pkcs11 key and each --clevis pin seals its share, each --passphrase-share NAME is a person
whose passphrase (asked now) protects theirs. nbdcryptd unseals the machine shares it can reach;
people give theirs with `nbdcryptctl unlock --share NAME`. `nbdcryptctl policy VOLUME` shows the
result in words.";

pub const ENROLL_EXAMPLES: &str = "\
Examples:
  nbdcryptctl enroll /srv/vol.img --kms alias/nbdcrypt-vol1            # asks the passphrase
  nbdcryptctl enroll vol.img --kms arn:aws:kms:eu-west-1:111122223333:key/1234abcd-... \\
      --key-file recovery.key --audit-log /var/log/nbdcrypt-audit.log
  nbdcryptctl enroll vol.img --kms alias/vol --region eu-west-1 \\
      --kms-endpoint https://vpce-0abc.kms.eu-west-1.vpce.amazonaws.com --key-file k
  nbdcryptctl enroll vol.img --pkcs11 'pkcs11:token=prod;object=db;type=secret-key' \
      --pkcs11-pin file:/etc/nbdcrypt/hsm.pin
  nbdcryptctl enroll vol.img --quorum 2 --kms alias/db \
      --pkcs11 'pkcs11:token=prod;object=db;type=secret-key' --pkcs11-pin file:/etc/nbdcrypt/hsm.pin \
      --passphrase-share alice                                        # any 2 of the 3
  nbdcryptctl enroll vol.img --tang http://tang.example:7500 \\
      --tang-thumbprint 9_CZiHk9PLtq7BG6UXXtQ2qdjTQ                   # clevis tang token
  nbdcryptctl enroll vol.img --tpm2 --tpm2-pcr-ids 7 --key-file recovery.key";

pub const UNENROLL_ABOUT: &str = "\
Remove a KMS enrolment: its token first, then its keyslot (wiped). Needs no secret. Refuses to
remove the last keyslot that opens the volume, and never touches other tools' tokens
(systemd-*, clevis, ...).";

pub const UNENROLL_EXAMPLES: &str = "\
Examples:
  nbdcryptctl unenroll /srv/vol.img --slot 1
  nbdcryptctl unenroll vol.img --token 0 --audit-log /var/log/nbdcrypt-audit.log";

pub const REKEY_ABOUT: &str = "\
Re-seal a KMS enrolment with a fresh secret, under a new KMS key (--kms) or the same one. Crash
safe: the new keyslot and token are written and verified (unsealed through KMS, keyslot opened)
before the old token and keyslot are removed; an interruption leaves a volume that opens with the
old or the new token. The volume key comes from unsealing the old token, or from --key-file / a
passphrase prompt with --passphrase. The KMS endpoint and region come from --kms-endpoint,
--kms-region or --config, never from the old token; unsealing the old token needs its key in
--kms-allow-key (or the config's kms-allow-key), as does re-sealing under the same key.";

pub const REKEY_EXAMPLES: &str = "\
Examples:
  nbdcryptctl rekey /srv/vol.img --slot 1 --config /etc/nbdcrypt/vol.toml --kms alias/nbdcrypt-2027
  nbdcryptctl rekey vol.img --slot 1 --kms-allow-key arn:aws:kms:eu-west-1:111122223333:key/1234abcd-...
  nbdcryptctl rekey vol.img --all-tokens --kms alias/new --key-file recovery.key";

pub const TEST_TOKEN_ABOUT: &str = "\
Unlock the volume key through the KMS tokens without changing anything: tries each nbdcrypt token
in keyslot priority order (or only --token N), prints the keyslot that opened and exits 0, or
prints why each token failed (key disabled, access denied, token copied from another volume, KMS
unreachable) and exits 1. KMS tokens are unsealed only through the endpoint and keys the operator
configured (--kms-endpoint, --kms-region, --kms-allow-key, or --config with nbdcryptd's file): a
token naming anything else is refused before any request.";

pub const TEST_TOKEN_EXAMPLES: &str = "\
Examples:
  nbdcryptctl test-token /srv/vol.img --config /etc/nbdcrypt/vol.toml
  nbdcryptctl test-token vol.img --kms-allow-key arn:aws:kms:eu-west-1:111122223333:key/1234abcd-... \\
      --token 2 --audit-log /var/log/nbdcrypt-audit.log";

/// Every key provider's settings (`--kms-endpoint`, `--kms-allow-key`, `--pkcs11-pin`, ... from
/// the provider registry), plus `--config FILE` to read them from nbdcryptd's file. The KMS and
/// HSM this host trusts are never taken from a token: the header is writable by whoever holds
/// the disk, so a token naming another endpoint, region, key or module is refused.
#[derive(Args, Debug, Clone)]
pub struct KmsLocation {
    #[command(flatten)]
    pub flags: SettingFlags,
    /// Take the key provider settings (kms-endpoint, kms-region, kms-allow-key, pkcs11-module,
    /// pkcs11-pin, ...) and the volume pin from this nbdcryptd config file (flags given here win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The volume pin of `--config FILE`, if any: commands that recover the volume key check it, as
/// the daemon would.
pub(crate) fn config_pin(loc: &KmsLocation) -> anyhow::Result<VolumePin> {
    match &loc.config {
        Some(path) => {
            let (file, _) = nbdcrypt::config_file::load(path).map_err(|e| anyhow!(e))?;
            file.volume_pin()
                .map_err(|e| anyhow!("{}: {e}", path.display()))
        }
        None => Ok(VolumePin::default()),
    }
}

/// The operator's provider settings: `--config FILE` (the daemon's TOML), then the flags.
pub(crate) fn seal_settings(loc: &KmsLocation) -> anyhow::Result<SealSettings> {
    let file = match &loc.config {
        Some(path) => {
            let (file, _) = nbdcrypt::config_file::load(path).map_err(|e| anyhow!(e))?;
            // Checked alone first, so an error names the file.
            file.seal_settings()
                .map_err(|e| anyhow!("{}: {e}", path.display()))?;
            file.provider_settings()
        }
        None => RawSettings::default(),
    };
    let raw = file.overlaid(&loc.flags.raw);
    SealSettings::from_raw(raw).map_err(|e| anyhow!("--{e}"))
}

/// The key holders named on the command line: for each provider of the registry, the values of
/// its enrol flag (`--kms KEY`, `--pkcs11 URI`, ...). `REKEY`: at most one, optional, and none
/// with `--control`; else at least one.
#[derive(Debug, Clone, Default)]
pub struct Holders<const REKEY: bool> {
    pub given: Vec<(&'static dyn Provider, Vec<String>)>,
}

impl<const REKEY: bool> Holders<REKEY> {
    /// Every (provider, value) in registry order.
    pub fn all(&self) -> Vec<(&'static dyn Provider, &str)> {
        self.given
            .iter()
            .flat_map(|(p, v)| v.iter().map(move |x| (*p, x.as_str())))
            .collect()
    }
}

impl<const REKEY: bool> clap::FromArgMatches for Holders<REKEY> {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut given = Vec::new();
        for p in PROVIDERS {
            if let Ok(Some(v)) = m.try_get_many::<String>(p.enroll_flag().long) {
                given.push((*p, v.cloned().collect()));
            }
        }
        Ok(Holders { given })
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl<const REKEY: bool> clap::Args for Holders<REKEY> {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        let mut ids = Vec::new();
        for p in PROVIDERS {
            let f = p.enroll_flag();
            let mut a = clap::Arg::new(f.long)
                .long(f.long)
                .value_name(f.value_name)
                .help(f.help)
                .help_heading(p.label());
            if REKEY {
                a = a.conflicts_with("control").action(clap::ArgAction::Set);
            } else {
                a = a.action(clap::ArgAction::Append);
            }
            ids.push(f.long);
            cmd = cmd.arg(a);
        }
        let group = ArgGroup::new("provider").args(ids);
        cmd.group(if REKEY {
            group.multiple(false)
        } else {
            // At least one holder: checked by `enroll` (a quorum may be people only).
            group.multiple(true)
        })
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[derive(Args, Debug)]
pub struct EnrollArgs {
    /// Volume file, block device, or NBD URI (nbd+unix:///EXPORT?socket=PATH, nbds://HOST/EXPORT).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    #[command(flatten)]
    pub holders: Holders<false>,
    /// Split the keyslot secret among every holder given (--kms, --pkcs11, --passphrase-share,
    /// each may repeat) so that any K of them open the keyslot (Shamir k-of-n).
    #[arg(long, value_name = "K", help_heading = "Quorum")]
    pub quorum: Option<usize>,
    /// A person holding a share, with a passphrase of their own (asked now, twice, on the
    /// terminal; without a terminal one line of standard input per share). They give it later
    /// with `nbdcryptctl unlock --share NAME`. Needs --quorum.
    #[arg(
        long,
        value_name = "NAME",
        requires = "quorum",
        help_heading = "Quorum"
    )]
    pub passphrase_share: Vec<String>,
    /// Key derivation of the people's share passphrases (as `format`'s --pbkdf options).
    #[command(flatten)]
    pub share_kdf: super::PbkdfArgs,
    #[command(flatten)]
    pub location: KmsLocation,
    #[command(flatten)]
    pub clevis: super::clevis::ClevisEnrollArgs,
    /// Existing passphrase from this file (bytes as-is; `-` = standard input).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Append a JSON line per key event to this file.
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    #[command(flatten)]
    pub kdf_limits: super::keys::KdfLimitArgs,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("which").required(true).args(["slot", "token"])))]
pub struct UnenrollArgs {
    /// Volume file, block device, or NBD URI (nbd+unix:///EXPORT?socket=PATH, nbds://HOST/EXPORT).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// The keyslot of the enrolment to remove.
    #[arg(long, value_name = "N")]
    pub slot: Option<u32>,
    /// The token of the enrolment to remove.
    #[arg(long, value_name = "N")]
    pub token: Option<u32>,
    /// Append a JSON line per key event to this file.
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("which").required(true).args(["slot", "all_tokens"])))]
pub struct RekeyArgs {
    /// Volume file, block device or NBD URI (or --control to have a running nbdcryptd do it).
    #[arg(value_name = "VOLUME", required_unless_present = "control")]
    pub volume: Option<PathBuf>,
    /// Ask the running nbdcryptd behind this control socket to re-seal its volume's tokens under
    /// the same keys (its KMS credentials and HSM PIN are used; nothing else is needed here).
    #[arg(long, value_name = "SOCK", conflicts_with_all = ["volume", "key_file", "passphrase"])]
    pub control: Option<PathBuf>,
    /// The keyslot of the enrolment to rekey.
    #[arg(long, value_name = "N")]
    pub slot: Option<u32>,
    /// Rekey every nbdcrypt token of the volume.
    #[arg(long)]
    pub all_tokens: bool,
    /// The new key (`--kms KEY`, `--pkcs11 URI`, ...; default: the token's current key).
    #[command(flatten)]
    pub holders: Holders<true>,
    #[command(flatten)]
    pub location: KmsLocation,
    /// Get the volume key from this passphrase file instead of the old token (bytes as-is;
    /// `-` = standard input).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Ask for a passphrase instead of unsealing the old token.
    #[arg(long, conflicts_with = "key_file")]
    pub passphrase: bool,
    /// Append a JSON line per key event to this file.
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    #[command(flatten)]
    pub kdf_limits: super::keys::KdfLimitArgs,
}

#[derive(Args, Debug)]
pub struct TestTokenArgs {
    /// Volume file, block device, or NBD URI (nbd+unix:///EXPORT?socket=PATH, nbds://HOST/EXPORT).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// Only try this token.
    #[arg(long, value_name = "N")]
    pub token: Option<u32>,
    #[command(flatten)]
    pub location: KmsLocation,
    /// Append a JSON line per key event to this file.
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    /// On success print {"volume", "keyslot", "token", "provider", "key"} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The optional audit log of a command: opened before anything is changed, so a bad path
/// fails the command up front.
pub(super) struct Audit(Option<AuditLog>);

impl Audit {
    pub(super) fn open(path: Option<&Path>) -> anyhow::Result<Audit> {
        match path {
            None => Ok(Audit(None)),
            Some(p) => AuditLog::open(p)
                .map(|l| Audit(Some(l)))
                .with_context(|| format!("cannot open the audit log {}", p.display())),
        }
    }

    pub(super) fn record(&self, e: AuditEvent) {
        if let Some(log) = &self.0 {
            if let Err(err) = log.record(&e.this_process()) {
                eprintln!("nbdcryptctl: warning: cannot write the audit log: {err}");
            }
        }
    }
}

fn explain(vol: &Volume, e: EnrollError) -> anyhow::Error {
    match e {
        EnrollError::Format(f) => vol.explain(f),
        other => anyhow!("{}: {other}", vol.path.display()),
    }
}

/// The key reference stored in token `id` (the ARN for KMS).
fn token_key(hdr: &Luks2Header, id: u32) -> Option<String> {
    hdr.token(id)
        .and_then(|t| token::parse(t).ok().flatten())
        .and_then(|p| p.key_reference().map(str::to_owned))
}

/// The volume key through a passphrase or key file, held to the `--config` file's pin (`pin`;
/// empty without `--config`) before anything is written for it: a header swapped for one whose
/// key the attacker knows gets no new keyslot or token, and no pin lines printed for its key.
pub(super) fn unlock_by_passphrase(
    vol: &Volume,
    hdr: &Luks2Header,
    key_file: Option<&Path>,
    limits: KdfLimits,
    pin: &VolumePin,
) -> anyhow::Result<VolumeKey> {
    let pass = read_existing(
        &Source::from_arg(key_file),
        &format!("Enter any existing passphrase for {}: ", vol.path.display()),
    )?;
    let (key, slot) = hdr
        .unlock(&vol.io, &pass, &limits)
        .map_err(|e| vol.explain(e))?;
    eprintln!("keyslot {slot} unlocked");
    pin.check(hdr, &key)
        .map_err(|e| anyhow!("{}: {e}", vol.path.display()))?;
    Ok(key)
}

pub fn enroll(a: EnrollArgs) -> anyhow::Result<()> {
    if a.clevis.given() {
        if !a.holders.all().is_empty() || a.quorum.is_some() || !a.passphrase_share.is_empty() {
            bail!(
                "clevis pins (--tang, --tpm2, --sss) make a clevis token on their own: give no \
                 --kms / --pkcs11 / --clevis / --quorum with them (in a quorum, a Tang server or \
                 the TPM is --clevis tang:URL=THUMBPRINT or --clevis tpm2)"
            );
        }
        return super::clevis::enroll(&a, &seal_settings(&a.location)?);
    }
    let audit = Audit::open(a.audit_log.as_deref())?;
    let settings = seal_settings(&a.location)?;
    let vol = Volume::open(&a.volume, true)?;
    let mut hdr = vol.header(true)?;
    let holders = a.holders.all();
    if let Some(k) = a.quorum {
        return enroll_quorum(&a, k, &holders, &settings, &audit, vol, hdr);
    }
    let (kind, value) = match holders.as_slice() {
        [one] => *one,
        [] => bail!("give a key holder: --kms KEY or --pkcs11 URI"),
        _ => bail!(
            "several key holders need --quorum K (any K of them open the keyslot); for holders \
             that open it alone, enrol each one separately"
        ),
    };
    let provider = new_provider(kind, value, &settings)?;
    let key = unlock_by_passphrase(
        &vol,
        &hdr,
        a.key_file.as_deref(),
        a.kdf_limits.limits(),
        &config_pin(&a.location)?,
    )?;
    let requested = provider.key_reference();
    let event = AuditEvent::new(AuditEventKind::Enrol)
        .volume(hdr.uuid())
        .provider(kind.name(), Some(&requested));
    match seal_enroll::enroll(&vol.io, &mut hdr, &key, &*provider) {
        Ok(Enrolled { keyslot, token_id }) => {
            let arn = token_key(&hdr, token_id).unwrap_or(requested);
            audit.record(
                event
                    .keyslot(keyslot)
                    .provider(kind.name(), Some(&arn))
                    .detail("token", token_id),
            );
            println!(
                "enrolled keyslot {keyslot} (token {token_id}, {} key {arn})",
                kind.name()
            );
            print_daemon_config(&vol, &hdr, kind, &arn, &settings);
            Ok(())
        }
        Err(e) => {
            let e = explain(&vol, e);
            audit.record(event.failed(format!("{e:#}")));
            Err(e)
        }
    }
}

/// `enroll --quorum K`: one keyslot, its secret split among the machine holders and people.
fn enroll_quorum(
    a: &EnrollArgs,
    k: usize,
    holders: &[(&'static dyn Provider, &str)],
    settings: &SealSettings,
    audit: &Audit,
    vol: Volume,
    mut hdr: Luks2Header,
) -> anyhow::Result<()> {
    let n = holders.len() + a.passphrase_share.len();
    if n == 0 {
        bail!("--quorum needs holders: --kms, --pkcs11 and/or --passphrase-share NAME");
    }
    if k == 0 || k > n {
        bail!("--quorum {k} with {n} holders: give a number from 1 to {n}");
    }
    if n > quorum::MAX_SHARES {
        bail!("at most {} holders in a quorum", quorum::MAX_SHARES);
    }
    for name in &a.passphrase_share {
        if !quorum::valid_name(name) {
            bail!("--passphrase-share {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ - @");
        }
    }
    a.share_kdf.precheck()?;
    let providers: Vec<(&'static dyn Provider, Box<dyn SealProvider>)> = holders
        .iter()
        .map(|(kind, value)| Ok((*kind, new_provider(*kind, value, settings)?)))
        .collect::<anyhow::Result<_>>()?;
    let key = unlock_by_passphrase(
        &vol,
        &hdr,
        a.key_file.as_deref(),
        a.kdf_limits.limits(),
        &config_pin(&a.location)?,
    )?;
    let kdf = if a.passphrase_share.is_empty() {
        None
    } else {
        Some(a.share_kdf.resolve(32)?)
    };
    let mut new: Vec<quorum::NewHolder<'_>> = providers
        .iter()
        .map(|(_, p)| quorum::NewHolder::Provider(&**p))
        .collect();
    for name in &a.passphrase_share {
        let passphrase = read_new(
            &Source::Interactive,
            &format!("New passphrase for share {name} (only {name} should type it): "),
        )?;
        new.push(quorum::NewHolder::Passphrase {
            name: name.clone(),
            passphrase,
            kdf: kdf.unwrap_or(nbdcrypt::luks2::KdfParams::Pbkdf2 {
                hash: nbdcrypt::luks2::HashAlg::Sha256,
                iterations: 1000,
            }),
        });
    }
    let mut event = AuditEvent::new(AuditEventKind::Enrol)
        .volume(hdr.uuid())
        .provider("quorum", None)
        .detail("threshold", k)
        .detail("holders", n);
    match quorum::enroll(&vol.io, &mut hdr, &key, k, &new) {
        Ok(Enrolled { keyslot, token_id }) => {
            drop(new);
            let q = hdr
                .token(token_id)
                .and_then(|t| quorum::parse(t).ok().flatten())
                .ok_or_else(|| anyhow!("the quorum token {token_id} does not read back"))?;
            let words: Vec<String> = q.shares.iter().map(|s| s.describe()).collect();
            event = event
                .keyslot(keyslot)
                .detail("token", token_id)
                .detail("shares", words.join(", "));
            audit.record(event);
            println!(
                "enrolled keyslot {keyslot} (token {token_id}): {k} of {{{}}}",
                words.join(", ")
            );
            println!();
            println!(
                "# For nbdcryptd's --config file (a volume pin makes it refuse a replaced header;"
            );
            println!(
                "# `nbdcryptctl pin {} --write FILE` writes the pin lines):",
                vol.path.display()
            );
            for s in &q.shares {
                if let quorum::Holder::Provider { provider, .. } = &s.holder {
                    if let (Some(p), Some(c)) = (
                        nbdcrypt::seal::registry::by_name(provider),
                        settings.get(provider),
                    ) {
                        for line in p.daemon_config_lines(&s.name(), c) {
                            println!("{line}");
                        }
                    }
                }
            }
            print!("{}", VolumePin::of_header(&hdr).toml_lines());
            Ok(())
        }
        Err(e) => {
            let e = explain(&vol, e);
            audit.record(event.failed(format!("{e:#}")));
            Err(e)
        }
    }
}

/// The provider sealing under `value` (what the operator gave to its enrol flag).
fn new_provider(
    kind: &'static dyn Provider,
    value: &str,
    settings: &SealSettings,
) -> anyhow::Result<Box<dyn SealProvider>> {
    let c = settings
        .get(kind.name())
        .ok_or_else(|| anyhow!("{} is not configured", kind.label()))?;
    Ok(kind.for_enroll(value, c)?)
}

/// After an enrolment: the lines nbdcryptd's config needs to use this token, and to pin this
/// volume (its key was just verified by the passphrase, so the digest printed is the real one).
fn print_daemon_config(
    vol: &Volume,
    hdr: &Luks2Header,
    kind: &'static dyn Provider,
    key: &str,
    s: &SealSettings,
) {
    println!();
    println!("# For nbdcryptd's --config file (a volume pin makes it refuse a replaced header;");
    println!(
        "# `nbdcryptctl pin {} --write FILE` writes the pin lines):",
        vol.path.display()
    );
    if let Some(c) = s.get(kind.name()) {
        for line in kind.daemon_config_lines(key, c) {
            println!("{line}");
        }
    }
    print!("{}", VolumePin::of_header(hdr).toml_lines());
}

pub(super) use nbdcrypt::seal::kms::toml_str;

pub fn unenroll(a: UnenrollArgs) -> anyhow::Result<()> {
    let audit = Audit::open(a.audit_log.as_deref())?;
    let vol = Volume::open(&a.volume, true)?;
    let mut hdr = vol.header(true)?;
    let target = match (a.slot, a.token) {
        (Some(s), _) => UnenrollTarget::Keyslot(s),
        (None, Some(t)) => UnenrollTarget::Token(t),
        (None, None) => bail!("name the enrolment with --slot N or --token N"),
    };
    let event = AuditEvent::new(AuditEventKind::Unenrol).volume(hdr.uuid());
    match seal_enroll::unenroll(&vol.io, &mut hdr, target) {
        Ok(u) => {
            let mut ev = event.detail("token", u.token_id);
            if let Some(k) = u.keyslot {
                ev = ev.keyslot(k);
            }
            let kind = match ProviderKind::from_token_type(&u.token_type) {
                Some(k) => k.name(),
                None if u.token_type == quorum::TOKEN_TYPE => "quorum",
                None => "unknown",
            };
            audit.record(ev.provider(kind, u.key.as_deref()));
            match u.keyslot {
                Some(k) => println!("removed token {} and keyslot {k}", u.token_id),
                None => println!("removed token {} (it had no keyslot)", u.token_id),
            }
            Ok(())
        }
        Err(e) => {
            let e = explain(&vol, e);
            audit.record(event.failed(format!("{e:#}")));
            Err(e)
        }
    }
}

pub fn rekey(a: RekeyArgs) -> anyhow::Result<()> {
    if let Some(sock) = &a.control {
        let slot = if a.all_tokens { None } else { a.slot };
        return match nbdcrypt::control::client::call(sock, &Request::Rekey { slot })? {
            Response::Ok(s) => {
                println!(
                    "rekeyed the tokens of volume {} (nbdcryptd behind {})",
                    s.volume_uuid,
                    sock.display()
                );
                Ok(())
            }
            Response::Error(e) => Err(anyhow!("{}", e.message)),
        };
    }
    let Some(volume) = a.volume.clone() else {
        bail!("give VOLUME or --control SOCK")
    };
    let audit = Audit::open(a.audit_log.as_deref())?;
    let settings = seal_settings(&a.location)?;
    let pin = config_pin(&a.location)?;
    let resolve = |json: &serde_json::Map<String, serde_json::Value>| resolver(json, &settings);
    let vol = Volume::open(&volume, true)?;
    let mut hdr = vol.header(true)?;
    let p = vol.path.display().to_string();
    // The tokens to rekey, decided up front.
    let ours: Vec<(u32, u32)> = hdr
        .tokens()
        .filter(|(_, t)| token::is_ours(t.type_name()))
        .filter_map(|(id, t)| t.keyslots().first().map(|k| (id, *k)))
        .collect();
    let targets: Vec<(u32, u32)> = match a.slot {
        Some(s) => {
            let v: Vec<_> = ours.iter().copied().filter(|(_, k)| *k == s).collect();
            match v.len() {
                0 => bail!("{p}: keyslot {s} has no nbdcrypt token"),
                1 => v,
                n => bail!("{p}: keyslot {s} is served by {n} nbdcrypt tokens"),
            }
        }
        None => {
            if ours.is_empty() {
                bail!("{p}: the volume has no nbdcrypt token");
            }
            ours
        }
    };
    // The volume key: from a passphrase, or by unsealing (the first of) the old tokens.
    let key = if a.key_file.is_some() || a.passphrase {
        unlock_by_passphrase(
            &vol,
            &hdr,
            a.key_file.as_deref(),
            a.kdf_limits.limits(),
            &config_pin(&a.location)?,
        )?
    } else {
        let mut last = None;
        let mut found = None;
        for (id, _) in &targets {
            match seal_enroll::unlock_with_token(&vol.io, &hdr, *id, &resolve) {
                Ok((k, slot)) => {
                    eprintln!("keyslot {slot} unlocked by token {id}");
                    found = Some(k);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        match (found, last) {
            (Some(k), _) => k,
            (None, Some(e)) => {
                return Err(explain(&vol, e).context(
                    "cannot unseal the old token (pass --key-file or --passphrase to use a \
                     passphrase instead)",
                ))
            }
            (None, None) => bail!("{p}: no token to rekey"),
        }
    };
    pin.check(&hdr, &key).map_err(|e| anyhow!("{p}: {e}"))?;
    for (id, _) in targets {
        let old_json = hdr
            .token(id)
            .map(|t| t.json().clone())
            .ok_or_else(|| anyhow!("{p}: token {id} vanished"))?;
        let old = token::parse_json(&old_json)
            .map_err(|e| anyhow!("{p}: token {id}: {e}"))?
            .ok_or_else(|| anyhow!("{p}: token {id} is not an nbdcrypt token"))?;
        let old_key = old.key_reference().map(str::to_owned);
        // The new provider: the key named here, or the old token's key if the configuration
        // allows it; endpoint and region always from the configuration, never the old token.
        let new_provider: Box<dyn SealProvider> = match a.holders.all().first() {
            Some((kind, value)) => new_provider(*kind, value, &settings)?,
            None => resolve(&old_json).map_err(|e| anyhow!("{p}: token {id}: {e}"))?,
        };
        let new_kind = ProviderKind::from_token_type(new_provider.token_type())
            .ok_or_else(|| anyhow!("internal: provider without a registry entry"))?;
        let event = AuditEvent::new(AuditEventKind::Rekey)
            .volume(hdr.uuid())
            .detail("old_token", id)
            .detail("old_keyslot", old.keyslot)
            .detail("old_key", old_key.clone().unwrap_or_default());
        match seal_enroll::rekey(&vol.io, &mut hdr, id, &key, &*new_provider) {
            Ok(r) => {
                let new_key =
                    token_key(&hdr, r.new.token_id).unwrap_or_else(|| new_provider.key_reference());
                audit.record(
                    event
                        .keyslot(r.new.keyslot)
                        .provider(new_kind.name(), Some(&new_key))
                        .detail("token", r.new.token_id),
                );
                println!(
                    "rekeyed token {id} (keyslot {}) -> token {} (keyslot {}, {} key {new_key})",
                    r.old.keyslot,
                    r.new.token_id,
                    r.new.keyslot,
                    new_kind.name()
                );
            }
            Err(e) => {
                let e = explain(&vol, e);
                audit.record(
                    event
                        .provider(new_kind.name(), Some(&new_provider.key_reference()))
                        .failed(format!("{e:#}")),
                );
                return Err(e);
            }
        }
    }
    Ok(())
}

/// test-token on quorums: opens one with its machine shares alone (people's shares are given to
/// the daemon, never here). Reports how many shares each quorum reached.
fn quorum_by_machines(
    vol: &Volume,
    hdr: &Luks2Header,
    settings: &SealSettings,
    only: Option<u32>,
) -> Result<(VolumeKey, u32, u32), EnrollError> {
    let mut why = Vec::new();
    for (id, q) in quorum::tokens(hdr) {
        if only.is_some_and(|o| o != id) {
            continue;
        }
        let q = match q {
            Ok(q) => q,
            Err(e) => {
                why.push(format!("quorum token {id}: {e}"));
                continue;
            }
        };
        let mut shares = Vec::new();
        let mut failed = Vec::new();
        for s in &q.shares {
            if let quorum::Holder::Provider { .. } = s.holder {
                match quorum::open_machine_share(hdr, &q, s, settings) {
                    Ok(share) => shares.push(share),
                    Err(e) => failed.push(e.to_string()),
                }
            }
        }
        let refs: Vec<_> = shares.iter().collect();
        match quorum::open_keyslot(&vol.io, hdr, &q, &refs) {
            Ok(key) => return Ok((key, q.keyslot, id)),
            Err(e) => {
                let mut m = format!("quorum token {id} (keyslot {}): {e}", q.keyslot);
                if q.passphrase_shares() > 0 {
                    m.push_str(" from machine holders alone; people give theirs to nbdcryptd");
                }
                for f in failed {
                    m.push_str(&format!("; {f}"));
                }
                why.push(m);
            }
        }
    }
    Err(EnrollError::Seal(nbdcrypt::seal::SealError::Other {
        provider: "quorum",
        detail: why.join("; "),
    }))
}

pub fn test_token(a: TestTokenArgs) -> anyhow::Result<()> {
    let audit = Audit::open(a.audit_log.as_deref())?;
    let vol = Volume::open(&a.volume, false)?;
    let hdr = vol.header(false)?;
    let event = AuditEvent::new(AuditEventKind::UnlockOk)
        .volume(hdr.uuid())
        .detail("check", true);
    let settings = seal_settings(&a.location)?;
    let pin = config_pin(&a.location)?;
    let resolve = |json: &serde_json::Map<String, serde_json::Value>| resolver(json, &settings);
    let is_quorum = |id: u32| {
        hdr.token(id)
            .is_some_and(|t| t.type_name() == quorum::TOKEN_TYPE)
    };
    let result = match a.token {
        Some(id) if is_quorum(id) => quorum_by_machines(&vol, &hdr, &settings, Some(id)),
        Some(id) => seal_enroll::unlock_with_token(&vol.io, &hdr, id, &resolve)
            .map(|(k, slot)| (k, slot, id)),
        None => {
            let opened = seal_enroll::unlock_with_tokens(&vol.io, &hdr, &resolve).or_else(|ours| {
                nbdcrypt::luks2::tokens::clevis::unlock_after_ours(
                    &vol.io,
                    &hdr,
                    &settings.clevis(),
                    ours,
                )
            });
            match opened {
                Err(EnrollError::NoTokens) if !quorum::tokens(&hdr).is_empty() => {
                    quorum_by_machines(&vol, &hdr, &settings, None)
                }
                r => r,
            }
        }
    };
    // A token that opens a header other than the pinned one is a failure, as in the daemon.
    if let Ok((key, _, _)) = &result {
        if let Err(e) = pin.check(&hdr, key) {
            let e = anyhow!("{}: {e}", vol.path.display());
            let mut ev = event;
            ev.kind = AuditEventKind::UnlockFailed;
            audit.record(ev.failed(format!("{e:#}")));
            return Err(e);
        }
    }
    match result {
        Ok((_key, slot, id)) => {
            let key = token_key(&hdr, id);
            let kind = hdr
                .token(id)
                .and_then(|t| match t.type_name() {
                    nbdcrypt::seal::clevis::TOKEN_TYPE => Some("clevis"),
                    other => ProviderKind::from_token_type(other).map(ProviderKind::name),
                })
                .unwrap_or("unknown");
            audit.record(
                event
                    .keyslot(slot)
                    .provider(kind, key.as_deref())
                    .detail("token", id),
            );
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "volume": vol.path.display().to_string(),
                        "uuid": hdr.uuid(),
                        "keyslot": slot,
                        "token": id,
                        "provider": kind,
                        "key": key,
                    })
                );
                return Ok(());
            }
            match key {
                Some(k) => println!("keyslot {slot} unlocked by token {id} ({kind} key {k})"),
                None => println!("keyslot {slot} unlocked by token {id}"),
            }
            Ok(())
        }
        Err(e) => {
            let mut ev = event;
            ev.kind = AuditEventKind::UnlockFailed;
            // One token tried: name its keyslot and key in the event.
            if let EnrollError::TokensFailed(f) = &e {
                if let [one] = f.as_slice() {
                    if let Some(k) = one.keyslot {
                        ev = ev.keyslot(k);
                    }
                    let kind = ProviderKind::from_token_type(&one.token_type)
                        .map(ProviderKind::name)
                        .unwrap_or("unknown");
                    ev = ev
                        .provider(kind, one.key.as_deref())
                        .detail("token", one.token_id);
                }
            }
            let e = explain(&vol, e);
            audit.record(ev.failed(format!("{e:#}")));
            Err(e)
        }
    }
}
