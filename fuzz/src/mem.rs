//! In-memory stand-ins for the real backing stores: a memfd (a `File` the LUKS2 code can take),
//! and a `BlockDevice` over a `Vec` for the NBD session.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use nbdcrypt::block::{BlockDevice, Caps, Error, ErrorKind, Extent, ZeroFlags};

thread_local! {
    static MEMFD: RefCell<Option<File>> = const { RefCell::new(None) };
}

fn new_memfd() -> File {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    match memfd_create(c"nbdcrypt-fuzz", MemFdCreateFlag::MFD_CLOEXEC) {
        Ok(fd) => File::from(fd),
        // No memfd (old kernel, seccomp): an unlinked file in /dev/shm (tmpfs) or the temp dir.
        Err(_) => {
            let dir = if std::path::Path::new("/dev/shm").is_dir() {
                std::path::PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            };
            let path = dir.join(format!("nbdcrypt-fuzz-{}", std::process::id()));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .expect("temporary file for the fuzz image");
            let _ = std::fs::remove_file(&path);
            f
        }
    }
}

/// Runs `f` on a memory-backed file holding `image`, extended (sparse, zeroes) to `len` bytes
/// if that is longer. The file is reused between runs.
pub fn with_image<R>(image: &[u8], len: u64, f: impl FnOnce(&File) -> R) -> R {
    MEMFD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let file = slot.get_or_insert_with(new_memfd);
        file.set_len(0).expect("truncate memfd");
        file.write_all_at(image, 0).expect("write memfd");
        let want = len.max(image.len() as u64);
        file.set_len(want).expect("extend memfd");
        f(file)
    })
}

/// A RAM disk. `trim` zeroes the range (the plaintext above it becomes garbage, as after a
/// real discard under dm-crypt).
pub struct MemDevice {
    pub data: Mutex<Vec<u8>>,
    pub trim: bool,
}

impl MemDevice {
    pub fn new(size: usize, trim: bool) -> MemDevice {
        MemDevice { data: Mutex::new(vec![0u8; size]), trim }
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, Error> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(Error::new(ErrorKind::OutOfRange)),
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn caps(&self) -> Caps {
        Caps {
            read_only: false,
            trim: self.trim,
            fast_zero: false,
            min_block: 512,
            preferred_block: 4096,
            rotational: false,
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<(), Error> {
        let r = self.range(offset, buf.len() as u64)?;
        self.data.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64, _fua: bool) -> Result<(), Error> {
        let r = self.range(offset, length)?;
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, length: u64, _flags: ZeroFlags) -> Result<(), Error> {
        let r = self.range(offset, length)?;
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn cache(&self, offset: u64, length: u64) -> Result<(), Error> {
        self.range(offset, length).map(|_| ())
    }
    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error> {
        let r = self.range(offset, length)?;
        Ok(vec![Extent { length: r.len() as u64, hole: false, zero: false }])
    }
}
