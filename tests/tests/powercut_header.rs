//! LUKS2 header updates across a power cut. The volume file lies on the power-cut filesystem
//! (tests/powercut). Each update (`nbdcryptctl add-key`, `remove-key`, `change-key`,
//! `header-restore`, and with a SoftHSM2 token `enroll` and `rekey`) runs once uncut to count its
//! write/sync operations (the filesystem's op
//! counter), then again from the same starting image with the power cut right after its k-th
//! operation, for every cut point k of updates of up to 48 operations (header-restore has ~145:
//! by default every sync, the write before it and a spread of the others), each cut clean and,
//! at every other write and around every sync, torn (a random subset of the pending 512-byte
//! sectors reaches the disk). `NBDCRYPT_POWERCUT_ALL_POINTS=1` (or `NBDCRYPT_POWERCUT_TRIALS`)
//! cuts at every point, clean and torn. Afterwards the volume must open with the old
//! or the new keys, both with `nbdcryptctl test-key` and with stock `cryptsetup open
//! --test-passphrase`, and the two must agree on every key; for rekey some token (old or new)
//! opens it at every point.
//!
//! Finding (fixed): header-restore used to write both header copies and the keyslots area and
//! sync once, as `cryptsetup luksHeaderRestore` does, so a torn cut during it left no valid
//! header copy at 113 of 145 points. It now writes the keyslots area, syncs, then the header at a
//! higher seqid, secondary copy first, each synced: some complete copy survives every cut, and
//! this test no longer accepts a broken header from any update.
//!
//! Needs /dev/fuse, root, cryptsetup, softhsm2 + opensc (pkcs11-tool).

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nbdcrypt_tests::powercut_rig::{Rig, Rng};
use nbdcrypt_tests::{
    ctl_binary, luks_format_keyfile, random_bytes, run, tool, Out, CTL_TIMEOUT, MIB,
};

const FILE_SIZE: u64 = 20 * MIB;
const FAST_KDF: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];

struct Keys {
    k0: PathBuf,
    k1: PathBuf,
    k2: PathBuf,
    /// SOFTHSM2_CONF of the test's SoftHSM2 token (HSM cases only) and the PIN file.
    hsm: Option<(PathBuf, PathBuf)>,
}

const HSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const HSM_TOKEN: &str = "nbdcrypt-powercut";

/// `nbdcryptctl ARGS` (with the test's SoftHSM2 configuration, if any).
fn ctl(k: &Keys, args: &[&OsStr]) -> Out {
    let mut c = std::process::Command::new(ctl_binary());
    c.args(args).env_remove("NBDCRYPT_CONTROL");
    if let Some((conf, _)) = &k.hsm {
        c.env("SOFTHSM2_CONF", conf);
    }
    run(&mut c, CTL_TIMEOUT)
}

fn hsm_uri(label: &str) -> String {
    format!("pkcs11:token={HSM_TOKEN};object={label};type=secret-key")
}

/// A SoftHSM2 token in `dir` with two AES-256 keys, kek1 and kek2 (as ctl/tests/hsm.rs).
fn softhsm(dir: &Path) -> (PathBuf, PathBuf) {
    assert!(
        Path::new(HSM_MODULE).exists(),
        "{HSM_MODULE} missing: apt-get install -y softhsm2 opensc"
    );
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let mut c = tool("softhsm2-util");
    c.env("SOFTHSM2_CONF", &conf).args([
        "--init-token",
        "--free",
        "--label",
        HSM_TOKEN,
        "--so-pin",
        "87654321",
        "--pin",
        "1234",
    ]);
    run(&mut c, Duration::from_secs(60)).success();
    for (label, id) in [("kek1", "01"), ("kek2", "02")] {
        let mut c = tool("pkcs11-tool");
        c.env("SOFTHSM2_CONF", &conf).args([
            "--module",
            HSM_MODULE,
            "--token-label",
            HSM_TOKEN,
            "--login",
            "--pin",
            "1234",
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            label,
            "--id",
            id,
            "--usage-decrypt",
            "--usage-wrap",
            "--sensitive",
            "--private",
        ]);
        run(&mut c, Duration::from_secs(60)).success();
    }
    let pin = dir.join("pin");
    std::fs::write(&pin, "1234\n").unwrap();
    (conf, pin)
}

fn pin_arg(k: &Keys) -> OsString {
    let mut a = OsString::from("file:");
    a.push(&k.hsm.as_ref().expect("an HSM case").1);
    a
}

/// Does a token of `img` open it (`test-token`), and which HSM keys does its output name?
fn token_opens(k: &Keys, img: &Path, what: &str) -> (bool, String) {
    let pin = pin_arg(k);
    let out = ctl(
        k,
        &[
            OsStr::new("test-token"),
            img.as_os_str(),
            OsStr::new("--pkcs11-pin"),
            &pin,
        ],
    );
    assert!(
        out.ok() || out.code() == Some(1),
        "{what}: test-token: {}",
        out.details()
    );
    let text = format!("{}{}", out.stdout, out.stderr);
    let keks: Vec<&str> = ["kek1", "kek2"]
        .into_iter()
        .filter(|k| text.contains(&format!("object={k}")))
        .collect();
    (out.ok(), keks.join("+"))
}

fn cryptsetup_add_key(img: &Path, existing: &Path, new: &Path) {
    let mut c = tool("cryptsetup");
    c.args([
        "luksAddKey",
        "--batch-mode",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
    ])
    .arg("--key-file")
    .arg(existing)
    .arg(img)
    .arg(new);
    run(&mut c, Duration::from_secs(60)).success();
}

/// Does `key` open `img`, per nbdcryptctl and per cryptsetup (run on a copy: cryptsetup may
/// repair a header copy, which would change what the next check sees)?
fn opens(k: &Keys, img: &Path, key: &Path, scratch: &Path, what: &str) -> (bool, bool) {
    let ctl = ctl(
        k,
        &[
            OsStr::new("test-key"),
            img.as_os_str(),
            OsStr::new("--key-file"),
            key.as_os_str(),
        ],
    );
    assert!(
        ctl.ok() || ctl.code() == Some(3),
        "{what}: test-key neither opened nor rejected the key: {}",
        ctl.details()
    );
    let copy = scratch.join("check.img");
    std::fs::copy(img, &copy).unwrap();
    let mut c = tool("cryptsetup");
    c.args(["open", "--test-passphrase", "--key-file"])
        .arg(key)
        .arg(&copy);
    let cs = run(&mut c, Duration::from_secs(60));
    // cryptsetup: 0 opened, 2 no key matched; anything else (e.g. 1: not a LUKS device) counts
    // as not opening, and is caught by the "always" keys.
    (ctl.ok(), cs.ok())
}

/// True if nbdcryptctl finds a valid LUKS2 header copy (`dump` succeeds).
fn header_valid(k: &Keys, img: &Path) -> bool {
    ctl(k, &[OsStr::new("dump"), img.as_os_str()]).ok()
}

struct Case {
    name: &'static str,
    /// Prepares `backing/disk.img` (and files outside the mount) before the mount.
    prepare: fn(&Path, &Keys, &Path),
    /// nbdcryptctl arguments; `{vol}` is the volume on the mount.
    args: fn(&Keys, &Path) -> Vec<OsString>,
    /// Keys that open before and after: they must open at every cut point.
    always: &'static [usize],
    /// At least one of these opens at every cut point (the key being changed: old or new).
    either: &'static [usize],
    /// After the uncut update: these open, those do not.
    after_open: &'static [usize],
    after_closed: &'static [usize],
    /// A torn cut may leave no valid header copy; running the update again must then repair it.
    torn_may_break: bool,
    /// HSM cases: `Some((after, always))`: after the uncut update a token sealed by exactly the
    /// HSM key `after` opens; with `always`, some token (old or new) opens at every cut point.
    token: Option<(&'static str, bool)>,
}

fn key(k: &Keys, i: usize) -> &Path {
    [&k.k0, &k.k1, &k.k2][i]
}

fn vol_args(parts: &[&OsStr]) -> Vec<OsString> {
    parts.iter().map(|s| s.to_os_string()).collect()
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "add-key",
            prepare: |_, _, _| {},
            args: |k, vol| {
                let mut v = vol_args(&[
                    "add-key".as_ref(),
                    vol.as_os_str(),
                    "--key-file".as_ref(),
                    k.k0.as_os_str(),
                    "--new-key-file".as_ref(),
                    k.k1.as_os_str(),
                ]);
                v.extend(FAST_KDF.iter().map(OsString::from));
                v
            },
            always: &[0],
            either: &[],
            after_open: &[0, 1],
            after_closed: &[],
            torn_may_break: false,
            token: None,
        },
        Case {
            name: "remove-key",
            prepare: |b, k, _| cryptsetup_add_key(&b.join("disk.img"), &k.k0, &k.k1),
            args: |k, vol| {
                vol_args(&[
                    "remove-key".as_ref(),
                    vol.as_os_str(),
                    "--slot".as_ref(),
                    "1".as_ref(),
                    "--key-file".as_ref(),
                    k.k0.as_os_str(),
                ])
            },
            always: &[0],
            either: &[],
            after_open: &[0],
            after_closed: &[1],
            torn_may_break: false,
            token: None,
        },
        Case {
            name: "change-key",
            prepare: |b, k, _| cryptsetup_add_key(&b.join("disk.img"), &k.k0, &k.k1),
            args: |k, vol| {
                let mut v = vol_args(&[
                    "change-key".as_ref(),
                    vol.as_os_str(),
                    "--key-file".as_ref(),
                    k.k1.as_os_str(),
                    "--new-key-file".as_ref(),
                    k.k2.as_os_str(),
                ]);
                v.extend(FAST_KDF.iter().map(OsString::from));
                v
            },
            always: &[0],
            either: &[1, 2],
            after_open: &[0, 2],
            after_closed: &[1],
            torn_may_break: false,
            token: None,
        },
        Case {
            name: "header-restore",
            // The backup (outside the mount) has key 0 only; key 1 is added after it.
            prepare: |b, k, outside| {
                let img = b.join("disk.img");
                let out = ctl(
                    k,
                    &[
                        OsStr::new("header-backup"),
                        img.as_os_str(),
                        OsStr::new("--file"),
                        outside.join("backup.hdr").as_os_str(),
                    ],
                );
                out.success();
                cryptsetup_add_key(&img, &k.k0, &k.k1);
            },
            args: |_, vol| {
                let backup = vol.parent().unwrap().parent().unwrap().join("backup.hdr");
                vol_args(&[
                    "header-restore".as_ref(),
                    vol.as_os_str(),
                    "--file".as_ref(),
                    backup.as_os_str(),
                    "--yes".as_ref(),
                ])
            },
            always: &[0],
            either: &[],
            after_open: &[0],
            after_closed: &[1],
            // Ordered writes (keyslots, secondary, primary; each synced): never broken.
            torn_may_break: false,
            token: None,
        },
        Case {
            name: "enroll",
            prepare: |_, _, _| {},
            args: |k, vol| {
                vec![
                    "enroll".into(),
                    vol.into(),
                    "--pkcs11".into(),
                    hsm_uri("kek1").into(),
                    "--pkcs11-pin".into(),
                    pin_arg(k),
                    "--key-file".into(),
                    k.k0.clone().into(),
                ]
            },
            always: &[0],
            either: &[],
            after_open: &[0],
            after_closed: &[],
            torn_may_break: false,
            // Before the enrolment commits, no token at all: checked only after the update.
            token: Some(("kek1", false)),
        },
        Case {
            name: "rekey",
            prepare: |b, k, _| {
                let img = b.join("disk.img");
                let pin = pin_arg(k);
                ctl(
                    k,
                    &[
                        OsStr::new("enroll"),
                        img.as_os_str(),
                        OsStr::new("--pkcs11"),
                        OsStr::new(&hsm_uri("kek1")),
                        OsStr::new("--pkcs11-pin"),
                        &pin,
                        OsStr::new("--key-file"),
                        k.k0.as_os_str(),
                    ],
                )
                .success();
            },
            args: |k, vol| {
                let pin = pin_arg(k);
                let out = ctl(
                    k,
                    &[
                        OsStr::new("test-token"),
                        vol.as_os_str(),
                        OsStr::new("--pkcs11-pin"),
                        &pin,
                    ],
                );
                let slot = format!("{}{}", out.success().stdout, "")
                    .split("keyslot ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| {
                        n.trim_end_matches(|c: char| !c.is_ascii_digit())
                            .parse::<u32>()
                            .ok()
                    })
                    .expect("keyslot number in test-token output");
                vec![
                    "rekey".into(),
                    vol.into(),
                    "--slot".into(),
                    slot.to_string().into(),
                    "--pkcs11".into(),
                    hsm_uri("kek2").into(),
                    "--pkcs11-pin".into(),
                    pin,
                ]
            },
            always: &[0],
            either: &[],
            after_open: &[0],
            after_closed: &[],
            torn_may_break: false,
            token: Some(("kek2", true)),
        },
    ]
}

fn all_points() -> bool {
    std::env::var_os("NBDCRYPT_POWERCUT_ALL_POINTS").is_some_and(|v| v == "1")
        || std::env::var_os("NBDCRYPT_POWERCUT_TRIALS").is_some()
}

/// The cut points to try, 1-based, for an update whose operations were `kinds`.
fn cut_points(kinds: &[&str]) -> Vec<u64> {
    let n = kinds.len() as u64;
    if all_points() || n <= 48 {
        return (1..=n).collect();
    }
    let mut v = BTreeSet::new();
    for (i, k) in kinds.iter().enumerate() {
        let k1 = i as u64 + 1;
        if *k != "write" {
            v.insert(k1);
            if k1 > 1 {
                v.insert(k1 - 1);
            }
        }
    }
    v.insert(1);
    v.insert(n);
    let stride = (n / 16).max(1);
    let mut k = 1;
    while k <= n {
        v.insert(k);
        k += stride;
    }
    v.into_iter().collect()
}

fn run_case(case: &Case) {
    let rig = Rig::new(|_| {});
    let outside = rig.dir.path().to_path_buf();
    let hsm = case.token.map(|_| softhsm(&outside.join("hsm")));
    let keys = Keys {
        k0: rig.backing.join("key"),
        k1: outside.join("k1"),
        k2: outside.join("k2"),
        hsm,
    };
    std::fs::write(&keys.k1, random_bytes(101, 40)).unwrap();
    std::fs::write(&keys.k2, random_bytes(102, 24)).unwrap();
    // Prepare on the backing directory directly (durable as is), then keep a copy to start
    // every cut point from.
    luks_format_keyfile(&rig.backing, FILE_SIZE, 4096);
    (case.prepare)(&rig.backing, &keys, &outside);
    let initial = outside.join("initial.img");
    std::fs::copy(rig.backing.join("disk.img"), &initial).unwrap();
    let vol = rig.mnt.join("disk.img");
    let args = (case.args)(&keys, &vol);
    let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    let reset = || {
        rig.fs().cut(None);
        rig.fs().power_on();
        std::fs::copy(&initial, rig.backing.join("disk.img")).unwrap();
    };
    let used: BTreeSet<usize> = [case.always, case.either, case.after_open, case.after_closed]
        .concat()
        .into_iter()
        .collect();
    let check = |what: &str, after: bool| {
        let img = rig.backing.join("disk.img");
        let mut open = [false; 3];
        for &i in &used {
            let (ctl, cs) = opens(&keys, &img, key(&keys, i), &outside, what);
            assert_eq!(
                ctl, cs,
                "{}: {what}: nbdcryptctl and cryptsetup disagree on key {i}",
                case.name
            );
            open[i] = ctl;
        }
        let mut token = String::new();
        if let Some((want, always)) = case.token {
            let (ok, keks) = token_opens(&keys, &img, what);
            if always || after {
                assert!(ok, "{}: {what}: no token opens the volume", case.name);
            }
            if after {
                assert_eq!(
                    keks, want,
                    "{}: {what}: the token is sealed by {keks}, not {want}",
                    case.name
                );
            }
            token = if ok {
                format!(" token:{keks}")
            } else {
                " token:none".into()
            };
        }
        for &i in case.always {
            assert!(
                open[i],
                "{}: {what}: key {i} no longer opens the volume",
                case.name
            );
        }
        if !case.either.is_empty() {
            assert!(
                case.either.iter().any(|&i| open[i]),
                "{}: {what}: neither the old nor the new key opens (keys {:?})",
                case.name,
                case.either
            );
        }
        if after {
            for &i in case.after_open {
                assert!(
                    open[i],
                    "{}: {what}: key {i} does not open after the update",
                    case.name
                );
            }
            for &i in case.after_closed {
                assert!(
                    !open[i],
                    "{}: {what}: key {i} still opens after the update",
                    case.name
                );
            }
        }
        format!("{open:?}{token}")
    };

    // Uncut: count the operations and check the new state.
    reset();
    let from = rig.fs().status().ops;
    ctl(&keys, &args).success();
    let kinds = rig.fs().control().op_kinds(from);
    let n = kinds.len() as u64;
    assert!(
        n > 0,
        "{}: the update wrote nothing through the mount",
        case.name
    );
    // Durable without the cut? Cut now: nothing of the update may depend on unsynced state.
    rig.fs().cut(None);
    rig.fs().power_on();
    check("uncut, then a cut", true);
    let syncs = kinds.iter().filter(|k| **k == "fsync").count();
    let points = cut_points(&kinds);
    eprintln!(
        "{}: {n} operations ({syncs} fsync), {} cut points, clean and (most) torn",
        case.name,
        points.len()
    );

    let mut rng = Rng::new(0x5eed ^ n);
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for &k in &points {
        // Torn as well: every point with NBDCRYPT_POWERCUT_ALL_POINTS; by default every other
        // write, and every point at or just before a sync or metadata operation.
        let i = k as usize - 1;
        let torn_here = all_points()
            || k % 2 == 1
            || kinds[i] != "write"
            || kinds.get(i + 1).is_some_and(|n| *n != "write");
        let tear_seed = rng.next();
        for tear in [None, torn_here.then_some(tear_seed)]
            .into_iter()
            .collect::<BTreeSet<_>>()
        {
            reset();
            rig.fs().arm(k, tear);
            let out = ctl(&keys, &args);
            let st = rig.fs().status();
            assert!(
                !st.powered,
                "{}: cut at {k} of {n} did not fire (exit {:?})",
                case.name,
                out.code()
            );
            rig.fs().power_on();
            let what = format!(
                "cut after op {k}/{n} ({}){}",
                kinds[k as usize - 1],
                if tear.is_some() { " torn" } else { "" }
            );
            if case.torn_may_break
                && tear.is_some()
                && !header_valid(&keys, &rig.backing.join("disk.img"))
            {
                *outcomes.entry("no valid header copy".into()).or_default() += 1;
                ctl(&keys, &args).success();
                check(&format!("{what}, then the update again"), true);
                continue;
            }
            let open = check(&what, false);
            *outcomes.entry(open).or_default() += 1;
        }
    }
    eprintln!(
        "{}: keys [k0, k1, k2] opening after the cuts: {outcomes:?}",
        case.name
    );
}

#[test]
fn add_key_survives_a_power_cut_at_every_write_and_sync() {
    run_case(&cases()[0]);
}

#[test]
fn remove_key_survives_a_power_cut_at_every_write_and_sync() {
    run_case(&cases()[1]);
}

#[test]
fn change_key_survives_a_power_cut_at_every_write_and_sync() {
    run_case(&cases()[2]);
}

#[test]
fn header_restore_survives_a_power_cut_at_every_write_and_sync() {
    run_case(&cases()[3]);
}

#[test]
fn enroll_with_an_hsm_survives_a_power_cut_at_every_write_and_sync() {
    run_case(&cases()[4]);
}

#[test]
fn rekey_to_another_hsm_key_survives_a_power_cut_at_every_write_and_sync() {
    run_case(&cases()[5]);
}
