//! The Prometheus text exposition format (version 0.0.4) of [`Metrics`].

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    Metrics, BUCKETS_NS, COMMANDS, ERRNOS, HANDSHAKE_REASONS, METHODS, NBUCKETS, PROVIDERS,
};

/// Facts the metrics do not hold themselves.
pub struct Context<'a> {
    /// NBD sessions attached now.
    pub clients: u64,
    /// "volume", "demo" or "plain".
    pub mode: &'a str,
    /// The LUKS2 UUID (from the header: escaped like any label value); empty in plain mode.
    pub volume_uuid: &'a str,
}

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn line(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.head(name, kind, help);
        self.line(name, &[], value);
    }
    fn each(&mut self, name: &str, help: &str, label: &str, names: &[&str], v: &[AtomicU64]) {
        self.head(name, "counter", help);
        for (n, a) in names.iter().zip(v) {
            self.line(name, &[(label, n)], ld(a));
        }
    }
}

fn ld(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Label values: backslash, double quote and newline escaped, as the format requires.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn seconds(ns: u64) -> String {
    // Exact decimal: whole seconds, then nine digits of fraction.
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

pub fn render(m: &Metrics, cx: &Context<'_>) -> String {
    let mut o = Out(String::with_capacity(16 * 1024));
    let b = |x: bool| u8::from(x);
    let xts_impl = *m.xts_impl.lock().unwrap_or_else(|e| e.into_inner());
    o.head(
        "nbdcrypt_info",
        "gauge",
        "Constant 1; labels describe the daemon and volume.",
    );
    o.line(
        "nbdcrypt_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("mode", cx.mode),
            ("volume_uuid", cx.volume_uuid),
            ("xts_impl", xts_impl),
        ],
        1,
    );
    o.one(
        "nbdcrypt_start_time_seconds",
        "gauge",
        "Unix time the daemon started.",
        ld(&m.start_time),
    );
    o.one(
        "nbdcrypt_unlocked",
        "gauge",
        "1 while the volume is unlocked and its export offered, 0 while locked.",
        b(m.unlocked.load(Ordering::Relaxed)),
    );
    o.one(
        "nbdcrypt_lock_state_changed_timestamp_seconds",
        "gauge",
        "Unix time of the last lock or unlock (daemon start if none since).",
        ld(&m.state_since),
    );
    o.each(
        "nbdcrypt_unlocks_total",
        "Successful unlocks by method.",
        "method",
        &METHODS,
        &m.unlocks,
    );
    o.each(
        "nbdcrypt_unlock_failures_total",
        "Failed unlocks (wrong passphrase, token refused, provider unreachable) by method.",
        "method",
        &METHODS,
        &m.failed_unlocks,
    );
    o.one(
        "nbdcrypt_locks_total",
        "counter",
        "Locks (key wiped).",
        ld(&m.locks),
    );
    o.one(
        "nbdcrypt_rekeys_total",
        "counter",
        "Successful token re-seals (nbdcryptctl rekey).",
        ld(&m.rekeys),
    );
    o.one(
        "nbdcrypt_rekey_failures_total",
        "counter",
        "Failed token re-seals.",
        ld(&m.failed_rekeys),
    );
    o.each(
        "nbdcrypt_provider_errors_total",
        "KMS/HSM provider failures while unsealing a token, by provider.",
        "provider",
        &PROVIDERS,
        &m.provider_errors,
    );
    o.one(
        "nbdcrypt_last_reseal_timestamp_seconds",
        "gauge",
        "Unix time a token's secret was last sealed (newest token \"created\" or last rekey); 0 unknown.",
        ld(&m.last_reseal),
    );
    o.one(
        "nbdcrypt_volume_key_created_timestamp_seconds",
        "gauge",
        "Unix time the volume key was created (recorded by nbdcryptctl reencrypt); 0 unknown.",
        ld(&m.volume_key_created),
    );
    {
        let tokens = m.tokens.lock().unwrap_or_else(|e| e.into_inner()).clone();
        o.head(
            "nbdcrypt_token_sealed_timestamp_seconds",
            "gauge",
            "Unix time each KMS/HSM token's secret was sealed, from the header's token \"created\".",
        );
        for t in &tokens {
            if let Some(s) = t.sealed {
                let (id, slot) = (t.token.to_string(), t.keyslot.to_string());
                o.line(
                    "nbdcrypt_token_sealed_timestamp_seconds",
                    &[("token", &id), ("keyslot", &slot), ("provider", t.provider)],
                    s,
                );
            }
        }
    }
    o.one(
        "nbdcrypt_failstop_latched",
        "gauge",
        "1 once a write or flush failed on the current device: every later flush fails until restart.",
        b(m.latched.load(Ordering::Relaxed)),
    );
    o.one(
        "nbdcrypt_failstop_trips_total",
        "counter",
        "Times the fail-stop latch tripped.",
        ld(&m.latch_trips),
    );
    o.one(
        "nbdcrypt_clients",
        "gauge",
        "NBD sessions attached now.",
        cx.clients,
    );
    o.one(
        "nbdcrypt_connections_total",
        "counter",
        "NBD connections accepted.",
        ld(&m.connections),
    );
    o.each(
        "nbdcrypt_handshake_failures_total",
        "Connections that ended before the handshake completed, by reason.",
        "reason",
        &HANDSHAKE_REASONS,
        &m.handshake_failures,
    );
    // One pass over the shards for every per-command series, so they agree with each other.
    let (in_flight_requests, in_flight_bytes) = m.in_flight();
    let totals = m.command_totals();
    o.one(
        "nbdcrypt_in_flight_requests",
        "gauge",
        "Requests read and not yet answered.",
        in_flight_requests,
    );
    o.one(
        "nbdcrypt_in_flight_bytes",
        "gauge",
        "Payload bytes of requests in flight.",
        in_flight_bytes,
    );
    o.head(
        "nbdcrypt_requests_total",
        "counter",
        "Requests answered, by command.",
    );
    for (c, name) in totals.iter().zip(COMMANDS) {
        o.line("nbdcrypt_requests_total", &[("command", name)], c.requests);
    }
    o.head(
        "nbdcrypt_request_bytes_total",
        "counter",
        "Payload bytes of answered requests, by command.",
    );
    for (c, name) in totals.iter().zip(COMMANDS) {
        o.line(
            "nbdcrypt_request_bytes_total",
            &[("command", name)],
            c.bytes,
        );
    }
    o.head(
        "nbdcrypt_request_errors_total",
        "counter",
        "Requests answered with an error, by command and NBD error value.",
    );
    for (c, name) in totals.iter().zip(COMMANDS) {
        for (&n, errno) in c.errors.iter().zip(ERRNOS) {
            if n > 0 {
                o.line(
                    "nbdcrypt_request_errors_total",
                    &[("command", name), ("errno", errno)],
                    n,
                );
            }
        }
    }
    o.head(
        "nbdcrypt_request_duration_seconds",
        "histogram",
        "Time from a request's header read to its reply written, by command (FLUSH: fdatasync).",
    );
    let les: Vec<String> = BUCKETS_NS
        .iter()
        .map(|ns| {
            let s = seconds(*ns);
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        })
        .chain(std::iter::once("+Inf".to_owned()))
        .collect();
    for (c, name) in totals.iter().zip(COMMANDS) {
        // Count is the buckets' sum, so the series is consistent.
        let counts = &c.buckets;
        let mut cum = 0u64;
        for (i, le) in les.iter().enumerate().take(NBUCKETS) {
            cum += counts[i];
            o.line(
                "nbdcrypt_request_duration_seconds_bucket",
                &[("command", name), ("le", le)],
                cum,
            );
        }
        o.line(
            "nbdcrypt_request_duration_seconds_sum",
            &[("command", name)],
            seconds(c.latency_sum_ns),
        );
        o.line(
            "nbdcrypt_request_duration_seconds_count",
            &[("command", name)],
            cum,
        );
    }
    o.head(
        "nbdcrypt_xts_seconds_total",
        "counter",
        "Time spent in AES-XTS, by direction: estimated, one chunk in 16 is timed per thread and scaled to the bytes since the last timed one.",
    );
    let xts = [m.xts_totals(true), m.xts_totals(false)];
    for ((nanos, _), dir) in xts.iter().zip(["encrypt", "decrypt"]) {
        o.line(
            "nbdcrypt_xts_seconds_total",
            &[("direction", dir)],
            seconds(*nanos),
        );
    }
    o.head(
        "nbdcrypt_xts_bytes_total",
        "counter",
        "Bytes through AES-XTS, by direction.",
    );
    for ((_, bytes), dir) in xts.iter().zip(["encrypt", "decrypt"]) {
        o.line("nbdcrypt_xts_bytes_total", &[("direction", dir)], bytes);
    }
    o.one(
        "nbdcrypt_process_cpu_seconds_total",
        "counter",
        "User and system CPU time of the daemon.",
        seconds(super::snapshot::process_cpu_ns()),
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn every_sample_line_is_well_formed() {
        let text = render(
            &super::super::METRICS,
            &Context {
                clients: 2,
                mode: "volume",
                volume_uuid: "x\"y",
            },
        );
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let (_, value) = line.rsplit_once(' ').expect(line);
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert!(text.contains("le=\"0.00005\""), "{text}");
        assert!(text.contains("le=\"+Inf\""));
        assert!(text.contains("volume_uuid=\"x\\\"y\""));
    }
}
