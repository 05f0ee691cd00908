//! Turns a LUKS2 volume plus a secret into a servable encrypted device: read the header (fresh
//! each time, so keyslots added by cryptsetup or nbdcryptctl while we run are seen), open a
//! keyslot, and stack latch → crypt → backing file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::block::crypt::{CryptDevice, Segment};
use crate::block::file::{claim_path, FileDevice, FileOptions};
use crate::block::latch::Latch;
use crate::block::BlockDevice;
use crate::crypto::kdf::KdfLimits;
use crate::crypto::keys::{SecretBytes, VolumeKey};
use crate::crypto::xts::SectorCipher;
use crate::luks2::tokens::enroll::{self, EnrollError, TokenFailureReason};
use crate::luks2::tokens::quorum::{self, QuorumError, QuorumToken};
use crate::luks2::tokens::resolver;
use crate::luks2::{FormatError, Luks2Header, SegmentSize, VolumeIo};
use crate::seal::pin::{PinKeeper, VolumePin};
use crate::seal::SealSettings;

pub mod shares;

use shares::ShareStore;

mod reencrypt;
pub use reencrypt::VolumeBackend;

/// What status reports about a volume, none of it secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub path: PathBuf,
    pub uuid: String,
    pub label: String,
    pub cipher: &'static str,
    pub key_bits: u32,
    pub sector_size: u32,
    pub data_offset: u64,
    /// Bytes exported to clients.
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnlockError {
    /// No keyslot opens with this secret. Deliberately says nothing about which slots exist.
    #[error("no keyslot opens with this passphrase or key")]
    WrongPassphrase,
    #[error("{0}")]
    Format(FormatError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the volume's data area does not fit the device: {0}")]
    Layout(String),
    #[error("cannot open the volume: {0}")]
    Backing(String),
    /// No KMS/HSM token opened the volume; `transient` when a provider was unreachable.
    #[error("{message}")]
    Tokens { message: String, transient: bool },
    /// The volume is not the one the configuration pins (UUID, or the volume key's digest).
    #[error(transparent)]
    Pin(#[from] crate::seal::pin::PinError),
    /// A person's share was wrong (named) or unknown; counts as a wrong secret.
    #[error("{0}")]
    WrongShare(String),
    /// The share was accepted; the quorum is not complete yet (how many are in).
    #[error("{0}")]
    SharePending(String),
}

impl From<FormatError> for UnlockError {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::WrongPassphrase => UnlockError::WrongPassphrase,
            other => UnlockError::Format(other),
        }
    }
}

/// A LUKS2 volume claimed by this process, ready to be unlocked any number of times. The backing
/// store is opened afresh at each unlock, so a volume resized while locked is served at its new
/// size; but always through the claimed descriptor (`/proc/self/fd/N`), never by name, so a file
/// renamed over the path after start is never read, written or served.
pub struct Volume {
    path: PathBuf,
    file_options: FileOptions,
    /// A local file or block device, claimed for the daemon's life (no second daemon serves
    /// it; every later open of the volume goes through this descriptor); or, for `--volume
    /// nbd://…`, the upstream NBD export that holds header and data (no claim and no header
    /// lock exist there: best effort, see `luks2::VolumeIo`).
    backing: VolumeIo,
    limits: KdfLimits,
    /// Which volume may be unlocked; checked at every unlock (see [`Volume::pinned`]); moved
    /// to the new key when a re-encryption finishes.
    pin: Arc<PinKeeper>,
    /// Online re-encryption: the router of the unlocked device, a job found at unlock.
    online: reencrypt::Online,
    /// Shares of quorums being assembled (locked memory, forgotten after a timeout).
    shares: ShareStore,
}

impl Volume {
    /// Check the header once at start so a wrong path or a non-LUKS2 file fails early.
    pub fn open(
        path: &Path,
        file_options: FileOptions,
    ) -> Result<(Volume, VolumeInfo), UnlockError> {
        if let Some(uri) = path
            .to_str()
            .filter(|p| crate::upstream::is_upstream_uri(p))
        {
            return Volume::open_upstream(path, uri, file_options);
        }
        let claim = claim_path(path, file_options.read_only)
            .map_err(|e| UnlockError::Backing(e.to_string()))?;
        let file_options = FileOptions {
            unclaimed: true,
            create_size: None,
            ..file_options
        };
        let vol = Volume {
            path: path.to_owned(),
            file_options,
            backing: VolumeIo::Local(claim),
            limits: KdfLimits::default(),
            pin: Arc::default(),
            online: reencrypt::Online::default(),
            shares: ShareStore::default(),
        };
        let (header, _) = vol.read_header()?;
        let info = vol.info(&header, &*vol.open_backing()?)?;
        Ok((vol, info))
    }

    /// A volume on an upstream NBD export (`crate::upstream`). No claim and no header lock exist
    /// there: best effort, documented in the README.
    fn open_upstream(
        path: &Path,
        uri: &str,
        file_options: FileOptions,
    ) -> Result<(Volume, VolumeInfo), UnlockError> {
        // Connects and reads the first sector, so an upstream failure is reported with its reason.
        let backing =
            VolumeIo::open_upstream(uri, !file_options.read_only, file_options.allow_discards)
                .map_err(UnlockError::Backing)?;
        let vol = Volume {
            path: path.to_owned(),
            file_options,
            backing,
            limits: KdfLimits::default(),
            pin: Arc::default(),
            online: reencrypt::Online::default(),
            shares: ShareStore::default(),
        };
        let (header, _) = vol.read_header()?;
        let info = vol.info(&header, &*vol.open_backing()?)?;
        Ok((vol, info))
    }

    /// Whether header and data live on an upstream NBD export.
    pub fn is_upstream(&self) -> bool {
        self.backing.is_upstream()
    }

    /// Pins the volume: refuses now if the header names another UUID, and from then on refuses
    /// every unlock whose header or volume key is not the pinned one.
    /// `file`: the `--config` file the key digest came from, kept up to date when a
    /// re-encryption moves the pin to the new key.
    pub fn pinned(mut self, pin: VolumePin, file: Option<PathBuf>) -> Result<Volume, UnlockError> {
        let (header, _) = self.read_header()?;
        pin.check_uuid(header.uuid())?;
        self.pin = Arc::new(PinKeeper::new(pin, file));
        Ok(self)
    }

    /// The claimed file, by descriptor: a new open file description of the same inode (so the
    /// backend can still have its own O_DIRECT / O_DSYNC descriptors), whatever the path now names.
    /// An error for an upstream NBD export (callers check `backing.upstream()` first).
    fn claimed_path(&self) -> Result<PathBuf, UnlockError> {
        use std::os::fd::AsRawFd;
        match self.backing.local_file() {
            Some(claim) => Ok(PathBuf::from(format!(
                "/proc/self/fd/{}",
                claim.as_raw_fd()
            ))),
            None => Err(UnlockError::Backing(format!(
                "{}: an upstream NBD export has no local file",
                self.path.display()
            ))),
        }
    }

    /// How long the shares of an incomplete quorum are kept (`--share-timeout`).
    pub fn with_share_timeout(mut self, timeout: std::time::Duration) -> Volume {
        self.shares = ShareStore::new(timeout);
        self
    }

    /// The partial quorums (for `status`).
    pub fn shares(&self) -> &ShareStore {
        &self.shares
    }

    /// KDF caps for every unlock of this volume (`--allow-expensive-kdf` lifts them).
    pub fn with_kdf_limits(mut self, limits: KdfLimits) -> Volume {
        self.limits = limits;
        self
    }

    fn open_backing(&self) -> Result<Arc<dyn BlockDevice>, UnlockError> {
        if let Some(up) = self.backing.upstream() {
            return Ok(up.clone());
        }
        let dev = FileDevice::open(&self.claimed_path()?, self.file_options.clone())
            .map_err(|e| UnlockError::Backing(format!("{}: {e}", self.path.display())))?;
        Ok(Arc::new(dev))
    }

    fn read_header(&self) -> Result<(Luks2Header, Arc<dyn crate::luks2::HeaderIo>), UnlockError> {
        let file: Arc<dyn crate::luks2::HeaderIo> =
            match self.backing.upstream() {
                Some(up) => up.clone(),
                None => Arc::new(File::open(self.claimed_path()?).map_err(|source| {
                    UnlockError::Io {
                        path: self.path.clone(),
                        source,
                    }
                })?),
            };
        // A volume in the middle of a re-encryption is read too (for its UUID and layout); only
        // `unlock` (through `luks2::reencrypt`, digest verified) acts on its re-encryption state.
        let header = crate::luks2::online::read_any_header(&file)?;
        Ok((header, file))
    }

    fn info(
        &self,
        header: &Luks2Header,
        backing: &dyn BlockDevice,
    ) -> Result<VolumeInfo, UnlockError> {
        let seg = self.segment(header, backing)?;
        let ds = header.data_segment();
        Ok(VolumeInfo {
            path: self.path.clone(),
            uuid: header.uuid().to_owned(),
            label: header.label().to_owned(),
            cipher: "aes-xts-plain64",
            key_bits: ds.key_size.unwrap_or(64) * 8,
            sector_size: ds.sector_size,
            data_offset: seg.offset,
            size: seg.size,
        })
    }

    /// The data segment for `status`: a re-encryption's (from the disk) if one is in progress,
    /// else `header`'s.
    fn segment(
        &self,
        header: &Luks2Header,
        backing: &dyn BlockDevice,
    ) -> Result<Segment, UnlockError> {
        if let Some(st) = self.reencrypt_state()? {
            return Ok(Segment {
                offset: st.data_offset,
                size: st.data_size,
                iv_tweak: 0,
            });
        }
        Self::segment_of(header, backing)
    }

    /// The data segment `header` describes, checked against the device. An unlock takes it from
    /// the header its key was verified with, never from a second read of the disk (a header
    /// swapped in between could otherwise move or resize what is served under the pinned key).
    fn segment_of(header: &Luks2Header, backing: &dyn BlockDevice) -> Result<Segment, UnlockError> {
        let ds = header.data_segment();
        let device = backing.size();
        let size = match ds.size {
            SegmentSize::Bytes(n) => n,
            SegmentSize::Dynamic => device.checked_sub(ds.offset).ok_or_else(|| {
                UnlockError::Layout(format!(
                    "data offset {} is past the end ({device} bytes)",
                    ds.offset
                ))
            })?,
        };
        let size = size - size % u64::from(ds.sector_size.max(512));
        if ds.offset.checked_add(size).is_none_or(|end| end > device) || size == 0 {
            return Err(UnlockError::Layout(format!(
                "segment at {} of {size} bytes, device has {device} bytes",
                ds.offset
            )));
        }
        Ok(Segment {
            offset: ds.offset,
            size,
            iv_tweak: ds.iv_tweak,
        })
    }

    /// The re-encryption the header says is in progress (not digest-verified: for layout and
    /// routing the unlock only; `reencrypt::unlock_resuming` verifies before acting).
    fn reencrypt_state(&self) -> Result<Option<crate::luks2::reencrypt::ReencState>, UnlockError> {
        if let Some(up) = self.backing.upstream() {
            return Ok(crate::luks2::reencrypt::peek(&**up)?);
        }
        let file = File::open(self.claimed_path()?).map_err(|source| UnlockError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(crate::luks2::reencrypt::peek(&file)?)
    }

    /// Open a keyslot with `secret` (any slot, or only `slot`) and build the device to serve.
    /// Runs the KDF: seconds of CPU, so callers keep it off the async reactor.
    pub fn unlock(
        &self,
        secret: &SecretBytes,
        slot: Option<u32>,
    ) -> Result<(Arc<dyn BlockDevice>, u32), UnlockError> {
        if self.reencrypt_state()?.is_some() {
            return reencrypt::unlock_resuming(self, secret);
        }
        let (header, file) = self.read_header()?;
        let (key, opened) = match slot {
            Some(s) => (header.unlock_slot(&file, s, secret, &self.limits)?, s),
            None => header.unlock(&file, secret, &self.limits)?,
        };
        Ok((self.device_for(&header, &key)?, opened))
    }

    /// Unseal the header's KMS/HSM tokens (priority order) and build the device to serve;
    /// then, if none opened, the quorums: every machine share reachable, plus the people's
    /// shares already given. Calls the providers over the network: seconds at worst, so off
    /// the reactor.
    pub fn unlock_with_tokens(
        &self,
        settings: &SealSettings,
    ) -> Result<(Arc<dyn BlockDevice>, u32), UnlockError> {
        if self.reencrypt_state()?.is_some() {
            return reencrypt::unlock_resuming_with_tokens(self, settings);
        }
        let (header, file) = self.read_header()?;
        // A header naming another volume is refused before any provider is asked.
        self.pin.get().check_uuid(header.uuid())?;
        let resolve = |json: &serde_json::Map<String, serde_json::Value>| resolver(json, settings);
        let quorums = quorum::tokens(&header);
        let opened = enroll::unlock_with_tokens(&file, &header, &resolve).or_else(|ours| {
            crate::luks2::tokens::clevis::unlock_after_ours(
                &file,
                &header,
                &settings.clevis(),
                ours,
            )
        });
        let first_error = match opened {
            Ok((key, slot, token)) => {
                tracing::info!(token, keyslot = slot, "token unsealed");
                return Ok((self.device_for(&header, &key)?, slot));
            }
            Err(EnrollError::NoTokens) if !quorums.is_empty() => None,
            Err(e) => {
                if let EnrollError::TokensFailed(f) = &e {
                    f.iter()
                        .filter(|x| matches!(&x.reason, TokenFailureReason::Seal(_)))
                        .for_each(|x| crate::metrics::METRICS.provider_error(&x.token_type));
                }
                let transient = match &e {
                    EnrollError::TokensFailed(f) => f.iter().any(
                        |x| matches!(&x.reason, TokenFailureReason::Seal(s) if s.is_transient()),
                    ),
                    other => other.seal_error().is_some_and(|s| s.is_transient()),
                };
                if quorums.is_empty() {
                    return Err(UnlockError::Tokens {
                        message: e.to_string(),
                        transient,
                    });
                }
                Some((e.to_string(), transient))
            }
        };
        let mut messages: Vec<String> = first_error.iter().map(|(m, _)| m.clone()).collect();
        let mut transient = first_error.is_some_and(|(_, t)| t);
        for (id, q) in quorums {
            let q = match q {
                Ok(q) => q,
                Err(e) => {
                    messages.push(format!("quorum token {id}: {e}"));
                    continue;
                }
            };
            match self.try_quorum(&file, &header, id, &q, settings) {
                Ok(key) => {
                    tracing::info!(token = id, keyslot = q.keyslot, "quorum complete");
                    return Ok((self.device_for(&header, &key)?, q.keyslot));
                }
                Err((m, t)) => {
                    transient |= t;
                    messages.push(format!("quorum token {id} (keyslot {}): {m}", q.keyslot));
                }
            }
        }
        Err(UnlockError::Tokens {
            message: messages.join("; "),
            transient,
        })
    }

    /// Unseals the machine shares of quorum `id` not held yet, then opens its keyslot if enough
    /// shares are in. Err: why not, and whether a provider was unreachable.
    fn try_quorum(
        &self,
        file: &dyn crate::luks2::HeaderIo,
        header: &Luks2Header,
        id: u32,
        q: &QuorumToken,
        settings: &SealSettings,
    ) -> Result<VolumeKey, (String, bool)> {
        let held = self.shares.held(id);
        let mut failures = Vec::new();
        let mut transient = false;
        for s in &q.shares {
            if held.contains(&s.x) || !matches!(s.holder, quorum::Holder::Provider { .. }) {
                continue;
            }
            match quorum::open_machine_share(header, q, s, settings) {
                Ok(share) => {
                    tracing::info!(token = id, share = %s.name(), "quorum: machine share unsealed");
                    self.shares
                        .add(id, q.keyslot, q.threshold, q.shares.len(), share);
                }
                Err(e) => {
                    if let QuorumError::Provider { source, .. } = &e {
                        transient |= source.is_transient();
                    }
                    tracing::warn!(token = id, error = %e, "quorum: machine share not available");
                    failures.push(e.to_string());
                }
            }
        }
        let result = self
            .shares
            .with_shares(id, |shares| quorum::open_keyslot(file, header, q, shares));
        match result {
            Ok(key) => {
                self.shares.forget(id);
                Ok(key)
            }
            Err(e @ QuorumError::NotEnough { .. }) => {
                let people = q.passphrase_shares();
                let mut m = e.to_string();
                if people > 0 {
                    m.push_str(&format!(
                        "; people give theirs with `nbdcryptctl unlock --share NAME` within {} s",
                        self.shares.timeout().as_secs()
                    ));
                }
                failures.insert(0, m);
                Err((failures.join("; "), transient))
            }
            Err(e) => {
                // Shares that combine to a wrong secret: none of them is worth keeping.
                self.shares.forget(id);
                failures.insert(0, e.to_string());
                Err((failures.join("; "), transient))
            }
        }
    }

    /// A person's share of a quorum (`nbdcryptctl unlock --share NAME`): checked against its
    /// tag, kept in locked memory, and the quorum opened if it is now complete (machine shares
    /// are unsealed on the way). Runs a KDF: off the reactor.
    pub fn unlock_with_share(
        &self,
        name: &str,
        passphrase: &SecretBytes,
        settings: &SealSettings,
    ) -> Result<(Arc<dyn BlockDevice>, u32), UnlockError> {
        if self.reencrypt_state()?.is_some() {
            return reencrypt::unlock_resuming_with_share(self, name, passphrase, settings);
        }
        let (header, file) = self.read_header()?;
        self.pin.get().check_uuid(header.uuid())?;
        let found = quorum::tokens(&header)
            .into_iter()
            .filter_map(|(id, q)| q.ok().map(|q| (id, q)))
            .find(|(_, q)| q.share_named(name).is_some());
        let Some((id, q)) = found else {
            return Err(UnlockError::WrongShare(
                QuorumError::UnknownShare(name.to_owned()).to_string(),
            ));
        };
        let share = match quorum::open_passphrase_share(&header, &q, name, passphrase, &self.limits)
        {
            Ok(s) => s,
            Err(e @ QuorumError::WrongShare { .. }) => {
                let have = self.shares.held(id).len();
                return Err(UnlockError::WrongShare(format!(
                    "{e}; {have} of {} needed shares received",
                    q.threshold
                )));
            }
            Err(e) => {
                return Err(UnlockError::Tokens {
                    message: e.to_string(),
                    transient: false,
                })
            }
        };
        self.shares
            .add(id, q.keyslot, q.threshold, q.shares.len(), share);
        match self.try_quorum(&file, &header, id, &q, settings) {
            Ok(key) => {
                tracing::info!(token = id, keyslot = q.keyslot, "quorum complete");
                Ok((self.device_for(&header, &key)?, q.keyslot))
            }
            Err((m, _)) => {
                // The details (which machine holder failed) go to the log, not to the person.
                tracing::info!(token = id, share = name, status = %m, "quorum: share accepted");
                Err(UnlockError::SharePending(format!(
                    "share {name:?} accepted; {} of {} needed shares received ({} holders)",
                    self.shares.held(id).len(),
                    q.threshold,
                    q.shares.len()
                )))
            }
        }
    }

    /// Re-seal the token of keyslot `slot` (every nbdcrypt token when `None`) with a fresh
    /// secret under the same KMS/HSM key: crash-safe (new keyslot and token verified before the
    /// old ones go), header only, under the header lock. The volume key comes from unsealing
    /// the old token, so no passphrase is needed. Returns a one-line summary.
    pub fn rekey_tokens(
        &self,
        slot: Option<u32>,
        settings: &SealSettings,
    ) -> Result<String, String> {
        let p = self.path.display();
        // The header's device, writable: the claimed local file (cryptsetup's flock at each
        // header update), or the upstream NBD export (no lock there: best effort, see
        // `luks2::VolumeIo`; every header write is made durable with the upstream's FLUSH
        // before the next step of the rekey relies on it).
        let local;
        let file: &dyn crate::luks2::HeaderIo = match self.backing.upstream() {
            Some(up) => {
                if self.file_options.read_only {
                    return Err(format!(
                        "{p}: served read-only (--read-only): the header cannot be written"
                    ));
                }
                &**up
            }
            None => {
                local = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(self.claimed_path().map_err(|e| e.to_string())?)
                    .map_err(|e| format!("cannot open {p} for writing: {e}"))?;
                &local
            }
        };
        let (mut header, _) = Luks2Header::read(file).map_err(|e| format!("{p}: {e}"))?;
        let targets: Vec<u32> = header
            .tokens()
            .filter(|(_, t)| crate::luks2::tokens::format::is_ours(t.type_name()))
            .filter(|(_, t)| slot.is_none_or(|s| t.keyslots().first() == Some(&s)))
            .map(|(id, _)| id)
            .collect();
        if targets.is_empty() {
            return Err(match slot {
                Some(s) => format!("{p}: keyslot {s} has no nbdcrypt token"),
                None => format!("{p}: the volume has no nbdcrypt token"),
            });
        }
        self.pin
            .get()
            .check_uuid(header.uuid())
            .map_err(|e| format!("{p}: {e}"))?;
        let resolve = |json: &serde_json::Map<String, serde_json::Value>| resolver(json, settings);
        let mut done = Vec::new();
        for id in targets {
            let (key, _) = enroll::unlock_with_token(file, &header, id, &resolve)
                .map_err(|e| format!("token {id}: {e}"))?;
            self.pin
                .get()
                .check_key(&key)
                .map_err(|e| format!("{p}: {e}"))?;
            let json = header
                .token(id)
                .map(|t| t.json().clone())
                .ok_or_else(|| format!("token {id} vanished"))?;
            let provider = resolve(&json).map_err(|e| format!("token {id}: {e}"))?;
            let r = enroll::rekey(file, &mut header, id, &key, &*provider)
                .map_err(|e| format!("token {id}: {e}"))?;
            done.push(format!(
                "token {id} (keyslot {}) -> token {} (keyslot {})",
                r.old.keyslot, r.new.token_id, r.new.keyslot
            ));
        }
        self.refresh_token_metrics();
        Ok(done.join("; "))
    }

    /// Tell the metrics when the header's tokens were sealed (at start and after a rekey).
    pub fn refresh_token_metrics(&self) {
        if let Ok((header, _)) = self.read_header() {
            crate::metrics::METRICS.set_tokens(crate::metrics::token_facts(&header));
            let created =
                crate::luks2::reencrypt::KeyAge::of(&header).map_or(0, |a| a.created_unix);
            crate::metrics::METRICS
                .volume_key_created
                .store(created, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Every unlock ends here: the pin is checked on the key actually recovered.
    fn device_for(
        &self,
        header: &Luks2Header,
        key: &VolumeKey,
    ) -> Result<Arc<dyn BlockDevice>, UnlockError> {
        self.pin.get().check(header, key)?;
        self.pin.set_served(Some(key));
        // The volume key is in hand: shares people gave towards a quorum are no longer needed,
        // whichever way the volume was opened.
        self.shares.forget_partial_quorums();
        reencrypt::complete_pending_wipe(self, header);
        let created = crate::luks2::reencrypt::KeyAge::of(header).map_or(0, |a| a.created_unix);
        crate::metrics::METRICS
            .volume_key_created
            .store(created, std::sync::atomic::Ordering::Relaxed);
        let backing = self.open_backing()?;
        let segment = Self::segment_of(header, &*backing)?;
        let cipher = SectorCipher::new(key, header.data_segment().sector_size as usize)
            .map_err(|e| UnlockError::Layout(e.to_string()))?;
        let allow_discards = self.file_options.allow_discards;
        let crypt = CryptDevice::new(backing, cipher, segment, allow_discards)
            .map_err(|e| UnlockError::Layout(e.to_string()))?;
        // Behind the re-encryption router, so a re-encryption can start under running clients.
        let router = Arc::new(crate::block::reencrypt::ReencryptDevice::single(Arc::new(
            crypt,
        )));
        self.online.set_router(&router);
        Ok(Arc::new(Latch::new(router)))
    }

    /// Current facts from the header on disk.
    pub fn current_info(&self) -> Result<VolumeInfo, UnlockError> {
        let (header, _) = self.read_header()?;
        self.info(&header, &*self.open_backing()?)
    }
}
