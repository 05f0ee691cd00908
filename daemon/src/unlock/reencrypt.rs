//! The LUKS2 side of online re-encryption: starts one (`luks2::reencrypt::Reencryption::start`),
//! resumes one found at unlock (recovering a hot zone a crash left), and drives the engine's
//! zone steps for the worker (`control::reencrypt`) through the router
//! (`block::reencrypt::ReencryptDevice`).

use std::fs::OpenOptions;
use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};

use tracing::{error, info, warn};

use super::{UnlockError, Volume};
use crate::block::crypt::{CryptDevice, Segment};
use crate::block::latch::Latch;
use crate::block::reencrypt::{ReencryptDevice, ZoneEngine};
use crate::block::BlockDevice;
use crate::control::proto::StartOptions;
use crate::control::reencrypt::{Backend, Job, DEFAULT_ZONE};
use crate::crypto::keys::{SecretBytes, VolumeKey};
use crate::crypto::xts::SectorCipher;
use crate::luks2::reencrypt::{BlockIo, Reencryption, Resilience, StartParams, ZoneIo};
use crate::luks2::tokens::carry::{self, Carrier, SharePassphrases};
use crate::luks2::tokens::quorum;
use crate::luks2::tokens::resume::KeyFinder;
use crate::luks2::{FormatError, HeaderIo, Luks2Header};
use crate::seal::pin::{PinKeeper, Rotated};
use crate::seal::SealSettings;

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
/// `after_sync` (synced, frontier not committed), `after_commit`; `before_wipe` (any ZONE): after
/// the final header commit, before the old keyslot areas are wiped.
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
    /// The volume's pin, moved to the new key at the finish.
    pin: Arc<PinKeeper>,
    file: Arc<dyn HeaderIo>,
    backing: Arc<dyn BlockDevice>,
    new: Option<Arc<dyn BlockDevice>>,
    hooks: TestHooks,
    zones: u64,
    /// How each old keyslot was carried over (for the start's audit event).
    carried: Vec<(String, String)>,
    /// Keyslots dropped (`--drop-unopened`), with why.
    dropped: Vec<(String, String)>,
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
        if self
            .hooks
            .abort
            .as_ref()
            .is_some_and(|(_, p)| p == "before_wipe")
        {
            // Test hook: the final commit, then death before the old keyslots are wiped.
            let _ = r.finish_then_crash_test(&self.file);
            eprintln!("nbdcryptd: test hook: aborting after the final commit at before_wipe");
            std::process::abort();
        }
        // Our KMS/HSM and quorum tokens of the old keyslots were re-sealed for new ones: they
        // go too.
        let new_key = VolumeKey::from_slice(r.new_key().expose_secret());
        let hdr = r
            .finish_dropping_orphans(&self.file, carry::resealed_token)
            .map_err(|e| e.to_string())?;
        // The pin follows the key: the old one is retired (see `PinKeeper`).
        match self.pin.rotate(&hdr, &new_key) {
            Ok(Rotated::NotPinned) => {}
            Ok(Rotated::InMemory) => warn!(
                "re-encryption finished: the pin now names the new volume key in this process; \
                 update --volume-key-digest (`nbdcryptctl pin VOLUME`) before the next start"
            ),
            Ok(Rotated::InFile(f)) => info!(
                config = %f.display(),
                "re-encryption finished: the pin moved to the new volume key (config file updated)"
            ),
            Err(e) => {
                error!(error = %e, "re-encryption finished, but the pin file was not updated")
            }
        }
        // status and the metrics show the new key's age from now on.
        let created = crate::luks2::reencrypt::KeyAge::of(&hdr).map_or(0, |a| a.created_unix);
        crate::metrics::METRICS
            .volume_key_created
            .store(created, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn max_rate(&self) -> Option<u64> {
        self.r.as_ref().and_then(Reencryption::max_rate)
    }
    fn set_max_rate(&mut self, rate: Option<u64>) -> Result<(), String> {
        let r = self.r.as_mut().ok_or("the re-encryption has finished")?;
        r.set_max_rate(&self.file, rate).map_err(|e| e.to_string())
    }
    fn carry_report(&self) -> Vec<(&'static str, serde_json::Value)> {
        let map = |v: &[(String, String)]| {
            serde_json::Value::Object(
                v.iter()
                    .map(|(k, how)| (k.clone(), serde_json::Value::String(how.clone())))
                    .collect(),
            )
        };
        let mut out = vec![("carried", map(&self.carried))];
        if !self.dropped.is_empty() {
            out.push(("dropped", map(&self.dropped)));
        }
        out
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

/// The header's device, writable: the claimed local file (a new open file description of it,
/// with cryptsetup's flock at each header update), or the upstream NBD export the volume lives
/// on (no lock there: best effort, see `luks2::VolumeIo`; each header update is made durable
/// with the upstream's FLUSH, which also covers the zone's data written before it through
/// [`Volume::open_backing`], the same upstream connection pool).
fn open_rw(vol: &Volume) -> Result<Arc<dyn HeaderIo>, UnlockError> {
    if let Some(up) = vol.backing.upstream() {
        if vol.file_options.read_only {
            return Err(UnlockError::Backing(format!(
                "{}: served read-only (--read-only): the header cannot be written",
                vol.path.display()
            )));
        }
        let dev: Arc<dyn HeaderIo> = up.clone();
        return Ok(dev);
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(vol.claimed_path()?)
        .map_err(|source| UnlockError::Io {
            path: vol.path.clone(),
            source,
        })?;
    Ok(Arc::new(file))
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
    let r = Reencryption::open(&file, std::slice::from_ref(secret), &vol.limits)?;
    serve_resuming(vol, file, r)
}

/// [`unlock_resuming`] through the tokens: each keyslot of the old and of the new key is tried
/// with the secrets its tokens unseal (our KMS/HSM tokens through the provider registry, clevis
/// tokens through their pins, quorums whose machine shares reach the threshold, with the
/// people's passphrases given so far with `unlock --share NAME`), lazily, until both keys are found and verified
/// (`luks2::tokens::resume`, the code the offline `nbdcryptctl reencrypt VOLUME` runs too).
pub(super) fn unlock_resuming_with_tokens(
    vol: &Volume,
    settings: &SealSettings,
) -> Result<(Arc<dyn BlockDevice>, u32), UnlockError> {
    unlock_resuming_by(vol, settings, &mut ResumeShares(vol))
}

/// [`unlock_resuming_with_tokens`] with people's passphrases from `people`.
fn unlock_resuming_by(
    vol: &Volume,
    settings: &SealSettings,
    people: &mut dyn SharePassphrases,
) -> Result<(Arc<dyn BlockDevice>, u32), UnlockError> {
    let file = open_rw(vol)?;
    let pin = vol.pin.get();
    let mut finder = KeyFinder::new(settings, &vol.limits, people, Some(&pin));
    let r = finder.open(&*file, &[]);
    match r {
        Ok(r) => serve_resuming(vol, file, r),
        Err(e @ (FormatError::InvalidParams(_) | FormatError::WrongVolumeKey)) => {
            let mut message = format!(
                "the volume is in the middle of a re-encryption and its tokens did not open it: {e}"
            );
            if !finder.failures().is_empty() {
                message.push_str(&format!(" ({})", finder.failures().join("; ")));
            }
            message.push_str("; or unlock it with its passphrase or key file");
            Err(UnlockError::Tokens {
                message,
                transient: finder.transient(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// People's passphrases for the resume of an interrupted quorum volume: those given with
/// `nbdcryptctl unlock --share NAME` while the volume is in the middle of a re-encryption (kept
/// in the share store's staging, locked memory, wiped at the unlock, a lock, or its timeout).
struct ResumeShares<'a>(&'a Volume);

impl SharePassphrases for ResumeShares<'_> {
    fn passphrase(&mut self, name: &str, _keyslot: u32) -> Result<Option<SecretBytes>, String> {
        Ok(self.0.shares().staged_passphrase(name))
    }
    fn missing(&self, names: &[String]) -> String {
        format!(
            "{} `nbdcryptctl unlock --control SOCK --share NAME`",
            if names.len() == 1 {
                "the holder runs"
            } else {
                "each holder runs"
            }
        )
    }
}

/// `nbdcryptctl unlock --share NAME` on a volume in the middle of a re-encryption: the person's
/// passphrase is checked against their share at once, kept (both keys need it: their share of
/// the old quorum and of the new one, under different salts), and the volume resumed if the
/// tokens, the machine shares and the passphrases given so far open both keys (verified as in
/// every resume: `luks2::tokens::resume`). Otherwise the share waits for the others
/// ([`UnlockError::SharePending`]).
pub(super) fn unlock_resuming_with_share(
    vol: &Volume,
    name: &str,
    passphrase: &SecretBytes,
    settings: &SealSettings,
) -> Result<(Arc<dyn BlockDevice>, u32), UnlockError> {
    let file = open_rw(vol)?;
    let hdr = crate::luks2::online::read_any_header(&*file)?;
    vol.pin.get().check_uuid(hdr.uuid())?;
    let Some(q) = quorum::tokens(&hdr)
        .into_iter()
        .filter_map(|(_, q)| q.ok())
        .find(|q| q.share_named(name).is_some())
    else {
        return Err(UnlockError::WrongShare(
            quorum::QuorumError::UnknownShare(name.to_owned()).to_string(),
        ));
    };
    match quorum::open_passphrase_share(&hdr, &q, name, passphrase, &vol.limits) {
        Ok(_) => {}
        Err(e @ quorum::QuorumError::WrongShare { .. }) => {
            return Err(UnlockError::WrongShare(e.to_string()))
        }
        Err(e) => {
            return Err(UnlockError::Tokens {
                message: e.to_string(),
                transient: false,
            })
        }
    }
    drop(file);
    let staged = vol
        .shares()
        .stage_passphrase(name, SecretBytes::from_slice(passphrase.expose_secret()));
    match unlock_resuming_by(vol, settings, &mut ResumeShares(vol)) {
        Ok(done) => {
            vol.shares().clear_staged();
            Ok(done)
        }
        Err(UnlockError::Tokens { message, .. }) => {
            // The details (which holder failed) go to the log, not to the person.
            info!(share = name, status = %message, "re-encryption resume: share accepted");
            Err(UnlockError::SharePending(format!(
                "share {name:?} accepted; the volume is in the middle of a re-encryption and \
                 needs more shares to open both its keys (given: {}; kept {} s)",
                staged.join(", "),
                vol.shares().timeout().as_secs()
            )))
        }
        Err(e) => {
            // Refused for another reason (pin, limits, I/O, digest): nothing waits for it.
            vol.shares().clear_staged();
            Err(e)
        }
    }
}

/// The common end of both resuming unlocks.
fn serve_resuming(
    vol: &Volume,
    file: Arc<dyn HeaderIo>,
    mut r: Reencryption,
) -> Result<(Arc<dyn BlockDevice>, u32), UnlockError> {
    vol.pin.get().check_uuid(r.header().uuid())?;
    // Mid-way the pin names the old key (`nbdcryptctl pin` refuses a volume in re-encryption,
    // so nobody re-pins to the new key before the end); trust passes to the new key through the
    // re-encryption digest, which binds both. Without this a header that claims a
    // re-encryption, written by someone whose tokens the daemon accepts, would be served under
    // their keys; and accepting the new key too would let a header rolled back to the middle
    // of an earlier rotation bring the rotated-out key back.
    let pin = vol.pin.get();
    if let Err(e) = pin.check_key(r.old_key()) {
        if pin.check_key(r.new_key()).is_ok() {
            warn!("refused: the header is in the middle of a re-encryption to the pinned key from another key (rolled back to an earlier rotation?)");
        }
        return Err(e.into());
    }
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
    // Two keys are served until the finish records the new one.
    vol.pin.set_served(None);
    // However the keys opened (passphrase, tokens, people's shares), a passphrase staged with
    // `unlock --share` for this resume has done its work.
    vol.shares().clear_staged();
    let slot = r.state().keyslot;
    *vol.online.resumed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(EngineJob {
        r: Some(r),
        pin: vol.pin.clone(),
        file,
        backing,
        new: None,
        hooks: TestHooks::from_env(),
        zones: 0,
        carried: Vec::new(),
        dropped: Vec::new(),
    }));
    Ok((Arc::new(Latch::new(router)), slot))
}

/// At every unlock of a volume not in re-encryption: if a re-encryption's last step was cut
/// between its final header commit and the end of its wipe, finish the wipe now (see
/// `luks2::reencrypt::complete_pending_wipe` for the rule that bounds what is overwritten).
/// Never fails the unlock: a refusal or an error is logged.
pub(super) fn complete_pending_wipe(vol: &Volume, header: &Luks2Header) {
    use crate::luks2::reencrypt::{PendingWipe, WIPE_TOKEN};
    if !header.tokens().any(|(_, t)| t.type_name() == WIPE_TOKEN) {
        return;
    }
    if vol.file_options.read_only {
        warn!("an interrupted re-encryption left old keyslot areas to wipe; served read-only, so they stay until a read-write unlock");
        return;
    }
    let done = open_rw(vol).map_err(|e| e.to_string()).and_then(|f| {
        crate::luks2::reencrypt::complete_pending_wipe(&f).map_err(|e| e.to_string())
    });
    match done {
        Ok(PendingWipe::Wiped(n, bytes)) => info!(
            areas = n,
            bytes, "wiped the old keyslot areas an interrupted re-encryption left"
        ),
        Ok(PendingWipe::Nothing) => {}
        Ok(PendingWipe::Refused(why)) => warn!(
            reason = %why,
            "the header asks to wipe keyslot areas outside what is safe: refused, nothing written"
        ),
        Err(e) => {
            warn!(error = %e, "cannot wipe the old keyslot areas an interrupted re-encryption left")
        }
    }
}

/// [`Backend`] over a [`Volume`]; `seal`: the operator's provider settings (to re-seal the
/// KMS/HSM tokens of the old keyslots, and to open them when no secret is given).
pub struct VolumeBackend {
    pub volume: Arc<Volume>,
    pub seal: SealSettings,
}

/// People's passphrases for a quorum carry: the shares staged at the control socket
/// (`nbdcryptctl reencrypt --control SOCK --share NAME`).
struct StagedShares<'a>(&'a Volume);

impl SharePassphrases for StagedShares<'_> {
    fn passphrase(&mut self, name: &str, _keyslot: u32) -> Result<Option<SecretBytes>, String> {
        Ok(self.0.shares().staged_passphrase(name))
    }
    fn missing(&self, names: &[String]) -> String {
        format!(
            "{} `nbdcryptctl reencrypt --control SOCK --share NAME` first, then start again",
            if names.len() == 1 {
                "the holder runs"
            } else {
                "each holder runs"
            }
        )
    }
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

    fn forget_staged(&self) {
        self.volume.shares().clear_staged();
    }

    fn stage_share(&self, name: &str, passphrase: SecretBytes) -> Result<String, String> {
        let vol = &*self.volume;
        let file = open_rw(vol).map_err(|e| e.to_string())?;
        let (hdr, _) = Luks2Header::read(&file).map_err(|e| e.to_string())?;
        vol.pin
            .get()
            .check_uuid(hdr.uuid())
            .map_err(|e| e.to_string())?;
        let q = quorum::tokens(&hdr)
            .into_iter()
            .filter_map(|(_, q)| q.ok())
            .find(|q| q.share_named(name).is_some())
            .ok_or_else(|| quorum::QuorumError::UnknownShare(name.to_owned()).to_string())?;
        // Checked now, against the share's tag, so a typo is named at the person's terminal.
        quorum::open_passphrase_share(&hdr, &q, name, &passphrase, &vol.limits)
            .map_err(|e| e.to_string())?;
        let names = vol.shares().stage_passphrase(name, passphrase);
        Ok(format!(
            "share {name:?} staged for the re-encryption (staged: {}; kept {} s)",
            names.join(", "),
            vol.shares().timeout().as_secs()
        ))
    }

    fn start(
        &self,
        secret: Option<&SecretBytes>,
        opts: &StartOptions,
    ) -> Result<Box<dyn Job>, String> {
        let drop_unopened = opts.drop_unopened;
        let vol = &*self.volume;
        let p = vol.path.display();
        let file = open_rw(vol).map_err(|e| e.to_string())?;
        let (hdr, _) = Luks2Header::read(&file).map_err(|e| format!("{p}: {e}"))?;
        vol.pin
            .get()
            .check_uuid(hdr.uuid())
            .map_err(|e| format!("{p}: {e}"))?;
        // Every keyslot of the data key is carried over, or named; nothing is dropped silently.
        let mut people = StagedShares(vol);
        let plan = Carrier {
            settings: &self.seal,
            limits: &vol.limits,
            people: &mut people,
        }
        .plan(
            &file,
            &hdr,
            secret.map(std::slice::from_ref).unwrap_or_default(),
        )?;
        let (slots, old_key) = (plan.slots, plan.old_key);
        let carried: Vec<(String, String)> = plan
            .carried
            .into_iter()
            .map(|(id, how)| (id.to_string(), how))
            .collect();
        let cannot: Vec<String> = plan
            .cannot
            .iter()
            .map(|(id, why)| format!("keyslot {id} ({why})"))
            .collect();
        let dropped: Vec<(String, String)> = plan
            .cannot
            .into_iter()
            .map(|(id, why)| (id.to_string(), why))
            .collect();
        let Some(old_key) = old_key else {
            return Err(match secret {
                Some(_) => "no keyslot opens with this passphrase or key, and no token opens \
                     the volume"
                    .to_owned(),
                None => format!(
                    "no token opens the volume ({}); give the passphrase or key file",
                    cannot.join("; ")
                ),
            });
        };
        vol.pin
            .get()
            .check(&hdr, &old_key)
            .map_err(|e| format!("{p}: {e}"))?;
        // Pinned or not, the header must still hold the key being served: one swapped in since
        // the unlock would have its key carried over and the data rewritten from it.
        if vol.pin.is_served(&old_key) == Some(false) {
            return Err(format!(
                "{p}: refused: the header on disk holds another volume key than the one being \
                 served (replaced since the unlock?); nothing was written. Lock and unlock to \
                 read it again, or restore the header from a backup"
            ));
        }
        if !cannot.is_empty() && !drop_unopened {
            return Err(format!(
                "{} cannot be carried over to the new key and would be lost with the old one: \
                 {}. Give the secret that opens them, make their tokens reachable (the daemon's \
                 KMS/HSM/clevis settings), remove them first, or pass --drop-unopened to drop them",
                if cannot.len() == 1 {
                    "a keyslot"
                } else {
                    "keyslots"
                },
                cannot.join("; ")
            ));
        }
        if !cannot.is_empty() {
            warn!(dropped = %cannot.join("; "), "re-encryption: dropping keyslots that cannot be carried over (asked for)");
        }
        let ds = hdr.data_segment();
        let params = StartParams {
            // Bits to bytes; the proto admits only 256 and 512.
            key_size: opts.key_bits.map_or(ds.key_size.unwrap_or(64), |b| b / 8),
            sector_size: opts.sector_size.unwrap_or(ds.sector_size),
            resilience: Resilience::from_name("checksum").ok_or("no checksum resilience")?,
            hotzone: Some(zone_size()),
            now_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let backing = vol.open_backing().map_err(|e| e.to_string())?;
        let r = Reencryption::start(&file, hdr, old_key, slots, &params)
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
        // The staged share passphrases did their work (the new quorum is sealed): wipe them.
        vol.shares().clear_staged();
        info!(carried = ?carried, dropped = dropped.len(), "re-encryption: keyslots carried over");
        Ok(Box::new(EngineJob {
            r: Some(r),
            pin: vol.pin.clone(),
            file,
            backing,
            new: Some(new),
            hooks: TestHooks::from_env(),
            zones: 0,
            carried,
            dropped,
        }))
    }
}
