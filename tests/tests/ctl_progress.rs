//! Progress on long work when standard error is not a terminal (a pipe, a log, systemd's
//! journal): plain lines at each tenth and a final line, no carriage returns or bars, and
//! nothing on standard output, so `--json` stays parseable.

use nbdcrypt_tests::*;
use std::ffi::OsStr;

const PASS: &[u8] = b"progress passphrase";

/// Progress lines (`LABEL: N% (...)`) of `stderr`, as their percentages.
fn percentages(stderr: &str, label: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(label)?.strip_prefix(": "))
        .filter_map(|l| l.split('%').next()?.parse().ok())
        .collect()
}

#[test]
fn header_restore_prints_plain_progress_lines_without_a_terminal() {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, 4 * MIB, 4096, "pbkdf2", PASS);
    let backup = dir.path().join("volume.header");
    let os = |s: &std::path::Path| s.as_os_str().to_owned();
    nbdcryptctl(&[
        OsStr::new("header-backup"),
        &os(&img),
        OsStr::new("--file"),
        &os(&backup),
    ])
    .success();
    let out = nbdcryptctl(&[
        OsStr::new("header-restore"),
        &os(&img),
        OsStr::new("--file"),
        &os(&backup),
        OsStr::new("--yes"),
    ])
    .success();
    assert!(!out.stderr.contains('\r'), "{}", out.details());
    assert!(!out.stderr.contains("[#"), "no bar: {}", out.details());
    let p = percentages(&out.stderr, "restoring keyslots area");
    // 16 MiB area copied a MiB at a time: every tenth once, rising, then the final 100%.
    assert_eq!(
        p,
        vec![10, 20, 30, 40, 50, 60, 70, 80, 90, 100],
        "{}",
        out.details()
    );
    assert!(
        out.stderr.contains("restoring keyslots area: 100% (") && out.stderr.contains(" MiB) in "),
        "{}",
        out.details()
    );
    assert!(
        !out.stdout.contains('%'),
        "progress stays off stdout: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("restored the header"),
        "{}",
        out.details()
    );
}

#[test]
fn cipher_bench_prints_plain_progress_lines_without_a_terminal() {
    let out = nbdcryptctl(&[
        OsStr::new("bench"),
        OsStr::new("--json"),
        OsStr::new("--seconds"),
        OsStr::new("0.05"),
    ])
    .success();
    assert!(!out.stderr.contains('\r'), "{}", out.details());
    let p = percentages(&out.stderr, "bench");
    assert!(p.len() >= 2, "{}", out.details());
    assert!(p.windows(2).all(|w| w[0] < w[1]), "rising: {p:?}");
    assert_eq!(p.last(), Some(&100), "{}", out.details());
    // stdout is the JSON alone.
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    assert_eq!(v["kind"], "cipher");
}
