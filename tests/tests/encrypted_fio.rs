//! fio (libnbd engine) with crc32c verification on an encrypted volume with 4096-byte sectors:
//! 512-byte-aligned random writes of mixed sizes mean most requests are read-modify-writes of
//! partial sectors, many in flight at once.

use nbdcrypt_tests::*;
use serde_json::Value;
use std::time::Duration;

const PASS: &[u8] = b"fio passphrase";

fn fio(uri: &str, args: &[&str]) -> (Out, Value) {
    let out_dir = tempdir();
    let json = out_dir.path().join("fio.json");
    let mut c = tool("fio");
    c.current_dir(out_dir.path());
    c.arg("--ioengine=nbd")
        .arg("--verify_state_save=0")
        .arg(format!("--uri={uri}"))
        .arg("--output-format=json")
        .arg(format!("--output={}", json.display()))
        .args(args);
    let out = run(&mut c, Duration::from_secs(300));
    let text = std::fs::read_to_string(&json).unwrap_or_default();
    (out, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn fio_sub_sector_random_writes_on_4096_byte_sectors_with_crc32c_verification_pass() {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, 32 * MIB, 4096, "pbkdf2", PASS);
    let mut d = Daemon::volume_in(dir, &img, &[]);
    assert_eq!(d.unlock(PASS).code(), Some(0), "unlock");
    let (out, report) = fio(
        &d.uri(),
        &[
            "--name=rmw",
            "--rw=randwrite",
            "--bsrange=512-20k",
            "--blockalign=512",
            "--iodepth=16",
            "--numjobs=2",
            "--size=12M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--runtime=60",
        ],
    );
    let out = out.success();
    let jobs = report["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no fio JSON report\n{}", out.details()));
    for j in jobs {
        assert_eq!(j["error"], 0, "fio job reported an error: {j:#}");
        assert!(
            j["write"]["io_bytes"].as_u64().unwrap_or(0) > 0,
            "job wrote nothing: {j:#}"
        );
        assert!(
            j["read"]["io_bytes"].as_u64().unwrap_or(0) > 0,
            "job verified nothing: {j:#}"
        );
    }
    let s = d.status();
    assert_eq!(s["errors"], 0, "{s:#}");
    d.assert_alive();
}
