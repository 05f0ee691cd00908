//! PostgreSQL on S3, encrypted on the database host: moto's S3 server (loopback) → nbdkit's S3
//! plugin (one 64 KiB object per block) → `nbdcryptd --volume nbd+unix://…` → nbdfuse → loop →
//! ext4 → PostgreSQL (Debian's binaries, as the `postgres` user, fsync on). The volume is
//! formatted through us (`nbdcryptctl format URI`), pgbench runs for a while, and then:
//!
//! * PostgreSQL's own checks hold: `pg_amcheck` clean, pgbench's bookkeeping balances (the sum
//!   of the history's deltas equals the sums of the account, teller and branch balances, and the
//!   history has one row per transaction pgbench counted), `e2fsck -fn` clean;
//! * a table written with a known plaintext pattern is on the decrypted device (read back from
//!   the unmounted filesystem with `debugfs`: the control that the pattern really went to
//!   storage), and no object in the bucket contains that pattern (the same scan finds it in a
//!   plaintext object we put there: the scan is not blind).
//!
//! Small on purpose (256 MiB export, pgbench scale 1 for 15 s): the S3 plugin is Python and
//! rewrites a whole 64 KiB object for every smaller write.

#[path = "common/db_stack.rs"]
mod db_stack;
#[path = "../../ctl/tests/moto/mod.rs"]
mod moto;
#[path = "common/postgres.rs"]
mod postgres;

use db_stack::*;
use nbdcrypt_tests::*;
use postgres::*;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Written into a table; must never reach the bucket.
const NEEDLE: &str = "NBDCRYPT-PG-S3-PLAINTEXT-";

/// Runs `code` under Debian's python3 (boto3 from python3-boto3) with `s3` bound to a client
/// of `endpoint`; returns stdout.
fn s3(endpoint: &str, code: &str) -> String {
    let script = format!(
        "import boto3\ns3 = boto3.client('s3', endpoint_url={endpoint:?}, region_name='us-east-1', \
         aws_access_key_id='test', aws_secret_access_key='test')\n{code}\n"
    );
    let mut c = Command::new("/usr/bin/python3");
    moto::aws_env(&mut c);
    run(c.arg("-c").arg(script), LONG).success().stdout
}

struct KillOnDropChild(Child);
impl Drop for KillOnDropChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `nbdinfo` answers on `uri`.
fn wait_serving(uri: &str, what: &str) {
    let deadline = Instant::now() + SHORT;
    loop {
        let out = run(tool("nbdinfo").arg("--size").arg(uri), SHORT);
        if out.ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not serving {uri}\n{}",
            out.details()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// "number of transactions actually processed: N" from pgbench's output.
fn pgbench_transactions(out: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in pgbench output:\n{out}"))
}

#[test]
fn postgres_pgbench_on_s3_through_nbdkit_over_moto_leaves_only_ciphertext_in_the_bucket() {
    preflight();
    need("debugfs", "e2fsprogs");
    let t0 = Instant::now();
    let m = moto::Moto::start();
    s3(&m.endpoint, "s3.create_bucket(Bucket='pgvol')");

    // The volume's directory: world-traversable (postgres reaches its mount point inside it).
    let dir = tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = dir.path().join("volume.key");
    std::fs::write(&key, random_bytes(0x5353, 64)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let vol = Volume {
        dir,
        image: PathBuf::new(),
        key: key.clone(),
    };

    // nbdkit's S3 plugin on a Unix socket.
    let sock = vol.path().join("s3.sock");
    let mut cmd = tool("nbdkit");
    moto::aws_env(&mut cmd);
    let nbdkit = KillOnDropChild(
        cmd.args(["-f", "-U"])
            .arg(&sock)
            .arg("S3")
            .arg(format!("endpoint-url={}", m.endpoint))
            .args(["bucket=pgvol", "key=db", "size=256M", "object-size=64k"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(vol.path().join("nbdkit.log")).unwrap())
            .spawn()
            .expect("nbdkit S3 (nbdkit-plugin-python)"),
    );
    let upstream = format!("nbd+unix:///?socket={}", sock.display());
    wait_serving(&upstream, "nbdkit S3");

    // Formatted through us, over NBD, into the bucket.
    sh(
        Command::new(db_stack::ctl_binary())
            .arg("format")
            .arg(&upstream)
            .arg("--key-file")
            .arg(&key)
            .args([
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--yes",
            ]),
        LONG,
    );

    // nbdcryptd on the upstream, then nbdfuse → loop → ext4.
    let ddir = tempdir();
    let p = |n: &str| OsString::from(ddir.path().join(n));
    let args = vec![
        "--volume".into(),
        OsString::from(&upstream),
        "--unlock-key-file".into(),
        key.clone().into_os_string(),
        "--control".into(),
        p("control.sock"),
        "--unix".into(),
        p("nbd.sock"),
    ];
    let daemon = Daemon::start_in(ddir, args);
    wait_serving(&daemon.uri(), "nbdcryptd");
    let fuse_mnt = vol.subdir("fuse");
    let data_mnt = vol.subdir("data");
    let fuse = Fuse::attach(&daemon.sock, &fuse_mnt, &vol.path().join("nbdfuse.log"));
    let lo = LoopDev::attach(&fuse.file());
    let mut stack = Stack {
        mount: None,
        lo: Some(lo),
        fuse: Some(fuse),
        daemon: Some(daemon),
        nbdkit: None,
        fuse_mnt,
        data_mnt,
    };
    mkfs(stack.dev());
    stack.mount();
    println!("[{:.1?}] ext4 on S3 mounted", t0.elapsed());

    let mut pg = Pg::init(&vol, &stack.data_mnt.join("pg"));
    pg.start();
    assert_eq!(pg.psql("show fsync"), "on");
    println!("[{:.1?}] postgres up", t0.elapsed());

    // The plaintext the bucket must not hold: 2000 rows, each under PostgreSQL's TOAST
    // threshold so it is stored as is (not compressed) in the heap file.
    pg.psql(&format!(
        "CREATE TABLE secret (id int PRIMARY KEY, body text NOT NULL); \
         INSERT INTO secret SELECT g, repeat('{NEEDLE}', 8) || g FROM generate_series(1, 2000) g"
    ));
    let rel = pg.psql("SELECT pg_relation_filepath('secret')");

    sh(pg.pgbench().args(["-i", "-s", "1", "-q", "postgres"]), LONG);
    let (_, flushes_before) = stack.io_counters();
    let out = sh(
        pg.pgbench()
            .args(["-c", "2", "-j", "2", "-T", "15", "postgres"]),
        LONG,
    );
    let (_, flushes_after) = stack.io_counters();
    let txs = pgbench_transactions(&out.stdout);
    println!(
        "[{:.1?}] pgbench -c 2 -T 15 (scale 1) on nbdcrypt over S3: {txs} transactions, {} NBD FLUSHes",
        t0.elapsed(),
        flushes_after - flushes_before
    );
    assert!(txs > 0, "pgbench committed nothing:\n{}", out.stdout);
    assert!(
        (flushes_after - flushes_before) * 2 >= txs,
        "only {} FLUSHes for {txs} synchronous commits",
        flushes_after - flushes_before
    );

    // pgbench's bookkeeping: every transaction added its delta to one account, teller and
    // branch and wrote one history row.
    let sums = pg.psql(
        "SELECT (SELECT count(*) FROM pgbench_history), \
                (SELECT coalesce(sum(delta), 0) FROM pgbench_history), \
                (SELECT sum(abalance) FROM pgbench_accounts), \
                (SELECT sum(tbalance) FROM pgbench_tellers), \
                (SELECT sum(bbalance) FROM pgbench_branches), \
                (SELECT count(*) FROM pgbench_accounts), \
                (SELECT count(*) FROM secret WHERE body LIKE '{NEEDLE}%')"
            .replace("{NEEDLE}", NEEDLE)
            .as_str(),
    );
    let f: Vec<i64> = sums.split('|').map(|s| s.trim().parse().unwrap()).collect();
    assert_eq!(f[0], txs as i64, "history rows vs pgbench's count: {sums}");
    assert!(
        f[1] == f[2] && f[2] == f[3] && f[3] == f[4],
        "balances do not add up (history, accounts, tellers, branches): {sums}"
    );
    assert_eq!(f[5], 100_000, "pgbench_accounts rows: {sums}");
    assert_eq!(f[6], 2000, "secret rows: {sums}");
    pg.psql("CHECKPOINT");
    let (am, am_ok) = pg.amcheck();
    assert!(am_ok, "{am}");
    pg.stop();
    drop(pg);

    // Control: the pattern is on the decrypted device (read from the unmounted filesystem).
    let dev = stack.dev().to_owned();
    stack.mount.take().unwrap().unmount();
    fsck_clean(&dev);
    let cat = std::process::Command::new(need("debugfs", "e2fsprogs"))
        .args(["-R", &format!("cat /pg/{rel}"), &dev])
        .stderr(Stdio::null())
        .output()
        .expect("debugfs");
    let heap = cat.stdout;
    assert!(
        heap.len() >= 8192 && contains(&heap, NEEDLE.as_bytes()),
        "the table's heap file ({} bytes read by debugfs) lacks the pattern: the control failed",
        heap.len()
    );
    stack.shutdown();
    drop(nbdkit);

    // Every object in the bucket: ciphertext only. Control: the same scan finds the pattern in
    // a plaintext object.
    let out = s3(
        &m.endpoint,
        &format!(
            "needle = {NEEDLE:?}.encode()\n\
             s3.put_object(Bucket='pgvol', Key='control', Body=b'x' + needle)\n\
             n = 0; bad = []; ctl = False\n\
             for page in s3.get_paginator('list_objects_v2').paginate(Bucket='pgvol'):\n\
             \x20   for o in page.get('Contents', []):\n\
             \x20       body = s3.get_object(Bucket='pgvol', Key=o['Key'])['Body'].read()\n\
             \x20       if o['Key'] == 'control':\n\
             \x20           ctl = needle in body\n\
             \x20           continue\n\
             \x20       n += 1\n\
             \x20       if needle in body: bad.append(o['Key'])\n\
             luks = s3.get_object(Bucket='pgvol', Key='db/0000000000000000')['Body'].read()[:6]\n\
             print(n, len(bad), luks == b'LUKS\\xba\\xbe', ctl, ' '.join(bad[:10]))"
        ),
    );
    let f: Vec<&str> = out.split_whitespace().collect();
    assert!(f.len() >= 4, "{out}");
    assert_eq!(f[3], "True", "the plaintext scan is blind: {out}");
    let objects: usize = f[0].parse().unwrap();
    println!(
        "[{:.1?}] bucket: {objects} objects, {} with the plaintext pattern",
        t0.elapsed(),
        f[1]
    );
    assert!(
        objects > 1000,
        "only {objects} objects in the bucket: {out}"
    );
    assert_eq!(f[1], "0", "objects holding plaintext: {out}");
    assert_eq!(f[2], "True", "no LUKS2 header in the first object: {out}");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
