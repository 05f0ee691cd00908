//! `nbdcryptd --demo`: a self-contained volume to try nbdcrypt with, no setup needed.
//!
//! DIR/demo.key   32 random bytes as hex (a key file, as `cryptsetup --key-file` reads it)
//! DIR/volume.img 256 MiB sparse LUKS2 volume, aes-xts-plain64, 4096-byte sectors
//! Existing files are reused, so data written in one demo run is there in the next.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::crypto::kdf::KdfParams;
use crate::crypto::keys::SecretBytes;
use crate::luks2::{self, FormatParams};

pub const VOLUME_SIZE: u64 = 256 << 20;

/// Paths of the demo's files.
pub struct DemoFiles {
    pub key: PathBuf,
    pub volume: PathBuf,
    /// True when this run created the volume.
    pub created: bool,
}

/// Create what is missing in `dir`.
pub fn prepare(dir: &Path) -> Result<DemoFiles, String> {
    let ctx =
        |what: &str, p: &Path, e: &dyn std::fmt::Display| format!("{what} {}: {e}", p.display());
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ctx("cannot create", dir, &e))?;
    let key = dir.join("demo.key");
    if !key.exists() {
        let mut raw = SecretBytes::zeroed(32);
        getrandom::fill(raw.expose_secret_mut()).map_err(|e| format!("no randomness: {e}"))?;
        let hex = hex(&raw);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .map_err(|e| ctx("cannot create", &key, &e))?;
        f.write_all(hex.expose_secret())
            .map_err(|e| ctx("cannot write", &key, &e))?;
    }
    let volume = dir.join("volume.img");
    let created = !volume.exists();
    if created {
        let secret = read_key_file(&key)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&volume)
            .map_err(|e| ctx("cannot create", &volume, &e))?;
        f.set_len(VOLUME_SIZE)
            .map_err(|e| ctx("cannot size", &volume, &e))?;
        // The key file is 256 random bits, so a light KDF costs an attacker nothing extra.
        let kdf = KdfParams::Argon2id {
            time: 4,
            memory_kib: 64 * 1024,
            cpus: 2,
        };
        let mut params = FormatParams::new(kdf);
        params.label = "nbdcrypt-demo".into();
        luks2::format(&f, &params, &secret).map_err(|e| ctx("cannot format", &volume, &e))?;
        f.sync_all().map_err(|e| ctx("cannot sync", &volume, &e))?;
    }
    Ok(DemoFiles {
        key,
        volume,
        created,
    })
}

/// A key file's bytes, used as they are (cryptsetup's --key-file semantics).
pub fn read_key_file(path: &Path) -> Result<SecretBytes, String> {
    crate::secret_file::read_file(path, crate::secret_file::Kind::KeyFile)
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))
}

/// Hex digits of a secret, straight into wiped memory.
fn hex(raw: &SecretBytes) -> SecretBytes {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = SecretBytes::zeroed(raw.len() * 2);
    for (i, b) in raw.expose_secret().iter().enumerate() {
        out.expose_secret_mut()[2 * i] = DIGITS[usize::from(b >> 4)];
        out.expose_secret_mut()[2 * i + 1] = DIGITS[usize::from(b & 15)];
    }
    out
}
