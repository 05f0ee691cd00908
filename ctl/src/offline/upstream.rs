//! `format` and `dump` of a volume on an upstream NBD export (`nbd://`, `nbds://`,
//! `nbd+unix://`, `nbds+unix://`): the header is read and written over NBD. There is no claim
//! and no header lock on an upstream (best effort): make sure no nbdcryptd serves it meanwhile.

use std::io::{self, Write};

use anyhow::{anyhow, bail};

use nbdcrypt::luks2::{format, FormatParams, HeaderIo, Luks2Header};
use nbdcrypt::upstream::UpstreamDevice;

use super::dump::DumpArgs;
use super::format::FormatArgs;
use super::{bytes_human, confirmed, describe_kdf};
use crate::secret_input::{read_new, Source};

/// Whether a VOLUME argument names an upstream NBD export.
pub fn is_uri(p: &std::path::Path) -> bool {
    p.to_str().is_some_and(nbdcrypt::upstream::is_upstream_uri)
}

fn open(uri: &str, write: bool) -> anyhow::Result<UpstreamDevice> {
    let up = nbdcrypt::upstream::open(uri, write).map_err(|e| anyhow!("{e}"))?;
    Ok(UpstreamDevice::new(up, !write, false))
}

pub fn format_run(a: FormatArgs) -> anyhow::Result<()> {
    let uri = a.volume.to_string_lossy().into_owned();
    if a.size.is_some() {
        bail!("--size creates local files; an upstream export has the size its server gives it");
    }
    let label = a.label.clone().unwrap_or_default();
    if label.len() > 47 || label.contains('\0') {
        bail!("--label must be at most 47 bytes");
    }
    a.pbkdf.precheck()?;
    let dev = open(&uri, true)?;
    let size = HeaderIo::size(&dev).map_err(|e| anyhow!("{uri}: {e}"))?;
    let mut params = FormatParams::new(nbdcrypt::luks2::KdfParams::Pbkdf2 {
        hash: nbdcrypt::luks2::HashAlg::Sha256,
        iterations: 1000,
    });
    let min_size = params.data_offset + u64::from(a.sector_size);
    if size < min_size {
        bail!(
            "{uri} is too small: {}; a LUKS2 volume needs at least {min_size} bytes",
            bytes_human(size)
        );
    }
    if !(size - params.data_offset).is_multiple_of(u64::from(a.sector_size)) {
        bail!(
            "{uri}: the data area is not a multiple of the sector size {}",
            a.sector_size
        );
    }
    let mut first = [0u8; 4096];
    dev.pread_exact(&mut first, 0)
        .map_err(|e| anyhow!("{uri}: cannot read: {e}"))?;
    let what = if first.starts_with(b"LUKS\xba\xbe") {
        Some(match Luks2Header::read_metadata_only(&dev) {
            Ok((h, _)) => format!("already contains a LUKS2 volume (uuid {})", h.uuid()),
            Err(_) => "already contains a LUKS header".to_owned(),
        })
    } else if first.iter().any(|&b| b != 0) {
        Some("is not empty: its first 4 KiB contain data".to_owned())
    } else {
        None
    };
    if let Some(what) = what {
        confirmed(
            a.yes,
            &format!(
                "WARNING: {uri} {what}.\nFormatting overwrites it irrevocably (and no lock \
                 protects an upstream: make sure no nbdcryptd serves it)."
            ),
        )?;
    }
    let passphrase = read_new(
        &Source::from_arg(a.key_file.as_deref()),
        &format!("Enter passphrase for {uri}: "),
    )?;
    let key_size = a.key_size / 8;
    let kdf = a.pbkdf.resolve(key_size as usize)?;
    params.kdf = kdf;
    params.key_size = key_size;
    params.sector_size = a.sector_size;
    params.label = label;
    params.digest_iterations = a.pbkdf.digest_iterations();
    let (hdr, key) = format(&dev, &params, &passphrase).map_err(|e| anyhow!("{uri}: {e}"))?;
    drop(key);
    drop(passphrase);
    dev.sync_durable()
        .map_err(|e| anyhow!("{uri}: cannot flush: {e}"))?;
    let seg = hdr.data_segment();
    println!("formatted {uri} as LUKS2");
    println!("  uuid:          {}", hdr.uuid());
    println!(
        "  cipher:        aes-xts-plain64, {}-bit key",
        seg.key_size.unwrap_or(0) * 8
    );
    println!("  sector size:   {} bytes", seg.sector_size);
    println!("  data offset:   {}", bytes_human(seg.offset));
    println!(
        "  exported size: {}",
        bytes_human(size.saturating_sub(seg.offset))
    );
    println!("  keyslot 0:     {}", describe_kdf(&kdf));
    Ok(())
}

pub fn dump_run(a: DumpArgs) -> anyhow::Result<()> {
    let uri = a.volume.to_string_lossy().into_owned();
    if a.dump_volume_key {
        bail!("--dump-volume-key is not supported on an upstream export yet");
    }
    let dev = open(&uri, false)?;
    // A probe first, so an upstream failure is reported with its reason.
    dev.pread_exact(&mut [0u8; 4096], 0)
        .map_err(|e| anyhow!("{uri}: cannot read the header: {e}"))?;
    let (hdr, _) = Luks2Header::read_metadata_only(&dev).map_err(|e| anyhow!("{uri}: {e}"))?;
    let mut out = io::stdout().lock();
    if a.json {
        let v = super::dump::to_json(&hdr);
        serde_json::to_writer_pretty(&mut out, &v)
            .map_err(io::Error::from)
            .and_then(|()| writeln!(out))?;
    } else {
        super::dump::write_text_for(&mut out, &uri, &hdr)?;
    }
    Ok(())
}
