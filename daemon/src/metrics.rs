//! Process-wide counters for monitoring: what `--metrics ADDR` serves in the Prometheus text
//! format (`metrics::http`, `metrics::render`) and what `nbdcryptctl top` reads through the
//! control socket (`metrics::snapshot`).
//!
//! One static [`METRICS`], made of atomics only: the I/O path adds to it with `fetch_add`s and
//! never takes a lock. The counters every request touches (per-command counts, bytes, latency
//! histograms, errors, XTS time, requests started) are sharded: each thread adds to its own
//! [`Shard`] (cache-line aligned, picked once per thread), and a scrape sums the shards. One
//! shared set of counters made every core fight over the same cache lines (measured: 252–565 ns
//! of hooks per request; `cargo bench -p nbdcrypt-benches --bench metrics` compares the two).
//! Unlike the status report's per-unlock counters
//! (`export::IoStats`, which start from zero at every unlock), these count from daemon start
//! and survive lock and unlock, as Prometheus counters must.
//!
//! A request is timed from the moment its header has been read to the moment its reply has
//! been written whole (or dropped because the client went away): [`RequestTimer`] travels with
//! the reply and records on drop. Clock reads are shared where the moments are shared: the
//! start is when the socket read that brought the header in returned (one clock read per read,
//! however many requests it delivered; a request waiting in the server's read buffer is
//! waiting in the server), the end of replies sent by one vectored write is read once
//! ([`ClockBatch`]), and AES-XTS time is sampled ([`Metrics::xts_chunk`]). On a KVM guest a
//! clock read costs 44–60 ns; per 4 KiB request these were four of them.

pub mod http;
pub mod render;
pub mod snapshot;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::nbd::codec::Command;
use crate::nbd::errno::NbdErrno;

/// Labels of the per-command series, indexed by [`command_index`].
pub const COMMANDS: [&str; 8] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "cache",
    "block_status",
    "other",
];

/// Labels of the error series, indexed by [`errno_index`] (NBD error values, as on the wire).
pub const ERRNOS: [&str; 8] = [
    "EPERM",
    "EIO",
    "EINVAL",
    "ENOSPC",
    "EOVERFLOW",
    "ENOTSUP",
    "ESHUTDOWN",
    "other",
];

/// Upper bounds of the latency histogram buckets, in nanoseconds (the +Inf bucket follows).
pub const BUCKETS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
/// Buckets including +Inf.
pub const NBUCKETS: usize = BUCKETS_NS.len() + 1;

/// Reasons a connection ended before its handshake completed.
pub const HANDSHAKE_REASONS: [&str; 6] = [
    "timeout",
    "aborted",
    "closed",
    "protocol",
    "locked",
    "connection_limit",
];

/// Unlock methods, as the control plane names them ("passphrase", "token").
pub const METHODS: [&str; 3] = ["passphrase", "token", "other"];

/// Seal providers, as token types name them.
pub const PROVIDERS: [&str; 4] = ["aws-kms", "pkcs11", "clevis", "other"];

/// One command's series in one shard, on its own cache lines.
#[repr(align(64))]
pub struct CommandStats {
    pub bytes: AtomicU64,
    pub latency_sum_ns: AtomicU64,
    /// Non-cumulative counts per bucket; rendering accumulates them. Their sum is the number
    /// of answered requests (there is no separate request counter to keep in step).
    pub buckets: [AtomicU64; NBUCKETS],
    pub errors: [AtomicU64; ERRNOS.len()],
}

impl CommandStats {
    const fn new() -> CommandStats {
        CommandStats {
            bytes: AtomicU64::new(0),
            latency_sum_ns: AtomicU64::new(0),
            buckets: [const { AtomicU64::new(0) }; NBUCKETS],
            errors: [const { AtomicU64::new(0) }; ERRNOS.len()],
        }
    }
}

/// Time and bytes in AES-XTS, one direction, one shard.
#[repr(align(64))]
pub struct XtsStats {
    pub nanos: AtomicU64,
    pub bytes: AtomicU64,
}

/// How many shards the hot counters are split into. Threads take them round-robin; more
/// threads than shards share (still correct, only slower).
pub const SHARDS: usize = 16;

/// The hot counters of the threads that picked this shard. Aligned to two cache lines so that
/// neighbouring shards never share a line or an adjacent-line prefetch pair.
#[repr(align(128))]
pub struct Shard {
    pub commands: [CommandStats; COMMANDS.len()],
    /// [encrypt, decrypt].
    pub xts: [XtsStats; 2],
    /// Requests whose header was read here, and their payload bytes. In flight = started minus
    /// answered (the buckets' sum, the commands' bytes), summed over all shards.
    pub started_requests: AtomicU64,
    pub started_bytes: AtomicU64,
}

impl Shard {
    const fn new() -> Shard {
        Shard {
            commands: [const { CommandStats::new() }; COMMANDS.len()],
            xts: [const {
                XtsStats {
                    nanos: AtomicU64::new(0),
                    bytes: AtomicU64::new(0),
                }
            }; 2],
            started_requests: AtomicU64::new(0),
            started_bytes: AtomicU64::new(0),
        }
    }
}

/// One command's counters summed over the shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandTotals {
    pub requests: u64,
    pub bytes: u64,
    pub latency_sum_ns: u64,
    pub buckets: [u64; NBUCKETS],
    pub errors: [u64; ERRNOS.len()],
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MY_SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's shard (assigned round-robin at its first request).
#[inline]
fn shard_index() -> usize {
    MY_SHARD.with(|c| {
        let i = c.get();
        if i < SHARDS {
            return i;
        }
        let i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
        c.set(i);
        i
    })
}

/// One chunk in this many (per thread and direction) is timed for the XTS time metric
/// ([`Metrics::xts_chunk`]).
pub const XTS_SAMPLE: u32 = 16;

/// A thread's XTS sampling state for one direction.
#[derive(Clone, Copy, Default)]
struct XtsSampler {
    /// Chunks to go before the next timed one (0: time the next one).
    countdown: u32,
    /// Bytes since the last timed chunk, which the next timed chunk's time is scaled to.
    pending: u64,
}

thread_local! {
    /// [encrypt, decrypt].
    static XTS_SAMPLER: Cell<[XtsSampler; 2]> = const {
        Cell::new([XtsSampler { countdown: 0, pending: 0 }; 2])
    };
}

/// Everything the daemon counts. See the module docs.
pub struct Metrics {
    /// The hot counters; read them summed with [`Metrics::command_totals`],
    /// [`Metrics::xts_totals`] and [`Metrics::in_flight`].
    pub shards: [Shard; SHARDS],
    pub connections: AtomicU64,
    pub handshake_failures: [AtomicU64; HANDSHAKE_REASONS.len()],
    pub unlocks: [AtomicU64; METHODS.len()],
    pub failed_unlocks: [AtomicU64; METHODS.len()],
    pub locks: AtomicU64,
    pub rekeys: AtomicU64,
    pub failed_rekeys: AtomicU64,
    pub provider_errors: [AtomicU64; PROVIDERS.len()],
    /// 1 while an export is published.
    pub unlocked: AtomicBool,
    /// Unix time of the last lock-state change (daemon start counts as one).
    pub state_since: AtomicU64,
    /// The current device's fail-stop latch has tripped.
    pub latched: AtomicBool,
    pub latch_trips: AtomicU64,
    /// Unix time of the last successful re-seal (rekey) of a token; 0: none seen.
    pub last_reseal: AtomicU64,
    /// Unix time the current volume key was created, from the header's `nbdcrypt-volume-key`
    /// token (written by `reencrypt`); 0: unknown. Attacker-writable, so informational only.
    pub volume_key_created: AtomicU64,
    pub start_time: AtomicU64,
    /// Token facts read from the header at start and after each rekey (not on the I/O path).
    pub tokens: Mutex<Vec<TokenFact>>,
    /// Which AES-XTS implementation the current device uses ("vaes512", "portable").
    pub xts_impl: Mutex<&'static str>,
}

/// One KMS/HSM token of the volume, as its header records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFact {
    pub token: u32,
    pub keyslot: u32,
    pub provider: &'static str,
    /// Unix time of the token's "created" member (when its secret was sealed); None if absent
    /// or not RFC 3339.
    pub sealed: Option<u64>,
}

/// The one instance.
pub static METRICS: Metrics = Metrics::new();

impl Metrics {
    const fn new() -> Metrics {
        Metrics {
            shards: [const { Shard::new() }; SHARDS],
            connections: AtomicU64::new(0),
            handshake_failures: [const { AtomicU64::new(0) }; HANDSHAKE_REASONS.len()],
            unlocks: [const { AtomicU64::new(0) }; METHODS.len()],
            failed_unlocks: [const { AtomicU64::new(0) }; METHODS.len()],
            locks: AtomicU64::new(0),
            rekeys: AtomicU64::new(0),
            failed_rekeys: AtomicU64::new(0),
            provider_errors: [const { AtomicU64::new(0) }; PROVIDERS.len()],
            unlocked: AtomicBool::new(false),
            state_since: AtomicU64::new(0),
            latched: AtomicBool::new(false),
            latch_trips: AtomicU64::new(0),
            last_reseal: AtomicU64::new(0),
            volume_key_created: AtomicU64::new(0),
            start_time: AtomicU64::new(0),
            tokens: Mutex::new(Vec::new()),
            xts_impl: Mutex::new(""),
        }
    }

    /// Called once by the daemon at start.
    pub fn started(&self) {
        let now = unix_now();
        self.start_time.store(now, Ordering::Relaxed);
        self.state_since.store(now, Ordering::Relaxed);
    }

    /// A request header has been read: count it in flight until the returned timer drops.
    pub fn start(&'static self, command: Command, length: u32) -> RequestTimer {
        self.start_at(command, length, Instant::now())
    }

    /// [`start`](Self::start) for a request that arrived at `at`: the session passes the time
    /// the read that brought the header in returned, one clock read for all the requests that
    /// read delivered.
    pub fn start_at(&'static self, command: Command, length: u32, at: Instant) -> RequestTimer {
        let bytes = match command {
            Command::Read | Command::Write | Command::WriteZeroes | Command::Trim => {
                u64::from(length)
            }
            _ => 0,
        };
        let shard = &self.shards[shard_index()];
        shard.started_requests.fetch_add(1, Ordering::Relaxed);
        shard.started_bytes.fetch_add(bytes, Ordering::Relaxed);
        RequestTimer {
            metrics: self,
            command: command_index(command),
            bytes,
            start: at,
        }
    }

    /// A request failed with `errno` (rejected, or failed on the device).
    pub fn error(&self, command: Command, errno: NbdErrno) {
        self.shards[shard_index()].commands[command_index(command)].errors[errno_index(errno)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// `nanos` spent encrypting (`encrypt`) or decrypting `bytes`.
    pub fn xts(&self, encrypt: bool, bytes: usize, nanos: u64) {
        let x = &self.shards[shard_index()].xts[usize::from(!encrypt)];
        x.nanos.fetch_add(nanos, Ordering::Relaxed);
        x.bytes
            .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Runs `f`, the AES-XTS work on one chunk of `bytes` bytes, and counts it: its bytes
    /// always, its time sampled. Per thread and direction, the first chunk and then one chunk
    /// in [`XTS_SAMPLE`] is timed, and its time per byte is charged for every byte since the
    /// previous timed chunk (itself included), so `nbdcrypt_xts_seconds_total` stays an
    /// estimate of the time spent in XTS that only ever grows, while the data path reads the
    /// clock twice per 16 chunks instead of twice per chunk (a clock read costs 44–60 ns on
    /// a KVM guest, as much as the AES of 700 bytes). Counted only when `f` succeeds.
    #[inline]
    pub fn xts_chunk<T, E>(
        &self,
        encrypt: bool,
        bytes: usize,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let d = usize::from(!encrypt);
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        let mut st = XTS_SAMPLER.get();
        let me = &mut st[d];
        me.pending = me.pending.saturating_add(bytes);
        if me.countdown > 0 {
            me.countdown -= 1;
            XTS_SAMPLER.set(st);
            let r = f();
            if r.is_ok() {
                let x = &self.shards[shard_index()].xts[d];
                x.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            return r;
        }
        let charged = std::mem::take(&mut me.pending);
        me.countdown = XTS_SAMPLE - 1;
        XTS_SAMPLER.set(st);
        let t = Instant::now();
        let r = f();
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if r.is_ok() {
            // ns per byte of this chunk, times the bytes it stands for.
            let est = u128::from(ns) * u128::from(charged) / u128::from(bytes.max(1));
            let x = &self.shards[shard_index()].xts[d];
            x.nanos
                .fetch_add(u64::try_from(est).unwrap_or(u64::MAX), Ordering::Relaxed);
            x.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        r
    }

    /// Every command's counters, summed over the shards (index as [`COMMANDS`]).
    pub fn command_totals(&self) -> [CommandTotals; COMMANDS.len()] {
        let mut t: [CommandTotals; COMMANDS.len()] = Default::default();
        for shard in &self.shards {
            for (tot, c) in t.iter_mut().zip(&shard.commands) {
                // Acquire: pairs with the Release adds in `RequestTimer::drop`, see `in_flight`.
                tot.bytes = tot.bytes.wrapping_add(c.bytes.load(Ordering::Acquire));
                tot.latency_sum_ns = tot
                    .latency_sum_ns
                    .wrapping_add(c.latency_sum_ns.load(Ordering::Relaxed));
                for (a, b) in tot.buckets.iter_mut().zip(&c.buckets) {
                    *a = a.wrapping_add(b.load(Ordering::Acquire));
                }
                for (a, e) in tot.errors.iter_mut().zip(&c.errors) {
                    *a = a.wrapping_add(e.load(Ordering::Relaxed));
                }
            }
        }
        for tot in &mut t {
            tot.requests = tot.buckets.iter().fold(0, |a, b| a.wrapping_add(*b));
        }
        t
    }

    /// (nanoseconds, bytes) in AES-XTS, summed over the shards; `encrypt` picks the direction.
    pub fn xts_totals(&self, encrypt: bool) -> (u64, u64) {
        let d = usize::from(!encrypt);
        self.shards.iter().fold((0u64, 0u64), |(n, b), s| {
            (
                n.wrapping_add(s.xts[d].nanos.load(Ordering::Relaxed)),
                b.wrapping_add(s.xts[d].bytes.load(Ordering::Relaxed)),
            )
        })
    }

    /// (requests, bytes) read and not yet answered: started minus answered, over all shards.
    /// A request may start on one thread and be answered on another, so no single shard's
    /// difference means anything; the sum does. Answered counts are loaded first (Acquire,
    /// pairing with the answering thread's Release add, which the start happened before), so
    /// every answer seen has its start seen too and the difference never goes below zero.
    pub fn in_flight(&self) -> (u64, u64) {
        let done = self.command_totals();
        let (done_req, done_bytes) = done.iter().fold((0u64, 0u64), |(r, b), t| {
            (r.wrapping_add(t.requests), b.wrapping_add(t.bytes))
        });
        let (started_req, started_bytes) = self.shards.iter().fold((0u64, 0u64), |(r, b), s| {
            (
                r.wrapping_add(s.started_requests.load(Ordering::Relaxed)),
                b.wrapping_add(s.started_bytes.load(Ordering::Relaxed)),
            )
        });
        (
            started_req.saturating_sub(done_req),
            started_bytes.saturating_sub(done_bytes),
        )
    }

    pub fn handshake_failed(&self, reason: &str) {
        let i = HANDSHAKE_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(HANDSHAKE_REASONS.len() - 1);
        self.handshake_failures[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The export was published (`true`) or withdrawn.
    pub fn set_unlocked(&self, unlocked: bool) {
        if self.unlocked.swap(unlocked, Ordering::Relaxed) != unlocked {
            self.state_since.store(unix_now(), Ordering::Relaxed);
        }
    }

    /// A new fail-stop latch (a new device) starts untripped.
    pub fn latch_reset(&self) {
        self.latched.store(false, Ordering::Relaxed);
    }

    pub fn latch_tripped(&self) {
        self.latched.store(true, Ordering::Relaxed);
        self.latch_trips.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_xts_impl(&self, name: &'static str) {
        *self.xts_impl.lock().unwrap_or_else(|e| e.into_inner()) = name;
    }

    /// A key event went through the audit log: count it.
    pub fn key_event(&self, event: &crate::audit::AuditEvent) {
        use crate::audit::AuditEventKind as K;
        let method = || {
            let m = event
                .details
                .get("method")
                .and_then(|v| v.as_str())
                .unwrap_or("other");
            METHODS
                .iter()
                .position(|x| *x == m)
                .unwrap_or(METHODS.len() - 1)
        };
        match event.kind {
            K::UnlockOk => {
                self.unlocks[method()].fetch_add(1, Ordering::Relaxed);
            }
            K::UnlockFailed => {
                self.failed_unlocks[method()].fetch_add(1, Ordering::Relaxed);
            }
            K::Lock => {
                self.locks.fetch_add(1, Ordering::Relaxed);
            }
            K::Rekey if event.error.is_none() => {
                self.rekeys.fetch_add(1, Ordering::Relaxed);
                self.last_reseal.store(unix_now(), Ordering::Relaxed);
            }
            K::Rekey => {
                self.failed_rekeys.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// A KMS/HSM provider failed (unreachable, refused, bad login) for a token of `token_type`.
    pub fn provider_error(&self, token_type: &str) {
        let name = crate::luks2::tokens::format::ProviderKind::from_token_type(token_type)
            .map_or("other", |k| k.name());
        let i = PROVIDERS
            .iter()
            .position(|p| *p == name)
            .unwrap_or(PROVIDERS.len() - 1);
        self.provider_errors[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Record the header's tokens (at start, after a rekey). The newest seal time also counts
    /// as the last re-seal if no rekey was seen by this process.
    pub fn set_tokens(&self, facts: Vec<TokenFact>) {
        if let Some(newest) = facts.iter().filter_map(|t| t.sealed).max() {
            self.last_reseal.fetch_max(newest, Ordering::Relaxed);
        }
        *self.tokens.lock().unwrap_or_else(|e| e.into_inner()) = facts;
    }
}

/// Travels with a request's reply; records its latency and bytes when dropped (reply written,
/// or dropped because the client is gone).
pub struct RequestTimer {
    metrics: &'static Metrics,
    command: usize,
    bytes: u64,
    start: Instant,
}

thread_local! {
    /// While a [`ClockBatch`] is alive on this thread: `Some(now)` once one of its timers has
    /// read the clock, `None` before; outside a batch the outer `Option` is `None`.
    static BATCH_NOW: Cell<Option<Option<Instant>>> = const { Cell::new(None) };
}

/// While alive, every [`RequestTimer`] dropped on this thread takes the same end time, read
/// once: for the replies one vectored write sent together, which were all written at the same
/// moment.
pub struct ClockBatch(());

impl ClockBatch {
    pub fn begin() -> ClockBatch {
        BATCH_NOW.set(Some(None));
        ClockBatch(())
    }
}

impl Drop for ClockBatch {
    fn drop(&mut self) {
        BATCH_NOW.set(None);
    }
}

/// Now, or the batch's now (see [`ClockBatch`]).
fn end_time() -> Instant {
    match BATCH_NOW.get() {
        None => Instant::now(),
        Some(Some(t)) => t,
        Some(None) => {
            let t = Instant::now();
            BATCH_NOW.set(Some(Some(t)));
            t
        }
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        let m = self.metrics;
        let ns = u64::try_from(end_time().saturating_duration_since(self.start).as_nanos())
            .unwrap_or(u64::MAX);
        let c = &m.shards[shard_index()].commands[self.command];
        c.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
        // Release: a scrape that sees this answer also sees the request's start (`in_flight`).
        c.bytes.fetch_add(self.bytes, Ordering::Release);
        c.buckets[bucket(ns)].fetch_add(1, Ordering::Release);
    }
}

/// The histogram bucket `ns` falls in.
pub fn bucket(ns: u64) -> usize {
    BUCKETS_NS
        .iter()
        .position(|b| ns <= *b)
        .unwrap_or(BUCKETS_NS.len())
}

pub fn command_index(c: Command) -> usize {
    match c {
        Command::Read => 0,
        Command::Write => 1,
        Command::Flush => 2,
        Command::Trim => 3,
        Command::WriteZeroes => 4,
        Command::Cache => 5,
        Command::BlockStatus => 6,
        Command::Disc | Command::Unknown(_) => 7,
    }
}

pub fn errno_index(e: NbdErrno) -> usize {
    match e {
        NbdErrno::Perm => 0,
        NbdErrno::Io => 1,
        NbdErrno::Inval => 2,
        NbdErrno::NoSpc => 3,
        NbdErrno::Overflow => 4,
        NbdErrno::NotSup => 5,
        NbdErrno::Shutdown => 6,
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `2026-11-28T22:40:00Z` (what tokens record) → Unix seconds. Anything else: `None`.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    if h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), for the proleptic Gregorian calendar.
    let (y, mo) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

/// Start `--metrics ADDR`: bind (errors are the caller's to report) and serve on a thread.
/// Returns the Unix socket path to remove at exit, if any.
pub async fn serve(
    addr: &http::MetricsAddr,
    exports: std::sync::Arc<crate::export::ExportTable>,
    mode: &'static str,
    volume_uuid: String,
) -> std::io::Result<Option<std::path::PathBuf>> {
    let listener = http::bind(addr).await?;
    if let http::MetricsAddr::Tcp(a) = addr {
        if !a.ip().is_loopback() {
            tracing::warn!(%a, "metrics listen beyond loopback: anyone who can reach it sees \
                lock state, traffic and key age (never key material)");
        }
    }
    let cleanup = match addr {
        http::MetricsAddr::Unix(p) => Some(p.clone()),
        http::MetricsAddr::Tcp(_) => None,
    };
    let source: http::Source = std::sync::Arc::new(move || {
        render::render(
            &METRICS,
            &render::Context {
                clients: u64::try_from(exports.attached()).unwrap_or(u64::MAX),
                mode,
                volume_uuid: &volume_uuid,
            },
        )
    });
    http::spawn(listener, source)?;
    tracing::info!(metrics = %addr, "serving metrics");
    Ok(cleanup)
}

/// The nbdcrypt tokens of `header` and when each was sealed (its "created" member). The header
/// is attacker-writable: a bad token is skipped, and only our own provider names are used.
pub fn token_facts(header: &crate::luks2::Luks2Header) -> Vec<TokenFact> {
    header
        .tokens()
        .filter_map(|(id, t)| {
            let p = crate::luks2::tokens::format::parse(t).ok()??;
            Some(TokenFact {
                token: id,
                keyslot: p.keyslot,
                provider: PROVIDERS
                    .iter()
                    .find(|n| **n == p.kind.name())
                    .copied()
                    .unwrap_or("other"),
                sealed: parse_rfc3339(&p.created),
            })
        })
        .take(64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_with_the_audit_formatter() {
        for secs in [0u64, 951_782_400, 1_764_367_200, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&crate::audit::rfc3339(secs)), Some(secs));
        }
        for bad in [
            "",
            "2026-11-28",
            "2026-13-01T00:00:00Z",
            "2026-11-28T22:40:00+01:00",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    /// Sampled XTS timing: every chunk's bytes are counted, the first chunk of a thread is
    /// timed (so one small request already shows time), one in XTS_SAMPLE after that, the time
    /// only grows, and it estimates the whole: chunks that each take about 1 ms sum to about
    /// as many ms as chunks ran (up to the untimed tail of at most XTS_SAMPLE - 1 chunks).
    #[test]
    fn sampled_xts_time_counts_every_byte_and_estimates_the_time() {
        static M: Metrics = Metrics::new();
        std::thread::scope(|s| {
            s.spawn(|| {
                let ok = M.xts_chunk(true, 4096, || Ok::<_, ()>(()));
                assert_eq!(ok, Ok(()));
                assert_eq!(M.xts_totals(true).1, 4096);
                let mut last = M.xts_totals(true).0;
                let chunks = 4 * XTS_SAMPLE + 1;
                for _ in 1..chunks {
                    M.xts_chunk(true, 4096, || {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        Ok::<_, ()>(())
                    })
                    .unwrap();
                    let now = M.xts_totals(true).0;
                    assert!(now >= last, "the estimate went down: {last} -> {now}");
                    last = now;
                }
                // A failed chunk counts nothing.
                let _ = M.xts_chunk(true, 4096, || Err::<(), _>(()));
                let (ns, bytes) = M.xts_totals(true);
                assert_eq!(bytes, 4096 * u64::from(chunks));
                // 4 * XTS_SAMPLE sleeping chunks timed through 4 samples: each sample charges
                // its own ms for XTS_SAMPLE chunks. Sleep overshoots; allow 3x.
                let expect = u64::from(4 * XTS_SAMPLE) * 1_000_000;
                assert!(
                    ns >= expect && ns < 3 * expect,
                    "estimated {ns} ns for {expect} ns of chunks"
                );
                assert_eq!(M.xts_totals(false), (0, 0));
            });
        });
    }

    /// Timers dropped inside one ClockBatch share one end time; outside, each reads the clock.
    #[test]
    fn a_clock_batch_gives_its_timers_one_end_time() {
        static M: Metrics = Metrics::new();
        let at = Instant::now();
        let timers: Vec<_> = (0..3)
            .map(|_| M.start_at(Command::Read, 4096, at))
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(2));
        {
            let _b = ClockBatch::begin();
            let mut timers = timers.into_iter();
            drop(timers.next());
            std::thread::sleep(std::time::Duration::from_millis(3));
            drop(timers);
        }
        let t = M.command_totals()[command_index(Command::Read)].clone();
        assert_eq!(t.requests, 3);
        // Three equal latencies of 2..3 ms (the batch's clock was read at the first drop).
        assert!(
            t.latency_sum_ns >= 6_000_000 && t.latency_sum_ns < 3 * 5_000_000,
            "{}",
            t.latency_sum_ns
        );
        let avg = t.latency_sum_ns / 3;
        assert!(
            avg < 5_000_000,
            "the later drops read the clock again: {avg}"
        );
        drop(M.start_at(Command::Write, 0, at));
        let w = M.command_totals()[command_index(Command::Write)].clone();
        assert!(
            w.latency_sum_ns >= 5_000_000,
            "outside a batch: {}",
            w.latency_sum_ns
        );
    }

    /// Requests started on one thread and answered on another (as when a tokio task moves):
    /// the summed counters are exact, in flight returns to zero, and never underflows while
    /// threads run. (What the hooks cost: `cargo bench -p nbdcrypt-benches --bench metrics`.)
    #[test]
    fn shards_sum_exactly_across_threads() {
        static M: Metrics = Metrics::new();
        const PER: u64 = 20_000;
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let mut max = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (r, b) = M.in_flight();
                    assert!(r <= 4 * PER && b <= 4 * PER * 4096, "underflow: {r} {b}");
                    max = max.max(r);
                }
                max
            });
            let workers: Vec<_> = (0..4)
                .map(|w| {
                    s.spawn(move || {
                        let (tx, rx) = std::sync::mpsc::sync_channel::<RequestTimer>(64);
                        std::thread::scope(|s2| {
                            s2.spawn(move || rx.into_iter().for_each(drop));
                            for i in 0..PER {
                                let c = if w % 2 == 0 {
                                    Command::Read
                                } else {
                                    Command::Write
                                };
                                if i % 1000 == 0 {
                                    M.error(c, NbdErrno::Io);
                                    M.xts(c == Command::Write, 4096, 7);
                                }
                                tx.send(M.start(c, 4096)).unwrap();
                            }
                            drop(tx);
                        });
                    })
                })
                .collect();
            workers.into_iter().for_each(|w| w.join().unwrap());
            stop.store(true, Ordering::Relaxed);
            watcher.join().unwrap();
        });
        let t = M.command_totals();
        for c in [Command::Read, Command::Write] {
            let x = &t[command_index(c)];
            assert_eq!(x.requests, 2 * PER);
            assert_eq!(x.bytes, 2 * PER * 4096);
            assert_eq!(x.buckets.iter().sum::<u64>(), 2 * PER);
            assert_eq!(x.errors[errno_index(NbdErrno::Io)], 2 * PER / 1000);
        }
        assert_eq!(M.in_flight(), (0, 0));
        assert_eq!(
            M.xts_totals(true),
            (7 * 2 * PER / 1000, 4096 * 2 * PER / 1000)
        );
        assert_eq!(
            M.xts_totals(false),
            (7 * 2 * PER / 1000, 4096 * 2 * PER / 1000)
        );
    }

    #[test]
    fn buckets_are_upper_bounds() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(50_000), 0);
        assert_eq!(bucket(50_001), 1);
        assert_eq!(bucket(u64::MAX), BUCKETS_NS.len());
    }
}
