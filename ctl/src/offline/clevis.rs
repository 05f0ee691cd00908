//! `enroll --tang / --tpm2 / --sss`: keyslots with clevis tokens, which `clevis luks unlock`,
//! `clevis luks list` and nbdcryptd all read. The operator settings that let nbdcryptd and
//! `test-token` use them (`--tang-allow`, `--tpm2-tcti`) come from the provider registry.

use anyhow::{anyhow, bail};
use clap::Args;

use nbdcrypt::audit::{AuditEvent, AuditEventKind};
use nbdcrypt::luks2::tokens::clevis as luks;
use nbdcrypt::luks2::tokens::enroll::Enrolled;
use nbdcrypt::seal::clevis::{provider::DEFAULT_TCTI, ClevisSettings, PinSpec};
use nbdcrypt::seal::SealSettings;

use super::enroll::{toml_str, EnrollArgs};

/// How a new keyslot is bound with clevis (flattened into `enroll`).
#[derive(Args, Debug, Clone, Default)]
pub struct ClevisEnrollArgs {
    /// Bind to this Tang server (clevis `tang` pin); repeat for several (with --sss). Each needs
    /// its --tang-thumbprint, in the same order.
    #[arg(
        long,
        value_name = "URL",
        group = "provider",
        help_heading = "clevis (Tang, TPM2)"
    )]
    pub tang: Vec<String>,
    /// Thumbprint of the Tang server's signing key (`tang-show-keys PORT` on the server, or
    /// `jose jwk thp -i KEY.jwk`): the advertisement must be signed by it. No trust on first use.
    #[arg(long, value_name = "THUMBPRINT", help_heading = "clevis (Tang, TPM2)")]
    pub tang_thumbprint: Vec<String>,
    /// Bind to this machine's TPM2 (clevis `tpm2` pin).
    #[arg(long, group = "provider", help_heading = "clevis (Tang, TPM2)")]
    pub tpm2: bool,
    /// Seal to the current values of these PCRs (e.g. 0,7): the TPM refuses to unseal once they
    /// change (firmware, boot chain, Secure Boot state).
    #[arg(
        long,
        value_name = "IDS",
        requires = "tpm2",
        help_heading = "clevis (Tang, TPM2)"
    )]
    pub tpm2_pcr_ids: Option<String>,
    /// PCR bank for --tpm2-pcr-ids.
    #[arg(
        long,
        value_name = "HASH",
        default_value = "sha256",
        help_heading = "clevis (Tang, TPM2)"
    )]
    pub tpm2_pcr_bank: String,
    /// Combine the pins given (--tang, --tpm2) with Shamir's secret sharing: any K of them
    /// unlock (clevis `sss` pin).
    #[arg(long, value_name = "K", help_heading = "clevis (Tang, TPM2)")]
    pub sss: Option<usize>,
}

impl ClevisEnrollArgs {
    pub fn given(&self) -> bool {
        !self.tang.is_empty() || self.tpm2
    }

    /// The policy the flags describe.
    pub fn pin(&self) -> anyhow::Result<PinSpec> {
        if self.tang.len() != self.tang_thumbprint.len() {
            bail!(
                "each --tang URL needs its --tang-thumbprint (the server's signing-key \
                 thumbprint, from `tang-show-keys PORT` on the server), in the same order"
            );
        }
        let mut pins: Vec<PinSpec> = self
            .tang
            .iter()
            .zip(&self.tang_thumbprint)
            .map(|(url, thp)| {
                // Checked as the daemon will check it.
                nbdcrypt::seal::clevis::tang::TangServer::parse(&format!("{url}={thp}"))
                    .map(|s| PinSpec::Tang {
                        url: s.url,
                        thumbprint: s.thumbprint,
                    })
                    .map_err(|e| anyhow!("--tang: {e}"))
            })
            .collect::<anyhow::Result<_>>()?;
        if self.tpm2 {
            pins.push(PinSpec::Tpm2 {
                pcr: self
                    .tpm2_pcr_ids
                    .as_ref()
                    .map(|ids| (self.tpm2_pcr_bank.clone(), ids.clone())),
            });
        }
        match (self.sss, pins.len()) {
            (_, 0) => bail!("give --tang URL --tang-thumbprint THP, or --tpm2"),
            (None, 1) => Ok(pins.remove(0)),
            (None, n) => bail!("{n} pins given: add --sss K to say how many of them must unlock"),
            (Some(t), n) if t == 0 || t > n => bail!("--sss {t}: give 1 to {n}"),
            (Some(t), _) => Ok(PinSpec::Sss { t, pins }),
        }
    }

    /// The operator's clevis settings (--tpm2-tcti, else the kernel's resource manager).
    pub fn settings(&self, seal: &SealSettings) -> ClevisSettings {
        let mut s = seal.clevis();
        if s.tpm2.tcti.is_none() {
            s.tpm2.tcti = Some(DEFAULT_TCTI.to_owned());
        }
        s
    }
}

fn tang_lines(pin: &PinSpec, out: &mut Vec<String>) {
    match pin {
        PinSpec::Tang { url, thumbprint } => out.push(format!("{url}={thumbprint}")),
        PinSpec::Sss { pins, .. } => pins.iter().for_each(|p| tang_lines(p, out)),
        PinSpec::Tpm2 { .. } => {}
    }
}

/// `enroll` with clevis pins.
pub fn enroll(a: &EnrollArgs, seal: &SealSettings) -> anyhow::Result<()> {
    let pin = a.clevis.pin()?;
    let settings = a.clevis.settings(seal);
    let audit = super::enroll::Audit::open(a.audit_log.as_deref())?;
    let vol = super::Volume::open(&a.volume, true)?;
    let mut hdr = vol.header(true)?;
    let key = super::enroll::unlock_by_passphrase(
        &vol,
        &hdr,
        a.key_file.as_deref(),
        a.kdf_limits.limits(),
        &super::enroll::config_pin(&a.location)?,
    )?;
    let event = AuditEvent::new(AuditEventKind::Enrol).volume(hdr.uuid());
    match luks::enroll(&vol.io, &mut hdr, &key, &pin, &settings) {
        Ok(Enrolled { keyslot, token_id }) => {
            let what = hdr
                .token(token_id)
                .and_then(|t| luks::parse_token(token_id, t.json()).ok().flatten())
                .map(|t| nbdcrypt::seal::clevis::summary(&t.jwe))
                .unwrap_or_default();
            audit.record(
                event
                    .keyslot(keyslot)
                    .provider("clevis", Some(&what))
                    .detail("token", token_id),
            );
            println!("enrolled keyslot {keyslot} (token {token_id}, clevis {what})");
            println!();
            println!(
                "# For nbdcryptd's --config file (clevis tokens are tried after nbdcrypt's own):"
            );
            let mut tangs = Vec::new();
            tang_lines(&pin, &mut tangs);
            if !tangs.is_empty() {
                let list: Vec<String> = tangs.iter().map(|t| toml_str(t)).collect();
                println!("tang-allow = [{}]", list.join(", "));
            }
            if let (true, Some(t)) = (a.clevis.tpm2, &settings.tpm2.tcti) {
                println!("tpm2-tcti = {}", toml_str(t));
            }
            print!(
                "{}",
                nbdcrypt::seal::pin::VolumePin::of_header(&hdr).toml_lines()
            );
            Ok(())
        }
        Err(e) => {
            let e = anyhow!("{}: {e}", vol.path.display());
            audit.record(event.provider("clevis", None).failed(format!("{e:#}")));
            Err(e)
        }
    }
}
