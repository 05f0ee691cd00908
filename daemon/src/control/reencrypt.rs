//! The online re-encryption worker: moves the unlocked volume from its old volume key to a new
//! one, zone by zone, while clients keep doing I/O through the router
//! ([`crate::block::reencrypt::ReencryptDevice`]).
//!
//! ```text
//!  control: reencrypt start ──> Backend::start (new key, keyslots, LUKS2 reencrypt header)
//!                               router.begin(new key's device)
//!                               worker thread: loop { throttle; router.reencrypt_zone(job) }
//!                               job.finish (old key and keyslots go), router.complete
//!  unlock of a volume found mid-re-encryption (crash, kill -9, lock): the unlock path
//!  recovers the hot zone and builds a resuming router; `on_unlock` continues the job.
//! ```
//!
//! Throttling: `max_rate` (bytes/s) caps the average rate; and while clients are busy (more
//! than [`BUSY_REQUESTS`] requests during one zone step) the worker sleeps as long as the step
//! took, so it uses at most about half of the device's time.
//!
//! Audit lines: event `reencrypt` with `phase` start, checkpoint (every 10 %), pause, resume,
//! finish, failed, and `mode` online.
//!
//! This module knows the router and the job interface, not LUKS2: the daemon's LUKS2 side
//! implements [`Backend`] and [`Job`].

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::audit::{AuditEvent, AuditEventKind, AuditLog};
use crate::block::reencrypt::{ReencryptDevice, ZoneEngine};
use crate::block::BlockDevice;
use crate::control::proto::{ReencryptAction, ReencryptReport, ReencryptState, StartOptions};
use crate::control::volume::Origin;
use crate::crypto::keys::SecretBytes;

/// Client requests during one zone step above which the worker backs off.
pub const BUSY_REQUESTS: u64 = 32;

/// Zone size of online re-encryption (the engine caps it by its resilience area): small
/// enough that a client request waiting on the hot zone waits tens of milliseconds, large
/// enough that the two header commits per zone cost little.
pub const DEFAULT_ZONE: u64 = 16 << 20;

/// One re-encryption as the disk knows it: the [`ZoneEngine`] steps plus what the worker needs.
pub trait Job: ZoneEngine + Send {
    /// The new key's device, for a job just started (the router does not have it yet);
    /// `None` for a resumed job (the unlock built the router with it).
    fn take_new_device(&mut self) -> Option<Arc<dyn BlockDevice>>;
    /// Where the job stands on disk (bytes already under the new key).
    fn frontier(&self) -> u64;
    /// Zone lengths and the frontier are multiples of this.
    fn align(&self) -> u64;
    /// After the last zone: the new key becomes the only one; the old key's keyslots go.
    fn finish(&mut self) -> Result<(), String>;
    /// The rate cap recorded with the job on disk (so a resume after a restart keeps it).
    fn max_rate(&self) -> Option<u64> {
        None
    }
    /// Record the rate cap with the job on disk.
    fn set_max_rate(&mut self, _rate: Option<u64>) -> Result<(), String> {
        Ok(())
    }
    /// For the start's audit event: how each keyslot of the old key was carried over (e.g.
    /// `{"1": "same secret", "2": "re-sealed: quorum 2 of 3"}`) and which were dropped.
    fn carry_report(&self) -> Vec<(&'static str, serde_json::Value)> {
        Vec::new()
    }
}

/// The daemon's LUKS2 side.
pub trait Backend: Send + Sync {
    /// The router of the device now unlocked (`None` while locked).
    fn router(&self) -> Option<Arc<ReencryptDevice>>;
    /// Begin a re-encryption on disk: a new random volume key, keyslots for it opened by the
    /// same secrets (`secret` for passphrase keyslots; tokens are re-sealed), the LUKS2
    /// re-encryption header. Keyslots that cannot be carried over make it refuse (naming them)
    /// unless `opts.drop_unopened`; `opts` may also give the new key and sector size. Slow (key
    /// derivation); runs on a blocking thread.
    fn start(
        &self,
        secret: Option<&SecretBytes>,
        opts: &StartOptions,
    ) -> Result<Box<dyn Job>, String>;
    /// A re-encryption the last unlock found in progress (its hot zone already recovered).
    fn take_resumed(&self) -> Option<Box<dyn Job>>;
    /// A person's passphrase for their quorum share `name`, checked and kept (locked memory,
    /// with a timeout) for the next start, which re-wraps their share of the new quorum under
    /// it. Returns what to tell the person. Slow (the share's KDF).
    fn stage_share(&self, _name: &str, _passphrase: SecretBytes) -> Result<String, String> {
        Err("this daemon cannot carry quorum shares".into())
    }
    /// At lock and shutdown: wipe the staged share passphrases.
    fn forget_staged(&self) {}
}

/// Why a reencrypt request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not now: locked, already running, nothing to pause or resume.
    Busy,
    /// The start itself failed (header, keyslots, I/O).
    Failed,
}

#[derive(Clone)]
struct Progress {
    state: ReencryptState,
    done: u64,
    total: u64,
    /// Bytes per second, smoothed over the last zones.
    rate: u64,
    max_rate: Option<u64>,
    backing_off: bool,
    error: Option<String>,
    paused: bool,
    stop: bool,
}

struct Shared {
    p: Mutex<Progress>,
    wake: Condvar,
}

struct Running {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Owns at most one worker; called by the volume manager (on blocking threads for the slow
/// calls: `command` with `Start`, `stop`).
pub struct Reencryptor {
    backend: Arc<dyn Backend>,
    audit: Arc<AuditLog>,
    uuid: String,
    worker: Mutex<Option<Running>>,
}

impl Reencryptor {
    pub fn new(backend: Arc<dyn Backend>, audit: Arc<AuditLog>, uuid: String) -> Reencryptor {
        Reencryptor {
            backend,
            audit,
            uuid,
            worker: Mutex::new(None),
        }
    }

    fn record(&self, event: AuditEvent) {
        record(&self.audit, event);
    }

    /// The progress for `status`, if a re-encryption ran since the last unlock.
    pub fn report(&self) -> Option<ReencryptReport> {
        let w = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        let p = w
            .as_ref()?
            .shared
            .p
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let rate = p.rate;
        let eta = (p.state == ReencryptState::Running && rate > 0)
            .then(|| (p.total - p.done).div_ceil(rate));
        Some(ReencryptReport {
            state: p.state,
            done_bytes: p.done,
            total_bytes: p.total,
            rate_bytes_per_sec: if p.state == ReencryptState::Running {
                rate
            } else {
                0
            },
            eta_secs: eta,
            max_rate: p.max_rate,
            backing_off: p.backing_off,
            error: p.error,
        })
    }

    /// Run a `reencrypt` request. `Start` is slow (new keyslots): call it off the reactor.
    pub fn command(
        &self,
        action: ReencryptAction,
        secret: Option<&SecretBytes>,
        max_rate: Option<u64>,
        origin: Origin,
    ) -> Result<(), (Refusal, String)> {
        self.command_with(action, secret, max_rate, StartOptions::default(), origin)
    }

    /// [`Reencryptor::command`] with the start's options (drop the old key's keyslots that
    /// cannot be carried over instead of refusing; a new key or sector size).
    pub fn command_with(
        &self,
        action: ReencryptAction,
        secret: Option<&SecretBytes>,
        max_rate: Option<u64>,
        start: StartOptions,
        origin: Origin,
    ) -> Result<(), (Refusal, String)> {
        let peer = |e: AuditEvent| {
            e.volume(&self.uuid)
                .peer(origin.uid, origin.pid.unwrap_or(0))
        };
        match action {
            ReencryptAction::Status => Ok(()),
            ReencryptAction::Start => {
                let Some(router) = self.backend.router() else {
                    return Err((
                        Refusal::Busy,
                        "the volume is locked: unlock it first (the re-encryption runs while \
                         it is served)"
                            .into(),
                    ));
                };
                {
                    let w = self.worker.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(r) = w.as_ref() {
                        let p = r.shared.p.lock().unwrap_or_else(|e| e.into_inner());
                        if matches!(p.state, ReencryptState::Running | ReencryptState::Paused) {
                            return Err((
                                Refusal::Busy,
                                format!(
                                    "a re-encryption is already {}; see `nbdcryptctl status`",
                                    p.state
                                ),
                            ));
                        }
                    }
                }
                if router.is_reencrypting() {
                    return Err((
                        Refusal::Busy,
                        "a re-encryption is already in progress on this volume".into(),
                    ));
                }
                let mut job = match self.backend.start(secret, &start) {
                    Ok(job) => job,
                    Err(e) => {
                        self.record(peer(phase("failed")).failed(&e));
                        return Err((Refusal::Failed, format!("cannot start re-encryption: {e}")));
                    }
                };
                let Some(new) = job.take_new_device() else {
                    return Err((Refusal::Failed, "the new key's device is missing".into()));
                };
                if let Err(e) = router.begin(new, job.frontier(), job.align()) {
                    let m = format!("cannot route the volume through the new key: {e}");
                    self.record(peer(phase("failed")).failed(&m));
                    return Err((Refusal::Failed, m));
                }
                if let Err(e) = job.set_max_rate(max_rate) {
                    warn!(error = %e, "cannot record the rate cap in the header; a resume after a restart runs unthrottled");
                }
                info!(%origin, ?max_rate, "re-encryption started");
                let mut event = peer(phase("start")).detail("size", router.size());
                for (k, v) in job.carry_report() {
                    event = event.detail(k, v);
                }
                self.record(event);
                self.spawn(router, job, max_rate);
                Ok(())
            }
            ReencryptAction::Pause | ReencryptAction::Resume => {
                let pause = action == ReencryptAction::Pause;
                let w = self.worker.lock().unwrap_or_else(|e| e.into_inner());
                let Some(r) = w.as_ref() else {
                    return Err((Refusal::Busy, "no re-encryption is running".into()));
                };
                let mut p = r.shared.p.lock().unwrap_or_else(|e| e.into_inner());
                if !matches!(p.state, ReencryptState::Running | ReencryptState::Paused) {
                    return Err((
                        Refusal::Busy,
                        format!(
                            "the re-encryption is {}; nothing to {}",
                            p.state,
                            if pause { "pause" } else { "resume" }
                        ),
                    ));
                }
                if max_rate.is_some() {
                    p.max_rate = max_rate;
                }
                if pause != p.paused {
                    p.paused = pause;
                    p.state = if pause {
                        ReencryptState::Paused
                    } else {
                        ReencryptState::Running
                    };
                    let kind = if pause { "pause" } else { "resume" };
                    let done = p.done;
                    drop(p);
                    r.shared.wake.notify_all();
                    info!(%origin, pause, "re-encryption {}", if pause { "paused" } else { "resumed" });
                    self.record(peer(phase(kind)).detail("done_bytes", done));
                } else {
                    drop(p);
                    r.shared.wake.notify_all();
                }
                Ok(())
            }
        }
    }

    /// `nbdcryptctl reencrypt --share NAME`: stage a person's passphrase for the next start
    /// (audited with the peer's credentials, never the passphrase). Slow: call it off the reactor.
    pub fn stage_share(
        &self,
        name: &str,
        passphrase: SecretBytes,
        origin: Origin,
    ) -> Result<String, (Refusal, String)> {
        let event = phase("share")
            .volume(&self.uuid)
            .peer(origin.uid, origin.pid.unwrap_or(0))
            .detail("share", name);
        match self.backend.stage_share(name, passphrase) {
            Ok(m) => {
                info!(%origin, share = name, "re-encryption: quorum share passphrase staged");
                self.record(event);
                Ok(m)
            }
            Err(e) => {
                self.record(event.failed(&e));
                Err((Refusal::Failed, e))
            }
        }
    }

    /// After an unlock: continue a re-encryption the header says is in progress.
    pub fn on_unlock(&self) {
        let Some(job) = self.backend.take_resumed() else {
            return;
        };
        let Some(router) = self.backend.router() else {
            return;
        };
        info!(
            frontier = job.frontier(),
            "re-encryption found in progress; resuming"
        );
        self.record(
            phase("resume")
                .volume(&self.uuid)
                .this_process()
                .detail("done_bytes", job.frontier())
                .detail("after", "unlock"),
        );
        let max_rate = job.max_rate();
        self.spawn(router, job, max_rate);
    }

    /// Before a lock or shutdown: stop the worker at the end of its current zone and wait.
    /// The header keeps the position; the next unlock resumes.
    pub fn stop(&self) {
        self.backend.forget_staged();
        let running = self
            .worker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|r| {
                r.shared.p.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
                r.shared.wake.notify_all();
                r.thread.take()
            });
        if let Some(t) = running {
            let _ = t.join();
        }
    }

    fn spawn(&self, router: Arc<ReencryptDevice>, job: Box<dyn Job>, max_rate: Option<u64>) {
        let shared = Arc::new(Shared {
            p: Mutex::new(Progress {
                state: ReencryptState::Running,
                done: router.frontier(),
                total: router.size(),
                rate: 0,
                max_rate,
                backing_off: false,
                error: None,
                paused: false,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let (s, audit, uuid) = (shared.clone(), self.audit.clone(), self.uuid.clone());
        let thread = std::thread::Builder::new()
            .name("reencrypt".into())
            .spawn(move || work(&s, &router, job, &audit, &uuid));
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                let mut p = shared.p.lock().unwrap_or_else(|e| e.into_inner());
                p.state = ReencryptState::Failed;
                p.error = Some(format!("cannot start the worker thread: {e}"));
                None
            }
        };
        *self.worker.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running { shared, thread });
    }
}

/// When the volume key in use was created (Unix seconds), as the last unlock or finished
/// re-encryption read it from the header (`luks2::reencrypt::KeyAge`); `None` if unknown.
pub fn volume_key_created() -> Option<u64> {
    match crate::metrics::METRICS
        .volume_key_created
        .load(Ordering::Relaxed)
    {
        0 => None,
        t => Some(t),
    }
}

/// An audit event of kind `reencrypt` (shared with the offline command) with its `phase`:
/// start, checkpoint, pause, resume, finish, failed; `mode` says online.
fn phase(phase: &str) -> AuditEvent {
    AuditEvent::new(AuditEventKind::Reencrypt)
        .detail("phase", phase)
        .detail("mode", "online")
}

fn record(audit: &AuditLog, event: AuditEvent) {
    if let Err(e) = audit.record(&event) {
        error!(error = %e, "cannot write the audit log");
    }
}

/// The worker loop (its own thread: zone steps block on I/O and fsync).
fn work(
    shared: &Shared,
    router: &ReencryptDevice,
    mut job: Box<dyn Job>,
    audit: &AuditLog,
    uuid: &str,
) {
    let total = router.size();
    let mut checkpoint = router.frontier().saturating_mul(10) / total.max(1);
    let mut last_requests = router.load().requests.load(Ordering::Relaxed);
    let mut recorded_rate = job.max_rate();
    let event = |p| phase(p).volume(uuid).this_process();
    loop {
        let max_rate = {
            let mut p = shared.p.lock().unwrap_or_else(|e| e.into_inner());
            while p.paused && !p.stop {
                p = shared.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.stop {
                if p.state == ReencryptState::Running {
                    p.state = ReencryptState::Paused;
                }
                info!(
                    done = p.done,
                    "re-encryption stopped (lock or shutdown); the next unlock resumes it"
                );
                return;
            }
            p.max_rate
        };
        if max_rate != recorded_rate {
            // Changed by a pause/resume request: kept on disk for a resume after a restart.
            if let Err(e) = job.set_max_rate(max_rate) {
                warn!(error = %e, "cannot record the new rate cap in the header");
            }
            recorded_rate = max_rate;
        }
        let t0 = Instant::now();
        let before = router.frontier();
        let frontier = match router.reencrypt_zone(&mut *job) {
            Ok(f) => f,
            Err(e) => {
                error!(error = %e, "re-encryption failed; the volume stays served (old key above the frontier, new key below)");
                let mut p = shared.p.lock().unwrap_or_else(|e| e.into_inner());
                p.state = ReencryptState::Failed;
                p.error = Some(e.to_string());
                record(
                    audit,
                    event("failed").detail("done_bytes", before).failed(&e),
                );
                return;
            }
        };
        let took = t0.elapsed();
        let requests = router.load().requests.load(Ordering::Relaxed);
        let busy = requests.wrapping_sub(last_requests) >= BUSY_REQUESTS;
        last_requests = requests;
        let moved = frontier - before;
        let mut pause = if busy { took } else { Duration::ZERO };
        if let Some(rate) = max_rate.filter(|&r| r > 0) {
            // The time `moved` bytes may take at `rate`.
            let min_us = u128::from(moved) * 1_000_000 / u128::from(rate);
            let min = Duration::from_micros(u64::try_from(min_us).unwrap_or(u64::MAX));
            pause = pause.max(min.saturating_sub(took));
        }
        let step_us = (took + pause).as_micros().max(1);
        {
            let mut p = shared.p.lock().unwrap_or_else(|e| e.into_inner());
            p.done = frontier;
            let now = u64::try_from(u128::from(moved) * 1_000_000 / step_us).unwrap_or(u64::MAX);
            p.rate = if p.rate == 0 {
                now
            } else {
                p.rate / 10 * 7 + now / 10 * 3
            };
            p.backing_off = busy;
        }
        let tenth = frontier.saturating_mul(10) / total.max(1);
        if tenth > checkpoint && frontier < total {
            checkpoint = tenth;
            info!(done = frontier, total, "re-encryption checkpoint");
            record(
                audit,
                event("checkpoint")
                    .detail("done_bytes", frontier)
                    .detail("total_bytes", total),
            );
        }
        if frontier >= total {
            let done = job
                .finish()
                .map_err(|e| e.to_string())
                .and_then(|()| router.complete().map_err(|e| e.to_string()));
            let mut p = shared.p.lock().unwrap_or_else(|e| e.into_inner());
            match done {
                Ok(()) => {
                    p.state = ReencryptState::Finished;
                    info!(total, "re-encryption finished; the old volume key is gone");
                    record(audit, event("finish").detail("total_bytes", total));
                }
                Err(e) => {
                    p.state = ReencryptState::Failed;
                    p.error = Some(format!("finishing: {e}"));
                    warn!(error = %e, "re-encryption: every zone is done, but finishing failed");
                    record(
                        audit,
                        event("failed").detail("done_bytes", frontier).failed(&e),
                    );
                }
            }
            return;
        }
        if !pause.is_zero() {
            let p = shared.p.lock().unwrap_or_else(|e| e.into_inner());
            let _ = shared
                .wake
                .wait_timeout_while(p, pause, |p| !p.stop && !p.paused);
        }
    }
}
