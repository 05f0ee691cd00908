//! The volume manager: the one task that owns lock state, the unlocked device (and so the key),
//! and the wrong-passphrase rate limit.
//!
//! Control connections never touch that state; they send a `Request` over a channel to this task
//! and wait for its `Response` (the `ApiAction` shape of cloud-hypervisor's `vmm/src/api`):
//!
//! ```text
//!  control::server task ──(Request, Origin, reply)──> VolumeManager task ──> ExportTable
//!        <──────────────────── Response ────────────────────┘       publish / withdraw
//! ```
//!
//! Slow steps run beside the loop, not in it, so `status` is answered at once while they do:
//! key derivation (`spawn_blocking`; Argon2 takes seconds), waiting for NBD clients to close
//! after a lock, and the final flush. While one is in progress, `unlock` and `lock` answer
//! `busy`.
//!
//! Lock sequence: `withdraw()` (new clients see "locked"; attached sessions finish their
//! in-flight requests, flush and close) → wait until `attached()` is 0 → flush the device → drop
//! it. The crypt layer wipes the key when the last reference drops. A forced lock answers `busy`
//! if clients have not closed within the drain timeout, and keeps waiting in the background.
//!
//! This module knows lock states and the export table; it does not know LUKS2 (the daemon passes
//! an `Unlocker`) or sockets.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::block::{self, BlockDevice};
use crate::control::proto::{ErrorKind, ErrorReply, Request, Response, StatusReport, VolumeState};
use crate::crypto::keys::SecretBytes;
use crate::export::{Export, ExportTable};
use crate::shutdown::Shutdown;

/// Opens the volume with a secret: tries the keyslot `slot` (or every keyslot) and builds the
/// crypt device over the backing store. Runs on a blocking thread.
pub type Unlocker = Box<
    dyn Fn(&SecretBytes, Option<u32>) -> Result<Arc<dyn BlockDevice>, UnlockError> + Send + Sync,
>;

/// Why an unlocker did not return a device.
#[derive(Debug)]
pub enum UnlockError {
    /// No keyslot (of those tried) opened with the secret. Counts toward the rate limit.
    WrongPassphrase,
    /// Anything else (I/O error, damaged header); does not count toward the rate limit. The text
    /// is shown to the operator, so it must not contain secret-derived values.
    Other(String),
}

impl fmt::Display for UnlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnlockError::WrongPassphrase => f.write_str("wrong passphrase or key file"),
            UnlockError::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for UnlockError {}

/// Facts about the volume that hold whether or not it is unlocked (from the LUKS2 header).
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub uuid: String,
    pub cipher: String,
    pub sector_size: u32,
    /// Plaintext bytes of the data segment; the device's own `size()` is shown once unlocked.
    pub size: u64,
}

/// Timing knobs; `Default` is what the daemon uses.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Wrong secrets in a row answered without delay.
    pub free_attempts: u32,
    /// Wait after the first failure past `free_attempts`; doubles with each further failure.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// How long a forced lock waits for attached clients before answering `busy`.
    pub drain_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            free_attempts: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Who sent a request (from the socket's peer credentials): for logs and the locked reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub uid: u32,
    pub pid: Option<i32>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "uid {} (pid {pid})", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

/// Builds the manager; `spawn` starts its task.
pub struct VolumeManager {
    exports: Arc<ExportTable>,
    info: VolumeInfo,
    unlocker: Arc<Unlocker>,
    policy: Policy,
}

/// Sends requests to the manager's task. Cheap to clone; one per control connection.
#[derive(Clone)]
pub struct VolumeHandle {
    tx: mpsc::Sender<Command>,
}

impl VolumeManager {
    pub fn new(exports: Arc<ExportTable>, info: VolumeInfo, unlocker: Unlocker) -> Self {
        VolumeManager { exports, info, unlocker: Arc::new(unlocker), policy: Policy::default() }
    }

    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Start the task that owns the volume. It runs until `shutdown` (or until every handle is
    /// dropped); then it withdraws the export, waits for attached sessions to close, flushes and
    /// drops the device. The join handle yields that final flush's result.
    pub fn spawn(self, shutdown: Shutdown) -> (VolumeHandle, JoinHandle<Result<(), block::Error>>) {
        let (tx, rx) = mpsc::channel(16);
        let task = Task {
            limiter: Limiter::new(self.policy.clone()),
            exports: self.exports,
            info: self.info,
            unlocker: self.unlocker,
            policy: self.policy,
            rx,
            vol: Vol::Locked { reason: "not unlocked since nbdcryptd started".into() },
            pending: Pending::None,
        };
        (VolumeHandle { tx }, tokio::spawn(task.run(shutdown)))
    }
}

impl VolumeHandle {
    /// Ask the manager; always answers (an `internal` error if the daemon is shutting down).
    pub async fn call(&self, request: Request, origin: Origin) -> Response {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Command { request, origin, reply }).await.is_err() {
            return shutting_down();
        }
        answer.await.unwrap_or_else(|_| shutting_down())
    }
}

fn shutting_down() -> Response {
    Response::error(ErrorKind::Internal, "nbdcryptd is shutting down")
}

/// How often a lock re-checks the attached count (the export table has no notification for it).
const DRAIN_POLL: Duration = Duration::from_millis(20);

struct Command {
    request: Request,
    origin: Origin,
    reply: Reply,
}

type Reply = oneshot::Sender<Response>;

/// Lock state proper. "Unlocking" is `Locked` with `Pending::Unlock`.
enum Vol {
    Locked { reason: String },
    Unlocked { device: Arc<dyn BlockDevice>, export: Arc<Export> },
    /// Withdrawn; waiting for clients to close (`Pending::Drain`) or for the final flush
    /// (`Pending::Close`). The export is kept for its counters.
    Locking { device: Arc<dyn BlockDevice>, export: Arc<Export> },
}

/// The slow step in progress, if any.
enum Pending {
    None,
    Unlock {
        task: JoinHandle<Result<Arc<dyn BlockDevice>, UnlockError>>,
        reply: oneshot::Sender<Response>,
        origin: Origin,
    },
    Drain {
        /// Taken when the deadline passes and the requester has been told `busy`.
        reply: Option<oneshot::Sender<Response>>,
        deadline: Instant,
        origin: Origin,
        forced: bool,
    },
    Close {
        task: JoinHandle<Result<(), block::Error>>,
        reply: Option<oneshot::Sender<Response>>,
        origin: Origin,
        forced: bool,
    },
}

enum Event {
    Command(Option<Command>),
    Shutdown,
    UnlockDone(Result<Result<Arc<dyn BlockDevice>, UnlockError>, tokio::task::JoinError>),
    Drained,
    DrainTimedOut,
    Closed(Result<Result<(), block::Error>, tokio::task::JoinError>),
}

struct Task {
    exports: Arc<ExportTable>,
    info: VolumeInfo,
    unlocker: Arc<Unlocker>,
    policy: Policy,
    limiter: Limiter,
    rx: mpsc::Receiver<Command>,
    vol: Vol,
    pending: Pending,
}

impl Task {
    async fn run(mut self, mut shutdown: Shutdown) -> Result<(), block::Error> {
        loop {
            let event = tokio::select! {
                _ = shutdown.triggered() => Event::Shutdown,
                cmd = self.rx.recv() => Event::Command(cmd),
                ev = next_pending(&mut self.pending, &self.exports) => ev,
            };
            match event {
                Event::Shutdown | Event::Command(None) => break,
                Event::Command(Some(cmd)) => self.handle(cmd),
                Event::UnlockDone(res) => self.unlock_done(res),
                Event::Drained => self.drained(),
                Event::DrainTimedOut => self.drain_timed_out(),
                Event::Closed(res) => self.closed(res),
            }
        }
        self.finish().await
    }

    fn handle(&mut self, Command { request, origin, reply }: Command) {
        let kind = request.kind();
        let refused = match request {
            Request::Status => {
                let _ = reply.send(Response::Ok(self.report()));
                return;
            }
            Request::Unlock { secret, slot } => self.unlock(secret, slot, origin, reply),
            Request::Lock { force } => self.lock(force, origin, reply),
        };
        // `None`: the request started a slow step, which answers when it ends.
        if let Some((reply, response)) = refused {
            if let Response::Error(e) = &response {
                info!(%origin, request = %kind, error = %e.kind, "control request refused");
            }
            let _ = reply.send(response);
        }
    }

    /// Start an unlock, or hand back the reply with the reason why not.
    fn unlock(
        &mut self,
        secret: SecretBytes,
        slot: Option<u32>,
        origin: Origin,
        reply: Reply,
    ) -> Option<(Reply, Response)> {
        if let Some(busy) = self.busy() {
            return Some((reply, busy));
        }
        match &self.vol {
            Vol::Unlocked { .. } => {
                let r = Response::error(ErrorKind::AlreadyUnlocked, "the volume is already unlocked");
                return Some((reply, r));
            }
            // Locking always has a pending step, so `busy()` answered above.
            Vol::Locking { .. } | Vol::Locked { .. } => {}
        }
        if let Some(wait) = self.limiter.remaining(Instant::now()) {
            let secs = ceil_secs(wait);
            let r = Response::Error(ErrorReply {
                kind: ErrorKind::RateLimited,
                message: format!("too many wrong passphrases in a row; try again in {secs} s"),
                retry_after_secs: Some(secs),
            });
            return Some((reply, r));
        }
        info!(%origin, slot = ?slot, "unlock: checking the secret against the keyslots");
        let unlocker = self.unlocker.clone();
        // The secret moves to the blocking thread and is wiped when the closure drops it.
        let task = tokio::task::spawn_blocking(move || unlocker(&secret, slot));
        self.pending = Pending::Unlock { task, reply, origin };
        None
    }

    /// Start a lock, or hand back the reply with the reason why not.
    fn lock(&mut self, force: bool, origin: Origin, reply: Reply) -> Option<(Reply, Response)> {
        if let Some(busy) = self.busy() {
            return Some((reply, busy));
        }
        let (device, export) = match &self.vol {
            Vol::Locked { .. } => {
                let r = Response::error(ErrorKind::AlreadyLocked, "the volume is already locked");
                return Some((reply, r));
            }
            Vol::Locking { device, export } | Vol::Unlocked { device, export } => {
                (device.clone(), export.clone())
            }
        };
        let attached = self.exports.attached();
        if attached > 0 && !force {
            return Some((reply, Response::error(
                ErrorKind::Busy,
                format!(
                    "{attached} client(s) attached; disconnect them first (e.g. `nbd-client -d \
                     /dev/nbdX`) or use `lock --force` to make them finish in-flight requests and \
                     close"
                ),
            )));
        }
        info!(%origin, force, attached, "lock: withdrawing the export");
        self.exports.withdraw();
        self.vol = Vol::Locking { device, export };
        // Even with no client attached a session may be between lookup and attach; drain anyway.
        self.pending = Pending::Drain {
            reply: Some(reply),
            deadline: Instant::now() + self.policy.drain_timeout,
            origin,
            forced: force,
        };
        None
    }

    /// `busy` while a slow step runs.
    fn busy(&self) -> Option<Response> {
        let message = match &self.pending {
            Pending::None => return None,
            Pending::Unlock { .. } => "an unlock is in progress; try again when it has finished".to_owned(),
            Pending::Drain { .. } => format!(
                "a lock is in progress: waiting for {} client(s) to close",
                self.exports.attached()
            ),
            Pending::Close { .. } => "a lock is in progress: flushing the volume".to_owned(),
        };
        Some(Response::Error(ErrorReply { kind: ErrorKind::Busy, message, retry_after_secs: Some(1) }))
    }

    fn unlock_done(
        &mut self,
        res: Result<Result<Arc<dyn BlockDevice>, UnlockError>, tokio::task::JoinError>,
    ) {
        let Pending::Unlock { reply, origin, .. } = std::mem::replace(&mut self.pending, Pending::None)
        else {
            return;
        };
        let response = match res {
            Ok(Ok(device)) => {
                self.limiter.success();
                let export = self.exports.publish(device.clone(), true);
                info!(%origin, uuid = %self.info.uuid, size = device.size(), export = %export.name,
                      "unlocked; export published");
                self.vol = Vol::Unlocked { device, export };
                Response::Ok(self.report())
            }
            Ok(Err(UnlockError::WrongPassphrase)) => {
                let failures = self.limiter.failure(Instant::now());
                warn!(%origin, failures, "unlock refused: wrong passphrase or key file");
                let mut message = "wrong passphrase or key file: no keyslot opened with it".to_owned();
                if let Some(wait) = self.limiter.remaining(Instant::now()) {
                    message.push_str(&format!("; the next attempt is possible in {} s", ceil_secs(wait)));
                }
                Response::error(ErrorKind::WrongPassphrase, message)
            }
            Ok(Err(UnlockError::Other(m))) => {
                error!(%origin, error = %m, "unlock failed");
                Response::error(ErrorKind::Internal, format!("cannot unlock: {m}"))
            }
            Err(e) => {
                error!(%origin, error = %e, "unlock task failed");
                Response::error(ErrorKind::Internal, "unlock failed unexpectedly; see the daemon log")
            }
        };
        let _ = reply.send(response);
    }

    fn drained(&mut self) {
        let Pending::Drain { reply, origin, forced, .. } = std::mem::replace(&mut self.pending, Pending::None)
        else {
            return;
        };
        let Vol::Locking { device, .. } = &self.vol else {
            return;
        };
        info!(%origin, "lock: no client attached; flushing");
        let device = device.clone();
        let task = tokio::task::spawn_blocking(move || device.flush());
        self.pending = Pending::Close { task, reply, origin, forced };
    }

    fn drain_timed_out(&mut self) {
        let Pending::Drain { reply, .. } = &mut self.pending else {
            return;
        };
        let attached = self.exports.attached();
        warn!(attached, timeout = ?self.policy.drain_timeout, "lock: clients still attached; still waiting");
        if let Some(reply) = reply.take() {
            let _ = reply.send(Response::Error(ErrorReply {
                kind: ErrorKind::Busy,
                message: format!(
                    "the export is withdrawn, but {attached} client(s) did not close within {} s; \
                     the volume locks (and the key is wiped) as soon as they do: check with \
                     `nbdcryptctl status`",
                    self.policy.drain_timeout.as_secs()
                ),
                retry_after_secs: Some(ceil_secs(self.policy.drain_timeout)),
            }));
        }
    }

    fn closed(&mut self, res: Result<Result<(), block::Error>, tokio::task::JoinError>) {
        let Pending::Close { reply, origin, forced, .. } = std::mem::replace(&mut self.pending, Pending::None)
        else {
            return;
        };
        let how = if forced { "locked (forced)" } else { "locked" };
        let (reason, failure) = match res {
            Ok(Ok(())) => (format!("{how} by {origin}"), None),
            Ok(Err(e)) => {
                error!(%origin, error = %e, "lock: final flush failed");
                (format!("{how} by {origin}; the final flush failed: {e}"), Some(e.to_string()))
            }
            Err(e) => {
                error!(%origin, error = %e, "lock: flush task failed");
                (format!("{how} by {origin}; the final flush failed"), Some(e.to_string()))
            }
        };
        self.drop_device(reason);
        info!(%origin, "locked; key dropped");
        let response = match failure {
            None => Response::Ok(self.report()),
            Some(e) => Response::error(
                ErrorKind::Internal,
                format!("the volume is locked, but the final flush failed ({e}); writes acknowledged \
                         before the lock may not be on stable storage"),
            ),
        };
        if let Some(reply) = reply {
            let _ = reply.send(response);
        }
    }

    /// Forget the device; the crypt layer wipes the key when its last reference drops.
    fn drop_device(&mut self, reason: String) {
        let old = std::mem::replace(&mut self.vol, Vol::Locked { reason });
        if let Vol::Unlocked { device, export } | Vol::Locking { device, export } = old {
            drop(export);
            // 1 is ours; anything more is a session that has not finished dropping its export.
            let others = Arc::strong_count(&device) - 1;
            if others > 0 {
                warn!(others, "device still referenced elsewhere; its key is wiped when they drop it");
            }
        }
    }

    /// Shutdown: stop serving, let sessions close, flush, wipe.
    async fn finish(mut self) -> Result<(), block::Error> {
        if let Pending::Unlock { reply, .. } = std::mem::replace(&mut self.pending, Pending::None) {
            // The blocking thread finishes on its own; the device it may return is dropped unused.
            let _ = reply.send(shutting_down());
        }
        let device = match &self.vol {
            Vol::Locked { .. } => return Ok(()),
            Vol::Unlocked { device, .. } | Vol::Locking { device, .. } => device.clone(),
        };
        self.exports.withdraw();
        let mut waited = Duration::ZERO;
        while self.exports.attached() > 0 {
            tokio::time::sleep(DRAIN_POLL).await;
            waited += DRAIN_POLL;
            if waited.as_millis() % 10_000 < DRAIN_POLL.as_millis() {
                info!(attached = self.exports.attached(), "shutdown: waiting for clients to close");
            }
        }
        let res = tokio::task::spawn_blocking(move || device.flush()).await.unwrap_or_else(|e| {
            error!(error = %e, "final flush task failed");
            Err(block::Error::new(block::ErrorKind::Io))
        });
        self.drop_device("nbdcryptd stopped".into());
        res
    }

    fn report(&self) -> StatusReport {
        let (state, reason, device, export) = match (&self.vol, &self.pending) {
            (Vol::Locked { reason }, Pending::Unlock { .. }) => (
                VolumeState::Unlocking,
                Some(format!("{reason}; checking a secret (key derivation takes a few seconds)")),
                None,
                None,
            ),
            (Vol::Locked { reason }, _) => (VolumeState::Locked, Some(reason.clone()), None, None),
            (Vol::Unlocked { device, export }, _) => (VolumeState::Unlocked, None, Some(device), Some(export)),
            (Vol::Locking { device, export }, pending) => {
                let doing = match pending {
                    Pending::Close { .. } => "flushing before dropping the key".to_owned(),
                    _ => format!("waiting for {} client(s) to close", self.exports.attached()),
                };
                (VolumeState::Locking, Some(format!("locking: {doing}")), Some(device), Some(export))
            }
        };
        let stat = |f: fn(&Export) -> u64| export.map_or(0, |e| f(e));
        StatusReport {
            state,
            volume_uuid: self.info.uuid.clone(),
            cipher: self.info.cipher.clone(),
            sector_size: self.info.sector_size,
            size: device.map_or(self.info.size, |d| d.size()),
            export_name: self.exports.name().to_owned(),
            clients: self.exports.attached() as u64,
            reads: stat(|e| e.stats.reads.load(Ordering::Relaxed)),
            writes: stat(|e| e.stats.writes.load(Ordering::Relaxed)),
            bytes_read: stat(|e| e.stats.bytes_read.load(Ordering::Relaxed)),
            bytes_written: stat(|e| e.stats.bytes_written.load(Ordering::Relaxed)),
            flushes: stat(|e| e.stats.flushes.load(Ordering::Relaxed)),
            errors: stat(|e| e.stats.errors.load(Ordering::Relaxed)),
            locked_reason: reason,
        }
    }
}

async fn next_pending(pending: &mut Pending, exports: &ExportTable) -> Event {
    match pending {
        Pending::None => std::future::pending().await,
        Pending::Unlock { task, .. } => Event::UnlockDone(task.await),
        Pending::Drain { reply, deadline, .. } => loop {
            if exports.attached() == 0 {
                return Event::Drained;
            }
            if reply.is_some() && Instant::now() >= *deadline {
                return Event::DrainTimedOut;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        },
        Pending::Close { task, .. } => Event::Closed(task.await),
    }
}

fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// Wrong secrets in a row: the first `free_attempts` cost nothing; after that each failure makes
/// the next attempt wait `base_delay * 2^(extra failures - 1)`, at most `max_delay`.
struct Limiter {
    policy: Policy,
    failures: u32,
    blocked_until: Option<Instant>,
}

impl Limiter {
    fn new(policy: Policy) -> Self {
        Limiter { policy, failures: 0, blocked_until: None }
    }

    /// How long until the next attempt is allowed, if it is not allowed now.
    fn remaining(&self, now: Instant) -> Option<Duration> {
        self.blocked_until.and_then(|t| t.checked_duration_since(now)).filter(|d| !d.is_zero())
    }

    /// Record a failure; returns the count in a row.
    fn failure(&mut self, now: Instant) -> u32 {
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.policy.free_attempts {
            let doublings = self.failures - self.policy.free_attempts;
            let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
            let delay = self.policy.base_delay.saturating_mul(factor).min(self.policy.max_delay);
            self.blocked_until = Some(now + delay);
        }
        self.failures
    }

    fn success(&mut self) {
        self.failures = 0;
        self.blocked_until = None;
    }
}

#[cfg(test)]
mod tests;
