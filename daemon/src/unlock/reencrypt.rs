//! The LUKS2 side of online re-encryption: starts one (`luks2::reencrypt::Reencryption::start`),
//! resumes one found at unlock (recovering a hot zone a crash left), and drives the engine's
//! zone steps for the worker (`control::reencrypt`) through the router
//! (`block::reencrypt::ReencryptDevice`).

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};

use tracing::{info, warn};

use super::{UnlockError, Volume};
use crate::block::crypt::{CryptDevice, Segment};
use crate::block::latch::Latch;
use crate::block::reencrypt::{ReencryptDevice, ZoneEngine};
use crate::block::BlockDevice;
use crate::control::reencrypt::{Backend, Job, DEFAULT_ZONE};
use crate::crypto::keys::{SecretBytes, VolumeKey};
use crate::crypto::xts::SectorCipher;
use crate::luks2::reencrypt::{BlockIo, NewSlot, Reencryption, Resilience, StartParams, ZoneIo};
use crate::luks2::{FormatError, Luks2Header};

/// Per-volume state shared by the unlock path and the worker's backend.
#[derive(Default)]
pub(super) struct Online {
    router: Mutex<Weak<ReencryptDevice>>,
    resumed: Mutex<Option<Box<dyn Job>>>,
}

impl Online {
    pub(super) fn set_router(&self, router: &Arc<ReencryptDevice>) {
        *self.router.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(router);
    }
}

/// Zone size: [`DEFAULT_ZONE`], or (debug builds, for tests on small volumes)
/// `NBDCRYPT_TEST_REENCRYPT_ZONE` bytes.
fn zone_size() -> u64 {
    if cfg!(debug_assertions) {
        if let Some(z) = std::env::var("NBDCRYPT_TEST_REENCRYPT_ZONE")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            return z;
        }
    }
    DEFAULT_ZONE
}

/// Crash points for the kill tests (debug builds only; `NBDCRYPT_TEST_REENCRYPT_ABORT` =
/// `ZONE:POINT`, ZONE counted from 0 in this process): the process aborts (like kill -9) at
/// POINT of zone ZONE's step: `before_write` (resilience committed, no data written),
/// `half_write` (half the zone written), `after_write` (all written, not synced),
/// `after_sync` (synced, frontier not committed), `after_commit`.
/// `NBDCRYPT_TEST_REENCRYPT_LOSE_ZONE` = ZONE: the negative control: zone ZONE's data write
/// is silently dropped, and its commit goes ahead (a lost zone).
#[derive(Clone, Default)]
struct TestHooks {
    abort: Option<(u64, String)>,
    lose: Option<u64>,
}

impl TestHooks {
    fn from_env() -> TestHooks {
        if !cfg!(debug_assertions) {
            return TestHooks::default();
        }
        let abort = std::env::var("NBDCRYPT_TEST_REENCRYPT_ABORT")
            .ok()
            .and_then(|v| {
                let (z, p) = v.split_once(':')?;
                Some((z.parse().ok()?, p.to_owned()))
            });
        let lose = std::env::var("NBDCRYPT_TEST_REENCRYPT_LOSE_ZONE")
            .ok()
            .and_then(|v| v.parse().ok());
        TestHooks { abort, lose }
    }

    fn abort_at(&self, zone: u64, point: &str) {
        if self
            .abort
            .as_ref()
            .is_some_and(|(z, p)| *z == zone && p == point)
        {
            eprintln!("nbdcryptd: test hook: aborting in re-encryption zone {zone} at {point}");
            std::process::abort();
        }
    }
}

/// The engine's data I/O over the raw backing device, with the test hooks.
struct HookIo<'a> {
    inner: BlockIo<'a>,
    hooks: &'a TestHooks,
    zone: u64,
}

impl ZoneIo for HookIo<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.hooks.abort_at(self.zone, "before_write");
        if self.hooks.lose == Some(self.zone) {
            warn!(
                zone = self.zone,
                "test hook: dropping this zone's data write"
            );
            return Ok(());
        }
        let half = buf.len() / 2;
        let half = half - half % 4096;
        self.inner.write_at(&buf[..half], offset)?;
        self.hooks.abort_at(self.zone, "half_write");
        self.inner.write_at(&buf[half..], offset + half as u64)?;
        self.hooks.abort_at(self.zone, "after_write");
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()?;
        self.hooks.abort_at(self.zone, "after_sync");
        Ok(())
    }
}

/// One re-encryption: the engine, the header file it commits to, and the raw backing device
/// it rewrites.
struct EngineJob {
    r: Option<Reencryption>,
    file: File,
    backing: Arc<dyn BlockDevice>,
    new: Option<Arc<dyn BlockDevice>>,
    hooks: TestHooks,
    zones: u64,
}

impl ZoneEngine for EngineJob {
    fn next_zone(&self) -> Option<Range<u64>> {
        self.r.as_ref()?.next_zone()
    }

    fn rewrite_zone(&mut self, zone: Range<u64>) -> Result<(), String> {
        let r = self.r.as_mut().ok_or("the re-encryption has finished")?;
        if r.next_zone().as_ref() != Some(&zone) {
            return Err("the engine's zone moved".into());
        }
        let io = HookIo {
            inner: BlockIo(&*self.backing),
            hooks: &self.hooks,
            zone: self.zones,
        };
        r.step(&self.file, &io).map_err(|e| e.to_string())?;
        self.hooks.abort_at(self.zones, "after_commit");
        self.zones += 1;
        Ok(())
    }
}

impl Job for EngineJob {
    fn take_new_device(&mut self) -> Option<Arc<dyn BlockDevice>> {
        self.new.take()
    }
    fn frontier(&self) -> u64 {
        self.r.as_ref().map_or(0, Reencryption::frontier)
    }
    fn align(&self) -> u64 {
        self.r.as_ref().map_or(4096, |r| {
            u64::from(r.old_sector_size().max(r.new_sector_size()))
        })
    }
    fn finish(&mut self) -> Result<(), String> {
        let r = self
            .r
            .take()
            .ok_or("the re-encryption has already finished")?;
        r.finish(&self.file).map(|_| ()).map_err(|e| e.to_string())
    }
}

fn crypt(
    backing: &Arc<dyn BlockDevice>,
    key: &VolumeKey,
    sector: u32,
    segment: Segment,
    allow_discards: bool,
) -> Result<Arc<dyn BlockDevice>, UnlockError> {
    let cipher =
        SectorCipher::new(key, sector as usize).map_err(|e| UnlockError::Layout(e.to_string()))?;
    let dev = CryptDevice::new(backing.clone(), cipher, segment, allow_discards)
        .map_err(|e| UnlockError::Layout(e.to_string()))?;
    Ok(Arc::new(dev))
}

fn open_rw(vol: &Volume) -> Result<File, UnlockError> {
    if vol.upstream.is_some() {
        return Err(UnlockError::Backing(
            "online re-encryption of a volume on an upstream NBD export is not supported".into(),
        ));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(vol.claimed_path())
        .map_err(|source| UnlockError::Io {
            path: vol.path.clone(),
            source,
        })
}

/// Unlock of a volume in the middle of a re-encryption: both keys from `secret` (the new
/// keyslots are opened by the same secrets), the digest verified, a half-done zone recovered,
/// then a router serving new key below the frontier and old key above; the worker continues
/// when the control plane sees the unlock.
pub(super) fn unlock_resuming(
    vol: &Volume,
    secret: &SecretBytes,
) -> Result<(Arc<dyn BlockDevice>, u32), UnlockError> {
    let file = open_rw(vol)?;
    let mut r = Reencryption::open(&file, std::slice::from_ref(secret), &vol.limits)?;
    vol.pin.check_uuid(r.header().uuid())?;
    let backing = vol.open_backing()?;
    r.set_hotzone(Some(zone_size()))?;
    if let Some(hot) = r.hot_zone() {
        info!(
            start = hot.start,
            end = hot.end,
            "re-encryption: recovering the zone a crash interrupted"
        );
    }
    r.recover(&file, &BlockIo(&*backing))?;
    let segment = Segment {
        offset: r.data_offset(),
        size: r.data_size(),
        iv_tweak: 0,
    };
    let discards = vol.file_options.allow_discards;
    let old = crypt(
        &backing,
        r.old_key(),
        r.old_sector_size(),
        segment,
        discards,
    )?;
    let new = crypt(
        &backing,
        r.new_key(),
        r.new_sector_size(),
        segment,
        discards,
    )?;
    let align = u64::from(r.old_sector_size().max(r.new_sector_size()));
    let router = ReencryptDevice::resuming(old, new, r.frontier(), align)
        .map_err(|e| UnlockError::Layout(e.to_string()))?;
    let router = Arc::new(router);
    info!(
        frontier = r.frontier(),
        size = r.data_size(),
        "unlocked mid-re-encryption"
    );
    vol.online.set_router(&router);
    let slot = r.state().keyslot;
    *vol.online.resumed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(EngineJob {
        r: Some(r),
        file,
        backing,
        new: None,
        hooks: TestHooks::from_env(),
        zones: 0,
    }));
    Ok((Arc::new(Latch::new(router)), slot))
}

/// [`Backend`] over a [`Volume`].
pub struct VolumeBackend {
    pub volume: Arc<Volume>,
}

impl Backend for VolumeBackend {
    fn router(&self) -> Option<Arc<ReencryptDevice>> {
        self.volume
            .online
            .router
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
    }

    fn take_resumed(&self) -> Option<Box<dyn Job>> {
        self.volume
            .online
            .resumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn start(&self, secret: Option<&SecretBytes>) -> Result<Box<dyn Job>, String> {
        let vol = &*self.volume;
        let p = vol.path.display();
        let Some(secret) = secret else {
            return Err(
                "starting needs the passphrase (or key file) of the volume's keyslot: \
                        the new volume key gets a keyslot opened by the same secret"
                    .into(),
            );
        };
        let file = open_rw(vol).map_err(|e| e.to_string())?;
        let (hdr, _) = Luks2Header::read(&file).map_err(|e| format!("{p}: {e}"))?;
        let (old_key, slot) = hdr
            .unlock(&file, secret, &vol.limits)
            .map_err(|e| match e {
                FormatError::WrongPassphrase => {
                    "no keyslot opens with this passphrase or key".to_owned()
                }
                e => format!("{p}: {e}"),
            })?;
        vol.pin
            .check(&hdr, &old_key)
            .map_err(|e| format!("{p}: {e}"))?;
        let slots = hdr.keyslots();
        // Keyslots of the data key we could not carry over would be erased at the end: refuse.
        let others: Vec<u32> = slots
            .iter()
            .filter(|k| k.for_data && k.id != slot)
            .map(|k| k.id)
            .collect();
        if !others.is_empty() {
            return Err(format!(
                "keyslot(s) {others:?} also open the volume key, and only keyslot {slot} (opened \
                 by the secret given) would be carried over to the new key; remove them first \
                 (`nbdcryptctl offline remove-key`) or re-encrypt offline with \
                 `nbdcryptctl reencrypt VOLUME`, which asks for each"
            ));
        }
        let kdf = slots
            .iter()
            .find(|k| k.id == slot)
            .and_then(|k| k.kdf)
            .ok_or_else(|| format!("keyslot {slot} has no usable KDF"))?;
        let ds = hdr.data_segment();
        let params = StartParams {
            key_size: ds.key_size.unwrap_or(64),
            sector_size: ds.sector_size,
            resilience: Resilience::from_name("checksum").ok_or("no checksum resilience")?,
            hotzone: Some(zone_size()),
            now_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let new_slot = NewSlot {
            old_slot: slot,
            secret: SecretBytes::from_slice(secret.expose_secret()),
            kdf,
            token: None,
        };
        let backing = vol.open_backing().map_err(|e| e.to_string())?;
        let r = Reencryption::start(&file, hdr, old_key, vec![new_slot], &params)
            .map_err(|e| format!("{p}: {e}"))?;
        let segment = Segment {
            offset: r.data_offset(),
            size: r.data_size(),
            iv_tweak: 0,
        };
        let new = crypt(
            &backing,
            r.new_key(),
            r.new_sector_size(),
            segment,
            vol.file_options.allow_discards,
        )
        .map_err(|e| e.to_string())?;
        crate::sys::scrub_stack();
        Ok(Box::new(EngineJob {
            r: Some(r),
            file,
            backing,
            new: Some(new),
            hooks: TestHooks::from_env(),
            zones: 0,
        }))
    }
}
