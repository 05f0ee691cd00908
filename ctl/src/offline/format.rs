//! `format`: a new LUKS2 volume, like `cryptsetup luksFormat --type luks2`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::Args;

use nbdcrypt::luks2::{format, FormatParams, HeaderIo, Luks2Header, VolumeIo};

use super::{bytes_human, confirmed, describe_kdf, PbkdfArgs, Volume};
use crate::secret_input::{io_reason, read_new, Source};

pub const ABOUT: &str = "\
Create a new LUKS2 volume on a file or block device: cipher aes-xts-plain64, a random volume key,
and keyslot 0 for the passphrase. The data area starts 16 MiB into the volume; the exported size
is the rest. The result opens with cryptsetup as well as with nbdcryptd.

Everything on the volume becomes unreadable. nbdcryptctl refuses to format anything that looks
like LUKS or has data in its first 4 KiB unless you type YES (or pass --yes).

The keyslot KDF defaults to argon2id benchmarked to take --iter-time (2 s) with at most 1 GiB of
memory (and half the RAM), as cryptsetup does.";

pub const EXAMPLES: &str = "\
Examples:
  nbdcryptctl format /srv/vol.img --size 20G    # creates a 20 GiB file, asks the passphrase twice
  nbdcryptctl format /dev/sdb --label backups   # a block device
  head -c 64 /dev/urandom > key.bin             # a random binary key file...
  nbdcryptctl format vol.img --size 1G --key-file key.bin --yes    # ...used as-is
  nbdcryptctl format vol.img --sector-size 512 --key-size 256 --pbkdf pbkdf2 --iter-time 1000
  nbdcryptctl format 'nbd+unix:///disk?socket=/run/up.sock'  # an export of another NBD server";

#[derive(Args, Debug)]
pub struct FormatArgs {
    /// Volume file, block device, or NBD URI (nbd+unix:///EXPORT?socket=PATH, nbds://HOST/EXPORT).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// Create VOLUME as a file of this size if it does not exist (bytes, or with a K/M/G/T
    /// suffix, powers of 1024).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Read the new passphrase from this file (bytes as-is; `-` = standard input).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Encryption sector size in bytes.
    #[arg(long, value_name = "512|1024|2048|4096", default_value_t = 4096,
          value_parser = parse_sector_size)]
    pub sector_size: u32,
    /// Volume key size in bits: 512 = AES-256-XTS, 256 = AES-128-XTS.
    #[arg(long, value_name = "256|512", default_value_t = 512, value_parser = parse_key_size)]
    pub key_size: u32,
    #[command(flatten)]
    pub pbkdf: PbkdfArgs,
    /// Header label (at most 47 bytes).
    #[arg(long, value_name = "LABEL")]
    pub label: Option<String>,
    /// Do not ask for confirmation before overwriting existing data.
    #[arg(long)]
    pub yes: bool,
}

fn parse_sector_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (512 | 1024 | 2048 | 4096)) => Ok(n),
        _ => Err(format!(
            "{s:?}: the sector size must be 512, 1024, 2048 or 4096"
        )),
    }
}

fn parse_key_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (256 | 512)) => Ok(n),
        _ => Err(format!(
            "{s:?}: the key size must be 256 or 512 bits (aes-xts)"
        )),
    }
}

/// `1024`, `64K`, `16M`, `20G`, `1T`, `512MiB`: bytes, powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 1073741824, 512M, 20G)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

pub fn run(a: FormatArgs) -> anyhow::Result<()> {
    let key_size = a.key_size / 8;
    let label = a.label.clone().unwrap_or_default();
    if label.len() > 47 || label.contains('\0') {
        bail!("--label must be at most 47 bytes");
    }
    a.pbkdf.precheck()?;
    let path = &a.volume;
    let mut params_probe = FormatParams::new(nbdcrypt::luks2::KdfParams::Pbkdf2 {
        hash: nbdcrypt::luks2::HashAlg::Sha256,
        iterations: 1000,
    });
    let data_offset = params_probe.data_offset;
    let min_size = data_offset + u64::from(a.sector_size);

    if let Some(uri) = super::upstream::uri_of(path) {
        if a.size.is_some() {
            bail!(
                "--size creates local files; the NBD export {uri} has the size its server gives \
                 it (e.g. nbdkit memory SIZE, or the size of the file nbdkit serves)"
            );
        }
        let vol = Volume::open(path, true)?;
        return format_open(
            &vol,
            &a,
            false,
            key_size,
            label,
            &mut params_probe,
            min_size,
        );
    }

    // Open or create the target. A file we create is removed again if formatting fails.
    let created;
    // A block device is opened exclusively: the kernel refuses (EBUSY) if it is mounted or held
    // by device-mapper, md, another exclusive opener...
    let is_block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if is_block {
        opts.custom_flags(nix::fcntl::OFlag::O_EXCL.bits());
    }
    let file = match opts.open(path) {
        Ok(f) => {
            created = false;
            if let Some(want) = a.size {
                let meta = f
                    .metadata()
                    .map_err(|e| anyhow!("cannot stat {}: {}", path.display(), io_reason(&e)))?;
                if !meta.is_file() || meta.len() != want {
                    bail!(
                        "{} already exists ({}); --size only creates new files (remove it, or \
                         format it without --size)",
                        path.display(),
                        bytes_human(meta.len())
                    );
                }
            }
            f
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let Some(size) = a.size else {
                bail!(
                    "cannot open {}: no such file or directory (pass --size to create it)",
                    path.display()
                );
            };
            check_size(size, min_size, a.sector_size)?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| anyhow!("cannot create {}: {}", path.display(), io_reason(&e)))?;
            created = true;
            if let Err(e) = f.set_len(size) {
                let _ = std::fs::remove_file(path);
                bail!(
                    "cannot size {} to {size} bytes: {}",
                    path.display(),
                    io_reason(&e)
                );
            }
            f
        }
        Err(e) if is_block && e.raw_os_error() == Some(nix::libc::EBUSY) => bail!(
            "cannot open {} exclusively: the device is in use (mounted, open in cryptsetup or \
             device-mapper, or served by nbdcryptd)",
            path.display()
        ),
        Err(e) => bail!("cannot open {}: {}", path.display(), io_reason(&e)),
    };
    // Never format a volume a daemon serves; hold the claim while formatting.
    if let Err(e) = super::claim(&file, path) {
        if created {
            let _ = std::fs::remove_file(path);
        }
        return Err(e);
    }
    let vol = Volume {
        path: path.clone(),
        io: VolumeIo::Local(file),
    };
    let result = format_open(
        &vol,
        &a,
        created,
        key_size,
        label,
        &mut params_probe,
        min_size,
    );
    if result.is_err() && created {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn check_size(size: u64, min_size: u64, sector: u32) -> anyhow::Result<()> {
    if size < min_size {
        bail!(
            "--size {size} is too small: the header takes 16 MiB and the data at least one \
             sector ({min_size} bytes in all)"
        );
    }
    if !size.is_multiple_of(u64::from(sector)) {
        bail!("--size {size} is not a multiple of the sector size {sector}");
    }
    Ok(())
}

fn format_open(
    vol: &Volume,
    a: &FormatArgs,
    created: bool,
    key_size: u32,
    label: String,
    params: &mut FormatParams,
    min_size: u64,
) -> anyhow::Result<()> {
    let p = vol.path.display();
    let size = match vol.io.local_file() {
        Some(file) => device_size(file),
        None => HeaderIo::size(&vol.io).context("cannot find the export's size"),
    }
    .map_err(|e| anyhow!("{p}: {e:#}"))?;
    if size < min_size {
        bail!(
            "{p} is too small: {}; a LUKS2 volume needs at least {min_size} bytes (16 MiB of \
             header plus one sector)",
            bytes_human(size)
        );
    }
    if !(size - params.data_offset).is_multiple_of(u64::from(a.sector_size)) {
        bail!(
            "{p}: size {size} leaves a data area that is not a multiple of the sector size {} \
             (choose a smaller --sector-size or resize the file)",
            a.sector_size
        );
    }
    if !created {
        if let Some(what) = existing_content(&vol.io).map_err(|e| anyhow!("{p}: {e}"))? {
            let unlocked = if vol.io.is_upstream() {
                "\nNo lock protects an NBD export: make sure no nbdcryptd serves it."
            } else {
                ""
            };
            confirmed(
                a.yes,
                &format!("WARNING: {p} {what}.\nFormatting overwrites it irrevocably.{unlocked}"),
            )?;
        }
    }
    let passphrase = read_new(
        &Source::from_arg(a.key_file.as_deref()),
        &format!("Enter passphrase for {p}: "),
    )?;
    let kdf = a.pbkdf.resolve(key_size as usize)?;
    params.kdf = kdf;
    params.key_size = key_size;
    params.sector_size = a.sector_size;
    params.label = label;
    params.digest_iterations = a.pbkdf.digest_iterations();
    let (hdr, key) = format(&vol.io, params, &passphrase).map_err(|e| vol.explain(e))?;
    drop(key);
    drop(passphrase);
    vol.io
        .sync_durable()
        .map_err(|e| anyhow!("{p}: cannot sync: {}", io_reason(&e)))?;
    print_summary(vol, &hdr, size, &kdf);
    Ok(())
}

fn print_summary(vol: &Volume, hdr: &Luks2Header, size: u64, kdf: &nbdcrypt::luks2::KdfParams) {
    let seg = hdr.data_segment();
    let bits = seg.key_size.unwrap_or(0) * 8;
    println!("formatted {} as LUKS2", vol.path.display());
    println!("  uuid:          {}", hdr.uuid());
    if !hdr.label().is_empty() {
        println!("  label:         {}", hdr.label());
    }
    println!("  cipher:        aes-xts-plain64, {bits}-bit key");
    println!("  sector size:   {} bytes", seg.sector_size);
    println!("  data offset:   {}", bytes_human(seg.offset));
    println!(
        "  exported size: {}",
        bytes_human(size.saturating_sub(seg.offset))
    );
    println!("  keyslot 0:     {}", describe_kdf(kdf));
}

/// What a non-empty target holds, if anything: a LUKS header, or data in its first 4 KiB.
fn existing_content(file: &dyn HeaderIo) -> anyhow::Result<Option<String>> {
    let mut buf = [0u8; 4096];
    let size = file
        .size()
        .map_err(|e| anyhow!("cannot find the size: {}", io_reason(&e)))?;
    let n = usize::try_from(size.min(buf.len() as u64)).unwrap_or(buf.len());
    file.pread_exact(&mut buf[..n], 0)
        .map_err(|e| anyhow!("cannot read: {}", io_reason(&e)))?;
    if buf.starts_with(b"LUKS\xba\xbe") {
        let version = u16::from_be_bytes([buf[6], buf[7]]);
        return Ok(Some(match Luks2Header::read_metadata_only(file) {
            Ok((h, _)) => format!("already contains a LUKS2 volume (uuid {})", h.uuid()),
            Err(_) => format!("already contains a LUKS{version} header"),
        }));
    }
    if buf[..n].iter().any(|&b| b != 0) {
        return Ok(Some("is not empty: its first 4 KiB contain data".into()));
    }
    Ok(None)
}

/// Size of a regular file or block device, in bytes.
fn device_size(file: &File) -> anyhow::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let meta = file.metadata().context("cannot stat")?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // Block devices report 0 in metadata; seeking to the end gives the size.
    let mut f = file;
    let end = f
        .seek(SeekFrom::End(0))
        .context("cannot find the device size")?;
    f.seek(SeekFrom::Start(0)).context("cannot seek")?;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_use_powers_of_1024() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
