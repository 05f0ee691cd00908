//! Token commands: `enroll`, `unenroll`, `rekey`, `test-token`: keyslots whose secret is sealed
//! by AWS KMS (systemd-cryptenroll style: a random secret opens a keyslot, only its sealed form
//! is stored, in a LUKS2 token bound to the volume UUID and keyslot).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::{ArgGroup, Args};

use nbdcrypt::audit::{AuditEvent, AuditEventKind, AuditLog};
use nbdcrypt::control::proto::{Request, Response};
use nbdcrypt::crypto::keys::VolumeKey;
use nbdcrypt::luks2::{KdfLimits, Luks2Header};
use nbdcrypt::seal::enroll::{self as seal_enroll, EnrollError, Enrolled, UnenrollTarget};
use nbdcrypt::seal::kms::KmsProvider;
use nbdcrypt::seal::pin::VolumePin;
use nbdcrypt::seal::pkcs11::{resolve_module, PinSource, Pkcs11Provider, Pkcs11Uri};
use nbdcrypt::seal::token::{self, ProviderKind};
use nbdcrypt::seal::{resolve_provider, Pkcs11Settings, SealProvider, SealSettings};

use super::Volume;
use crate::secret_input::{read_existing, Source};

pub const ENROLL_ABOUT: &str = "\
Add a keyslot that AWS KMS unlocks. A random 32-byte secret opens a new keyslot (PBKDF2-SHA256,
1000 iterations; its passphrase is the secret's base64, as systemd-cryptenroll does); the secret
is stored only encrypted by the KMS key, in a LUKS2 token bound to this volume's UUID and the
keyslot (KMS encryption context), so a copied token opens nothing. An existing passphrase or key
file unlocks the volume key first. Credentials come from the standard AWS chain (environment,
profile, instance role); the region from --kms-region or the standard chain. Prints the keyslot
and the token id, then the lines for nbdcryptd's config: the key to allow (kms-allow-key) and
the volume pin (volume-uuid, volume-key-digest) that makes the daemon refuse a replaced header.
Keep a passphrase keyslot as a recovery key.";

pub const ENROLL_EXAMPLES: &str = "\
Examples:
  nbdcryptctl enroll /srv/vol.img --kms alias/nbdcrypt-vol1            # asks the passphrase
  nbdcryptctl enroll vol.img --kms arn:aws:kms:eu-west-1:111122223333:key/1234abcd-... \\
      --key-file recovery.key --audit-log /var/log/nbdcrypt-audit.log
  nbdcryptctl enroll vol.img --kms alias/vol --region eu-west-1 \\
      --kms-endpoint https://vpce-0abc.kms.eu-west-1.vpce.amazonaws.com --key-file k";

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

/// The AWS KMS this host trusts. Never taken from a token: the header is writable by whoever
/// holds the disk, so a token naming another endpoint, region or key is refused.
#[derive(Args, Debug, Clone)]
pub struct KmsLocation {
    /// AWS region of the KMS key (default: AWS_REGION / the profile's region).
    #[arg(
        long = "kms-region",
        visible_alias = "region",
        value_name = "REGION",
        help_heading = "AWS KMS"
    )]
    pub region: Option<String>,
    /// KMS endpoint URL (VPC endpoint, test server). Tokens naming another are refused.
    #[arg(long, value_name = "URL", help_heading = "AWS KMS")]
    pub kms_endpoint: Option<String>,
    /// A KMS key (key ARN or key id) whose tokens may be unsealed; repeat for several.
    #[arg(long = "kms-allow-key", value_name = "ARN", help_heading = "AWS KMS")]
    pub kms_allow_key: Vec<String>,
    /// Take kms-endpoint, kms-region, kms-allow-key, pkcs11-module and pkcs11-pin from this
    /// nbdcryptd config file (flags given here win).
    #[arg(long, value_name = "FILE", help_heading = "AWS KMS")]
    pub config: Option<PathBuf>,
}

/// The volume pin of `--config FILE`, if any: commands that recover the volume key check it, as
/// the daemon would.
fn config_pin(loc: &KmsLocation) -> anyhow::Result<VolumePin> {
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
fn seal_settings(loc: &KmsLocation, hsm: &Pkcs11Args) -> anyhow::Result<SealSettings> {
    let mut s = match &loc.config {
        Some(path) => {
            let (file, _) = nbdcrypt::config_file::load(path).map_err(|e| anyhow!(e))?;
            file.seal_settings()
                .map_err(|e| anyhow!("{}: {e}", path.display()))?
        }
        None => SealSettings::default(),
    };
    if let Some(e) = &loc.kms_endpoint {
        s.kms.endpoint = Some(e.clone());
    }
    if let Some(r) = &loc.region {
        s.kms.region = Some(r.clone());
    }
    if !loc.kms_allow_key.is_empty() {
        s.kms.allowed_keys = loc.kms_allow_key.clone();
    }
    s.kms.validate().map_err(|e| anyhow!("--{e}"))?;
    let p = hsm.settings()?;
    if p.pin.is_some() {
        s.pkcs11.pin = p.pin;
    }
    if p.module.is_some() {
        s.pkcs11.module = p.module;
    }
    Ok(s)
}

/// The PKCS#11 HSM: the key (an RFC 7512 URI), its user PIN and the module to load.
#[derive(Args, Debug, Clone)]
pub struct Pkcs11Args {
    /// PIN source for HSM tokens: file:/path (or just /path) or cred:NAME (systemd
    /// credential). `--pin-file /path` is the same.
    #[arg(
        long,
        value_name = "SOURCE",
        help_heading = "PKCS#11 HSM",
        visible_alias = "pin-file"
    )]
    pub pkcs11_pin: Option<String>,
    /// PKCS#11 module (default: the URI's module-path, else SoftHSM2's).
    #[arg(long, value_name = "PATH", help_heading = "PKCS#11 HSM")]
    pub pkcs11_module: Option<PathBuf>,
}

impl Pkcs11Args {
    /// Settings for unsealing existing PKCS#11 tokens (the module never comes from the header).
    fn settings(&self) -> anyhow::Result<Pkcs11Settings> {
        let pin = match &self.pkcs11_pin {
            Some(p) => Some(PinSource::parse(p).map_err(|e| anyhow!("--pkcs11-pin: {e}"))?),
            None => None,
        };
        Ok(Pkcs11Settings {
            module: self.pkcs11_module.clone(),
            pin,
        })
    }

    /// A provider sealing under the key `uri` names. The PIN comes from `--pkcs11-pin` or the
    /// URI's `pin-source=` (both typed by the operator), never from the command line itself.
    fn provider(&self, uri: &str) -> anyhow::Result<Pkcs11Provider> {
        let (uri, inline_pin) =
            Pkcs11Uri::parse_with_pin_value(uri).map_err(|e| anyhow!("--pkcs11: {e}"))?;
        if inline_pin.is_some() {
            drop(inline_pin);
            bail!(
                "--pkcs11: the URI carries pin-value=: a PIN on the command line is readable by \
                 every local user (ps, /proc) and lands in shell history. Remove pin-value= and \
                 give --pkcs11-pin file:/path/to/pin or --pkcs11-pin cred:NAME (a systemd credential)"
            );
        }
        let pin = match (&self.pkcs11_pin, &uri.pin_source) {
            (Some(p), _) => PinSource::parse(p)
                .map_err(|e| anyhow!("--pkcs11-pin: {e}"))?
                .read()?,
            (None, Some(src)) => src.read()?,
            (None, None) => bail!("--pkcs11 needs a PIN: --pkcs11-pin file:/path (or cred:NAME)"),
        };
        let module = resolve_module(self.pkcs11_module.as_deref(), &uri);
        Ok(Pkcs11Provider::new(uri, module, pin)?)
    }
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("provider").required(true).multiple(true).args(["kms", "pkcs11", "tang", "tpm2"])))]
pub struct EnrollArgs {
    /// Volume file or block device.
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// The KMS key that seals the secret: key id, key ARN, alias/NAME or alias ARN.
    #[arg(long, value_name = "KEY_ID|ALIAS", help_heading = "AWS KMS")]
    pub kms: Option<String>,
    #[command(flatten)]
    pub location: KmsLocation,
    /// The HSM key that seals the secret: a non-extractable AES key, as an RFC 7512 URI
    /// (pkcs11:token=LABEL;object=LABEL or ;id=%01).
    #[arg(long, value_name = "URI", help_heading = "PKCS#11 HSM")]
    pub pkcs11: Option<String>,
    #[command(flatten)]
    pub hsm: Pkcs11Args,
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
    /// Volume file or block device.
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
    /// Volume file or block device (or --control to have a running nbdcryptd do it).
    #[arg(value_name = "VOLUME", required_unless_present = "control")]
    pub volume: Option<PathBuf>,
    /// Ask the running nbdcryptd behind this control socket to re-seal its volume's tokens under
    /// the same keys (its KMS credentials and HSM PIN are used; nothing else is needed here).
    #[arg(long, value_name = "SOCK", conflicts_with_all = ["volume", "kms", "pkcs11", "key_file", "passphrase"])]
    pub control: Option<PathBuf>,
    /// The keyslot of the enrolment to rekey.
    #[arg(long, value_name = "N")]
    pub slot: Option<u32>,
    /// Rekey every nbdcrypt token of the volume.
    #[arg(long)]
    pub all_tokens: bool,
    /// The new KMS key (default: the token's current key).
    #[arg(
        long,
        value_name = "KEY_ID|ALIAS",
        help_heading = "AWS KMS",
        conflicts_with = "pkcs11"
    )]
    pub kms: Option<String>,
    #[command(flatten)]
    pub location: KmsLocation,
    /// Move to this HSM key (RFC 7512 URI) instead of re-sealing under the current one.
    #[arg(long, value_name = "URI", help_heading = "PKCS#11 HSM")]
    pub pkcs11: Option<String>,
    #[command(flatten)]
    pub hsm: Pkcs11Args,
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
    /// Volume file or block device.
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// Only try this token.
    #[arg(long, value_name = "N")]
    pub token: Option<u32>,
    #[command(flatten)]
    pub location: KmsLocation,
    #[command(flatten)]
    pub hsm: Pkcs11Args,
    #[command(flatten)]
    pub clevis: super::clevis::ClevisUnlockArgs,
    /// Append a JSON line per key event to this file.
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
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

pub(super) fn unlock_by_passphrase(
    vol: &Volume,
    hdr: &Luks2Header,
    key_file: Option<&Path>,
    limits: KdfLimits,
) -> anyhow::Result<VolumeKey> {
    let pass = read_existing(
        &Source::from_arg(key_file),
        &format!("Enter any existing passphrase for {}: ", vol.path.display()),
    )?;
    let (key, slot) = hdr
        .unlock(&vol.file, &pass, &limits)
        .map_err(|e| vol.explain(e))?;
    eprintln!("keyslot {slot} unlocked");
    Ok(key)
}

pub fn enroll(a: EnrollArgs) -> anyhow::Result<()> {
    let families = [a.kms.is_some(), a.pkcs11.is_some(), a.clevis.given()];
    if families.iter().filter(|g| **g).count() > 1 {
        bail!("give one of --kms, --pkcs11, or clevis pins (--tang, --tpm2, combined with --sss)");
    }
    if a.clevis.given() {
        return super::clevis::enroll(&a);
    }
    let audit = Audit::open(a.audit_log.as_deref())?;
    let settings = seal_settings(&a.location, &a.hsm)?;
    let vol = Volume::open(&a.volume, true)?;
    let mut hdr = vol.header(true)?;
    let (provider, kind): (Box<dyn SealProvider>, ProviderKind) = match (&a.kms, &a.pkcs11) {
        (Some(kms), _) => (
            Box::new(KmsProvider::new(
                kms.clone(),
                settings.kms.region.clone(),
                settings.kms.endpoint.clone(),
            )?),
            ProviderKind::AwsKms,
        ),
        (None, Some(uri)) => (Box::new(a.hsm.provider(uri)?), ProviderKind::Pkcs11),
        (None, None) => bail!("give --kms KEY or --pkcs11 URI"),
    };
    let key = unlock_by_passphrase(&vol, &hdr, a.key_file.as_deref(), a.kdf_limits.limits())?;
    let requested = provider.key_reference();
    let event = AuditEvent::new(AuditEventKind::Enrol)
        .volume(hdr.uuid())
        .provider(kind.name(), Some(&requested));
    match seal_enroll::enroll(&vol.file, &mut hdr, &key, &*provider) {
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

/// After an enrolment: the lines nbdcryptd's config needs to use this token, and to pin this
/// volume (its key was just verified by the passphrase, so the digest printed is the real one).
fn print_daemon_config(
    vol: &Volume,
    hdr: &Luks2Header,
    kind: ProviderKind,
    key: &str,
    s: &SealSettings,
) {
    println!();
    println!("# For nbdcryptd's --config file (a volume pin makes it refuse a replaced header;");
    println!(
        "# `nbdcryptctl pin {} --write FILE` writes the pin lines):",
        vol.path.display()
    );
    if kind == ProviderKind::AwsKms {
        println!("kms-allow-key = [{}]", toml_str(key));
        if let Some(e) = &s.kms.endpoint {
            println!("kms-endpoint = {}", toml_str(e));
        }
        if let Some(r) = &s.kms.region {
            println!("kms-region = {}", toml_str(r));
        }
    }
    print!("{}", VolumePin::of_header(hdr).toml_lines());
}

/// A TOML basic string.
pub(super) fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

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
    match seal_enroll::unenroll(&vol.file, &mut hdr, target) {
        Ok(u) => {
            let mut ev = event.detail("token", u.token_id);
            if let Some(k) = u.keyslot {
                ev = ev.keyslot(k);
            }
            let kind = ProviderKind::from_token_type(&u.token_type)
                .map(ProviderKind::name)
                .unwrap_or("unknown");
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
    let settings = seal_settings(&a.location, &a.hsm)?;
    let pin = config_pin(&a.location)?;
    let resolve =
        |json: &serde_json::Map<String, serde_json::Value>| resolve_provider(json, &settings);
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
        unlock_by_passphrase(&vol, &hdr, a.key_file.as_deref(), a.kdf_limits.limits())?
    } else {
        let mut last = None;
        let mut found = None;
        for (id, _) in &targets {
            match seal_enroll::unlock_with_token(&vol.file, &hdr, *id, &resolve) {
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
        let new_provider: Box<dyn SealProvider> = match (&a.kms, &a.pkcs11) {
            (None, Some(uri)) => Box::new(a.hsm.provider(uri)?),
            (Some(k), _) => Box::new(KmsProvider::new(
                k.clone(),
                settings.kms.region.clone(),
                settings.kms.endpoint.clone(),
            )?),
            (None, None) => resolve(&old_json).map_err(|e| anyhow!("{p}: token {id}: {e}"))?,
        };
        let new_kind = match new_provider.token_type() {
            t if t == ProviderKind::Pkcs11.token_type() => ProviderKind::Pkcs11,
            _ => ProviderKind::AwsKms,
        };
        let event = AuditEvent::new(AuditEventKind::Rekey)
            .volume(hdr.uuid())
            .detail("old_token", id)
            .detail("old_keyslot", old.keyslot)
            .detail("old_key", old_key.clone().unwrap_or_default());
        match seal_enroll::rekey(&vol.file, &mut hdr, id, &key, &*new_provider) {
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

pub fn test_token(a: TestTokenArgs) -> anyhow::Result<()> {
    let audit = Audit::open(a.audit_log.as_deref())?;
    let vol = Volume::open(&a.volume, false)?;
    let hdr = vol.header(false)?;
    let event = AuditEvent::new(AuditEventKind::UnlockOk)
        .volume(hdr.uuid())
        .detail("check", true);
    let mut settings = seal_settings(&a.location, &a.hsm)?;
    a.clevis.apply(&mut settings.clevis)?;
    let pin = config_pin(&a.location)?;
    let resolve =
        |json: &serde_json::Map<String, serde_json::Value>| resolve_provider(json, &settings);
    let result = match a.token {
        Some(id) => seal_enroll::unlock_with_token(&vol.file, &hdr, id, &resolve)
            .map(|(k, slot)| (k, slot, id)),
        None => seal_enroll::unlock_with_tokens(&vol.file, &hdr, &resolve).or_else(|ours| {
            nbdcrypt::seal::clevis::luks::unlock_after_ours(&vol.file, &hdr, &settings.clevis, ours)
        }),
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
