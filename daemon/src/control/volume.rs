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

use crate::audit::{AuditEvent, AuditEventKind, AuditLog};
use crate::block::{self, BlockDevice};
use crate::control::proto::{ErrorKind, ErrorReply, Request, Response, StatusReport, VolumeState};
use crate::crypto::keys::SecretBytes;
use crate::export::{Export, ExportTable};
use crate::shutdown::Shutdown;

/// Opens the volume: with a secret (keyslot `slot`, or every keyslot), or with the KMS/HSM
/// tokens in the header; builds the crypt device over the backing store. Runs on a blocking
/// thread.
pub type Unlocker =
    Box<dyn Fn(UnlockWith) -> Result<Arc<dyn BlockDevice>, UnlockError> + Send + Sync>;

/// Re-seals token keyslots (`None`: all) with fresh secrets; returns a summary for the
/// operator, or why not. Runs on a blocking thread; takes the header lock as cryptsetup does.
pub type Rekeyer = Box<dyn Fn(Option<u32>) -> Result<String, String> + Send + Sync>;

/// What an unlock uses. The secret moves to the unlocker's thread and is wiped there.
pub enum UnlockWith {
    Secret {
        secret: SecretBytes,
        slot: Option<u32>,
    },
    /// The header's sealed-keyslot tokens, tried in priority order.
    Tokens,
    /// A person's quorum share: their passphrase for the share `name`.
    Share { name: String, secret: SecretBytes },
}

/// Extra words for `status` while locked (a quorum being assembled: "1 of 2 shares
/// received"), asked at each status.
pub type StatusHook = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Why an unlocker did not return a device.
#[derive(Debug)]
pub enum UnlockError {
    /// No keyslot (of those tried) opened with the secret. Counts toward the rate limit.
    WrongPassphrase,
    /// No token opened the volume (each failure named); does not count toward the rate limit:
    /// nothing was guessed. `transient` when a provider was unreachable (worth retrying).
    Tokens { message: String, transient: bool },
    /// The configuration's volume pin refused what was opened (another volume, another volume
    /// key: a replaced header). The volume stays locked; no rate limit (nothing was guessed).
    Refused(String),
    /// Anything else (I/O error, damaged header); does not count toward the rate limit. The text
    /// is shown to the operator, so it must not contain secret-derived values.
    Other(String),
    /// A quorum share was wrong (named in the text) or unknown. Counts toward the rate limit.
    WrongShare(String),
    /// A quorum share was accepted and kept; the quorum is not complete yet (the text says how
    /// many are in). Answered with the status.
    SharePending(String),
}

impl fmt::Display for UnlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnlockError::WrongPassphrase => f.write_str("wrong passphrase or key file"),
            UnlockError::Tokens { message, .. } => f.write_str(message),
            UnlockError::Refused(m)
            | UnlockError::Other(m)
            | UnlockError::WrongShare(m)
            | UnlockError::SharePending(m) => f.write_str(m),
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
    audit: Arc<AuditLog>,
    rekeyer: Option<Arc<Rekeyer>>,
    reencryptor: Option<Arc<crate::control::reencrypt::Reencryptor>>,
    status_hook: Option<StatusHook>,
}

/// Sends requests to the manager's task. Cheap to clone; one per control connection.
#[derive(Clone)]
pub struct VolumeHandle {
    tx: mpsc::Sender<Command>,
}

impl VolumeManager {
    pub fn new(exports: Arc<ExportTable>, info: VolumeInfo, unlocker: Unlocker) -> Self {
        VolumeManager {
            exports,
            info,
            unlocker: Arc::new(unlocker),
            policy: Policy::default(),
            audit: Arc::new(AuditLog::tracing()),
            rekeyer: None,
            reencryptor: None,
            status_hook: None,
        }
    }

    /// Words `status` adds while locked (see [`StatusHook`]).
    pub fn with_status_hook(mut self, hook: StatusHook) -> Self {
        self.status_hook = Some(hook);
        self
    }

    /// What `reencrypt` requests drive (without one they are refused).
    pub fn with_reencryptor(
        mut self,
        reencryptor: Arc<crate::control::reencrypt::Reencryptor>,
    ) -> Self {
        self.reencryptor = Some(reencryptor);
        self
    }

    /// What `rekey` requests run (without one they are refused).
    pub fn with_rekeyer(mut self, rekeyer: Rekeyer) -> Self {
        self.rekeyer = Some(Arc::new(rekeyer));
        self
    }

    /// Where unlock and lock events are recorded (default: the log).
    pub fn with_audit(mut self, audit: Arc<AuditLog>) -> Self {
        self.audit = audit;
        self
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
            audit: self.audit,
            rekeyer: self.rekeyer,
            reencryptor: self.reencryptor,
            status_hook: self.status_hook,
            rx,
            vol: Vol::Locked {
                reason: "not unlocked since nbdcryptd started".into(),
            },
            pending: Pending::None,
        };
        (VolumeHandle { tx }, tokio::spawn(task.run(shutdown)))
    }
}

impl VolumeHandle {
    /// Ask the manager; always answers (an `internal` error if the daemon is shutting down).
    pub async fn call(&self, request: Request, origin: Origin) -> Response {
        let (reply, answer) = oneshot::channel();
        if self
            .tx
            .send(Command {
                request,
                origin,
                reply,
            })
            .await
            .is_err()
        {
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
    Locked {
        reason: String,
    },
    Unlocked {
        device: Arc<dyn BlockDevice>,
        export: Arc<Export>,
    },
    /// Withdrawn; waiting for clients to close (`Pending::Drain`) or for the final flush
    /// (`Pending::Close`). The export is kept for its counters.
    Locking {
        device: Arc<dyn BlockDevice>,
        export: Arc<Export>,
    },
}

/// The slow step in progress, if any.
enum Pending {
    None,
    Unlock {
        task: JoinHandle<Result<Arc<dyn BlockDevice>, UnlockError>>,
        reply: oneshot::Sender<Response>,
        origin: Origin,
        /// "passphrase", "token" or "share", for the audit log.
        method: &'static str,
        /// The share's name, for a quorum share.
        share: Option<String>,
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
    audit: Arc<AuditLog>,
    rekeyer: Option<Arc<Rekeyer>>,
    reencryptor: Option<Arc<crate::control::reencrypt::Reencryptor>>,
    status_hook: Option<StatusHook>,
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

    fn handle(
        &mut self,
        Command {
            request,
            origin,
            reply,
        }: Command,
    ) {
        let refused = match request {
            Request::Status => {
                let _ = reply.send(Response::Ok(self.report()));
                return;
            }
            Request::Stats => {
                let mut report = self.report();
                report.metrics = Some(Box::new(crate::metrics::snapshot::Snapshot::take(
                    &crate::metrics::METRICS,
                )));
                let _ = reply.send(Response::Ok(report));
                return;
            }
            Request::Unlock { secret, slot } => {
                self.unlock(UnlockWith::Secret { secret, slot }, origin, reply)
            }
            Request::UnlockToken => self.unlock(UnlockWith::Tokens, origin, reply),
            Request::Share { name, secret } => {
                self.unlock(UnlockWith::Share { name, secret }, origin, reply)
            }
            Request::Rekey { slot } => self.rekey(slot, origin, reply),
            Request::Lock { force } => self.lock(force, origin, reply),
            Request::Reencrypt {
                action,
                secret,
                max_rate,
                start,
            } => self.reencrypt(action, secret, max_rate, start, origin, reply),
            Request::ReencryptShare { name, secret } => {
                self.reencrypt_share(name, secret, origin, reply)
            }
        };
        // `None`: the request started a slow step, which answers when it ends. (The control
        // server logs every outcome; this task logs what it does.)
        if let Some((reply, response)) = refused {
            let _ = reply.send(response);
        }
    }

    /// Start an unlock, or hand back the reply with the reason why not.
    fn unlock(
        &mut self,
        with: UnlockWith,
        origin: Origin,
        reply: Reply,
    ) -> Option<(Reply, Response)> {
        if let Some(busy) = self.busy() {
            return Some((reply, busy));
        }
        match &self.vol {
            Vol::Unlocked { .. } => {
                let r =
                    Response::error(ErrorKind::AlreadyUnlocked, "the volume is already unlocked");
                return Some((reply, r));
            }
            // Locking always has a pending step, so `busy()` answered above.
            Vol::Locking { .. } | Vol::Locked { .. } => {}
        }
        let by_secret = matches!(with, UnlockWith::Secret { .. } | UnlockWith::Share { .. });
        if let (true, Some(wait)) = (by_secret, self.limiter.remaining(Instant::now())) {
            let secs = ceil_secs(wait);
            let r = Response::Error(ErrorReply {
                kind: ErrorKind::RateLimited,
                message: format!("too many wrong passphrases in a row; try again in {secs} s"),
                retry_after_secs: Some(secs),
            });
            return Some((reply, r));
        }
        match &with {
            UnlockWith::Secret { slot, .. } => {
                info!(%origin, slot = ?slot, "unlock: checking the secret against the keyslots")
            }
            UnlockWith::Tokens => info!(%origin, "unlock: trying the KMS/HSM tokens"),
            UnlockWith::Share { name, .. } => {
                info!(%origin, share = %name, "unlock: checking a quorum share")
            }
        }
        let (method, share) = match &with {
            UnlockWith::Secret { .. } => ("passphrase", None),
            UnlockWith::Tokens => ("token", None),
            UnlockWith::Share { name, .. } => ("share", Some(name.clone())),
        };
        let unlocker = self.unlocker.clone();
        // The secret moves to the blocking thread and is wiped when the unlocker drops it.
        let task = tokio::task::spawn_blocking(move || unlocker(with));
        self.pending = Pending::Unlock {
            task,
            reply,
            origin,
            method,
            share,
        };
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
            return Some((
                reply,
                Response::error(
                    ErrorKind::Busy,
                    format!(
                    "{attached} client(s) attached; disconnect them first (e.g. `nbd-client -d \
                     /dev/nbdX`) or use `lock --force` to make them finish in-flight requests and \
                     close"
                ),
                ),
            ));
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
            Pending::Unlock { .. } => {
                "an unlock is in progress; try again when it has finished".to_owned()
            }
            Pending::Drain { .. } => format!(
                "a lock is in progress: waiting for {} client(s) to close",
                self.exports.attached()
            ),
            Pending::Close { .. } => "a lock is in progress: flushing the volume".to_owned(),
        };
        Some(Response::Error(ErrorReply {
            kind: ErrorKind::Busy,
            message,
            retry_after_secs: Some(1),
        }))
    }

    /// Rekeying touches only the header: it runs beside whatever the volume is doing, and
    /// answers when done. Concurrent header updates are serialised by the header lock.
    fn rekey(
        &mut self,
        slot: Option<u32>,
        origin: Origin,
        reply: Reply,
    ) -> Option<(Reply, Response)> {
        let Some(rekeyer) = self.rekeyer.clone() else {
            return Some((
                reply,
                Response::error(ErrorKind::BadRequest, "this daemon cannot rekey"),
            ));
        };
        info!(%origin, slot = ?slot, "rekey: re-sealing token keyslots");
        let (audit, uuid) = (self.audit.clone(), self.info.uuid.clone());
        let report = self.report();
        tokio::spawn(async move {
            let done = tokio::task::spawn_blocking(move || rekeyer(slot)).await;
            let mut event = AuditEvent::new(AuditEventKind::Rekey)
                .volume(&uuid)
                .peer(origin.uid, origin.pid.unwrap_or(0));
            if let Some(s) = slot {
                event = event.keyslot(s);
            }
            let response = match done {
                Ok(Ok(summary)) => {
                    info!(%origin, %summary, "rekey done");
                    Response::Ok(report)
                }
                Ok(Err(e)) => {
                    warn!(%origin, error = %e, "rekey failed");
                    event = event.failed(&e);
                    Response::error(ErrorKind::TokenFailed, e)
                }
                Err(e) => {
                    event = event.failed(&e);
                    Response::error(
                        ErrorKind::Internal,
                        "rekey failed unexpectedly; see the daemon log",
                    )
                }
            };
            if let Err(e) = audit.record(&event) {
                error!(error = %e, "cannot write the audit log");
            }
            let _ = reply.send(response);
        });
        None
    }

    /// `reencrypt start|pause|resume|status`: the worker runs beside everything else; start
    /// (new keyslots: key derivation) runs on a blocking thread and answers when done.
    fn reencrypt(
        &mut self,
        action: crate::control::proto::ReencryptAction,
        secret: Option<SecretBytes>,
        max_rate: Option<u64>,
        start: crate::control::proto::StartOptions,
        origin: Origin,
        reply: Reply,
    ) -> Option<(Reply, Response)> {
        use crate::control::proto::ReencryptAction;
        use crate::control::reencrypt::Refusal;
        let Some(r) = self.reencryptor.clone() else {
            return Some((
                reply,
                Response::error(ErrorKind::BadRequest, "this daemon cannot re-encrypt"),
            ));
        };
        if action == ReencryptAction::Start {
            if let Some(busy) = self.busy() {
                return Some((reply, busy));
            }
            if !matches!(self.vol, Vol::Unlocked { .. }) {
                return Some((
                    reply,
                    Response::error(
                        ErrorKind::Busy,
                        "the volume is not unlocked: unlock it first (the re-encryption runs \
                         while it is served)",
                    ),
                ));
            }
        }
        let report = self.report();
        tokio::spawn(async move {
            let r2 = r.clone();
            let done = tokio::task::spawn_blocking(move || {
                r2.command_with(action, secret.as_ref(), max_rate, start, origin)
            })
            .await;
            let response = match done {
                Ok(Ok(())) => Response::Ok(StatusReport {
                    reencrypt: r.report().map(Box::new),
                    ..report
                }),
                Ok(Err((Refusal::Busy, m))) => Response::Error(ErrorReply {
                    kind: ErrorKind::Busy,
                    message: m,
                    retry_after_secs: None,
                }),
                Ok(Err((Refusal::Failed, m))) => Response::error(ErrorKind::Internal, m),
                Err(_) => Response::error(
                    ErrorKind::Internal,
                    "the re-encryption request failed unexpectedly; see the daemon log",
                ),
            };
            let _ = reply.send(response);
        });
        None
    }

    /// `reencrypt --share NAME`: a person's quorum-share passphrase, checked against the
    /// share's tag off the reactor and staged for the next start (see
    /// `unlock::reencrypt::VolumeBackend::stage_share`).
    fn reencrypt_share(
        &mut self,
        name: String,
        secret: SecretBytes,
        origin: Origin,
        reply: Reply,
    ) -> Option<(Reply, Response)> {
        let Some(r) = self.reencryptor.clone() else {
            return Some((
                reply,
                Response::error(ErrorKind::BadRequest, "this daemon cannot re-encrypt"),
            ));
        };
        if !matches!(self.vol, Vol::Unlocked { .. }) {
            return Some((
                reply,
                Response::error(
                    ErrorKind::Busy,
                    "the volume is not unlocked: unlock it first (a share is staged for an \
                     online re-encryption of the volume being served)",
                ),
            ));
        }
        let report = self.report();
        tokio::spawn(async move {
            let done =
                tokio::task::spawn_blocking(move || r.stage_share(&name, secret, origin)).await;
            let response = match done {
                Ok(Ok(_)) => Response::Ok(report),
                Ok(Err((_, m))) if m.contains("is wrong") => Response::Error(ErrorReply {
                    kind: ErrorKind::WrongPassphrase,
                    message: m,
                    retry_after_secs: None,
                }),
                Ok(Err((_, m))) => Response::error(ErrorKind::BadRequest, m),
                Err(_) => Response::error(
                    ErrorKind::Internal,
                    "staging the share failed unexpectedly; see the daemon log",
                ),
            };
            let _ = reply.send(response);
        });
        None
    }

    fn record(&self, event: &AuditEvent) {
        if let Err(e) = self.audit.record(event) {
            error!(error = %e, "cannot write the audit log");
        }
    }

    fn unlock_done(
        &mut self,
        res: Result<Result<Arc<dyn BlockDevice>, UnlockError>, tokio::task::JoinError>,
    ) {
        let Pending::Unlock {
            reply,
            origin,
            method,
            share,
            ..
        } = std::mem::replace(&mut self.pending, Pending::None)
        else {
            return;
        };
        let mut event = AuditEvent::new(match &res {
            Ok(Ok(_)) => AuditEventKind::UnlockOk,
            Ok(Err(UnlockError::SharePending(_))) => AuditEventKind::ShareAccepted,
            _ => AuditEventKind::UnlockFailed,
        })
        .volume(&self.info.uuid)
        .detail("method", method)
        .peer(origin.uid, origin.pid.unwrap_or(0));
        if let Some(name) = &share {
            event = event.detail("share", name.as_str());
        }
        match &res {
            Ok(Err(UnlockError::SharePending(m))) => event = event.detail("quorum", m.as_str()),
            Ok(Err(e)) => event = event.failed(e),
            Err(e) => event = event.failed(e),
            Ok(Ok(_)) => {}
        }
        self.record(&event);
        let response = match res {
            Ok(Ok(device)) => {
                self.limiter.success();
                let export = self.exports.publish(device.clone(), true);
                info!(%origin, uuid = %self.info.uuid, size = device.size(), export = %export.name,
                      "unlocked; export published");
                self.vol = Vol::Unlocked { device, export };
                if let Some(r) = &self.reencryptor {
                    r.on_unlock();
                }
                Response::Ok(self.report())
            }
            Ok(Err(UnlockError::WrongPassphrase)) => {
                let failures = self.limiter.failure(Instant::now());
                warn!(%origin, failures, "unlock refused: wrong passphrase or key file");
                let mut message =
                    "wrong passphrase or key file: no keyslot opened with it".to_owned();
                if let Some(wait) = self.limiter.remaining(Instant::now()) {
                    message.push_str(&format!(
                        "; the next attempt is possible in {} s",
                        ceil_secs(wait)
                    ));
                }
                Response::error(ErrorKind::WrongPassphrase, message)
            }
            Ok(Err(UnlockError::Tokens { message, transient })) => {
                warn!(%origin, error = %message, transient, "unlock by token failed");
                // `status` shows why the volume is still locked.
                if let Vol::Locked { reason } = &mut self.vol {
                    *reason = format!("unlock by token failed: {message}");
                }
                let kind = if transient {
                    ErrorKind::ProviderUnreachable
                } else {
                    ErrorKind::TokenFailed
                };
                Response::error(kind, format!("no token opened the volume: {message}"))
            }
            Ok(Err(UnlockError::WrongShare(m))) => {
                let failures = self.limiter.failure(Instant::now());
                warn!(%origin, failures, error = %m, "quorum share refused");
                let mut message = m;
                if let Some(wait) = self.limiter.remaining(Instant::now()) {
                    message.push_str(&format!(
                        "; the next attempt is possible in {} s",
                        ceil_secs(wait)
                    ));
                }
                Response::error(ErrorKind::WrongPassphrase, message)
            }
            Ok(Err(UnlockError::SharePending(m))) => {
                // A good share: not a failure, but not an unlock either.
                info!(%origin, status = %m, "quorum share accepted");
                Response::Ok(self.report())
            }
            Ok(Err(UnlockError::Refused(m))) => {
                error!(%origin, error = %m, "unlock refused by the volume pin; staying locked");
                if let Vol::Locked { reason } = &mut self.vol {
                    *reason = format!("unlock refused: {m}");
                }
                // Not a wrong passphrase, not a provider's refusal: the disk is not the pinned one.
                Response::error(ErrorKind::Internal, format!("unlock refused: {m}"))
            }
            Ok(Err(UnlockError::Other(m))) => {
                error!(%origin, error = %m, "unlock failed");
                Response::error(ErrorKind::Internal, format!("cannot unlock: {m}"))
            }
            Err(e) => {
                error!(%origin, error = %e, "unlock task failed");
                Response::error(
                    ErrorKind::Internal,
                    "unlock failed unexpectedly; see the daemon log",
                )
            }
        };
        let _ = reply.send(response);
    }

    fn drained(&mut self) {
        let Pending::Drain {
            reply,
            origin,
            forced,
            ..
        } = std::mem::replace(&mut self.pending, Pending::None)
        else {
            return;
        };
        let Vol::Locking { device, .. } = &self.vol else {
            return;
        };
        info!(%origin, "lock: no client attached; flushing");
        let device = device.clone();
        let reencryptor = self.reencryptor.clone();
        let task = tokio::task::spawn_blocking(move || {
            // A running re-encryption stops at its zone boundary first; the header keeps it.
            if let Some(r) = reencryptor {
                r.stop();
            }
            device.flush()
        });
        self.pending = Pending::Close {
            task,
            reply,
            origin,
            forced,
        };
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
        let Pending::Close {
            reply,
            origin,
            forced,
            ..
        } = std::mem::replace(&mut self.pending, Pending::None)
        else {
            return;
        };
        let how = if forced { "locked (forced)" } else { "locked" };
        let (reason, failure) = match res {
            Ok(Ok(())) => (format!("{how} by {origin}"), None),
            Ok(Err(e)) => {
                error!(%origin, error = %e, "lock: final flush failed");
                (
                    format!("{how} by {origin}; the final flush failed: {e}"),
                    Some(e.to_string()),
                )
            }
            Err(e) => {
                error!(%origin, error = %e, "lock: flush task failed");
                (
                    format!("{how} by {origin}; the final flush failed"),
                    Some(e.to_string()),
                )
            }
        };
        self.drop_device(reason);
        info!(%origin, "locked; key dropped");
        let mut event = AuditEvent::new(AuditEventKind::Lock)
            .volume(&self.info.uuid)
            .detail("forced", forced)
            .peer(origin.uid, origin.pid.unwrap_or(0));
        if let Some(e) = &failure {
            event = event.failed(e);
        }
        self.record(&event);
        let response = match failure {
            None => Response::Ok(self.report()),
            Some(e) => Response::error(
                ErrorKind::Internal,
                format!(
                    "the volume is locked, but the final flush failed ({e}); writes acknowledged \
                         before the lock may not be on stable storage"
                ),
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
                warn!(
                    others,
                    "device still referenced elsewhere; its key is wiped when they drop it"
                );
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
                info!(
                    attached = self.exports.attached(),
                    "shutdown: waiting for clients to close"
                );
            }
        }
        let reencryptor = self.reencryptor.clone();
        let res = tokio::task::spawn_blocking(move || {
            if let Some(r) = reencryptor {
                r.stop();
            }
            device.flush()
        })
        .await
        .unwrap_or_else(|e| {
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
                Some(format!(
                    "{reason}; checking a secret (key derivation takes a few seconds)"
                )),
                None,
                None,
            ),
            (Vol::Locked { reason }, _) => {
                let quorum = self.status_hook.as_ref().and_then(|h| h());
                let reason = match quorum {
                    Some(q) => format!("{reason}; {q}"),
                    None => reason.clone(),
                };
                (VolumeState::Locked, Some(reason), None, None)
            }
            (Vol::Unlocked { device, export }, _) => {
                (VolumeState::Unlocked, None, Some(device), Some(export))
            }
            (Vol::Locking { device, export }, pending) => {
                let doing = match pending {
                    Pending::Close { .. } => "flushing before dropping the key".to_owned(),
                    _ => format!("waiting for {} client(s) to close", self.exports.attached()),
                };
                (
                    VolumeState::Locking,
                    Some(format!("locking: {doing}")),
                    Some(device),
                    Some(export),
                )
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
            reencrypt: self
                .reencryptor
                .as_ref()
                .and_then(|r| r.report())
                .map(Box::new),
            metrics: None,
            upstream: crate::upstream::status_line(),
            volume_key_created: crate::control::reencrypt::volume_key_created(),
        }
    }
}

async fn next_pending(pending: &mut Pending, exports: &ExportTable) -> Event {
    match pending {
        Pending::None => std::future::pending().await,
        Pending::Unlock { task, .. } => Event::UnlockDone(task.await),
        Pending::Drain {
            reply, deadline, ..
        } => loop {
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
        Limiter {
            policy,
            failures: 0,
            blocked_until: None,
        }
    }

    /// How long until the next attempt is allowed, if it is not allowed now.
    fn remaining(&self, now: Instant) -> Option<Duration> {
        self.blocked_until
            .and_then(|t| t.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Record a failure; returns the count in a row.
    fn failure(&mut self, now: Instant) -> u32 {
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.policy.free_attempts {
            let doublings = self.failures - self.policy.free_attempts;
            let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
            let delay = self
                .policy
                .base_delay
                .saturating_mul(factor)
                .min(self.policy.max_delay);
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
pub(crate) mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::Mutex;

    use super::*;
    use crate::block::{Caps, Extent, ZeroFlags};
    use crate::shutdown::{self, ShutdownTrigger};

    pub(crate) const GOOD: &[u8] = b"correct horse";
    const ORIGIN: Origin = Origin {
        uid: 0,
        pid: Some(42),
    };

    /// A small in-memory device that records flushes and whether it was dropped (where the
    /// crypt layer would wipe its key).
    pub(crate) struct MemDevice {
        data: Mutex<Vec<u8>>,
        flushes: Arc<AtomicUsize>,
        dropped: Arc<AtomicBool>,
    }

    impl Drop for MemDevice {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    impl BlockDevice for MemDevice {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn caps(&self) -> Caps {
            Caps {
                read_only: false,
                trim: false,
                fast_zero: false,
                min_block: 512,
                preferred_block: 4096,
                rotational: false,
            }
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), block::Error> {
            let d = self.data.lock().unwrap();
            let o = usize::try_from(offset).unwrap();
            buf.copy_from_slice(&d[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<(), block::Error> {
            let mut d = self.data.lock().unwrap();
            let o = usize::try_from(offset).unwrap();
            d[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> Result<(), block::Error> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), block::Error> {
            Err(block::Error::new(block::ErrorKind::Unsupported))
        }
        fn write_zeroes(&self, offset: u64, length: u64, _: ZeroFlags) -> Result<(), block::Error> {
            let mut d = self.data.lock().unwrap();
            d[usize::try_from(offset).unwrap()..usize::try_from(offset + length).unwrap()].fill(0);
            Ok(())
        }
        fn cache(&self, _: u64, _: u64) -> Result<(), block::Error> {
            Ok(())
        }
        fn extents(&self, _: u64, length: u64) -> Result<Vec<Extent>, block::Error> {
            Ok(vec![Extent {
                length,
                hole: false,
                zero: false,
            }])
        }
    }

    /// What the fake unlocker did, for assertions.
    #[derive(Clone, Default)]
    pub(crate) struct Probe {
        pub attempts: Arc<AtomicUsize>,
        pub flushes: Arc<AtomicUsize>,
        pub dropped: Arc<AtomicBool>,
    }

    /// Accepts `GOOD` (any slot but 7) and returns a 64 KiB MemDevice.
    pub(crate) fn fake_unlocker(probe: &Probe) -> Unlocker {
        let probe = probe.clone();
        Box::new(move |with: UnlockWith| {
            let UnlockWith::Secret { secret, slot } = with else {
                return Err(UnlockError::Tokens {
                    message: "no tokens".into(),
                    transient: false,
                });
            };
            probe.attempts.fetch_add(1, Ordering::SeqCst);
            if secret.expose_secret() != GOOD || slot == Some(7) {
                return Err(UnlockError::WrongPassphrase);
            }
            probe.dropped.store(false, Ordering::SeqCst);
            Ok(Arc::new(MemDevice {
                data: Mutex::new(vec![0; 64 * 1024]),
                flushes: probe.flushes.clone(),
                dropped: probe.dropped.clone(),
            }) as Arc<dyn BlockDevice>)
        })
    }

    pub(crate) fn info() -> VolumeInfo {
        VolumeInfo {
            uuid: "8d5e4bb0-2b7e-4b8e-9d0a-4c1f4f4f0a11".into(),
            cipher: "aes-xts-plain64".into(),
            sector_size: 4096,
            size: 64 * 1024,
        }
    }

    struct Rig {
        exports: Arc<ExportTable>,
        volume: VolumeHandle,
        probe: Probe,
        trigger: ShutdownTrigger,
        task: JoinHandle<Result<(), block::Error>>,
    }

    fn rig(policy: Policy) -> Rig {
        let exports = ExportTable::new("vol".into(), String::new());
        let probe = Probe::default();
        let (trigger, shutdown) = shutdown::channel();
        let (volume, task) = VolumeManager::new(exports.clone(), info(), fake_unlocker(&probe))
            .with_policy(policy)
            .spawn(shutdown);
        Rig {
            exports,
            volume,
            probe,
            trigger,
            task,
        }
    }

    fn quick() -> Policy {
        Policy {
            free_attempts: 3,
            base_delay: Duration::from_millis(300),
            max_delay: Duration::from_millis(1200),
            drain_timeout: Duration::from_millis(200),
        }
    }

    fn unlock(secret: &[u8]) -> Request {
        Request::Unlock {
            secret: SecretBytes::from_slice(secret),
            slot: None,
        }
    }

    fn ok(r: Response) -> StatusReport {
        match r {
            Response::Ok(s) => s,
            Response::Error(e) => panic!("expected ok, got {e:?}"),
        }
    }

    fn err(r: Response) -> ErrorReply {
        match r {
            Response::Error(e) => e,
            Response::Ok(s) => panic!("expected an error, got {s:?}"),
        }
    }

    #[tokio::test]
    async fn starts_locked_and_reports_the_volume() {
        let r = rig(quick());
        let s = ok(r.volume.call(Request::Status, ORIGIN).await);
        assert_eq!(s.state, VolumeState::Locked);
        assert_eq!(s.volume_uuid, info().uuid);
        assert_eq!(s.cipher, "aes-xts-plain64");
        assert_eq!(s.sector_size, 4096);
        assert_eq!(s.export_name, "vol");
        assert!(s.locked_reason.unwrap().contains("not unlocked since"));
        assert!(r.exports.current().is_none());
    }

    #[tokio::test]
    async fn unlock_publishes_an_encrypted_export() {
        let r = rig(quick());
        let s = ok(r.volume.call(unlock(GOOD), ORIGIN).await);
        assert_eq!(s.state, VolumeState::Unlocked);
        assert_eq!(s.size, 64 * 1024);
        assert_eq!(s.locked_reason, None);
        let export = r.exports.current().expect("published");
        assert!(export.encrypted);
        let e = err(r.volume.call(unlock(GOOD), ORIGIN).await);
        assert_eq!(e.kind, ErrorKind::AlreadyUnlocked);
    }

    #[tokio::test]
    async fn wrong_passphrase_stays_locked_without_naming_keyslots() {
        let r = rig(quick());
        let e = err(r.volume.call(unlock(b"hunter2"), ORIGIN).await);
        assert_eq!(e.kind, ErrorKind::WrongPassphrase);
        assert!(
            !e.message.contains("slot 0") && !e.message.contains("keyslots:"),
            "{}",
            e.message
        );
        assert!(r.exports.current().is_none());
        assert_eq!(
            ok(r.volume.call(Request::Status, ORIGIN).await).state,
            VolumeState::Locked
        );
        // A wrong slot for the right passphrase reads the same.
        let e = err(r
            .volume
            .call(
                Request::Unlock {
                    secret: SecretBytes::from_slice(GOOD),
                    slot: Some(7),
                },
                ORIGIN,
            )
            .await);
        assert_eq!(e.kind, ErrorKind::WrongPassphrase);
    }

    #[tokio::test]
    async fn repeated_wrong_passphrases_are_rate_limited_with_growing_delays() {
        let r = rig(quick());
        for _ in 0..3 {
            assert_eq!(
                err(r.volume.call(unlock(b"nope"), ORIGIN).await).kind,
                ErrorKind::WrongPassphrase
            );
        }
        // Third failure: the next attempt must wait, and the unlocker is not even asked.
        let e = err(r.volume.call(unlock(GOOD), ORIGIN).await);
        assert_eq!(e.kind, ErrorKind::RateLimited);
        assert_eq!(e.retry_after_secs, Some(1));
        assert_eq!(r.probe.attempts.load(Ordering::SeqCst), 3);

        // After the delay one attempt is allowed; failing it doubles the delay.
        tokio::time::sleep(Duration::from_millis(320)).await;
        assert_eq!(
            err(r.volume.call(unlock(b"nope"), ORIGIN).await).kind,
            ErrorKind::WrongPassphrase
        );
        tokio::time::sleep(Duration::from_millis(320)).await;
        assert_eq!(
            err(r.volume.call(unlock(GOOD), ORIGIN).await).kind,
            ErrorKind::RateLimited
        );
        tokio::time::sleep(Duration::from_millis(320)).await;

        // Success resets the count.
        ok(r.volume.call(unlock(GOOD), ORIGIN).await);
        ok(r.volume.call(Request::Lock { force: false }, ORIGIN).await);
        for _ in 0..3 {
            assert_eq!(
                err(r.volume.call(unlock(b"nope"), ORIGIN).await).kind,
                ErrorKind::WrongPassphrase
            );
        }
    }

    #[test]
    fn limiter_delay_doubles_from_the_free_attempts_up_to_the_cap() {
        let mut l = Limiter::new(Policy::default());
        let t0 = Instant::now();
        let mut waits = vec![];
        for _ in 0..10 {
            l.failure(t0);
            waits.push(l.remaining(t0).map_or(0, |d| d.as_secs()));
        }
        assert_eq!(waits, [0, 0, 1, 2, 4, 8, 16, 30, 30, 30]);
        l.success();
        assert_eq!(l.remaining(t0), None);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
    }

    #[tokio::test]
    async fn lock_flushes_and_drops_the_device() {
        let r = rig(quick());
        ok(r.volume.call(unlock(GOOD), ORIGIN).await);
        let s = ok(r.volume.call(Request::Lock { force: false }, ORIGIN).await);
        assert_eq!(s.state, VolumeState::Locked);
        assert!(s.locked_reason.unwrap().contains("uid 0 (pid 42)"));
        assert!(r.exports.current().is_none());
        assert_eq!(r.probe.flushes.load(Ordering::SeqCst), 1);
        assert!(
            r.probe.dropped.load(Ordering::SeqCst),
            "device (and key) dropped"
        );
        assert_eq!(
            err(r.volume.call(Request::Lock { force: true }, ORIGIN).await).kind,
            ErrorKind::AlreadyLocked
        );
    }

    #[tokio::test]
    async fn lock_is_refused_while_clients_are_attached() {
        let r = rig(quick());
        ok(r.volume.call(unlock(GOOD), ORIGIN).await);
        let _session = r.exports.attach();
        let e = err(r.volume.call(Request::Lock { force: false }, ORIGIN).await);
        assert_eq!(e.kind, ErrorKind::Busy);
        assert!(
            e.message.contains("1 client(s) attached") && e.message.contains("--force"),
            "{}",
            e.message
        );
        let s = ok(r.volume.call(Request::Status, ORIGIN).await);
        assert_eq!(s.state, VolumeState::Unlocked);
        assert_eq!(s.clients, 1);
        assert!(r.exports.current().is_some());
    }

    #[tokio::test]
    async fn forced_lock_withdraws_waits_for_sessions_then_wipes() {
        let r = rig(Policy {
            drain_timeout: Duration::from_secs(10),
            ..quick()
        });
        ok(r.volume.call(unlock(GOOD), ORIGIN).await);
        let session = r.exports.attach();
        let mut withdrawn = r.exports.watch_withdrawal();
        let exports = r.exports.clone();
        // A session that finishes its requests and detaches once told.
        let sess = tokio::spawn(async move {
            withdrawn.changed().await.unwrap();
            assert!(
                exports.current().is_none(),
                "withdrawn before the sessions are told"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(session);
        });
        let s = ok(r.volume.call(Request::Lock { force: true }, ORIGIN).await);
        sess.await.unwrap();
        assert_eq!(s.state, VolumeState::Locked);
        assert_eq!(s.clients, 0);
        assert!(s.locked_reason.unwrap().contains("forced"));
        assert_eq!(r.probe.flushes.load(Ordering::SeqCst), 1);
        assert!(r.probe.dropped.load(Ordering::SeqCst));
        // And it can be unlocked again.
        ok(r.volume.call(unlock(GOOD), ORIGIN).await);
    }

    #[tokio::test]
    async fn forced_lock_answers_busy_after_the_timeout_and_finishes_later() {
        let r = rig(quick()); // drain_timeout 200 ms
        ok(r.volume.call(unlock(GOOD), ORIGIN).await);
        let session = r.exports.attach();
        let e = err(r.volume.call(Request::Lock { force: true }, ORIGIN).await);
        assert_eq!(e.kind, ErrorKind::Busy);
        assert!(e.message.contains("did not close"), "{}", e.message);
        let s = ok(r.volume.call(Request::Status, ORIGIN).await);
        assert_eq!(s.state, VolumeState::Locking);
        assert!(r.exports.current().is_none());
        assert!(!r.probe.dropped.load(Ordering::SeqCst));
        // Unlock and lock wait for it.
        assert_eq!(
            err(r.volume.call(unlock(GOOD), ORIGIN).await).kind,
            ErrorKind::Busy
        );
        assert_eq!(
            err(r.volume.call(Request::Lock { force: true }, ORIGIN).await).kind,
            ErrorKind::Busy
        );
        drop(session);
        let mut state = VolumeState::Locking;
        for _ in 0..100 {
            state = ok(r.volume.call(Request::Status, ORIGIN).await).state;
            if state == VolumeState::Locked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(state, VolumeState::Locked);
        assert!(r.probe.dropped.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn status_is_answered_while_an_unlock_runs() {
        let exports = ExportTable::new("vol".into(), String::new());
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let unlocker: Unlocker = Box::new(move |_| {
            // Stands in for seconds of key derivation.
            let _ = release_rx.lock().unwrap().recv();
            Err(UnlockError::Other("backing store unreadable".into()))
        });
        let (_trigger, shutdown) = shutdown::channel();
        let (volume, _task) = VolumeManager::new(exports, info(), unlocker).spawn(shutdown);
        let v = volume.clone();
        let pending = tokio::spawn(async move { v.call(unlock(GOOD), ORIGIN).await });
        let mut s = ok(volume.call(Request::Status, ORIGIN).await);
        for _ in 0..100 {
            if s.state == VolumeState::Unlocking {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            s = ok(volume.call(Request::Status, ORIGIN).await);
        }
        assert_eq!(s.state, VolumeState::Unlocking);
        assert_eq!(
            err(volume.call(unlock(GOOD), ORIGIN).await).kind,
            ErrorKind::Busy
        );
        release_tx.send(()).unwrap();
        let e = err(pending.await.unwrap());
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(e.message.contains("backing store unreadable"));
        assert_eq!(
            ok(volume.call(Request::Status, ORIGIN).await).state,
            VolumeState::Locked
        );
    }

    #[tokio::test]
    async fn shutdown_flushes_and_drops_an_unlocked_device() {
        let r = rig(quick());
        ok(r.volume.call(unlock(GOOD), ORIGIN).await);
        r.trigger.trigger();
        r.task.await.unwrap().unwrap();
        assert!(r.exports.current().is_none());
        assert_eq!(r.probe.flushes.load(Ordering::SeqCst), 1);
        assert!(r.probe.dropped.load(Ordering::SeqCst));
        assert_eq!(
            err(r.volume.call(Request::Status, ORIGIN).await).kind,
            ErrorKind::Internal
        );
    }
}
