//! `pin`: the lines that pin a volume in nbdcryptd's config (its LUKS2 UUID and the digest of its
//! volume key), printed or written into the config file.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::Args;

use nbdcrypt::luks2::KdfLimits;
use nbdcrypt::seal::pin::VolumePin;

use super::Volume;
use crate::secret_input::{read_existing, Source};

pub const ABOUT: &str = "\
Print (or write into nbdcryptd's config file) the lines that pin VOLUME: its LUKS2 UUID
(volume-uuid) and the LUKS2 digest of its volume key (volume-key-digest: hash, iterations, salt
and digest, which identify the key without revealing it). With them nbdcryptd refuses to start
on a volume with another UUID, and refuses every unlock (passphrase, key file, token,
--auto-unlock) whose volume key does not match the digest: a header replaced by whoever can write
the disk or a backup is refused, and the volume stays locked.

The pin is read from the header as it is now: pin while the volume is in your hands (right after
`format` or `enroll`, which prints the same lines). --key-file / --verify first checks that a
passphrase you know opens the volume with the key the digest names. Needs no secret otherwise.";

pub const EXAMPLES: &str = "\
Examples:
  nbdcryptctl pin /srv/db.img                                   # print the TOML lines
  nbdcryptctl pin /srv/db.img --key-file recovery.key --write /etc/nbdcrypt/db.toml
  nbdcryptctl pin /dev/sdb --verify --write /etc/nbdcrypt/sdb.toml   # asks the passphrase

Then restart nbdcryptd (systemctl restart nbdcryptd@db). --write replaces the volume-uuid and
volume-key-digest lines of FILE (or creates FILE, mode 0600, with `volume = ...`); the file is
checked as a daemon config and replaced atomically. It refuses to replace a pin of another volume
key unless --replace (with --key-file or --verify): a re-encryption moves the pin by itself
(nbdcryptd, and `reencrypt --config FILE`), so a different key on disk is more likely a swapped
or rolled-back header than a change of yours.
  nbdcryptctl pin /srv/db.img --replace --key-file recovery.key --write /etc/nbdcrypt/db.toml";

#[derive(Args, Debug)]
pub struct PinArgs {
    /// Volume file, block device, or NBD URI (nbd+unix:///EXPORT?socket=PATH, nbds://HOST/EXPORT).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// Write the pin into this nbdcryptd config file instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub write: Option<PathBuf>,
    /// Check first that this passphrase file opens the volume (bytes as-is; `-` = stdin).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Check first that a passphrase (asked for) opens the volume.
    #[arg(long, conflicts_with = "key_file")]
    pub verify: bool,
    /// Pin the UUID only (a volume whose key may legitimately change: none today).
    #[arg(long)]
    pub uuid_only: bool,
    /// With --write: replace a pin of FILE that names another volume key (refused without it:
    /// the disk may hold a swapped or rolled-back header). Needs --key-file or --verify.
    #[arg(long, requires = "write")]
    pub replace: bool,
}

pub fn run(a: PinArgs) -> anyhow::Result<()> {
    let vol = Volume::open(&a.volume, false)?;
    let hdr = vol.header(false)?;
    let mut pin = VolumePin::of_header(&hdr);
    if pin.key_digest.is_none() {
        bail!(
            "{}: the header has no digest of the volume key",
            vol.path.display()
        );
    }
    if a.key_file.is_some() || a.verify {
        let pass = read_existing(
            &Source::from_arg(a.key_file.as_deref()),
            &format!("Enter any passphrase of {}: ", vol.path.display()),
        )?;
        let (key, slot) = hdr
            .unlock(&vol.io, &pass, &KdfLimits::default())
            .map_err(|e| vol.explain(e))?;
        pin.check_key(&key)
            .map_err(|e| anyhow!("{}: {e}", vol.path.display()))?;
        eprintln!("keyslot {slot} opened: the digest names the volume key it holds");
    }
    if a.uuid_only {
        pin.key_digest = None;
    }
    let lines = pin.toml_lines();
    match &a.write {
        None => {
            println!("# nbdcryptd --config lines pinning {}", vol.path.display());
            print!("{lines}");
            Ok(())
        }
        Some(file) => {
            refuse_silent_replace(&a, file, &pin)?;
            write_config(file, &vol.path, &lines)?;
            println!(
                "pinned {} (UUID {}) in {}",
                vol.path.display(),
                hdr.uuid(),
                file.display()
            );
            Ok(())
        }
    }
}

/// `--write` over a config whose pin names another volume key: the header on disk may be the
/// swapped or rolled-back one the pin is there to refuse (and the daemon's refusal tells the
/// operator to come here). Only with --replace, and then only after a passphrase the operator
/// knows proved the key (--key-file / --verify).
fn refuse_silent_replace(a: &PinArgs, file: &Path, new: &VolumePin) -> anyhow::Result<()> {
    let Ok((cfg, _)) = nbdcrypt::config_file::load(file) else {
        return Ok(()); // no file yet, or not a config: write_config says what is wrong
    };
    let old = cfg
        .volume_pin()
        .map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let (Some(was), Some(now)) = (&old.key_digest, &new.key_digest) else {
        return Ok(());
    };
    if was == now {
        return Ok(());
    }
    if !a.replace {
        bail!(
            "{} pins another volume key ({was}) than the header now holds ({now}); if the key \
             changed by your hand (a re-encryption without --config), run again with --replace \
             --key-file KEY (or --verify); if not, the header may have been swapped or rolled \
             back: restore it from your header backup instead",
            file.display()
        );
    }
    if a.key_file.is_none() && !a.verify {
        bail!(
            "--replace needs --key-file or --verify: prove a passphrase you know opens the new key"
        );
    }
    eprintln!("replacing the pinned key {was} with {now}");
    Ok(())
}

/// Replaces the pin lines of `file` (or creates it), checks the result parses as a daemon config
/// serving `volume`, and renames it into place.
fn write_config(file: &Path, volume: &Path, lines: &str) -> anyhow::Result<()> {
    let (old, mode) = match std::fs::read_to_string(file) {
        Ok(t) => {
            let mode = std::fs::metadata(file)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o600);
            (Some(t), mode)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, 0o600),
        Err(e) => return Err(anyhow!("cannot read {}: {e}", file.display())),
    };
    let mut text = String::new();
    match &old {
        Some(t) => {
            for l in t.lines().filter(|l| !nbdcrypt::seal::pin::is_pin_line(l)) {
                text.push_str(l);
                text.push('\n');
            }
        }
        None => {
            let abs = std::fs::canonicalize(volume).unwrap_or_else(|_| volume.to_owned());
            let path = abs
                .to_str()
                .ok_or_else(|| anyhow!("{} is not UTF-8", abs.display()))?;
            text.push_str(&format!("volume = {}\n", super::enroll::toml_str(path)));
        }
    }
    text.push_str(lines);
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = file
        .file_name()
        .ok_or_else(|| anyhow!("{} names no file", file.display()))?;
    let tmp = dir.join(format!(
        ".{}.nbdcrypt-pin.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        let (cfg, _) = nbdcrypt::config_file::load(&tmp)
            .map_err(|e| anyhow!("the result would not load: {e}"))?;
        if let Some(v) = cfg.volume() {
            let same = match (std::fs::canonicalize(v), std::fs::canonicalize(volume)) {
                (Ok(a), Ok(b)) => a == b,
                _ => v == volume,
            };
            if !same {
                bail!(
                    "{} serves {}, not {}: refusing to pin another volume there",
                    file.display(),
                    v.display(),
                    volume.display()
                );
            }
        }
        std::fs::rename(&tmp, file)
            .with_context(|| format!("cannot replace {}", file.display()))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
