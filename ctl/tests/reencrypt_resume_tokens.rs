//! An offline re-encryption (`nbdcryptctl reencrypt VOLUME`) killed mid-way is resumed through
//! the volume's tokens and quorums, without its passphrase, with real holders: AWS KMS (moto's
//! server), a PKCS#11 HSM (a throwaway SoftHSM2 token) and a person's share passphrase file.
//!
//! - KMS + HSM tokens beside a recovery passphrase: killed inside a zone; with the KMS key
//!   disabled (and no HSM settings) the resume is refused with exit 3 and the volume is
//!   byte-identical (negative control); with the key enabled the KMS token alone resumes it
//!   (stopped again part-way), then the HSM token alone finishes it; cryptsetup recovers the new
//!   key with the passphrase and verify.py decrypts the data written before.
//! - 2 of {KMS, HSM, alice}: killed mid-way; KMS + a wrong passphrase for alice is refused with
//!   exit 3, byte-identical; KMS + alice's file resumes and finishes; the data reads back. A
//!   header writer who lowers the threshold of the (new) quorum to 1 is refused by the
//!   polynomial check while the genuine token (negative control) opens.
//! - The same quorum volume online: nbdcryptd with the KMS alone stays locked and names alice;
//!   her wrong passphrase (`unlock --share`) is refused with exit 3, byte-identical; her right
//!   one opens both keys, and the daemon resumes and finishes the re-encryption.
//! - A header writer swaps the old and the new KMS keyslots between the two keys' digests:
//!   each token's secret opens a key of the other segment; nothing opens, exit 3, untouched;
//!   the genuine header (negative control) resumes through the KMS token alone.

// The cast lints of ctl/ are not the tests crate's (its home).
#[allow(dead_code, clippy::cast_possible_truncation)]
#[path = "../../tests/tests/hostile/generator.rs"]
mod generator;
mod moto;
mod quorum_rig;

use std::path::Path;
use std::process::{Command, Output};

use moto::{Moto, REGION};
use nbdcrypt_tests::{assert_finished_and_cryptsetup_decrypts, random_bytes, write_export};
use quorum_rig::{ok, run_ok, state, text, Rig, MODULE};
use serde_json::Value;

const TOKEN: &str = "nbdcrypt-rt";

/// Test hook of debug builds: die inside the 4th zone (after its hot-zone commit, half of it
/// written), as kill -9 or a power cut would.
const CRASH: (&str, &str) = ("NBDCRYPT_TEST_REENCRYPT_CRASH_AFTER_ZONES", "3");

/// The operator's KMS settings (moto) for the key `key`.
fn kms(moto: &Moto, key: &str) -> Vec<String> {
    [
        "--kms-endpoint",
        &moto.endpoint,
        "--kms-region",
        REGION,
        "--kms-allow-key",
        key,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The operator's HSM settings (the rig's SoftHSM2).
/// `enroll` a KMS keyslot (moto's key `alias/db`) on the rig's volume, opened by `recovery`.
fn enroll_kms(r: &Rig, moto: &Moto, recovery: &str) {
    ok(r.ctl(
        &[
            "enroll",
            &r.vol(),
            "--kms",
            "alias/db",
            "--kms-endpoint",
            &moto.endpoint,
            "--region",
            REGION,
            "--key-file",
            recovery,
        ],
        None,
    ));
}

fn hsm(r: &Rig) -> Vec<String> {
    ["--pkcs11-module", MODULE, "--pkcs11-pin", &r.pin()]
        .map(str::to_owned)
        .to_vec()
}

/// `nbdcryptctl reencrypt VOLUME --no-progress-bar --hotzone-size 1M ARGS` with `env`.
fn reencrypt(r: &Rig, args: &[String], env: &[(&str, &str)]) -> Output {
    let vol = r.vol();
    let mut a = vec![
        "reencrypt",
        &vol,
        "--no-progress-bar",
        "--hotzone-size",
        "1M",
    ];
    a.extend(args.iter().map(String::as_str));
    r.ctl_env(&a, None, env)
}

/// Writes a known pattern through nbdcryptd unlocked by its tokens (`settings`); returns it.
fn write_data(r: &Rig, settings: &[String], seed: u64) -> Vec<u8> {
    let mut a = vec!["--auto-unlock"];
    a.extend(settings.iter().map(String::as_str));
    let d = r.daemon("write", &a);
    let s = d.wait_for(r, 60, "token unlock", |s| state(s) == "unlocked");
    let data = random_bytes(seed, usize::try_from(s["size"].as_u64().unwrap()).unwrap());
    write_export(&d.uri(), r.dir.path(), &data);
    data
}

/// Kills an offline re-encryption (started with `args`) inside a zone; checks it is in progress.
fn interrupted(r: &Rig, args: &[String]) {
    let o = reencrypt(r, args, &[CRASH]);
    assert!(!o.status.success(), "not interrupted: {}", text(&o));
    assert!(text(&o).contains("simulated crash"), "{}", text(&o));
    let st = ok(r.ctl(&["reencrypt", &r.vol(), "--status"], None));
    assert!(
        text(&st).contains("re-encryption in progress") && text(&st).contains("interrupted"),
        "{}",
        text(&st)
    );
}

/// The frontier `reencrypt --status` shows ("N of M done").
fn frontier(r: &Rig) -> u64 {
    let o = ok(r.ctl(&["reencrypt", &r.vol(), "--status"], None));
    let t = text(&o);
    t.split("in progress: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no frontier in {t}"))
}

#[track_caller]
fn refused_untouched(r: &Rig, o: &Output, before: &[u8], what: &str) {
    assert_eq!(o.status.code(), Some(3), "{what}: {}", text(o));
    assert!(
        std::fs::read(r.vol()).unwrap() == before,
        "{what}: the volume was written: {}",
        text(o)
    );
}

#[test]
fn an_interrupted_offline_reencryption_resumes_through_kms_or_hsm_tokens_without_a_passphrase() {
    let moto = Moto::start();
    let key = moto.create_key(Some("db"));
    let r = Rig::new("24M", TOKEN).with_hsm();
    let (vol, rec, pin) = (r.vol(), r.path("recovery.key"), r.pin());
    let uri = format!("pkcs11:token={TOKEN};object=kek;type=secret-key");
    enroll_kms(&r, &moto, &rec);
    ok(r.ctl(
        &[
            "enroll",
            &vol,
            "--pkcs11",
            &uri,
            "--pkcs11-pin",
            &pin,
            "--key-file",
            &rec,
        ],
        None,
    ));
    let (kms, hsm) = (kms(&moto, &key), hsm(&r));
    let both: Vec<String> = kms.iter().chain(&hsm).cloned().collect();
    let data = write_data(&r, &both, 21);

    let mut start = vec!["--key-file".to_owned(), rec.clone()];
    start.extend(both.iter().cloned());
    interrupted(&r, &start);
    let f0 = frontier(&r);

    // Negative control: the KMS key disabled, no HSM settings, no passphrase: exit 3, the
    // reason named, not one byte written.
    moto.disable_key(&key);
    let before = std::fs::read(&vol).unwrap();
    let o = reencrypt(&r, &kms, &[]);
    refused_untouched(&r, &o, &before, "KMS key disabled");
    let t = text(&o);
    assert!(t.contains("the tokens:") && t.contains("token"), "{t}");
    assert!(t.contains("Nothing was written"), "{t}");
    let o = reencrypt(
        &r,
        &[vec!["--resume-only".to_owned()], kms.clone()].concat(),
        &[],
    );
    refused_untouched(&r, &o, &before, "KMS key disabled, --resume-only");

    // The KMS token alone (key enabled again) resumes: it recovers the interrupted zone and
    // moves on (stopped again after two zones by the test hook).
    moto.boto3("kms.enable_key(KeyId=sys.argv[1])", &[&key]);
    let o = reencrypt(
        &r,
        &kms,
        &[("NBDCRYPT_TEST_REENCRYPT_STOP_AFTER_ZONES", "2")],
    );
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("interrupted by the test hook"),
        "{t}"
    );
    assert!(
        t.contains("resuming the re-encryption") && !t.contains("Enter passphrase"),
        "{t}"
    );
    let f1 = frontier(&r);
    assert!(
        f1 > f0,
        "the KMS resume made no progress ({f0} -> {f1}): {t}"
    );

    // The HSM token alone (the KMS key disabled again) finishes it.
    moto.disable_key(&key);
    let o = ok(reencrypt(
        &r,
        &[vec!["--resume-only".to_owned()], hsm.clone()].concat(),
        &[],
    ));
    assert!(text(&o).contains("re-encryption finished"), "{}", text(&o));

    // cryptsetup recovers the new key with the passphrase, and verify.py (not our code)
    // decrypts the data written before the re-encryption.
    assert_finished_and_cryptsetup_decrypts(
        Path::new(&vol),
        quorum_rig::PASS,
        &data,
        "after a token resume",
    );
    // Both tokens were re-sealed for the new key; the HSM's opens it.
    let dump = r.dump().to_string();
    assert!(
        dump.contains("nbdcrypt-aws-kms") && dump.contains("nbdcrypt-pkcs11"),
        "{dump}"
    );
    let mut a = vec!["--auto-unlock"];
    a.extend(hsm.iter().map(String::as_str));
    let d = r.daemon("after", &a);
    d.wait_for(&r, 60, "HSM unlock of the new key", |s| {
        state(s) == "unlocked"
    });
}

/// Replaces token `id` of the volume with `json`, as a header writer could.
fn forge_token(r: &Rig, id: u32, json: &Value) {
    generator::rewrite_json(Path::new(&r.vol()), |md| {
        md["tokens"][id.to_string()] = json.clone();
    });
}

/// The keyslot (id) token `t` (header JSON) is bound to.
fn token_slot(t: &Value) -> String {
    t["keyslots"][0].as_str().unwrap().to_owned()
}

#[test]
fn a_token_keyslot_moved_to_the_other_keys_digest_opens_nothing_and_nothing_is_written() {
    let moto = Moto::start();
    let key = moto.create_key(Some("db"));
    let r = Rig::new("24M", TOKEN);
    let (vol, rec) = (r.vol(), r.path("recovery.key"));
    enroll_kms(&r, &moto, &rec);
    let kms = kms(&moto, &key);
    let mut start = vec!["--key-file".to_owned(), rec.clone()];
    start.extend(kms.iter().cloned());
    interrupted(&r, &start);

    // The old KMS keyslot's and the new KMS keyslot's digests swapped: each token now unseals
    // the key of the other segment than its keyslot claims.
    let (md, _) = generator::read_json(&std::fs::File::open(&vol).unwrap());
    let kms_slots: Vec<String> = md["tokens"]
        .as_object()
        .unwrap()
        .values()
        .filter(|t| t["type"] == "nbdcrypt-aws-kms")
        .map(token_slot)
        .collect();
    assert_eq!(kms_slots.len(), 2, "old and new KMS token: {md}");
    let genuine = md.clone();
    generator::rewrite_json(Path::new(&vol), |md| {
        for d in md["digests"].as_object_mut().unwrap().values_mut() {
            for ks in d["keyslots"].as_array_mut().unwrap() {
                if *ks == kms_slots[0].as_str() {
                    *ks = kms_slots[1].clone().into();
                } else if *ks == kms_slots[1].as_str() {
                    *ks = kms_slots[0].clone().into();
                }
            }
        }
    });
    let before = std::fs::read(&vol).unwrap();
    let o = reencrypt(&r, &kms, &[]);
    refused_untouched(&r, &o, &before, "keyslots moved between the keys");
    assert!(
        text(&o).contains("neither of the two volume keys")
            && text(&o).contains("did not open the key that keyslot's digest names"),
        "{}",
        text(&o)
    );

    // Negative control: the genuine assignment resumes through the KMS token alone.
    generator::rewrite_json(Path::new(&vol), |md| *md = genuine);
    let o = ok(reencrypt(&r, &kms, &[]));
    assert!(text(&o).contains("re-encryption finished"), "{}", text(&o));
    run_ok(Command::new("cryptsetup").args([
        "open",
        "--test-passphrase",
        "--key-file",
        &rec,
        &vol,
    ]));
}

#[test]
fn an_interrupted_quorum_volume_resumes_offline_with_kms_and_a_persons_share_file() {
    let moto = Moto::start();
    let key = moto.create_key(Some("db"));
    let r = Rig::new("24M", TOKEN).with_hsm();
    let (vol, rec) = (r.vol(), r.path("recovery.key"));
    ok(r.enroll_kms_hsm_alice(&moto.endpoint));
    let (kms, hsm) = (kms(&moto, &key), hsm(&r));
    let both: Vec<String> = kms.iter().chain(&hsm).cloned().collect();
    let data = write_data(&r, &both, 22);

    let good = r.path("alice.pass");
    std::fs::write(&good, "alice's words\n").unwrap();
    let wrong = r.path("alice.wrong");
    std::fs::write(&wrong, "not alice's words\n").unwrap();
    let alice = |f: &str| vec!["--share-passphrase-file".to_owned(), format!("alice={f}")];

    let mut start = vec!["--key-file".to_owned(), rec.clone()];
    start.extend(both.iter().cloned());
    start.extend(alice(&good));
    interrupted(&r, &start);

    // KMS + a wrong passphrase for alice (the HSM not configured): one share of two; exit 3,
    // alice named, not one byte written.
    let before = std::fs::read(&vol).unwrap();
    let o = reencrypt(&r, &[kms.clone(), alice(&wrong)].concat(), &[]);
    refused_untouched(&r, &o, &before, "a wrong share passphrase");
    let t = text(&o);
    assert!(
        t.contains("share \"alice\" is wrong") && t.contains("1 of 2 needed shares"),
        "{t}"
    );
    assert!(!t.contains("alice's words"), "{t}");
    // KMS alone (no alice, no terminal to ask her at): exit 3, says how to give her share.
    let o = reencrypt(&r, &kms, &[]);
    refused_untouched(&r, &o, &before, "alice missing");
    assert!(
        text(&o).contains("alice") && text(&o).contains("--share-passphrase-file NAME=FILE"),
        "{}",
        text(&o)
    );

    // A header writer lowers the new quorum's threshold to 1 (KMS + HSM both reachable):
    // the second machine share does not lie on a 1-of-3 "polynomial"; refused, untouched.
    // (`nbdcryptctl dump` refuses a header in re-encryption: the JSON as stored.)
    let (md, _) = generator::read_json(&std::fs::File::open(&vol).unwrap());
    let quorums: Vec<(u32, Value)> = md["tokens"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, t)| t["type"] == "nbdcrypt-quorum")
        .map(|(id, t)| (id.parse().unwrap(), t.clone()))
        .collect();
    assert_eq!(quorums.len(), 2, "old and new quorum: {quorums:?}");
    let (new_id, genuine) = quorums
        .into_iter()
        .max_by_key(|(_, q)| q["keyslots"][0].as_str().unwrap().parse::<u32>().unwrap())
        .unwrap();
    let mut forged = genuine.clone();
    forged["threshold"] = 1.into();
    forge_token(&r, new_id, &forged);
    let forged_bytes = std::fs::read(&vol).unwrap();
    let o = reencrypt(&r, &both, &[]);
    refused_untouched(&r, &o, &forged_bytes, "a lowered threshold");
    assert!(
        text(&o).contains("threshold or shares were changed"),
        "{}",
        text(&o)
    );
    forge_token(&r, new_id, &genuine);

    // KMS + alice's file: resumed and finished.
    let audit = r.path("resume.audit");
    let mut a = [kms.clone(), alice(&good)].concat();
    a.extend(["--audit-log".to_owned(), audit.clone()]);
    let o = ok(reencrypt(&r, &a, &[]));
    let t = text(&o);
    assert!(
        t.contains("resuming the re-encryption") && t.contains("re-encryption finished"),
        "{t}"
    );
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(!log.contains("alice's words"), "{log}");
    let resume: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["phase"] == "resume")
        .unwrap_or_else(|| panic!("no resume event: {log}"));
    assert_eq!(resume["share_passphrases"]["alice"], "file", "{resume}");

    assert_finished_and_cryptsetup_decrypts(
        Path::new(&vol),
        quorum_rig::PASS,
        &data,
        "after a quorum resume",
    );
    // One quorum left (the new one), and KMS + HSM open the volume through it.
    assert_eq!(r.quorum_tokens().len(), 1);
    let mut a = vec!["--auto-unlock"];
    a.extend(both.iter().map(String::as_str));
    let d = r.daemon("after", &a);
    d.wait_for(&r, 60, "KMS + HSM unlock of the new quorum", |s| {
        state(s) == "unlocked"
    });
}

#[test]
fn an_interrupted_quorum_volume_resumes_online_when_the_person_gives_their_share() {
    let moto = Moto::start();
    let key = moto.create_key(Some("db"));
    let r = Rig::new("24M", TOKEN).with_hsm();
    let (vol, rec) = (r.vol(), r.path("recovery.key"));
    ok(r.enroll_kms_hsm_alice(&moto.endpoint));
    let (kms, hsm) = (kms(&moto, &key), hsm(&r));
    let both: Vec<String> = kms.iter().chain(&hsm).cloned().collect();
    let data = write_data(&r, &both, 23);
    let good = r.path("alice.pass");
    std::fs::write(&good, "alice's words\n").unwrap();
    let mut start = vec!["--key-file".to_owned(), rec.clone()];
    start.extend(both.iter().cloned());
    start.extend([
        "--share-passphrase-file".to_owned(),
        format!("alice={good}"),
    ]);
    interrupted(&r, &start);

    // nbdcryptd with the KMS only: one share of two for each quorum; it stays locked and says
    // whose share is missing.
    let mut a = vec!["--auto-unlock"];
    a.extend(kms.iter().map(String::as_str));
    let d = r.daemon("online", &a);
    let s = d.wait_for(&r, 60, "locked, alice named", |s| {
        s["locked_reason"]
            .as_str()
            .is_some_and(|m| m.contains("alice") && m.contains("unlock --control SOCK --share"))
    });
    assert_eq!(state(&s), "locked", "{s}");
    // A wrong passphrase for alice: exit 3, still locked, not one byte written.
    let before = std::fs::read(&vol).unwrap();
    let o = d.unlock_share(&r, "alice", "not alice's words");
    refused_untouched(&r, &o, &before, "a wrong share online");
    assert!(text(&o).contains("\"alice\" is wrong"), "{}", text(&o));
    assert_eq!(state(&d.status(&r)), "locked");
    // alice's passphrase: both keys open (KMS + alice, old and new quorum), the daemon resumes
    // the re-encryption and finishes it.
    let o = ok(d.unlock_share(&r, "alice", "alice's words"));
    assert!(text(&o).contains("unlocked"), "{}", text(&o));
    d.wait_for(&r, 120, "resumed and finished", |s| {
        s["reencrypt"]["state"] == "finished"
    });
    let audit = d.audit();
    assert!(!audit.contains("alice's words"), "{audit}");
    drop(d);
    assert_finished_and_cryptsetup_decrypts(
        Path::new(&vol),
        quorum_rig::PASS,
        &data,
        "after an online resume by share",
    );
}
