//! The only module allowed OS-level `unsafe`: locked memory for secrets and core dumps off.
//!
//! Everything here is a thin, documented wrapper over one system call or one allocator call.
//! Callers outside this module get safe functions and one safe type, [`LockedBuf`]. This module
//! never sees what is stored in the memory it locks and logs nothing about it.
//!
//! (`crypto::xts`'s VAES path has its own `unsafe` for CPU intrinsics; that is not OS-level.)
//!
//! `unsafe_code` is denied workspace-wide and allowed here only, by the `#[allow]` on this
//! module's declaration in lib.rs; every block carries a `// SAFETY:` comment.

use std::alloc::{self, Layout};
use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;
use std::sync::OnceLock;

use nix::sys::mman::{madvise, mlock, munlock, MmapAdvise};
use nix::sys::prctl;
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{sysconf, SysconfVar};
use zeroize::Zeroize;

/// Page size used when the OS cannot tell us (it always can on Linux).
const FALLBACK_PAGE_SIZE: usize = 4096;

/// The system page size, read once.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) => usize::try_from(n)
            .ok()
            .filter(|n| n.is_power_of_two())
            .unwrap_or(FALLBACK_PAGE_SIZE),
        _ => FALLBACK_PAGE_SIZE,
    })
}

/// Locks the pages covering `ptr..ptr+len` into RAM (`mlock(2)`), so they are never swapped.
///
/// Invariants: none for memory safety. `mlock` only changes page residency; it neither reads
/// nor writes the range, and an unmapped or invalid range makes it fail with `ENOMEM`, not
/// misbehave. So this is a safe function taking a raw pointer. A zero `len` is a no-op.
///
/// Locks are per page and not counted: unlocking any range also unlocks everything else on its
/// pages. Use it on page-aligned, page-sized regions no one else shares, as [`LockedBuf`] does.
pub fn lock_memory(ptr: *const u8, len: usize) -> io::Result<()> {
    let Some(addr) = NonNull::new(ptr.cast_mut().cast::<c_void>()) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    if len == 0 {
        return Ok(());
    }
    // SAFETY: mlock(2) does not access the memory and fails cleanly (ENOMEM) for addresses that
    // are not mapped, so no pointer validity is required for soundness. nix marks it `unsafe`
    // because locking pages affects memory that may belong to other owners; callers are told
    // above to pass only regions they own exclusively.
    unsafe { mlock(addr, len) }.map_err(io::Error::from)
}

/// Unlocks the pages covering `ptr..ptr+len` (`munlock(2)`). Same invariants as
/// [`lock_memory`]: it never touches the bytes; it unlocks whole pages, shared or not.
pub fn unlock_memory(ptr: *const u8, len: usize) -> io::Result<()> {
    let Some(addr) = NonNull::new(ptr.cast_mut().cast::<c_void>()) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    if len == 0 {
        return Ok(());
    }
    // SAFETY: as for mlock above, munlock(2) only changes residency of the pages and fails
    // cleanly for unmapped addresses; it neither reads nor writes the memory.
    unsafe { munlock(addr, len) }.map_err(io::Error::from)
}

/// Makes this process non-dumpable and sets its core-file limit to zero, so a crash cannot
/// write key material to disk and other same-user processes cannot ptrace or read
/// `/proc/<pid>/mem`. Both calls are safe wrappers in `nix`; no `unsafe` is needed.
pub fn disable_core_dumps() -> io::Result<()> {
    prctl::set_dumpable(false).map_err(io::Error::from)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(io::Error::from)?;
    Ok(())
}

/// A zero-initialised heap buffer for secrets: page-aligned and padded to whole pages (so
/// locking and unlocking it cannot affect any other allocation), `mlock`ed and excluded from
/// core dumps on a best-effort basis, wiped, unlocked and freed on drop.
///
/// It has no `Clone`, `Debug` or `Display`. Its bytes never move: moving a `LockedBuf` moves
/// only the pointer.
pub struct LockedBuf {
    /// Start of the allocation; dangling (and never dereferenced for more than 0 bytes) when
    /// `layout` is `None`.
    ptr: NonNull<u8>,
    /// Bytes visible through the slice accessors.
    len: usize,
    /// The allocation's layout (whole pages, page-aligned); `None` for a zero-length buffer.
    layout: Option<Layout>,
    /// Whether `mlock` succeeded, so drop only unlocks what it locked.
    locked: bool,
}

// SAFETY: `LockedBuf` owns its allocation exclusively (like `Box<[u8]>`); the raw pointer is
// never shared, so sending it to another thread or sharing `&LockedBuf` is as sound as for
// `Box<[u8]>`.
unsafe impl Send for LockedBuf {}
// SAFETY: see `Send`; `&LockedBuf` only gives `&[u8]`.
unsafe impl Sync for LockedBuf {}

impl LockedBuf {
    /// Allocates `len` zero bytes.
    ///
    /// Like `vec![0; len]`, this aborts via `handle_alloc_error` when the allocator fails and
    /// panics only if `len` rounded up to a page overflows `isize` (a programming error: no
    /// secret is that large). Locking failures (e.g. `RLIMIT_MEMLOCK`) are not errors: the
    /// buffer is still wiped on drop.
    pub fn zeroed(len: usize) -> LockedBuf {
        if len == 0 {
            return LockedBuf {
                ptr: NonNull::dangling(),
                len: 0,
                layout: None,
                locked: false,
            };
        }
        let page = page_size();
        let size = len
            .checked_next_multiple_of(page)
            .and_then(|size| Layout::from_size_align(size, page).ok());
        // Invariant: only a `len` within a page of `isize::MAX` fails here, which no key,
        // passphrase or key file can reach (see the doc comment).
        let layout = size.expect("secret buffer size overflows isize");
        // SAFETY: `layout` has a non-zero size (len > 0 rounded up to a page) as `alloc_zeroed`
        // requires.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        let locked = lock_memory(ptr.as_ptr(), layout.size()).is_ok();
        if !locked {
            tracing::debug!("mlock of a secret buffer failed; it stays unlocked");
        }
        // SAFETY: `ptr..ptr+layout.size()` is our own fresh, page-aligned allocation of whole
        // pages, so advising on it affects no other memory; MADV_DONTDUMP changes only core-dump
        // contents, not the mapping's data or validity. Best effort: errors are ignored.
        let _ = unsafe {
            madvise(
                ptr.cast::<c_void>(),
                layout.size(),
                MmapAdvise::MADV_DONTDUMP,
            )
        };
        LockedBuf {
            ptr,
            len,
            layout: Some(layout),
            locked,
        }
    }

    /// Allocates a buffer holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> LockedBuf {
        let mut buf = LockedBuf::zeroed(bytes.len());
        buf.as_mut_slice().copy_from_slice(bytes);
        buf
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for reads of `len` initialised (zeroed at allocation) bytes
        // for as long as `self` lives, or dangling with `len == 0`, which is allowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` guarantees the access is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the pages are locked into RAM (best effort; false when `RLIMIT_MEMLOCK` is hit).
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl Drop for LockedBuf {
    #[inline(never)]
    fn drop(&mut self) {
        let Some(layout) = self.layout else { return };
        // SAFETY: `ptr` is valid for writes of `layout.size()` bytes: the whole allocation,
        // including the padding after `len`, which we zero too.
        let all = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), layout.size()) };
        // Volatile writes plus a compiler fence: not optimised away before the free below.
        all.zeroize();
        if self.locked {
            let _ = unlock_memory(self.ptr.as_ptr(), layout.size());
        }
        // SAFETY: `ptr` came from `alloc_zeroed(layout)` with this same layout and is freed
        // exactly once, here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_buf_is_zeroed_page_aligned_and_writable() {
        let mut buf = LockedBuf::zeroed(100);
        assert_eq!(buf.len(), 100);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        assert_eq!(buf.as_slice().as_ptr() as usize % page_size(), 0);
        buf.as_mut_slice()[99] = 7;
        assert_eq!(buf.as_slice()[99], 7);
    }

    #[test]
    fn empty_locked_buf_needs_no_allocation() {
        let buf = LockedBuf::zeroed(0);
        assert!(buf.is_empty());
        assert_eq!(buf.as_slice(), &[] as &[u8]);
        assert!(!buf.is_locked());
    }

    #[test]
    fn locked_buf_from_slice_copies_bytes() {
        let data: Vec<u8> = (0..=255).collect();
        let buf = LockedBuf::from_slice(&data);
        assert_eq!(buf.as_slice(), &data[..]);
    }

    #[test]
    fn lock_memory_rejects_null_and_accepts_empty() {
        assert!(lock_memory(std::ptr::null(), 16).is_err());
        assert!(unlock_memory(std::ptr::null(), 16).is_err());
        let x = [0u8; 4];
        assert!(lock_memory(x.as_ptr(), 0).is_ok());
    }

    #[test]
    fn disable_core_dumps_succeeds_unprivileged() {
        // Lowering our own limits needs no privilege; it only affects this test process.
        disable_core_dumps().unwrap();
        assert_eq!(
            nix::sys::resource::getrlimit(Resource::RLIMIT_CORE).unwrap(),
            (0, 0)
        );
        assert!(!prctl::get_dumpable().unwrap());
    }

    #[test]
    fn page_size_is_a_power_of_two() {
        assert!(page_size().is_power_of_two());
    }
}

/// A value in locked, page-aligned memory of its own, for long-lived key material that is not a
/// byte string (an expanded AES key schedule). Dropping it drops the value in place, then wipes,
/// unlocks and frees the pages (`LockedBuf`).
pub struct LockedBox<T> {
    /// At least `size_of::<T>()` bytes, page-aligned; holds one initialised `T`.
    buf: LockedBuf,
    _owns: std::marker::PhantomData<T>,
}

// SAFETY: `LockedBox<T>` owns its `T` exclusively, like `Box<T>`.
unsafe impl<T: Send> Send for LockedBox<T> {}
// SAFETY: `&LockedBox<T>` only gives `&T`, like `&Box<T>`.
unsafe impl<T: Sync> Sync for LockedBox<T> {}

impl<T> LockedBox<T> {
    pub fn new(value: T) -> LockedBox<T> {
        // Invariant: no type we store asks for more than page alignment (4 KiB); a 64-byte
        // aligned key schedule is the most we have.
        assert!(
            std::mem::align_of::<T>() <= page_size(),
            "LockedBox: alignment above a page"
        );
        let mut buf = LockedBuf::zeroed(std::mem::size_of::<T>().max(1));
        let slot = buf.as_mut_slice().as_mut_ptr().cast::<T>();
        // SAFETY: `slot` is page-aligned (so aligned for `T`, checked above), valid for writes
        // of `size_of::<T>()` bytes (the buffer is at least that long) and exclusively ours; it
        // holds no `T` yet, so nothing is overwritten without being dropped.
        unsafe { std::ptr::write(slot, value) };
        LockedBox {
            buf,
            _owns: std::marker::PhantomData,
        }
    }
}

impl<T> std::ops::Deref for LockedBox<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the buffer holds an initialised `T` from `new` until `drop`, aligned as
        // checked in `new`; `&self` keeps it alive and unmutated for the borrow.
        unsafe { &*self.buf.as_slice().as_ptr().cast::<T>() }
    }
}

impl<T> Drop for LockedBox<T> {
    fn drop(&mut self) {
        let slot = self.buf.as_mut_slice().as_mut_ptr().cast::<T>();
        // SAFETY: the `T` written in `new` is still there and is dropped exactly once, here;
        // afterwards the buffer's own drop only wipes and frees bytes.
        unsafe { std::ptr::drop_in_place(slot) };
    }
}

/// Overwrite the stack below the caller's frame: key derivation, AF merge and key expansion
/// leave temporaries there (spilled arrays, HMAC pads) that are not ours to zeroize. Call it on
/// the thread that unlocked, right after the key material has moved into locked memory.
#[inline(never)]
pub fn scrub_stack() {
    let mut area = [0u8; 256 * 1024];
    zeroize::Zeroize::zeroize(&mut area[..]);
    std::hint::black_box(&area);
}

#[cfg(test)]
mod locked_box_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static DROPS: AtomicUsize = AtomicUsize::new(0);

    struct Counted([u64; 100]);
    impl Drop for Counted {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_locked_box_holds_its_value_page_aligned_and_drops_it_once() {
        let b = LockedBox::new(Counted([7; 100]));
        assert_eq!(b.0[99], 7);
        assert_eq!((&*b as *const Counted as usize) % page_size(), 0);
        drop(b);
        assert_eq!(DROPS.load(Ordering::SeqCst), 1);
    }
}

/// Asks the kernel to back the whole pages inside `buf` with transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`; this kernel's default THP mode is "madvise"). For large I/O
/// buffers used with O_DIRECT: the kernel pins a buffer's pages for every request, one 4 KiB
/// page at a time unless they are huge. Call it before the buffer is first written (pages
/// already faulted in stay small). Best effort: errors are ignored.
pub fn advise_huge_pages(buf: &mut [u8]) {
    let page = page_size();
    let base = buf.as_mut_ptr();
    let head = (base as usize).next_multiple_of(page) - base as usize;
    let len = buf.len().saturating_sub(head) / page * page;
    if len == 0 {
        return;
    }
    let Some(addr) = NonNull::new(base.wrapping_add(head).cast::<c_void>()) else {
        return;
    };
    // SAFETY: `addr..addr+len` is whole pages inside `buf`, memory the caller holds exclusively
    // (`&mut`); MADV_HUGEPAGE changes only which page size the kernel backs that range with,
    // never its contents or validity (advising part of a larger mapping splits the mapping's
    // bookkeeping, not anyone's data).
    let _ = unsafe { madvise(addr, len, MmapAdvise::MADV_HUGEPAGE) };
}
