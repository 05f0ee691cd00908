//! A copy of the counters at one instant, serializable: what the control socket's `stats`
//! request returns and `nbdcryptctl top` turns into rates and percentiles (two snapshots a
//! second apart).

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::{Metrics, COMMANDS};

/// One command's counters.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandSnapshot {
    pub name: String,
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency_sum_ns: u64,
    /// Non-cumulative counts per latency bucket; bounds in `Snapshot::bucket_bounds_ns`.
    pub buckets: Vec<u64>,
}

/// Every counter, as of `taken_ms` (Unix milliseconds).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub taken_ms: u64,
    pub start_time: u64,
    pub unlocked: bool,
    pub state_since: u64,
    pub latched: bool,
    pub commands: Vec<CommandSnapshot>,
    pub bucket_bounds_ns: Vec<u64>,
    pub encrypt_ns: u64,
    pub encrypt_bytes: u64,
    pub decrypt_ns: u64,
    pub decrypt_bytes: u64,
    /// CPU time (user + system) of the whole daemon process so far.
    pub process_cpu_ns: u64,
    pub in_flight_requests: u64,
    pub in_flight_bytes: u64,
    pub connections: u64,
    /// Unix time of the last re-seal of a token (0: none known).
    pub last_reseal: u64,
    /// Unix time the oldest token of the volume was sealed (0: no token with a time).
    pub oldest_token_sealed: u64,
    pub xts_impl: String,
}

impl Snapshot {
    pub fn take(m: &Metrics) -> Snapshot {
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let (in_flight_requests, in_flight_bytes) = m.in_flight();
        let commands = m
            .command_totals()
            .iter()
            .zip(COMMANDS)
            .map(|(c, name)| CommandSnapshot {
                name: name.to_owned(),
                requests: c.requests,
                bytes: c.bytes,
                errors: c.errors.iter().sum(),
                latency_sum_ns: c.latency_sum_ns,
                buckets: c.buckets.to_vec(),
            })
            .collect();
        let (encrypt_ns, encrypt_bytes) = m.xts_totals(true);
        let (decrypt_ns, decrypt_bytes) = m.xts_totals(false);
        let tokens = m.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = tokens.iter().filter_map(|t| t.sealed).min().unwrap_or(0);
        drop(tokens);
        Snapshot {
            taken_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            start_time: ld(&m.start_time),
            unlocked: m.unlocked.load(Ordering::Relaxed),
            state_since: ld(&m.state_since),
            latched: m.latched.load(Ordering::Relaxed),
            commands,
            bucket_bounds_ns: super::BUCKETS_NS.to_vec(),
            encrypt_ns,
            encrypt_bytes,
            decrypt_ns,
            decrypt_bytes,
            process_cpu_ns: process_cpu_ns(),
            in_flight_requests,
            in_flight_bytes,
            connections: ld(&m.connections),
            last_reseal: ld(&m.last_reseal),
            oldest_token_sealed: oldest,
            xts_impl: (*m.xts_impl.lock().unwrap_or_else(|e| e.into_inner())).to_owned(),
        }
    }

    pub fn command(&self, name: &str) -> Option<&CommandSnapshot> {
        self.commands.iter().find(|c| c.name == name)
    }
}

/// User plus system CPU time of this process (getrusage), in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let Ok(u) = getrusage(UsageWho::RUSAGE_SELF) else {
        return 0;
    };
    let ns = |t: nix::sys::time::TimeVal| {
        u64::try_from(t.tv_sec())
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(t.tv_usec()).unwrap_or(0).saturating_mul(1000))
    };
    ns(u.user_time()).saturating_add(ns(u.system_time()))
}

/// Latency percentile `p` (0..1) from per-bucket counts, as the upper bound of the bucket it
/// falls in (ns); `None` without samples. The +Inf bucket reports the largest finite bound.
pub fn percentile(buckets: &[u64], bounds: &[u64], p: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // Rank of the sample wanted, 1-based; the float only picks a rank within `total`.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((total as f64) * p.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(bounds.get(i).or(bounds.last()).copied().unwrap_or(0));
        }
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_bucket_bound() {
        let bounds = [10, 20, 30];
        assert_eq!(percentile(&[0, 0, 0, 0], &bounds, 0.5), None);
        assert_eq!(percentile(&[5, 5, 0, 0], &bounds, 0.5), Some(10));
        assert_eq!(percentile(&[5, 5, 0, 0], &bounds, 0.99), Some(20));
        assert_eq!(percentile(&[0, 0, 0, 3], &bounds, 0.5), Some(30));
    }
}
