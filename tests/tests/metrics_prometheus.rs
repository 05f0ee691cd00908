//! `nbdcryptd --metrics`: a real Prometheus scrapes the daemon; its query API shows lock state,
//! unlocks, per-command requests, errors by errno, XTS time and latency change with what the
//! test does, counters survive lock and unlock, the shipped alert rules fire (locked), and
//! hostile HTTP peers do not stop the daemon or the metrics.

use nbdcrypt_tests::raw::*;
use nbdcrypt_tests::*;
use std::io::{Read, Write};
use std::time::Duration;

#[path = "common/prom.rs"]
mod prom;
use prom::*;

const PASS: &[u8] = b"metrics passphrase";

fn formatted() -> (TempDir, std::path::PathBuf) {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, 4 * MIB, 4096, "pbkdf2", PASS);
    (dir, img)
}

#[test]
fn prometheus_scrapes_io_unlocks_and_errors_and_counters_survive_a_lock() {
    let (dir, img) = formatted();
    let port = free_port();
    let target = format!("127.0.0.1:{port}");
    let d = Daemon::volume_in(dir, &img, &["--metrics", &target]);
    let p = Prometheus::start(d.dir(), &target, &shipped_rules_without_waits());

    // Locked: scraped as such, and the "locked too long" rule fires.
    p.wait("nbdcrypt_unlocked", |v| v == 0.0, "locked at start");
    p.wait(
        "count(ALERTS{alertname=\"NbdcryptLockedTooLong\",alertstate=\"firing\"})",
        |v| v == 1.0,
        "the locked alert fires",
    );

    // A wrong passphrase, then the right one.
    assert!(!d.unlock(b"not it").ok());
    assert!(d.unlock(PASS).ok(), "unlock");
    p.wait("nbdcrypt_unlocked", |v| v == 1.0, "unlocked");
    p.wait(
        "nbdcrypt_unlocks_total{method=\"passphrase\"}",
        |v| v == 1.0,
        "one passphrase unlock",
    );
    p.wait(
        "nbdcrypt_unlock_failures_total{method=\"passphrase\"}",
        |v| v == 1.0,
        "one failed unlock",
    );
    p.wait(
        "count(ALERTS{alertname=\"NbdcryptLockedTooLong\"}) or vector(0)",
        |v| v == 0.0,
        "the locked alert resolves",
    );

    let (mut c, _) = Client::connect_go(&d.sock);
    for i in 0..5u64 {
        assert_eq!(c.write(i, i * 8192, &[i as u8; 8192], 0), 0);
    }
    for i in 0..3u64 {
        c.read(100 + i, 0, 4096).unwrap();
    }
    // Past the end: EINVAL.
    assert!(c.read(200, 8 * MIB, 4096).is_err());
    c.request(0, CMD_FLUSH, 300, 0, 0, &[]).unwrap();
    assert_eq!(c.simple_reply().unwrap(), (0, 300));

    p.wait(
        "nbdcrypt_requests_total{command=\"write\"}",
        |v| v == 5.0,
        "5 writes",
    );
    p.wait(
        "nbdcrypt_request_bytes_total{command=\"write\"}",
        |v| v == 5.0 * 8192.0,
        "write bytes",
    );
    p.wait(
        "nbdcrypt_requests_total{command=\"read\"}",
        |v| v == 4.0,
        "4 reads answered (one with an error)",
    );
    p.wait(
        "nbdcrypt_request_errors_total{command=\"read\",errno=\"EINVAL\"}",
        |v| v == 1.0,
        "the bad read counted by errno",
    );
    p.wait(
        "nbdcrypt_request_duration_seconds_count{command=\"flush\"}",
        |v| v >= 1.0,
        "flush latency observed",
    );
    p.wait(
        "histogram_quantile(0.5, nbdcrypt_request_duration_seconds_bucket{command=\"write\"})",
        |v| v > 0.0 && v <= 10.0,
        "a median write latency",
    );
    p.wait(
        "nbdcrypt_xts_bytes_total{direction=\"encrypt\"}",
        |v| v >= 5.0 * 8192.0,
        "bytes encrypted",
    );
    p.wait(
        "nbdcrypt_xts_seconds_total{direction=\"decrypt\"}",
        |v| v > 0.0,
        "time decrypting",
    );
    p.wait("nbdcrypt_clients", |v| v == 1.0, "one client attached");
    p.wait(
        "nbdcrypt_in_flight_requests",
        |v| v == 0.0,
        "nothing in flight",
    );
    drop(c);

    // Lock and unlock: the counters go on (status' per-unlock counters start again).
    assert!(d.ctl("lock", &["--force"]).ok(), "lock");
    d.wait_state("locked", Duration::from_secs(10));
    assert!(d.unlock(PASS).ok(), "unlock again");
    p.wait("nbdcrypt_locks_total", |v| v == 1.0, "one lock");
    p.wait(
        "nbdcrypt_unlocks_total{method=\"passphrase\"}",
        |v| v == 2.0,
        "two unlocks",
    );
    let (mut c, _) = Client::connect_go(&d.sock);
    assert_eq!(c.write(9, 0, &[9u8; 4096], 0), 0);
    p.wait(
        "nbdcrypt_requests_total{command=\"write\"}",
        |v| v == 6.0,
        "writes counted across the lock",
    );
    // No counter went backwards over the whole run (a reset would show here).
    assert_eq!(
        p.value("sum(resets(nbdcrypt_requests_total[5m]))"),
        Some(0.0),
        "a counter reset"
    );
    assert_eq!(
        d.status()["writes"],
        1,
        "status counts since the last unlock"
    );
}

#[test]
fn hostile_http_peers_neither_stop_the_metrics_nor_the_daemon() {
    let (dir, img) = formatted();
    let target = format!("127.0.0.1:{}", free_port());
    let d = Daemon::volume_in(dir, &img, &["--metrics", &target]);
    assert!(d.unlock(PASS).ok());
    // Garbage, an endless head, a non-GET, a path probe, a silent peer, many at once.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(std::net::TcpStream::connect(&target).unwrap());
    }
    let send = |bytes: &[u8]| {
        let mut s = std::net::TcpStream::connect(&target).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let busy = send(b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(
        busy.starts_with("HTTP/1.1 503") || busy.is_empty(),
        "more than the cap at once: {busy}"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let big = vec![b'G'; 1 << 20];
    let r = send(&big);
    assert!(r.starts_with("HTTP/1.1 431") || r.is_empty(), "{r}");
    assert!(send(b"\xff\x00\x13\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(send(b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(send(b"GET /../../etc/passwd HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    // Still serving metrics and NBD.
    let r = http_get(&target, "/metrics").unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("nbdcrypt_unlocked 1"), "{r}");
    let (mut c, _) = Client::connect_go(&d.sock);
    assert_eq!(c.write(1, 0, &[1u8; 4096], 0), 0);
}

#[test]
fn metrics_on_a_unix_socket() {
    let (dir, img) = formatted();
    let sock = dir.path().join("metrics.sock");
    let d = Daemon::volume_in(dir, &img, &["--metrics", sock.to_str().unwrap()]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "metrics socket mode");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.contains("\r\n\r\n# HELP nbdcrypt_info"), "{out}");
    assert!(out.contains("nbdcrypt_unlocked 0"), "{out}");
    drop(d);
}

fn docs(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name)
}

/// Alert names of a rule file (`- alert: NAME` lines).
fn rule_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// Alerts that some `alert_rule_test` case of a promtool test file expects to fire (its
/// `alertname:` followed by a non-empty `exp_alerts:` list).
fn alerts_tested_firing(tests: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for l in tests.lines().map(str::trim) {
        if let Some(n) = l.strip_prefix("alertname:") {
            current = Some(n.trim().to_owned());
        } else if let Some(rest) = l.strip_prefix("exp_alerts:") {
            if rest.trim() != "[]" {
                out.extend(current.take());
            }
        }
    }
    out
}

/// Alerts of `rules` without a test case that shows them firing.
fn untested(rules: &str, tests: &str) -> Vec<String> {
    let tested = alerts_tested_firing(tests);
    rule_names(rules)
        .into_iter()
        .filter(|r| !tested.contains(r))
        .collect()
}

#[test]
fn shipped_alert_rules_pass_promtool_and_each_has_a_unit_test_that_fires() {
    let rules = std::fs::read_to_string(docs("nbdcrypt-alerts.yml")).unwrap();
    // Every promtool test file shipped beside the rules (docs/nbdcrypt-alerts*.test.yml).
    let mut test_files: Vec<String> = std::fs::read_dir(docs(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nbdcrypt-alerts") && n.ends_with(".test.yml"))
        .collect();
    test_files.sort();
    assert!(test_files.len() >= 2, "{test_files:?}");
    let tests: String = test_files
        .iter()
        .map(|f| std::fs::read_to_string(docs(f)).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let names = rule_names(&rules);
    assert!(names.len() >= 5, "rules found: {names:?}");
    assert_eq!(
        untested(&rules, &tests),
        Vec::<String>::new(),
        "rules without a promtool test case in docs/nbdcrypt-alerts*.test.yml that fires them"
    );
    // Negative control: the coverage check notices a rule nobody tests.
    let extra =
        format!("{rules}\n      - alert: NbdcryptNobodyTestsThis\n        expr: vector(1)\n");
    assert_eq!(untested(&extra, &tests), vec!["NbdcryptNobodyTestsThis"]);
    let check = run(
        tool("promtool")
            .arg("check")
            .arg("rules")
            .arg(docs("nbdcrypt-alerts.yml")),
        Duration::from_secs(60),
    )
    .success();
    assert!(
        check
            .stdout
            .contains(&format!("SUCCESS: {} rules found", names.len())),
        "{}",
        check.details()
    );
    // promtool resolves rule_files relative to the test file.
    let test = run(
        tool("promtool")
            .current_dir(docs(""))
            .arg("test")
            .arg("rules")
            .args(&test_files),
        Duration::from_secs(120),
    )
    .success();
    assert_eq!(
        test.stdout.matches("SUCCESS").count(),
        test_files.len(),
        "{}",
        test.details()
    );
}

/// README's metrics table lists exactly the metric families the daemon exports.
#[test]
fn readme_lists_every_exported_metric_and_nothing_else() {
    let (dir, img) = formatted();
    let target = format!("127.0.0.1:{}", free_port());
    let d = Daemon::volume_in(dir, &img, &["--metrics", &target]);
    assert!(d.unlock(PASS).ok());
    let text = body(&http_get(&target, "/metrics").unwrap());
    let mut exported: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    exported.sort();
    exported.dedup();
    assert!(exported.len() > 20, "{text}");
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .unwrap();
    let section = readme
        .split("## Monitoring")
        .nth(1)
        .expect("README has a Monitoring section");
    let mut listed: Vec<String> = Vec::new();
    for row in section.lines().filter(|l| l.starts_with("| `nbdcrypt_")) {
        let first = row.split('|').nth(1).unwrap_or("");
        for part in first.split('`').skip(1).step_by(2) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            listed.push(name);
        }
    }
    listed.sort();
    listed.dedup();
    let missing: Vec<_> = exported.iter().filter(|n| !listed.contains(n)).collect();
    let stale: Vec<_> = listed.iter().filter(|n| !exported.contains(n)).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "README's metrics table vs /metrics: exported but not listed {missing:?}; listed but not exported {stale:?}"
    );
}
