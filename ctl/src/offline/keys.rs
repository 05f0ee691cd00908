//! Keyslot commands: `add-key`, `remove-key`, `change-key`, `test-key` (cryptsetup's
//! `luksAddKey`, `luksKillSlot`, `luksChangeKey`, `open --test-passphrase`).

use std::path::PathBuf;

use anyhow::{anyhow, bail};
use clap::Args;

use nbdcrypt::crypto::keys::VolumeKey;
use nbdcrypt::luks2::{FormatError, KdfLimits, Luks2Header};

use super::{describe_kdf, NoKey, PbkdfArgs, Volume, NO_KEY_MESSAGE};
use crate::secret_input::{check_distinct, read_existing, read_new, Source};

pub const ADD_ABOUT: &str = "\
Add a passphrase to a LUKS2 volume in the lowest free keyslot. An existing passphrase (of any
keyslot) unlocks the volume key first; the new keyslot stores the same volume key. Prints the new
keyslot number.";

pub const ADD_EXAMPLES: &str = "\
Examples:
  nbdcryptctl add-key /srv/vol.img                    # asks the existing, then the new passphrase
  nbdcryptctl add-key vol.img --key-file old.key --new-key-file new.key
  printf 'old\\nnew\\n' | nbdcryptctl add-key vol.img  # two lines of standard input
  nbdcryptctl add-key vol.img --pbkdf pbkdf2 --iter-time 500
  nbdcryptctl add-key 'nbds://10.0.0.5/disk?tls-certificates=/etc/nbdcrypt/up-tls'  # over NBD";

pub const REMOVE_ABOUT: &str = "\
Wipe the key material of a keyslot and remove it from the header. Asks for the passphrase of
another keyslot (so you cannot lock yourself out by mistake) unless --force. The last keyslot
is never removed: without it the data is lost.";

pub const REMOVE_EXAMPLES: &str = "\
Examples:
  nbdcryptctl remove-key /srv/vol.img --slot 1        # asks a passphrase of a slot other than 1
  nbdcryptctl remove-key vol.img --slot 1 --key-file slot0.key
  nbdcryptctl remove-key vol.img --slot 3 --force     # no passphrase needed";

pub const CHANGE_ABOUT: &str = "\
Replace a passphrase: the keyslot the old passphrase opens gets the new one, under a freshly
benchmarked KDF; the keyslot number stays the same and the old key material is wiped.";

pub const CHANGE_EXAMPLES: &str = "\
Examples:
  nbdcryptctl change-key /srv/vol.img                 # asks the old, then the new passphrase twice
  nbdcryptctl change-key vol.img --slot 1 --key-file old.key --new-key-file new.key";

pub const TEST_ABOUT: &str = "\
Check a passphrase without changing anything: prints the keyslot it opens and exits 0, or prints
\"no key available with this passphrase\" and exits 2.";

pub const TEST_EXAMPLES: &str = "\
Examples:
  nbdcryptctl test-key /srv/vol.img
  nbdcryptctl test-key vol.img --key-file key.bin && echo ok
  echo -n secret | nbdcryptctl test-key vol.img --key-file - --slot 1";

/// `--allow-expensive-kdf`: lift the KDF caps for a header you trust.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct KdfLimitArgs {
    /// Run keyslot KDFs that exceed the default caps (argon2 above 1 GiB or 16 GiB-passes,
    /// PBKDF2 above 20 million iterations, more than about 4 such derivations in all). Only for
    /// a header you trust: a crafted one can cost minutes of CPU or gigabytes of memory.
    #[arg(long)]
    pub allow_expensive_kdf: bool,
}

/// Warns when a keyslot we are about to write could not be opened under the default caps.
fn warn_if_expensive(kdf: &nbdcrypt::luks2::KdfParams) {
    if let Err(l) = KdfLimits::default().check(kdf) {
        eprintln!(
            "warning: this keyslot's {} = {} is above the default unlock limit {}; opening it \
             will need --allow-expensive-kdf (nbdcryptd and nbdcryptctl)",
            l.param, l.value, l.cap
        );
    }
}

impl KdfLimitArgs {
    pub fn limits(self) -> KdfLimits {
        if self.allow_expensive_kdf {
            KdfLimits::allow_expensive()
        } else {
            KdfLimits::default()
        }
    }
}

#[derive(Args, Debug)]
pub struct AddKeyArgs {
    /// Volume file, block device, or NBD URI (nbd+unix:///EXPORT?socket=PATH, nbds://HOST/EXPORT).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// Existing passphrase from this file (bytes as-is; `-` = standard input).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// New passphrase from this file (bytes as-is; `-` = standard input).
    #[arg(long, value_name = "FILE")]
    pub new_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub pbkdf: PbkdfArgs,
    /// Append a JSON line for this key event to this file (nbdcrypt audit log).
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    #[command(flatten)]
    pub kdf_limits: KdfLimitArgs,
}

#[derive(Args, Debug)]
pub struct RemoveKeyArgs {
    /// Volume file, block device, or NBD URI (nbd+unix:///EXPORT?socket=PATH, nbds://HOST/EXPORT).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// Keyslot to remove.
    #[arg(long, value_name = "N")]
    pub slot: u32,
    /// Passphrase of another keyslot from this file (bytes as-is; `-` = standard input).
    #[arg(long, value_name = "FILE", conflicts_with = "force")]
    pub key_file: Option<PathBuf>,
    /// Remove without asking for another keyslot's passphrase.
    #[arg(long)]
    pub force: bool,
    /// Append a JSON line for this key event to this file (nbdcrypt audit log).
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    #[command(flatten)]
    pub kdf_limits: KdfLimitArgs,
}

#[derive(Args, Debug)]
pub struct ChangeKeyArgs {
    /// Volume file, block device, or NBD URI (nbd+unix:///EXPORT?socket=PATH, nbds://HOST/EXPORT).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// The keyslot to change (default: the one the old passphrase opens).
    #[arg(long, value_name = "N")]
    pub slot: Option<u32>,
    /// Old passphrase from this file (bytes as-is; `-` = standard input).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// New passphrase from this file (bytes as-is; `-` = standard input).
    #[arg(long, value_name = "FILE")]
    pub new_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub pbkdf: PbkdfArgs,
    /// Append a JSON line for this key event to this file (nbdcrypt audit log).
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    #[command(flatten)]
    pub kdf_limits: KdfLimitArgs,
}

#[derive(Args, Debug)]
pub struct TestKeyArgs {
    /// Volume file, block device, or NBD URI (nbd+unix:///EXPORT?socket=PATH, nbds://HOST/EXPORT).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// Passphrase from this file (bytes as-is; `-` = standard input).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Only try this keyslot.
    #[arg(long, value_name = "N")]
    pub slot: Option<u32>,
    #[command(flatten)]
    pub kdf_limits: KdfLimitArgs,
    /// On success print {"volume", "keyslot"} as JSON (failures: message on stderr, exit code).
    #[arg(long)]
    pub json: bool,
}

/// Unlocks with every data keyslot (or only `slot`); a wrong passphrase becomes `NoKey`.
fn unlock(
    vol: &Volume,
    hdr: &Luks2Header,
    pass: &nbdcrypt::crypto::keys::SecretBytes,
    slot: Option<u32>,
    limits: KdfLimits,
) -> anyhow::Result<(VolumeKey, u32)> {
    match slot {
        None => hdr
            .unlock(&vol.io, pass, &limits)
            .map_err(|e| vol.explain(e)),
        Some(s) => match hdr.unlock_slot(&vol.io, s, pass, &limits) {
            Ok(k) => Ok((k, s)),
            Err(FormatError::WrongPassphrase) => Err(anyhow::Error::new(NoKey(format!(
                "{NO_KEY_MESSAGE} in keyslot {s}"
            )))),
            Err(e) => Err(vol.explain(e)),
        },
    }
}

pub fn test(a: TestKeyArgs) -> anyhow::Result<()> {
    let vol = Volume::open(&a.volume, false)?;
    let hdr = vol.header(false)?;
    if let Some(s) = a.slot {
        if !hdr.keyslots().iter().any(|k| k.id == s) {
            bail!("{}: keyslot {s} does not exist", vol.path.display());
        }
    }
    let pass = read_existing(
        &Source::from_arg(a.key_file.as_deref()),
        &format!("Enter passphrase for {}: ", vol.path.display()),
    )?;
    let (_key, slot) = unlock(&vol, &hdr, &pass, a.slot, a.kdf_limits.limits())?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"volume": vol.path.display().to_string(), "uuid": hdr.uuid(), "keyslot": slot})
        );
        return Ok(());
    }
    println!("keyslot {slot} unlocked");
    Ok(())
}

pub fn add(a: AddKeyArgs) -> anyhow::Result<Option<u32>> {
    let old_src = Source::from_arg(a.key_file.as_deref());
    let new_src = Source::from_arg(a.new_key_file.as_deref());
    check_distinct(&old_src, &new_src)?;
    a.pbkdf.precheck()?;
    let vol = Volume::open(&a.volume, true)?;
    let mut hdr = vol.header(true)?;
    let p = vol.path.display();
    let old = read_existing(
        &old_src,
        &format!("Enter any existing passphrase for {p}: "),
    )?;
    let (key, opened) = unlock(&vol, &hdr, &old, None, a.kdf_limits.limits())?;
    drop(old);
    eprintln!("keyslot {opened} unlocked");
    let new = read_new(&new_src, "Enter new passphrase for key slot: ")?;
    let kdf = a.pbkdf.resolve(key.len())?;
    warn_if_expensive(&kdf);
    let slot = hdr
        .add_keyslot(&vol.io, &key, &new, &kdf)
        .map_err(|e| vol.explain(e))?;
    println!("added keyslot {slot}: {}", describe_kdf(&kdf));
    Ok(Some(slot))
}

pub fn remove(a: RemoveKeyArgs) -> anyhow::Result<Option<u32>> {
    let vol = Volume::open(&a.volume, true)?;
    let mut hdr = vol.header(true)?;
    let p = vol.path.display();
    let slots = hdr.keyslots();
    let Some(target) = slots.iter().find(|k| k.id == a.slot) else {
        bail!("{p}: keyslot {} does not exist", a.slot);
    };
    let others: Vec<u32> = slots
        .iter()
        .filter(|k| k.for_data && k.id != a.slot)
        .map(|k| k.id)
        .collect();
    if target.for_data && others.is_empty() {
        bail!(
            "{p}: refusing to remove keyslot {}: it is the last keyslot that opens the volume \
             (the data would be lost)",
            a.slot
        );
    }
    if !a.force {
        let pass = read_existing(
            &Source::from_arg(a.key_file.as_deref()),
            &format!(
                "Enter any remaining passphrase for {p} (not that of keyslot {}): ",
                a.slot
            ),
        )?;
        let limits = a.kdf_limits.limits();
        let mut opened = None;
        let mut other_err = None;
        for id in &others {
            match hdr.unlock_slot(&vol.io, *id, &pass, &limits) {
                Ok(_) => {
                    opened = Some(*id);
                    break;
                }
                Err(FormatError::WrongPassphrase) | Err(FormatError::KeyslotUnusable { .. }) => {}
                Err(e) => {
                    other_err.get_or_insert(e);
                }
            }
        }
        match (opened, other_err) {
            (Some(id), _) => eprintln!("keyslot {id} unlocked"),
            (None, Some(e)) => return Err(vol.explain(e)),
            (None, None) => {
                return Err(anyhow::Error::new(NoKey(format!(
                    "{NO_KEY_MESSAGE} in a keyslot other than {} (pass the passphrase of a \
                     keyslot you keep, or --force)",
                    a.slot
                ))))
            }
        }
    }
    hdr.remove_keyslot(&vol.io, a.slot)
        .map_err(|e| vol.explain(e))?;
    println!("removed keyslot {}", a.slot);
    Ok(Some(a.slot))
}

pub fn change(a: ChangeKeyArgs) -> anyhow::Result<Option<u32>> {
    let old_src = Source::from_arg(a.key_file.as_deref());
    let new_src = Source::from_arg(a.new_key_file.as_deref());
    check_distinct(&old_src, &new_src)?;
    a.pbkdf.precheck()?;
    let vol = Volume::open(&a.volume, true)?;
    let mut hdr = vol.header(true)?;
    let p = vol.path.display();
    if let Some(s) = a.slot {
        if !hdr.keyslots().iter().any(|k| k.id == s) {
            bail!("{p}: keyslot {s} does not exist");
        }
    }
    let old = read_existing(
        &old_src,
        &format!("Enter passphrase to be changed for {p}: "),
    )?;
    // Check the old passphrase before asking for the new one.
    let limits = a.kdf_limits.limits();
    let (key, opened) = unlock(&vol, &hdr, &old, None, limits)?;
    if let Some(s) = a.slot {
        if s != opened {
            bail!("{p}: the passphrase opens keyslot {opened}, not keyslot {s}");
        }
    }
    eprintln!("keyslot {opened} unlocked");
    let new = read_new(&new_src, "Enter new passphrase: ")?;
    let kdf = a.pbkdf.resolve(key.len())?;
    warn_if_expensive(&kdf);
    drop(key);
    let slot = hdr
        .change_passphrase(&vol.io, &old, &new, &kdf, &limits)
        .map_err(|e| vol.explain(e))?;
    if slot != opened {
        return Err(anyhow!("{p}: changed keyslot {slot} (expected {opened})"));
    }
    println!(
        "changed the passphrase of keyslot {slot}: {}",
        describe_kdf(&kdf)
    );
    Ok(Some(slot))
}
