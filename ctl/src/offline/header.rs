//! `header-backup` and `header-restore` (cryptsetup's `luksHeaderBackup/Restore`).

use std::path::PathBuf;

use clap::Args;

use nbdcrypt::luks2::{header_backup, header_restore_with_progress, Luks2Header};

use super::{bytes_human, confirmed, Volume};

pub const BACKUP_ABOUT: &str = "\
Copy the LUKS2 header and keyslots area (the first 16 MiB by default, exactly what cryptsetup's
luksHeaderBackup saves) to a new file with mode 0600. The file is never overwritten.

Keep the backup as safe as the volume: with it, any passphrase that was valid when it was made
opens the volume, even after that passphrase has been removed from the volume itself.";

pub const BACKUP_EXAMPLES: &str = "\
Examples:
  nbdcryptctl header-backup /srv/vol.img --file /root/vol.header
  cryptsetup luksHeaderRestore /srv/vol.img --header-backup-file /root/vol.header   # also works";

pub const RESTORE_ABOUT: &str = "\
Replace the LUKS2 header and every keyslot of a volume with a backup made by header-backup or
cryptsetup luksHeaderBackup. The backup is validated first; if the volume still has a readable
header, the backup must have the same UUID and data offset.

All current keyslots are replaced: passphrases added after the backup stop working, removed ones
work again. Asks you to type YES unless --yes.";

pub const RESTORE_EXAMPLES: &str = "\
Examples:
  nbdcryptctl header-restore /srv/vol.img --file /root/vol.header
  nbdcryptctl header-restore vol.img --file vol.header --yes";

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Volume file, block device, or NBD URI (nbd+unix:///EXPORT?socket=PATH, nbds://HOST/EXPORT).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// Backup file to create (must not exist).
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// Append a JSON line for this key event to this file (nbdcrypt audit log).
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Volume file, block device, or NBD URI (nbd+unix:///EXPORT?socket=PATH, nbds://HOST/EXPORT).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// Backup file made by header-backup or cryptsetup luksHeaderBackup.
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Append a JSON line for this key event to this file (nbdcrypt audit log).
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
}

pub fn backup(a: BackupArgs) -> anyhow::Result<()> {
    let vol = Volume::open(&a.volume, false)?;
    // Read first for a clear message (not LUKS2, ...); the backup re-reads under the lock.
    let hdr = vol.header_metadata_only()?;
    header_backup(&vol.io, &a.file).map_err(|e| vol.explain(e))?;
    println!(
        "header of {} (uuid {}) saved to {}: {}",
        vol.path.display(),
        hdr.uuid(),
        a.file.display(),
        bytes_human(hdr.metadata_end())
    );
    eprintln!(
        "keep it as safe as the volume: with it, every passphrase valid today opens the volume, \
         even after it is removed"
    );
    Ok(())
}

pub fn restore(a: RestoreArgs) -> anyhow::Result<()> {
    let vol = Volume::open(&a.volume, true)?;
    let p = vol.path.display();
    // Describe the backup before asking; header_restore validates it again.
    if super::upstream::is_uri(&a.file) {
        anyhow::bail!("the backup FILE must be a local file (copy it out with nbdcopy first)");
    }
    let backup = Volume::open(&a.file, false)?;
    let (b, _) = Luks2Header::read_metadata_only(&backup.io).map_err(|e| backup.explain(e))?;
    let current = match Luks2Header::read_metadata_only(&vol.io) {
        Ok((h, _)) => format!(
            "its current header (uuid {}, {} keyslots)",
            h.uuid(),
            h.keyslots().len()
        ),
        Err(_) => "its current header (unreadable)".to_owned(),
    };
    confirmed(
        a.yes,
        &format!(
            "WARNING: restoring {} (uuid {}, {} keyslots) onto {p} replaces {current} and all its \
             keyslots.",
            a.file.display(),
            b.uuid(),
            b.keyslots().len()
        ),
    )?;
    // The keyslots area (16 MiB by default, up to 128 MiB) is copied first: a bar on a terminal,
    // a line per tenth otherwise (crate::progress).
    let mut bar: Option<crate::progress::Progress> = None;
    let hdr = header_restore_with_progress(&vol.io, &a.file, &mut |done, total| {
        bar.get_or_insert_with(|| crate::progress::Progress::new("restoring keyslots area", total))
            .set(done);
    })
    .map_err(|e| vol.explain(e))?;
    if let Some(mut b) = bar {
        b.finish();
    }
    println!(
        "restored the header of {p} from {} (uuid {}, {} keyslots)",
        a.file.display(),
        hdr.uuid(),
        hdr.keyslots().len()
    );
    Ok(())
}
