//! fio with its libnbd engine: concurrent random I/O with crc32c verification.

use nbdcrypt_tests::*;
use serde_json::Value;
use std::time::Duration;

const FIO_TIMEOUT: Duration = Duration::from_secs(300);

/// Run fio with `args` against `uri`; returns the parsed JSON report.
fn fio(uri: &str, args: &[&str]) -> (Out, Value) {
    let out_dir = tempdir();
    let json = out_dir.path().join("fio.json");
    let mut c = tool("fio");
    // fio drops verify state files in its working directory: keep them in the temp dir.
    c.current_dir(out_dir.path());
    c.arg("--ioengine=nbd")
        .arg("--verify_state_save=0")
        .arg(format!("--uri={uri}"))
        .arg("--output-format=json")
        .arg(format!("--output={}", json.display()))
        .args(args);
    let out = run(&mut c, FIO_TIMEOUT);
    let text = std::fs::read_to_string(&json).unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(Value::Null);
    (out, v)
}

/// Assert fio exited 0 and every job reported error 0 and moved data in both directions.
#[track_caller]
fn assert_clean(out: Out, report: &Value, want_reads: bool) {
    let out = out.success();
    let jobs = report["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no fio JSON report\n{}", out.details()));
    assert!(!jobs.is_empty());
    for j in jobs {
        assert_eq!(
            j["error"], 0,
            "fio job {} reported an error: {j:#}",
            j["jobname"]
        );
        assert!(
            j["write"]["io_bytes"].as_u64().unwrap_or(0) > 0,
            "job wrote nothing: {j:#}"
        );
        if want_reads {
            assert!(
                j["read"]["io_bytes"].as_u64().unwrap_or(0) > 0,
                "job read nothing: {j:#}"
            );
        }
    }
}

#[test]
fn fio_random_read_write_with_two_jobs_and_crc32c_verification_passes() {
    let d = Daemon::plain(32 * MIB, &[]);
    let (out, report) = fio(
        &d.uri(),
        &[
            "--name=t",
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=2",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--runtime=60",
        ],
    );
    assert_clean(out, &report, true);
}

#[test]
fn fio_verification_passes_with_direct_io_and_mixed_block_sizes() {
    let d = Daemon::plain(32 * MIB, &["--direct"]);
    let (out, report) = fio(
        &d.uri(),
        &[
            "--name=mixed",
            "--rw=randwrite",
            "--bsrange=512-128k",
            "--iodepth=8",
            "--numjobs=2",
            "--size=8M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--runtime=60",
        ],
    );
    assert_clean(out, &report, true);
}

#[test]
fn fio_verify_detects_a_corrupted_backing_file() {
    // Proves the verification above is not vacuous: fio writes with checksums, we flip bytes
    // in the backing file, a verify-only pass must fail.
    let d = Daemon::plain(16 * MIB, &[]);
    let job = [
        "--name=w",
        "--rw=write",
        "--bs=4k",
        "--iodepth=8",
        "--size=8M",
        "--verify=crc32c",
    ];
    let mut args = job.to_vec();
    args.push("--do_verify=0");
    let (out, report) = fio(&d.uri(), &args);
    assert_clean(out, &report, false);

    let mut args = job.to_vec();
    args.push("--verify_only");
    let (out, _) = fio(&d.uri(), &args);
    out.success();

    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&d.image)
            .unwrap();
        f.write_all_at(b"CORRUPT!", 4096 * 100 + 100).unwrap();
    }
    let mut args = job.to_vec();
    args.push("--verify_only");
    let (out, report) = fio(&d.uri(), &args);
    let failed = !out.ok() || report["jobs"][0]["error"].as_u64().unwrap_or(0) != 0;
    assert!(
        failed,
        "fio verify did not notice a corrupted block\n{}",
        out.details()
    );
}
