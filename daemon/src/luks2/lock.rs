//! Metadata locking compatible with cryptsetup: `flock` on the image file itself for regular
//! files, on `/run/cryptsetup/L_<major>:<minor>` for block devices. Readers take it shared,
//! writers exclusive, held only around header I/O.
//!
//! flock locks belong to the open file description: the guard locks a `try_clone` of the
//! caller's `File`, so never take a second guard on the same `File` while holding one (that would
//! convert, then drop, the first lock). Internal code takes one guard per public operation.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};

use super::error::FormatError;

/// cryptsetup's lock directory for block devices.
const LOCK_DIR: &str = "/run/cryptsetup";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// Held lock; released on drop.
pub struct HeaderLock {
    _flock: Flock<File>,
}

/// Takes the header lock through the device's hook; `None` where it cannot lock (best effort).
pub(crate) fn lock(
    io: &dyn super::io::HeaderIo,
    mode: LockMode,
) -> Result<Option<HeaderLock>, FormatError> {
    io.lock_header(mode)
}

pub(crate) fn lock_file(file: &File, mode: LockMode) -> Result<HeaderLock, FormatError> {
    let meta = file
        .metadata()
        .map_err(|e| FormatError::io("reading file metadata", 0, e))?;
    let (target, path) = if meta.file_type().is_block_device() {
        let path = block_lock_path(meta.rdev());
        (open_lock_file(&path)?, path)
    } else {
        let clone = file.try_clone().map_err(|e| FormatError::Lock {
            path: "(image file)".into(),
            source: e,
        })?;
        (clone, PathBuf::from("(image file)"))
    };
    let arg = match mode {
        LockMode::Shared => FlockArg::LockShared,
        LockMode::Exclusive => FlockArg::LockExclusive,
    };
    let flock = Flock::lock(target, arg).map_err(|(_, errno)| FormatError::Lock {
        path: path.display().to_string(),
        source: std::io::Error::from_raw_os_error(errno as i32),
    })?;
    Ok(HeaderLock { _flock: flock })
}

fn block_lock_path(rdev: u64) -> PathBuf {
    // glibc's gnu_dev_major/minor encoding.
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
    PathBuf::from(format!("{LOCK_DIR}/L_{major}:{minor}"))
}

fn open_lock_file(path: &PathBuf) -> Result<File, FormatError> {
    let err = |e| FormatError::Lock {
        path: path.display().to_string(),
        source: e,
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(LOCK_DIR)
        .map_err(err)?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_lock_path_uses_major_minor() {
        // 8:16 (sdb) in the Linux dev_t encoding.
        assert_eq!(
            block_lock_path((8 << 8) | 16),
            PathBuf::from("/run/cryptsetup/L_8:16")
        );
        // 259:3 (nvme) and a large minor.
        let rdev = (259u64 << 8) | 0x23 | ((0x123u64 & !0xff) << 12);
        assert_eq!(
            block_lock_path(rdev),
            PathBuf::from("/run/cryptsetup/L_259:291")
        );
    }

    #[test]
    fn exclusive_lock_excludes_another_open_file_description() {
        let f = tempfile::tempfile().unwrap();
        let _g = lock_file(&f, LockMode::Exclusive).unwrap();
        // A second, independent open of the same file cannot get the lock.
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
        let other = File::open(path).unwrap();
        let r = Flock::lock(other, FlockArg::LockSharedNonblock);
        assert!(r.is_err());
    }
}
