//! Online re-encryption carries quorum keyslots (`enroll --quorum K`) to the new volume key,
//! with real holders: AWS KMS (moto's server), a PKCS#11 HSM (a throwaway SoftHSM2 token) and a
//! person's passphrase share given at the control socket (`reencrypt --share NAME`).
//!
//! - 2 of {KMS, HSM, alice}: refused while alice's passphrase is missing (named), a wrong one is
//!   named, then carried; after a restart the new quorum unlocks (KMS + alice, and KMS + HSM) and
//!   the data written before reads back; the old quorum token is gone, alice's share has a fresh
//!   salt, and the audit log says what was carried without any passphrase.
//! - A header writer who lowers the threshold (2 → 1) of a people-only quorum is refused at the
//!   carry, and nothing is written; restoring the token (negative control) lets it carry.

mod moto;
mod quorum_rig;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use moto::{Moto, REGION};
use quorum_rig::{ok, run_ok, state, text, Daemon, Rig, FAST, MODULE};
use serde_json::Value;

const TOKEN: &str = "nbdcrypt-rc";

fn nbdcopy(from: &str, to: &str) {
    let o = Command::new("nbdcopy")
        .args([from, to])
        .output()
        .expect("nbdcopy (libnbd-bin)");
    assert!(o.status.success(), "nbdcopy {from} {to}: {}", text(&o));
}

/// Writes `data` (the export's size) through the daemon.
fn write_all(r: &Rig, d: &Daemon, data: &[u8]) {
    let f = r.path("in.bin");
    std::fs::write(&f, data).unwrap();
    nbdcopy(&f, &d.uri());
}

fn read_all(r: &Rig, d: &Daemon) -> Vec<u8> {
    let f = r.path("out.bin");
    let _ = std::fs::remove_file(&f);
    nbdcopy(&d.uri(), &f);
    let v = std::fs::read(&f).unwrap();
    std::fs::remove_file(&f).unwrap();
    v
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn size(s: &Value) -> usize {
    usize::try_from(s["size"].as_u64().unwrap()).unwrap()
}

fn share_field<'a>(q: &'a Value, holder: &str, field: &str) -> &'a Value {
    q["shares"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["holder"] == holder || s["name"] == holder)
        .unwrap_or_else(|| panic!("no share of {holder}: {q}"))
        .get(field)
        .unwrap_or(&Value::Null)
}

#[test]
fn a_two_of_three_quorum_of_kms_hsm_and_a_person_is_carried_online_and_opens_the_new_key() {
    let moto = Moto::start();
    let key = moto.create_key(Some("db"));
    let r = Rig::new("24M", TOKEN).with_hsm();
    let (vol, _, pin) = (r.vol(), r.path("recovery.key"), r.pin());
    ok(r.enroll_kms_hsm_alice(&moto.endpoint));
    let before = r.quorum_tokens();
    assert_eq!(before.len(), 1);
    let (_, old_q) = &before[0];
    assert_eq!(old_q["keyslots"], serde_json::json!(["1"]));

    let kms = [
        "--kms-endpoint",
        &moto.endpoint,
        "--kms-region",
        REGION,
        "--kms-allow-key",
        &key,
    ];
    let hsm = ["--pkcs11-pin", &pin, "--pkcs11-module", MODULE];
    let mut both = vec!["--auto-unlock"];
    both.extend(kms);
    both.extend(hsm);

    let data;
    {
        let d = r.daemon("carry", &both);
        let s = d.wait_for(&r, 60, "KMS + HSM unlock", |s| state(s) == "unlocked");
        data = pattern(size(&s), 7);
        write_all(&r, &d, &data);

        // alice's passphrase is missing: refused, naming the keyslot, alice and what to do.
        let o = d.reencrypt(&r, &[]);
        assert!(!o.status.success(), "{}", text(&o));
        let t = text(&o);
        assert!(
            t.contains("keyslot 1") && t.contains("alice") && t.contains("--share NAME"),
            "{t}"
        );
        assert_eq!(r.quorum_tokens().len(), 1, "a refused start wrote a token");

        // A wrong passphrase is named at the person's terminal (exit 3), nothing staged.
        let o = d.stage(&r, "alice", "not alice's words");
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        assert!(text(&o).contains("\"alice\" is wrong"), "{}", text(&o));
        let o = d.stage(&r, "mallory", "x");
        assert!(
            !o.status.success() && text(&o).contains("mallory"),
            "{}",
            text(&o)
        );

        let o = ok(d.stage(&r, "alice", "alice's words"));
        assert!(text(&o).contains("staged"), "{}", text(&o));
        let o = ok(d.reencrypt(&r, &["--wait"]));
        assert!(text(&o).contains("finished"), "{}", text(&o));
        // Served throughout; the data reads back under the new key.
        assert!(
            read_all(&r, &d) == data,
            "data changed by the re-encryption"
        );

        let audit = d.audit();
        assert!(!audit.contains("alice's words"), "{audit}");
        assert!(!d.log().contains("alice's words"));
        let events: Vec<Value> = audit
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let staged = events
            .iter()
            .find(|e| e["phase"] == "share" && e["error"].is_null())
            .unwrap_or_else(|| panic!("no staged-share event: {audit}"));
        assert_eq!(staged["share"], "alice");
        assert!(staged["peer_uid"].is_u64(), "{staged}");
        assert!(
            events
                .iter()
                .any(|e| e["phase"] == "share" && e["error"].is_string()),
            "the wrong passphrase is not audited: {audit}"
        );
        let start = events
            .iter()
            .find(|e| e["phase"] == "start")
            .unwrap_or_else(|| panic!("no start event: {audit}"));
        assert_eq!(start["carried"]["0"], "same secret", "{start}");
        assert!(
            start["carried"]["1"]
                .as_str()
                .is_some_and(|s| s.starts_with("quorum re-split: 2 of 3")),
            "{start}"
        );
    }

    // On disk: one quorum token, on a new keyslot, same threshold and holders at the same
    // indices, every share sealed anew (alice's under a fresh salt).
    let after = r.quorum_tokens();
    assert_eq!(after.len(), 1, "{after:?}");
    let (_, new_q) = &after[0];
    assert_ne!(new_q["keyslots"], old_q["keyslots"], "{new_q}");
    assert_eq!(new_q["threshold"], 2);
    assert_eq!(new_q["shares"].as_array().unwrap().len(), 3);
    for holder in ["nbdcrypt-aws-kms", "nbdcrypt-pkcs11", "alice"] {
        assert_eq!(
            share_field(new_q, holder, "x"),
            share_field(old_q, holder, "x")
        );
        assert_ne!(
            share_field(new_q, holder, "sealed"),
            share_field(old_q, holder, "sealed"),
            "{holder}'s share was not re-sealed"
        );
    }
    assert_ne!(
        share_field(new_q, "alice", "kdf")["salt"],
        share_field(old_q, "alice", "kdf")["salt"]
    );
    let p = text(&ok(r.ctl(&["policy", &vol], None)));
    assert!(
        p.contains(": 2 of {AWS KMS arn:aws:kms:")
            && p.contains("HSM nbdcrypt-rc/kek, passphrase share alice}"),
        "{p}"
    );

    // Restarted: KMS alone is one of two, alice completes the new quorum; the data is there.
    {
        let mut a = vec!["--auto-unlock"];
        a.extend(kms);
        let d = r.daemon("kms-alice", &a);
        d.wait_for(&r, 60, "one share from KMS", |s| {
            s["locked_reason"]
                .as_str()
                .is_some_and(|m| m.contains("1 of 2 needed shares received (3 holders)"))
        });
        let o = d.unlock_share(&r, "alice", "not alice's words");
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        ok(d.unlock_share(&r, "alice", "alice's words"));
        assert_eq!(state(&d.status(&r)), "unlocked");
        assert!(read_all(&r, &d) == data, "data lost after the carry");
    }
    // KMS + HSM, no person: the machine shares of the new quorum.
    {
        let d = r.daemon("kms-hsm", &both);
        d.wait_for(&r, 60, "KMS + HSM unlock", |s| state(s) == "unlocked");
        assert!(read_all(&r, &d) == data);
    }

    // A second carry, killed mid-zone (abort, the kill -9 stand-in): the restarted daemon finds
    // the old and the new key through the machine shares of the old and the new quorum, recovers
    // the zone and finishes.
    let zone = [
        ("NBDCRYPT_TEST_REENCRYPT_ZONE", "1048576"),
        ("NBDCRYPT_TEST_REENCRYPT_ABORT", "2:half_write"),
    ];
    {
        let mut d = r.daemon_env("crash", &both, &zone);
        d.wait_for(&r, 60, "KMS + HSM unlock", |s| state(s) == "unlocked");
        ok(d.stage(&r, "alice", "alice's words"));
        ok(d.reencrypt(&r, &["--max-rate", "64M"]));
        let deadline = Instant::now() + Duration::from_secs(60);
        while d.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "no crash\n{}", d.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(d.log().contains("half_write"), "{}", d.log());
    }
    let dump = text(&run_ok(Command::new("cryptsetup").args(["luksDump", &vol])));
    assert_eq!(
        dump.matches("nbdcrypt-quorum").count(),
        2,
        "the old and the new quorum: {dump}"
    );
    {
        let d = r.daemon_env("resume", &both, &zone[..1]);
        d.wait_for(&r, 120, "resumed and finished", |s| {
            s["reencrypt"]["state"] == "finished"
        });
        assert!(read_all(&r, &d) == data, "data lost across the crash");
    }
    assert_eq!(r.quorum_tokens().len(), 1);
}

/// Rewrites token `id` of `vol` with `json` (`cryptsetup token import --token-replace`).
fn replace_token(r: &Rig, id: u32, json: &Value) {
    let f = r.path("token.json");
    std::fs::write(&f, json.to_string()).unwrap();
    run_ok(Command::new("cryptsetup").args([
        "token",
        "import",
        "--token-replace",
        "--token-id",
        &id.to_string(),
        "--json-file",
        &f,
        &r.vol(),
    ]));
}

#[test]
fn a_quorum_whose_threshold_a_header_writer_lowered_is_refused_not_carried() {
    let r = Rig::new("24M", TOKEN);
    let (vol, rec) = (r.vol(), r.path("recovery.key"));
    let mut args = vec![
        "enroll",
        &vol,
        "--quorum",
        "2",
        "--passphrase-share",
        "alice",
        "--passphrase-share",
        "bob",
        "--passphrase-share",
        "carol",
        "--key-file",
        &rec,
    ];
    args.extend(FAST);
    ok(r.ctl(&args, Some("pa\npb\npc\n")));
    let (id, genuine) = r.quorum_tokens().remove(0);

    // The attacker's edit: 1 of 3, so any one person (or a stolen passphrase) would open the
    // new key. Every share and tag is left as it was.
    let mut forged = genuine.clone();
    forged["threshold"] = 1.into();
    replace_token(&r, id, &forged);

    let d = r.daemon("forged", &[]);
    d.unlock(&r);
    for (n, p) in [("alice", "pa"), ("bob", "pb"), ("carol", "pc")] {
        ok(d.stage(&r, n, p));
    }
    let o = d.reencrypt(&r, &[]);
    assert!(
        !o.status.success(),
        "a forged threshold was carried: {}",
        text(&o)
    );
    let t = text(&o);
    assert!(
        t.contains("keyslot 1") && t.contains("threshold or shares were changed"),
        "{t}"
    );
    let dump = r.dump();
    assert!(
        !dump.to_string().contains("reencrypt"),
        "the refused start wrote to the header: {dump}"
    );
    // Nothing was dropped either: with --drop-unopened it would be, and the operator chose.
    assert_eq!(r.quorum_tokens()[0].1["threshold"], 1);

    // Second edit: a fourth holder "mallory" appended, with a share that opens with mallory's
    // passphrase and passes its tag (it comes from a genuine 2-of-4 quorum enrolled on a copy
    // of this volume, same UUID and keyslot), but of another secret. Carried, it would make
    // mallory a holder of the new quorum.
    let copy = r.path("copy.img");
    std::fs::copy(r.vol(), &copy).unwrap();
    run_ok(Command::new("cryptsetup").args([
        "luksKillSlot",
        "--batch-mode",
        "--key-file",
        &rec,
        &copy,
        "1",
    ]));
    run_ok(Command::new("cryptsetup").args([
        "token",
        "remove",
        "--token-id",
        &id.to_string(),
        &copy,
    ]));
    let mut args = vec!["enroll", &copy, "--quorum", "2"];
    for n in ["alice", "bob", "carol", "mallory"] {
        args.extend(["--passphrase-share", n]);
    }
    args.extend(["--key-file", &rec]);
    args.extend(FAST);
    ok(r.ctl(&args, Some("pa\npb\npc\npm\n")));
    let other = r.quorum_tokens_of(&copy).remove(0).1;
    assert_eq!(other["keyslots"], genuine["keyslots"], "{other}");
    let mallory = other["shares"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "mallory")
        .unwrap()
        .clone();
    let mut forged = genuine.clone();
    forged["shares"].as_array_mut().unwrap().push(mallory);
    replace_token(&r, id, &forged);
    ok(d.stage(&r, "mallory", "pm"));
    let o = d.reencrypt(&r, &[]);
    assert!(
        !o.status.success(),
        "a forged holder was carried: {}",
        text(&o)
    );
    let t = text(&o);
    assert!(
        t.contains("share mallory does not belong to a 2-of-4 split"),
        "{t}"
    );
    assert!(!r.dump().to_string().contains("reencrypt"));

    // Negative control: the genuine token is carried by the same daemon, same staged people
    // (a refused start keeps them for a retry).
    replace_token(&r, id, &genuine);
    let o = ok(d.reencrypt(&r, &["--wait"]));
    assert!(text(&o).contains("finished"), "{}", text(&o));
    let after = r.quorum_tokens();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].1["threshold"], 2);
    assert_ne!(after[0].1["keyslots"], genuine["keyslots"]);

    // Staged passphrases do not outlive a lock: staged, locked, unlocked, then the start names
    // every person again.
    ok(d.stage(&r, "alice", "pa"));
    ok(r.ctl(&["lock", "--control", &d.control], None));
    d.unlock(&r);
    let o = d.reencrypt(&r, &[]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("the passphrase of shares alice, bob, carol is needed"),
        "{}",
        text(&o)
    );
}

/// The volume key `key_file` opens, saved to `out` (`cryptsetup luksDump --dump-volume-key`).
fn save_volume_key(vol: &str, key_file: &str, out: &str) {
    run_ok(Command::new("cryptsetup").args([
        "luksDump",
        "--dump-volume-key",
        "--volume-key-file",
        out,
        "--key-file",
        key_file,
        "--batch-mode",
        vol,
    ]));
}

/// Whether the volume key in `file` is the volume's (`cryptsetup open --test-passphrase`).
fn is_volume_key(vol: &str, file: &str) -> bool {
    Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--volume-key-file", file, vol])
        .output()
        .expect("cryptsetup")
        .status
        .success()
}

/// `nbdcryptctl reencrypt VOLUME` (offline) with the recovery key file and `args`.
fn offline_reencrypt(r: &Rig, args: &[&str]) -> Output {
    let rec = r.path("recovery.key");
    let vol = r.vol();
    let mut a = vec!["reencrypt", &vol, "--key-file", &rec, "--no-progress-bar"];
    a.extend_from_slice(args);
    r.ctl(&a, None)
}

#[test]
fn a_two_of_three_quorum_of_kms_hsm_and_a_person_is_carried_offline_and_opens_the_new_key() {
    let moto = Moto::start();
    let key = moto.create_key(Some("db"));
    let r = Rig::new("24M", TOKEN).with_hsm();
    let (vol, rec, pin) = (r.vol(), r.path("recovery.key"), r.pin());
    ok(r.enroll_kms_hsm_alice(&moto.endpoint));
    let (_, old_q) = r.quorum_tokens().remove(0);
    assert_eq!(old_q["keyslots"], serde_json::json!(["1"]));

    let kms = [
        "--kms-endpoint",
        &moto.endpoint,
        "--kms-region",
        REGION,
        "--kms-allow-key",
        &key,
    ];
    let hsm = ["--pkcs11-pin", &pin, "--pkcs11-module", MODULE];
    let mut both = vec!["--auto-unlock"];
    both.extend(kms);
    both.extend(hsm);
    let mut offline: Vec<&str> = kms.to_vec();
    offline.extend(hsm);

    let data;
    {
        let d = r.daemon("write", &both);
        let s = d.wait_for(&r, 60, "KMS + HSM unlock", |s| state(s) == "unlocked");
        data = pattern(size(&s), 11);
        write_all(&r, &d, &data);
    }
    let old_key = r.path("old.vk");
    save_volume_key(&vol, &rec, &old_key);
    let untouched = |what: &str| {
        let dump = r.dump().to_string();
        assert!(
            !dump.contains("reencrypt"),
            "{what}: header written: {dump}"
        );
        assert!(is_volume_key(&vol, &old_key), "{what}: the old key changed");
        assert_eq!(
            r.quorum_tokens()[0].1,
            old_q,
            "{what}: quorum token changed"
        );
    };

    // No terminal and no share file for alice: refused, naming alice and what to give.
    let o = offline_reencrypt(&r, &offline);
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("keyslot 1")
            && t.contains("alice")
            && t.contains("--share-passphrase-file NAME=FILE"),
        "{t}"
    );
    untouched("missing person");

    // A wrong passphrase for alice: exit 3, named, nothing changed.
    let wrong = r.path("alice.wrong");
    std::fs::write(&wrong, "not alice's words\n").unwrap();
    let arg = format!("alice={wrong}");
    let mut a = offline.clone();
    a.extend(["--share-passphrase-file", &arg]);
    let o = offline_reencrypt(&r, &a);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("share \"alice\" is wrong") && t.contains("nothing was changed"),
        "{t}"
    );
    untouched("wrong person");
    // A share nobody holds: refused by name.
    let arg = format!("mallory={wrong}");
    let mut a = offline.clone();
    a.extend(["--share-passphrase-file", &arg]);
    let o = offline_reencrypt(&r, &a);
    assert!(
        !o.status.success() && text(&o).contains("\"mallory\""),
        "{}",
        text(&o)
    );
    untouched("foreign share");
    // Still readable under the old key (KMS + HSM).
    {
        let d = r.daemon("before", &both);
        d.wait_for(&r, 60, "KMS + HSM unlock", |s| state(s) == "unlocked");
        assert!(read_all(&r, &d) == data, "refused runs changed the data");
    }

    // alice's passphrase in a file (the first line): carried.
    let good = r.path("alice.pass");
    std::fs::write(&good, "alice's words\n").unwrap();
    let arg = format!("alice={good}");
    let audit = r.path("offline.audit");
    let mut a = offline.clone();
    a.extend(["--share-passphrase-file", &arg, "--audit-log", &audit]);
    let o = ok(offline_reencrypt(&r, &a));
    let t = text(&o);
    assert!(t.contains("keyslot 1: quorum re-split: 2 of 3"), "{t}");
    assert!(t.contains("re-encryption finished"), "{t}");
    assert!(!t.contains("alice's words"), "{t}");
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(!log.contains("alice's words"), "{log}");
    let start: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["phase"] == "start")
        .unwrap_or_else(|| panic!("no start event: {log}"));
    assert_eq!(start["carried"]["0"], "same secret", "{start}");
    assert!(
        start["carried"]["1"]
            .as_str()
            .is_some_and(|s| s.starts_with("quorum re-split: 2 of 3") && s.contains("alice")),
        "{start}"
    );
    assert_eq!(start["share_passphrases"]["alice"], "file", "{start}");

    // The old volume key is gone; one quorum token, on a new keyslot, same threshold, same
    // holders at the same indices, every share sealed anew (alice's under a fresh salt).
    assert!(
        !is_volume_key(&vol, &old_key),
        "the old volume key still opens the volume"
    );
    let after = r.quorum_tokens();
    assert_eq!(after.len(), 1, "{after:?}");
    let (_, new_q) = &after[0];
    assert_ne!(new_q["keyslots"], old_q["keyslots"], "{new_q}");
    assert_eq!(new_q["threshold"], 2);
    for holder in ["nbdcrypt-aws-kms", "nbdcrypt-pkcs11", "alice"] {
        assert_eq!(
            share_field(new_q, holder, "x"),
            share_field(&old_q, holder, "x")
        );
        assert_ne!(
            share_field(new_q, holder, "sealed"),
            share_field(&old_q, holder, "sealed"),
            "{holder}'s share was not re-sealed"
        );
    }
    assert_ne!(
        share_field(new_q, "alice", "kdf")["salt"],
        share_field(&old_q, "alice", "kdf")["salt"]
    );

    // KMS + alice open the new key, and KMS + HSM; the data is there.
    {
        let mut a = vec!["--auto-unlock"];
        a.extend(kms);
        let d = r.daemon("kms-alice", &a);
        d.wait_for(&r, 60, "one share from KMS", |s| {
            s["locked_reason"]
                .as_str()
                .is_some_and(|m| m.contains("1 of 2 needed shares received (3 holders)"))
        });
        ok(d.unlock_share(&r, "alice", "alice's words"));
        assert_eq!(state(&d.status(&r)), "unlocked");
        assert!(read_all(&r, &d) == data, "data lost by the offline carry");
    }
    {
        let d = r.daemon("kms-hsm", &both);
        d.wait_for(&r, 60, "KMS + HSM unlock", |s| state(s) == "unlocked");
        assert!(read_all(&r, &d) == data);
    }
}

#[test]
fn an_offline_carry_refuses_a_quorum_whose_threshold_a_header_writer_lowered() {
    let r = Rig::new("24M", TOKEN);
    let (vol, rec) = (r.vol(), r.path("recovery.key"));
    let mut args = vec!["enroll", &vol, "--quorum", "2"];
    for n in ["alice", "bob", "carol"] {
        args.extend(["--passphrase-share", n]);
    }
    args.extend(["--key-file", &rec]);
    args.extend(FAST);
    ok(r.ctl(&args, Some("pa\npb\npc\n")));
    let (id, genuine) = r.quorum_tokens().remove(0);
    let old_key = r.path("old.vk");
    save_volume_key(&vol, &rec, &old_key);
    let mut files = Vec::new();
    for (n, p) in [("alice", "pa"), ("bob", "pb"), ("carol", "pc")] {
        let f = r.path(&format!("{n}.pass"));
        std::fs::write(&f, p).unwrap();
        files.push(format!("{n}={f}"));
    }
    let mut a = Vec::new();
    for f in &files {
        a.extend(["--share-passphrase-file", f.as_str()]);
    }

    let mut forged = genuine.clone();
    forged["threshold"] = 1.into();
    replace_token(&r, id, &forged);
    let o = offline_reencrypt(&r, &a);
    assert!(
        !o.status.success(),
        "a forged threshold was carried: {}",
        text(&o)
    );
    let t = text(&o);
    assert!(
        t.contains("keyslot 1") && t.contains("threshold or shares were changed"),
        "{t}"
    );
    assert!(
        !r.dump().to_string().contains("reencrypt"),
        "header written"
    );
    assert!(is_volume_key(&vol, &old_key));
    assert_eq!(r.quorum_tokens()[0].1["threshold"], 1);

    // Negative control: the genuine token is carried.
    replace_token(&r, id, &genuine);
    ok(offline_reencrypt(&r, &a));
    assert!(!is_volume_key(&vol, &old_key));
    let after = r.quorum_tokens();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].1["threshold"], 2);
    assert_ne!(after[0].1["keyslots"], genuine["keyslots"]);
}

/// Waits until `out` (the terminal's output so far) contains `what`; panics after 60 s.
fn wait_output(out: &std::sync::Mutex<Vec<u8>>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
        if text.contains(what) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {what:?} on the terminal: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn offline_each_person_is_asked_at_the_terminal_in_turn_and_a_typo_is_asked_again() {
    let r = Rig::new("24M", TOKEN);
    let (vol, rec) = (r.vol(), r.path("recovery.key"));
    let mut args = vec!["enroll", &vol, "--quorum", "2"];
    for n in ["alice", "bob"] {
        args.extend(["--passphrase-share", n]);
    }
    args.extend(["--key-file", &rec]);
    args.extend(FAST);
    ok(r.ctl(&args, Some("alice words\nbob words\n")));
    let (_, old_q) = r.quorum_tokens().remove(0);
    let old_key = r.path("old.vk");
    save_volume_key(&vol, &rec, &old_key);

    // A real terminal: util-linux `script` runs nbdcryptctl on a pseudo-terminal and copies
    // what we write to it; each line is written only once its prompt is shown (echo off).
    let cmd = format!(
        "{} reencrypt {vol} --key-file {rec} --no-progress-bar",
        env!("CARGO_BIN_EXE_nbdcryptctl")
    );
    let mut child = Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let out = out.clone();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let mut tty = child.stdin.take().unwrap();
    let mut say = |line: &str| {
        use std::io::Write;
        tty.write_all(line.as_bytes()).unwrap();
        tty.flush().unwrap();
    };
    wait_output(
        &out,
        "Passphrase of quorum share alice (keyslot 1), for alice to type:",
    );
    say("alice wrods\n");
    wait_output(&out, "share \"alice\" is wrong");
    wait_output(&out, "try again");
    // Asked again (the second prompt for alice), then bob's turn.
    let deadline = Instant::now() + Duration::from_secs(60);
    while String::from_utf8_lossy(&out.lock().unwrap())
        .matches("for alice to type")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "alice not asked again");
        std::thread::sleep(Duration::from_millis(50));
    }
    say("alice words\n");
    wait_output(
        &out,
        "Passphrase of quorum share bob (keyslot 1), for bob to type:",
    );
    say("bob words\n");
    let status = child.wait().unwrap();
    drop(tty);
    reader.join().unwrap();
    let shown = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    assert!(status.success(), "{shown}");
    assert!(shown.contains("re-encryption finished"), "{shown}");
    assert!(
        !shown.contains("alice words") && !shown.contains("bob words") && !shown.contains("wrods"),
        "a passphrase was echoed: {shown}"
    );
    assert!(
        !is_volume_key(&vol, &old_key),
        "the old key still opens the volume"
    );
    let (_, new_q) = r.quorum_tokens().remove(0);
    assert_ne!(new_q["keyslots"], old_q["keyslots"]);
    assert_eq!(new_q["threshold"], 2);
}
