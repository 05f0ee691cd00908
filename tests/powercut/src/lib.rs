//! powercut: a FUSE passthrough filesystem for power-loss tests.
//!
//! Everything written through the mount that has not been made durable lives in memory only, as it
//! would in a disk's volatile cache plus the page cache: reads see it, the backing directory does
//! not. `fsync`/`fdatasync` of a file (and every write through an `O_SYNC`/`O_DSYNC` descriptor)
//! writes that file's pending sectors and size to the backing file and syncs it. Namespace
//! operations (create, mkdir, unlink, rmdir, rename, symlink) are applied to the backing directory
//! at once but journalled; `fsync` of a directory commits the journal up to the last entry that
//! touches that directory. A **cut** throws away everything not durable (optionally keeping a
//! random subset of the pending 512-byte sectors: a torn write), undoes the uncommitted journal,
//! and switches the power off: every operation fails with EIO until the power is switched on
//! again; descriptors opened before the cut stay dead for good.
//!
//! Control: the file `/.powercut` in the mount (not listed by readdir). Write one command:
//! `cut`, `cut tear SEED`, `arm K` / `arm K tear SEED` (cut right after the K-th counted
//! operation from now), `disarm`, `on`. Reading it gives `ops N powered B pending_bytes P armed A
//! cuts C`. Counted operations: write, fsync, fdatasync, fsyncdir, truncate, create, mknod, mkdir,
//! unlink, rmdir, rename, symlink. See README.md for the model and where it differs from LazyFS.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

/// The sector size of the modelled disk: the unit a cut may tear at.
pub const SECTOR: u64 = 512;
/// Name of the control file in the root of the mount.
pub const CONTROL_NAME: &str = ".powercut";
/// Name of the directory in the backing root where unlinked entries wait for their commit.
pub const STASH_NAME: &str = ".powercut-stash";
const CONTROL_INO: u64 = 0x7fff_ffff_ffff_0001;
const ROOT_INO: u64 = fuser::FUSE_ROOT_ID;
const TTL: Duration = Duration::ZERO;

type Sector = Box<[u8; SECTOR as usize]>;

/// Pending (not yet durable) state of one regular file.
#[derive(Default)]
struct Pending {
    /// Sectors written since the last sync, each holding the file's full logical content.
    sectors: BTreeMap<u64, Sector>,
    /// The file's logical size.
    size: u64,
    /// Backing bytes at or past this offset are stale (cut off by a truncate) and read as zero.
    valid: u64,
}

impl Pending {
    fn bytes(&self) -> u64 {
        self.sectors.len() as u64 * SECTOR
    }
}

/// One namespace operation already applied to the backing directory, with what undoes it.
#[derive(Debug)]
enum Undo {
    /// A new file, directory or symlink at `path`: undone by removing it.
    Created { path: PathBuf },
    /// `path` was moved to `stash` (unlink/rmdir): undone by moving it back.
    Removed { path: PathBuf, stash: PathBuf },
    /// `from` was renamed to `to`; what `to` held before went to `replaced`.
    Renamed {
        from: PathBuf,
        to: PathBuf,
        replaced: Option<PathBuf>,
    },
}

impl Undo {
    fn touches(&self, dir: &Path) -> bool {
        let parent = |p: &PathBuf| p.parent().map(Path::to_path_buf).unwrap_or_default();
        match self {
            Undo::Created { path, .. } | Undo::Removed { path, .. } => parent(path) == dir,
            Undo::Renamed { from, to, .. } => parent(from) == dir || parent(to) == dir,
        }
    }
}

struct Handle {
    file: Option<File>,
    /// Writes through it are durable when they return (O_SYNC / O_DSYNC).
    sync: bool,
}

/// Counters and state visible to tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Counted (mutating) operations since mount.
    pub ops: u64,
    /// False between a cut and the next `on`.
    pub powered: bool,
    /// Bytes of pending sector data held in memory.
    pub pending_bytes: u64,
    /// Uncommitted namespace journal entries.
    pub pending_meta: usize,
    /// Cuts so far.
    pub cuts: u64,
    /// The op count at which an armed cut fires.
    pub armed_at: Option<u64>,
    /// Pending sector bytes the last cut found (and dropped, or tore).
    pub pending_at_last_cut: u64,
}

struct Core {
    backing: PathBuf,
    /// Inode numbers are never reused; a cut forgets all but the root's and the control file's.
    next_ino: u64,
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    pending: HashMap<u64, Pending>,
    journal: Vec<Undo>,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    next_stash: u64,
    ops: u64,
    powered: bool,
    cuts: u64,
    armed: Option<(u64, Option<u64>)>,
    control_reply: Vec<u8>,
    /// The kind of each counted operation (`op_log[i]` is operation `i + 1`).
    op_log: Vec<&'static str>,
    pending_at_last_cut: u64,
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// xorshift64*: tear patterns reproducible from a seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl Core {
    fn new(backing: PathBuf) -> io::Result<Core> {
        let stash = backing.join(STASH_NAME);
        // Leftovers of an earlier run are entries whose unlink was never committed nor undone.
        if stash.exists() {
            fs::remove_dir_all(&stash)?;
        }
        fs::create_dir(&stash)?;
        let mut c = Core {
            backing,
            next_ino: ROOT_INO + 1,
            paths: HashMap::new(),
            inos: HashMap::new(),
            pending: HashMap::new(),
            journal: Vec::new(),
            handles: HashMap::new(),
            next_fh: 1,
            next_stash: 0,
            ops: 0,
            powered: true,
            cuts: 0,
            armed: None,
            control_reply: Vec::new(),
            op_log: Vec::new(),
            pending_at_last_cut: 0,
        };
        c.paths.insert(ROOT_INO, PathBuf::new());
        c.inos.insert(PathBuf::new(), ROOT_INO);
        Ok(c)
    }

    fn status(&self) -> Status {
        Status {
            ops: self.ops,
            powered: self.powered,
            pending_bytes: self.pending.values().map(Pending::bytes).sum(),
            pending_meta: self.journal.len(),
            cuts: self.cuts,
            armed_at: self.armed.map(|(k, _)| k),
            pending_at_last_cut: self.pending_at_last_cut,
        }
    }

    fn full(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.backing.clone()
        } else {
            self.backing.join(rel)
        }
    }

    fn rel(&self, ino: u64) -> Result<PathBuf, i32> {
        self.paths.get(&ino).cloned().ok_or(libc::ESTALE)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, i32> {
        if name.as_bytes().contains(&b'/') || name == "." || name == ".." {
            return Err(libc::EINVAL);
        }
        let p = self.rel(parent)?;
        if p.as_os_str().is_empty() && (name == STASH_NAME || name == CONTROL_NAME) {
            return Err(libc::EPERM);
        }
        Ok(p.join(name))
    }

    fn ino_of(&mut self, rel: &Path) -> u64 {
        if let Some(&i) = self.inos.get(rel) {
            return i;
        }
        let i = self.next_ino;
        self.next_ino += 1;
        self.inos.insert(rel.to_path_buf(), i);
        self.paths.insert(i, rel.to_path_buf());
        i
    }

    /// Moves the table entries at `from` (and below it) to `to`.
    fn move_paths(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(u64, PathBuf)> = self
            .paths
            .iter()
            .filter(|(_, p)| p.starts_with(from))
            .map(|(&i, p)| (i, to.join(p.strip_prefix(from).unwrap_or(Path::new("")))))
            .collect();
        for (i, new) in moved {
            if let Some(old) = self.paths.insert(i, new.clone()) {
                if self.inos.get(&old) == Some(&i) {
                    self.inos.remove(&old);
                }
            }
            self.inos.insert(new, i);
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, i32> {
        if ino == CONTROL_INO {
            return Ok(control_attr(self.control_reply.len() as u64));
        }
        let rel = self.rel(ino)?;
        let md = fs::symlink_metadata(self.full(&rel)).map_err(|e| errno(&e))?;
        let mut a = attr_from(ino, &md);
        if let Some(p) = self.pending.get(&ino) {
            a.size = p.size;
            a.blocks = p.size.div_ceil(512);
        }
        Ok(a)
    }

    fn count(&mut self, kind: &'static str) {
        self.ops += 1;
        if self.op_log.len() < 1 << 20 {
            self.op_log.push(kind);
        }
        if let Some((at, tear)) = self.armed {
            if self.ops >= at {
                self.cut(tear);
            }
        }
    }

    fn live(&self) -> Result<(), i32> {
        if self.powered {
            Ok(())
        } else {
            Err(libc::EIO)
        }
    }

    fn handle(&self, fh: u64) -> Result<&Handle, i32> {
        self.live()?;
        self.handles.get(&fh).ok_or(libc::EIO)
    }

    // ---- file data ----------------------------------------------------------------------------

    fn pending_mut(&mut self, ino: u64) -> Result<&mut Pending, i32> {
        if !self.pending.contains_key(&ino) {
            let rel = self.rel(ino)?;
            let len = fs::metadata(self.full(&rel)).map_err(|e| errno(&e))?.len();
            self.pending.insert(
                ino,
                Pending {
                    sectors: BTreeMap::new(),
                    size: len,
                    valid: len,
                },
            );
        }
        Ok(self.pending.get_mut(&ino).expect("inserted above"))
    }

    /// Reads `buf.len()` bytes at `off` of the file's current (pending over durable) content,
    /// zeros past the end.
    fn read_logical(&self, ino: u64, file: &File, off: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let p = self.pending.get(&ino);
        let valid = p.map_or(u64::MAX, |p| p.valid);
        let end = off + buf.len() as u64;
        let base_end = end.min(valid);
        if base_end > off {
            let want = (base_end - off) as usize;
            let mut done = 0;
            while done < want {
                let n = file.read_at(&mut buf[done..want], off + done as u64)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
        }
        if let Some(p) = p {
            let first = off / SECTOR;
            for (&s, data) in p.sectors.range(first..end.div_ceil(SECTOR)) {
                let s_off = s * SECTOR;
                let from = s_off.max(off);
                let to = (s_off + SECTOR).min(end);
                buf[(from - off) as usize..(to - off) as usize]
                    .copy_from_slice(&data[(from - s_off) as usize..(to - s_off) as usize]);
            }
            let size = p.size;
            if end > size {
                let keep = size.saturating_sub(off) as usize;
                let n = buf.len();
                buf[keep.min(n)..].fill(0);
            }
        }
        Ok(())
    }

    fn write_pending(&mut self, ino: u64, file: &File, off: u64, data: &[u8]) -> Result<(), i32> {
        self.pending_mut(ino)?;
        let end = off + data.len() as u64;
        let mut s = off / SECTOR;
        while s * SECTOR < end {
            let s_off = s * SECTOR;
            let from = s_off.max(off);
            let to = (s_off + SECTOR).min(end);
            let mut sector: Sector = Box::new([0u8; SECTOR as usize]);
            if to - from < SECTOR {
                self.read_logical(ino, file, s_off, &mut sector[..])
                    .map_err(|e| errno(&e))?;
            }
            sector[(from - s_off) as usize..(to - s_off) as usize]
                .copy_from_slice(&data[(from - off) as usize..(to - off) as usize]);
            self.pending
                .get_mut(&ino)
                .expect("made above")
                .sectors
                .insert(s, sector);
            s += 1;
        }
        let p = self.pending.get_mut(&ino).expect("made above");
        p.size = p.size.max(end);
        Ok(())
    }

    fn truncate(&mut self, ino: u64, size: u64) -> Result<(), i32> {
        let rel = self.rel(ino)?;
        let file = File::open(self.full(&rel)).map_err(|e| errno(&e))?;
        self.pending_mut(ino)?;
        let mut edge = None;
        if !size.is_multiple_of(SECTOR) {
            let s = size / SECTOR;
            let mut sector: Sector = Box::new([0u8; SECTOR as usize]);
            self.read_logical(ino, &file, s * SECTOR, &mut sector[..])
                .map_err(|e| errno(&e))?;
            sector[(size % SECTOR) as usize..].fill(0);
            edge = Some((s, sector));
        }
        let p = self.pending.get_mut(&ino).expect("made above");
        if size < p.size {
            p.valid = p.valid.min(size);
            p.sectors.retain(|&s, _| s * SECTOR < size);
            if let Some((s, sector)) = edge {
                p.sectors.insert(s, sector);
            }
        }
        p.size = size;
        Ok(())
    }

    /// Writes the file's pending state to the backing file and syncs it.
    fn sync_file(&mut self, ino: u64) -> Result<(), i32> {
        let Some(p) = self.pending.get(&ino) else {
            return Ok(());
        };
        let rel = self.rel(ino)?;
        let f = OpenOptions::new()
            .write(true)
            .open(self.full(&rel))
            .map_err(|e| errno(&e))?;
        let e = |e: io::Error| errno(&e);
        let cur = f.metadata().map_err(e)?.len();
        if p.valid < cur {
            f.set_len(p.valid).map_err(e)?;
        }
        for (&s, data) in &p.sectors {
            let len = (p.size - s * SECTOR).min(SECTOR) as usize;
            f.write_all_at(&data[..len], s * SECTOR).map_err(e)?;
        }
        f.set_len(p.size).map_err(e)?;
        f.sync_data().map_err(e)?;
        self.pending.remove(&ino);
        Ok(())
    }

    /// O_DSYNC semantics: makes only the sectors of `[off, off+len)` (and the size, if the write
    /// extended the file) durable; other pending writes of the file stay pending.
    fn sync_range(&mut self, ino: u64, off: u64, len: u64) -> Result<(), i32> {
        let Some(p) = self.pending.get(&ino) else {
            return Ok(());
        };
        let rel = self.rel(ino)?;
        let f = OpenOptions::new()
            .write(true)
            .open(self.full(&rel))
            .map_err(|e| errno(&e))?;
        let e = |e: io::Error| errno(&e);
        let cur = f.metadata().map_err(e)?.len();
        if p.valid < cur {
            // A pending truncate: keep it simple and make the whole file durable.
            return self.sync_file(ino);
        }
        let (first, end) = (off / SECTOR, (off + len).div_ceil(SECTOR));
        let size = p.size;
        for (&s, data) in p.sectors.range(first..end) {
            let n = (size - s * SECTOR).min(SECTOR) as usize;
            f.write_all_at(&data[..n], s * SECTOR).map_err(e)?;
        }
        let new_len = cur.max((off + len).min(size));
        if new_len != cur {
            f.set_len(new_len).map_err(e)?;
        }
        f.sync_data().map_err(e)?;
        let p = self.pending.get_mut(&ino).expect("checked above");
        p.sectors.retain(|&s, _| s < first || s >= end);
        p.valid = new_len;
        if p.sectors.is_empty() && p.size == new_len {
            self.pending.remove(&ino);
        }
        Ok(())
    }

    // ---- namespace ----------------------------------------------------------------------------

    fn stash_path(&mut self) -> PathBuf {
        self.next_stash += 1;
        PathBuf::from(STASH_NAME).join(self.next_stash.to_string())
    }

    /// Commits the journal up to its last entry touching directory `dir`.
    fn commit_dir(&mut self, dir: &Path) -> io::Result<()> {
        let Some(last) = self.journal.iter().rposition(|u| u.touches(dir)) else {
            return Ok(());
        };
        for u in self.journal.drain(..=last).collect::<Vec<_>>() {
            let gone = match u {
                Undo::Removed { stash, .. } => Some(stash),
                Undo::Renamed { replaced, .. } => replaced,
                Undo::Created { .. } => None,
            };
            if let Some(stash) = gone {
                let full = self.full(&stash);
                if full.is_dir() {
                    fs::remove_dir_all(&full)?;
                } else {
                    fs::remove_file(&full)?;
                }
                // An open descriptor of an unlinked file keeps it alive; its data no longer matters.
            }
        }
        let d = File::open(self.full(dir))?;
        d.sync_all()
    }

    fn remove_any(&self, rel: &Path) {
        let full = self.full(rel);
        let r = match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&full),
            Ok(_) => fs::remove_file(&full),
            Err(_) => Ok(()),
        };
        if let Err(e) = r {
            eprintln!(
                "powercut: cannot undo the creation of {}: {e}",
                full.display()
            );
        }
    }

    fn rename_backing(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(self.full(from), self.full(to))
    }

    // ---- the cut ------------------------------------------------------------------------------

    /// Loses everything not durable; with `tear`, first writes a random subset of the pending
    /// sectors (chosen by the seed) to their backing files. Then the power stays off.
    pub fn cut(&mut self, tear: Option<u64>) {
        self.pending_at_last_cut = self.pending.values().map(Pending::bytes).sum();
        self.armed = None;
        if let Some(seed) = tear {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let pending = std::mem::take(&mut self.pending);
            for (ino, p) in pending {
                let Some(rel) = self.paths.get(&ino) else {
                    continue;
                };
                let Ok(f) = OpenOptions::new().write(true).open(self.full(rel)) else {
                    continue;
                };
                for (&s, data) in &p.sectors {
                    if rng.next().is_multiple_of(2) {
                        let _ = f.write_all_at(&data[..], s * SECTOR);
                    }
                }
            }
        }
        self.pending.clear();
        while let Some(u) = self.journal.pop() {
            let r = match &u {
                Undo::Created { path, .. } => {
                    self.remove_any(path);
                    Ok(())
                }
                Undo::Removed { path, stash } => self.rename_backing(stash, path),
                Undo::Renamed { from, to, replaced } => {
                    self.rename_backing(to, from).and_then(|()| {
                        replaced
                            .as_ref()
                            .map_or(Ok(()), |r| self.rename_backing(r, to))
                    })
                }
            };
            if let Err(e) = r {
                eprintln!("powercut: cannot undo {u:?}: {e}");
            }
        }
        self.handles.clear();
        self.paths.retain(|&i, _| i == ROOT_INO);
        self.inos.retain(|_, &mut i| i == ROOT_INO);
        self.powered = false;
        self.cuts += 1;
    }

    fn control(&mut self, cmd: &str) -> Result<(), i32> {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let tear = |w: &[&str]| -> Result<Option<u64>, i32> {
            match w {
                [] => Ok(None),
                ["tear", seed] => seed.parse().map(Some).map_err(|_| libc::EINVAL),
                _ => Err(libc::EINVAL),
            }
        };
        match words.as_slice() {
            ["cut", rest @ ..] => {
                let t = tear(rest)?;
                self.cut(t);
            }
            ["arm", k, rest @ ..] => {
                let k: u64 = k.parse().map_err(|_| libc::EINVAL)?;
                let t = tear(rest)?;
                if k == 0 {
                    self.cut(t);
                } else {
                    self.armed = Some((self.ops + k, t));
                }
            }
            ["disarm"] => self.armed = None,
            ["on"] => self.powered = true,
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }
}

fn control_attr(size: u64) -> FileAttr {
    FileAttr {
        ino: CONTROL_INO,
        size,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0o600,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 512,
        flags: 0,
    }
}

fn attr_from(ino: u64, md: &fs::Metadata) -> FileAttr {
    let t = |s: i64, ns: i64| {
        if s >= 0 {
            UNIX_EPOCH + Duration::new(s as u64, ns as u32)
        } else {
            UNIX_EPOCH
        }
    };
    let ft = md.file_type();
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_fifo() {
        FileType::NamedPipe
    } else if ft.is_socket() {
        FileType::Socket
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else {
        FileType::RegularFile
    };
    FileAttr {
        ino,
        size: md.len(),
        blocks: md.blocks(),
        atime: t(md.atime(), md.atime_nsec()),
        mtime: t(md.mtime(), md.mtime_nsec()),
        ctime: t(md.ctime(), md.ctime_nsec()),
        crtime: t(md.ctime(), md.ctime_nsec()),
        kind,
        perm: (md.mode() & 0o7777) as u16,
        nlink: md.nlink() as u32,
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: 4096,
        flags: 0,
    }
}

/// The FUSE filesystem. Build it with [`PowerCutFs::new`] and mount it with [`mount`].
pub struct PowerCutFs {
    core: Arc<Mutex<Core>>,
}

/// A handle on a mounted filesystem's state, shared with the FUSE thread.
#[derive(Clone)]
pub struct Control {
    core: Arc<Mutex<Core>>,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Cuts the power: everything not durable is lost (`tear`: a seeded random subset of the
    /// pending sectors survives). The power stays off until [`Control::power_on`].
    pub fn cut(&self, tear: Option<u64>) {
        self.lock().cut(tear)
    }
    /// Switches the power back on: new opens work again (descriptors from before stay dead).
    pub fn power_on(&self) {
        self.lock().powered = true
    }
    /// Cuts right after the `k`-th counted operation from now (`k == 0`: now).
    pub fn arm(&self, k: u64, tear: Option<u64>) {
        let mut c = self.lock();
        if k == 0 {
            c.cut(tear)
        } else {
            c.armed = Some((c.ops + k, tear));
        }
    }
    pub fn disarm(&self) {
        self.lock().armed = None
    }
    pub fn status(&self) -> Status {
        self.lock().status()
    }
    /// The kinds of the counted operations after the first `from` (`write`, `fsync`,
    /// `fsyncdir`, `truncate`, `create`, `mkdir`, `symlink`, `rename`, `unlink`): operation
    /// `from + 1 + i` is `result[i]`. Logged for the first 2^20 operations.
    pub fn op_kinds(&self, from: u64) -> Vec<&'static str> {
        self.lock()
            .op_log
            .iter()
            .skip(from as usize)
            .copied()
            .collect()
    }
}

impl PowerCutFs {
    /// A filesystem passing through to `backing` (an existing directory, taken as durable).
    pub fn new(backing: &Path) -> io::Result<(PowerCutFs, Control)> {
        let core = Arc::new(Mutex::new(Core::new(backing.canonicalize()?)?));
        Ok((PowerCutFs { core: core.clone() }, Control { core }))
    }
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The mount options powercut uses: kernel-checked permissions, other users allowed (a database
/// server runs as its own user), no fusermount needed when run as root.
pub fn mount_options() -> Vec<MountOption> {
    vec![
        MountOption::FSName("powercut".into()),
        MountOption::Subtype("powercut".into()),
        MountOption::DefaultPermissions,
        MountOption::AllowOther,
        MountOption::RW,
        MountOption::Dev,
        MountOption::Suid,
    ]
}

/// A mounted powercut filesystem; dropping it unmounts (lazily, as `umount -l`).
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    control: Control,
    mountpoint: PathBuf,
}

impl Mounted {
    pub fn control(&self) -> &Control {
        &self.control
    }
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
    pub fn cut(&self, tear: Option<u64>) {
        self.control.cut(tear)
    }
    pub fn power_on(&self) {
        self.control.power_on()
    }
    pub fn arm(&self, k: u64, tear: Option<u64>) {
        self.control.arm(k, tear)
    }
    pub fn status(&self) -> Status {
        self.control.status()
    }
    /// Unmounts and waits for the FUSE thread.
    pub fn unmount(mut self) {
        if let Some(s) = self.session.take() {
            s.join();
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            drop(s);
        }
    }
}

/// Mounts a powercut filesystem over `backing` at `mountpoint` in a background thread. Needs
/// root (or fusermount3) and /dev/fuse.
pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<Mounted> {
    let (fs, control) = PowerCutFs::new(backing)?;
    let session = fuser::spawn_mount2(fs, mountpoint, &mount_options())?;
    Ok(Mounted {
        session: Some(session),
        control,
        mountpoint: mountpoint.to_path_buf(),
    })
}

fn time_arg(t: Option<TimeOrNow>) -> nix::sys::time::TimeSpec {
    use nix::sys::time::TimeSpec;
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => {
            TimeSpec::from(t.duration_since(UNIX_EPOCH).unwrap_or_default())
        }
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let mut c = self.lock();
        if parent == ROOT_INO && name == CONTROL_NAME {
            return reply.entry(&TTL, &control_attr(c.control_reply.len() as u64), 0);
        }
        let r = (|| {
            c.live()?;
            let rel = c.child(parent, name).map_err(|_| libc::ENOENT)?;
            fs::symlink_metadata(c.full(&rel)).map_err(|e| errno(&e))?;
            let ino = c.ino_of(&rel);
            c.attr(ino)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let c = self.lock();
        let r = if ino == CONTROL_INO || ino == ROOT_INO {
            c.attr(ino)
        } else {
            c.live().and(c.attr(ino))
        };
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut c = self.lock();
        if ino == CONTROL_INO {
            return reply.attr(&TTL, &control_attr(0));
        }
        let r = (|| {
            c.live()?;
            let full = c.full(&c.rel(ino)?);
            // Ownership, mode and times are applied at once (durable immediately): see README.
            if let Some(m) = mode {
                fs::set_permissions(&full, std::os::unix::fs::PermissionsExt::from_mode(m))
                    .map_err(|e| errno(&e))?;
            }
            if uid.is_some() || gid.is_some() {
                let (u, g) = (
                    uid.map(nix::unistd::Uid::from_raw),
                    gid.map(nix::unistd::Gid::from_raw),
                );
                nix::unistd::fchownat(None, &full, u, g, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|e| e as i32)?;
            }
            if atime.is_some() || mtime.is_some() {
                let (a, m) = (time_arg(atime), time_arg(mtime));
                nix::sys::stat::utimensat(
                    None,
                    &full,
                    &a,
                    &m,
                    nix::sys::stat::UtimensatFlags::FollowSymlink,
                )
                .map_err(|e| e as i32)?;
            }
            if let Some(s) = size {
                c.truncate(ino, s)?;
                c.count("truncate");
                c.live()?;
            }
            c.attr(ino)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        let c = self.lock();
        let r = c
            .live()
            .and_then(|()| c.rel(ino))
            .and_then(|rel| fs::read_link(c.full(&rel)).map_err(|e| errno(&e)));
        match r {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(libc::EPERM);
        }
        let mut c = self.lock();
        let r = (|| {
            c.live()?;
            let rel = c.child(parent, name)?;
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & !umask & 0o7777)
                .open(c.full(&rel))
                .map_err(|e| errno(&e))?;
            c.journal.push(Undo::Created { path: rel.clone() });
            let ino = c.ino_of(&rel);
            let a = c.attr(ino)?;
            c.count("create");
            Ok(a)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut c = self.lock();
        let r = (|| {
            c.live()?;
            let rel = c.child(parent, name)?;
            fs::create_dir(c.full(&rel)).map_err(|e| errno(&e))?;
            c.journal.push(Undo::Created { path: rel.clone() });
            fs::set_permissions(
                c.full(&rel),
                std::os::unix::fs::PermissionsExt::from_mode(mode & !umask & 0o7777),
            )
            .map_err(|e| errno(&e))?;
            let ino = c.ino_of(&rel);
            let a = c.attr(ino)?;
            c.count("mkdir");
            Ok(a)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply)
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply)
    }

    fn symlink(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut c = self.lock();
        let r = (|| {
            c.live()?;
            let rel = c.child(parent, link_name)?;
            std::os::unix::fs::symlink(target, c.full(&rel)).map_err(|e| errno(&e))?;
            c.journal.push(Undo::Created { path: rel.clone() });
            let ino = c.ino_of(&rel);
            let a = c.attr(ino)?;
            c.count("symlink");
            Ok(a)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut c = self.lock();
        let r = (|| {
            c.live()?;
            if flags & !(libc::RENAME_NOREPLACE) != 0 {
                return Err(libc::EINVAL);
            }
            let from = c.child(parent, name)?;
            let to = c.child(newparent, newname)?;
            fs::symlink_metadata(c.full(&from)).map_err(|e| errno(&e))?;
            let mut replaced = None;
            if let Ok(md) = fs::symlink_metadata(c.full(&to)) {
                if flags & libc::RENAME_NOREPLACE != 0 {
                    return Err(libc::EEXIST);
                }
                let from_dir = fs::symlink_metadata(c.full(&from))
                    .map_err(|e| errno(&e))?
                    .is_dir();
                if md.is_dir() != from_dir {
                    return Err(if md.is_dir() {
                        libc::EISDIR
                    } else {
                        libc::ENOTDIR
                    });
                }
                if md.is_dir()
                    && fs::read_dir(c.full(&to))
                        .map_err(|e| errno(&e))?
                        .next()
                        .is_some()
                {
                    return Err(libc::ENOTEMPTY);
                }
                let stash = c.stash_path();
                c.rename_backing(&to, &stash).map_err(|e| errno(&e))?;
                c.move_paths(&to, &stash);
                replaced = Some(stash);
            }
            if let Err(e) = c.rename_backing(&from, &to) {
                if let Some(s) = &replaced {
                    let _ = c.rename_backing(s, &to);
                    c.move_paths(s, &to);
                }
                return Err(errno(&e));
            }
            c.move_paths(&from, &to);
            c.journal.push(Undo::Renamed { from, to, replaced });
            c.count("rename");
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _newparent: u64,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        // Hard links are not modelled (one path per inode): see README.
        reply.error(libc::EPERM);
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let mut c = self.lock();
        if ino == CONTROL_INO {
            let s = c.status();
            c.control_reply = format!(
                "ops {} powered {} pending_bytes {} pending_meta {} armed {} cuts {}\n",
                s.ops,
                s.powered,
                s.pending_bytes,
                s.pending_meta,
                s.armed_at.map_or("no".to_string(), |k| k.to_string()),
                s.cuts
            )
            .into_bytes();
            return reply.opened(0, fuser::consts::FOPEN_DIRECT_IO);
        }
        let r = (|| {
            c.live()?;
            let rel = c.rel(ino)?;
            let acc = flags & libc::O_ACCMODE;
            let file = OpenOptions::new()
                .read(true)
                .write(acc != libc::O_RDONLY)
                .open(c.full(&rel))
                .map_err(|e| errno(&e))?;
            if flags & libc::O_TRUNC != 0 && acc != libc::O_RDONLY {
                c.truncate(ino, 0)?;
                c.count("truncate");
                c.live()?;
            }
            let fh = c.next_fh;
            c.next_fh += 1;
            let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
            c.handles.insert(
                fh,
                Handle {
                    file: Some(file),
                    sync,
                },
            );
            Ok(fh)
        })();
        match r {
            Ok(fh) => reply.opened(fh, fuser::consts::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let c = self.lock();
        let off = offset.max(0) as u64;
        if ino == CONTROL_INO {
            let d = &c.control_reply;
            let from = (off as usize).min(d.len());
            let to = (from + size as usize).min(d.len());
            return reply.data(&d[from..to]);
        }
        let r = (|| {
            let h = c.handle(fh)?;
            let file = h.file.as_ref().ok_or(libc::EBADF)?;
            let len = c.attr(ino)?.size;
            let n = (size as u64).min(len.saturating_sub(off)) as usize;
            let mut buf = vec![0u8; n];
            c.read_logical(ino, file, off, &mut buf)
                .map_err(|e| errno(&e))?;
            Ok(buf)
        })();
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut c = self.lock();
        if ino == CONTROL_INO {
            let cmd = String::from_utf8_lossy(data).to_string();
            return match c.control(&cmd) {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(e),
            };
        }
        let r = (|| {
            let h = c.handle(fh)?;
            let sync = h.sync || flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
            let file = h
                .file
                .as_ref()
                .ok_or(libc::EBADF)?
                .try_clone()
                .map_err(|e| errno(&e))?;
            let off = offset.max(0) as u64;
            c.write_pending(ino, &file, off, data)?;
            c.count("write");
            if sync {
                // The write and its sync are one operation to the caller: a cut armed for this
                // count fires before the sync (the write returns EIO, nothing durable).
                c.live()?;
                c.sync_range(ino, off, data.len() as u64)?;
            }
            Ok(data.len() as u32)
        })();
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().handles.remove(&fh);
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let mut c = self.lock();
        if ino == CONTROL_INO {
            return reply.ok();
        }
        let r = (|| {
            c.handle(fh)?;
            c.sync_file(ino)?;
            c.count("fsync");
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let mut c = self.lock();
        let r = (|| {
            if ino != ROOT_INO {
                c.live()?;
            }
            c.rel(ino)?;
            let fh = c.next_fh;
            c.next_fh += 1;
            c.handles.insert(
                fh,
                Handle {
                    file: None,
                    sync: false,
                },
            );
            Ok(fh)
        })();
        match r {
            Ok(fh) => reply.opened(fh, 0),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let mut c = self.lock();
        let r = (|| {
            c.handle(fh)?;
            let rel = c.rel(ino)?;
            let mut entries: Vec<(u64, FileType, OsString)> = vec![
                (ino, FileType::Directory, ".".into()),
                (ino, FileType::Directory, "..".into()),
            ];
            let mut names: Vec<(OsString, bool)> = Vec::new();
            for e in fs::read_dir(c.full(&rel)).map_err(|e| errno(&e))? {
                let e = e.map_err(|e| errno(&e))?;
                if rel.as_os_str().is_empty() && e.file_name() == STASH_NAME {
                    continue;
                }
                let dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
                names.push((e.file_name(), dir));
            }
            names.sort();
            for (n, dir) in names {
                let i = c.ino_of(&rel.join(&n));
                entries.push((
                    i,
                    if dir {
                        FileType::Directory
                    } else {
                        FileType::RegularFile
                    },
                    n,
                ));
            }
            Ok(entries)
        })();
        match r {
            Ok(entries) => {
                for (i, (ino, kind, name)) in
                    entries.into_iter().enumerate().skip(offset.max(0) as usize)
                {
                    if reply.add(ino, (i + 1) as i64, kind, name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        reply: ReplyEmpty,
    ) {
        self.lock().handles.remove(&fh);
        reply.ok();
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut c = self.lock();
        let r = (|| {
            c.handle(fh)?;
            let rel = c.rel(ino)?;
            c.commit_dir(&rel).map_err(|e| errno(&e))?;
            c.count("fsyncdir");
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let c = self.lock();
        match nix::sys::statvfs::statvfs(&c.backing) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(e as i32),
        }
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut c = self.lock();
        let r = (|| {
            c.live()?;
            let rel = c.child(parent, name)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode & !umask & 0o7777)
                .open(c.full(&rel))
                .map_err(|e| errno(&e))?;
            c.journal.push(Undo::Created { path: rel.clone() });
            let ino = c.ino_of(&rel);
            let a = c.attr(ino)?;
            let fh = c.next_fh;
            c.next_fh += 1;
            let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
            c.handles.insert(
                fh,
                Handle {
                    file: Some(file),
                    sync,
                },
            );
            c.count("create");
            Ok((a, fh))
        })();
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, 0, fh, fuser::consts::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _offset: i64,
        _length: i64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // Not modelled: callers fall back to writing (zeros). See README.
        reply.error(libc::EOPNOTSUPP);
    }
}

impl PowerCutFs {
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let mut c = self.lock();
        let r = (|| {
            c.live()?;
            let rel = c.child(parent, name)?;
            let md = fs::symlink_metadata(c.full(&rel)).map_err(|e| errno(&e))?;
            if dir != md.is_dir() {
                return Err(if dir { libc::ENOTDIR } else { libc::EISDIR });
            }
            if dir
                && fs::read_dir(c.full(&rel))
                    .map_err(|e| errno(&e))?
                    .next()
                    .is_some()
            {
                return Err(libc::ENOTEMPTY);
            }
            let stash = c.stash_path();
            c.rename_backing(&rel, &stash).map_err(|e| errno(&e))?;
            c.move_paths(&rel, &stash);
            c.journal.push(Undo::Removed { path: rel, stash });
            c.count("unlink");
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
