//! Quorums (`enroll --quorum K`): a keyslot whose secret is split among key holders, with real
//! parts: AWS KMS (moto's server, `moto/mod.rs`), a PKCS#11 HSM (a throwaway SoftHSM2 token),
//! people's passphrase shares given over the daemon's control socket, checked with cryptsetup
//! (which must still open the other keyslots and dump the header).

mod moto;
mod quorum_rig;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use moto::{Moto, REGION};
use quorum_rig::{ok, state, text, Rig, FAST, MODULE};
use serde_json::Value;

const TOKEN: &str = "nbdcrypt-q";

fn reason(s: &Value) -> String {
    s["locked_reason"].as_str().unwrap_or("").to_owned()
}

fn cryptsetup(args: &[&str]) -> Output {
    Command::new("cryptsetup")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cryptsetup")
}

#[test]
fn a_two_of_three_quorum_of_kms_hsm_and_a_person_unlocks_with_any_two_and_not_with_one() {
    let moto = Moto::start();
    let key = moto.create_key(Some("db"));
    let r = Rig::new("20M", TOKEN).with_hsm();
    let (vol, rec, pin) = (r.vol(), r.path("recovery.key"), r.pin());
    let o = ok(r.enroll_kms_hsm_alice(&moto.endpoint));
    let t = text(&o);
    assert!(
        t.contains("2 of {AWS KMS arn:aws:kms:")
            && t.contains("HSM nbdcrypt-q/kek, passphrase share alice}"),
        "{t}"
    );
    assert!(t.contains("kms-allow-key = [\"arn:aws:kms:"), "{t}");

    // cryptsetup: the header dumps (our token type is foreign to it) and keyslot 0 still opens.
    let dump = cryptsetup(&["luksDump", &vol]);
    assert!(dump.status.success(), "{}", text(&dump));
    assert!(text(&dump).contains("nbdcrypt-quorum"), "{}", text(&dump));
    let o = cryptsetup(&[
        "open",
        "--test-passphrase",
        "--key-slot",
        "0",
        "--key-file",
        &rec,
        &vol,
    ]);
    assert!(o.status.success(), "{}", text(&o));

    // The policy, in words and JSON.
    let p = text(&ok(r.ctl(&["policy", &vol], None)));
    assert!(p.contains("keyslot 0: a passphrase"), "{p}");
    assert!(
        p.contains("keyslot 1: 2 of {AWS KMS arn:aws:kms:")
            && p.contains("HSM nbdcrypt-q/kek, passphrase share alice}"),
        "{p}"
    );
    let j: Value =
        serde_json::from_slice(&ok(r.ctl(&["policy", &vol, "--json"], None)).stdout).unwrap();
    assert_eq!(j["keyslots"][1]["kind"], "quorum");
    assert_eq!(j["keyslots"][1]["tokens"][0]["threshold"], 2);
    assert_eq!(j["keyslots"][1]["tokens"][0]["holders"][2]["name"], "alice");

    let kms = [
        "--kms-endpoint",
        &moto.endpoint,
        "--kms-region",
        REGION,
        "--kms-allow-key",
        &key,
    ];
    let hsm = ["--pkcs11-pin", &pin, "--pkcs11-module", MODULE];

    // test-token: the machine holders alone make two of two; one alone does not.
    let mut a = vec!["test-token", vol.as_str()];
    a.extend(kms);
    a.extend(hsm);
    let o = ok(r.ctl(&a, None));
    assert!(
        text(&o).contains("keyslot 1 unlocked by token 0"),
        "{}",
        text(&o)
    );
    let mut a = vec!["test-token", vol.as_str()];
    a.extend(kms);
    let o = r.ctl(&a, None);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("1 of 2 needed shares received") && text(&o).contains("people give"),
        "{}",
        text(&o)
    );

    // KMS + HSM, at start, no person needed.
    {
        let mut a = vec!["--auto-unlock"];
        a.extend(kms);
        a.extend(hsm);
        let d = r.daemon("kms-hsm", &a);
        d.wait_for(&r, 60, "KMS + HSM unlock", |s| state(s) == "unlocked");
    }
    // KMS alone: one of two; alice completes it.
    {
        let mut a = vec!["--auto-unlock"];
        a.extend(kms);
        let d = r.daemon("kms-alice", &a);
        let s = d.wait_for(&r, 60, "one share from KMS", |s| {
            reason(s).contains("1 of 2 needed shares received (3 holders)")
        });
        assert_eq!(state(&s), "locked", "{s}");
        let o = ok(d.unlock_share(&r, "alice", "alice's words"));
        assert!(text(&o).contains("quorum is complete"), "{}", text(&o));
        assert_eq!(state(&d.status(&r)), "unlocked");
        let audit = d.audit();
        assert!(
            audit.contains("\"share\":\"alice\"") && audit.contains("\"peer_uid\""),
            "{audit}"
        );
        assert!(!audit.contains("alice's words"), "{audit}");
    }
    // HSM + alice, without --auto-unlock: alice's share makes the daemon reach the HSM too.
    {
        let d = r.daemon("hsm-alice", &hsm);
        assert_eq!(state(&d.status(&r)), "locked");
        let o = ok(d.unlock_share(&r, "alice", "alice's words"));
        assert!(text(&o).contains("quorum is complete"), "{}", text(&o));
        assert_eq!(state(&d.status(&r)), "unlocked");
    }
    // One holder alone never unlocks: alice alone, HSM alone.
    {
        let d = r.daemon("alice-only", &[]);
        let o = ok(d.unlock_share(&r, "alice", "alice's words"));
        assert!(
            text(&o).contains("1 of 2 needed shares received"),
            "{}",
            text(&o)
        );
        let o = r.ctl(&["unlock", "--token", "--control", &d.control], None);
        assert!(!o.status.success(), "{}", text(&o));
        let s = d.status(&r);
        assert_eq!(state(&s), "locked");
        assert!(reason(&s).contains("1 of 2 needed shares received"), "{s}");
        // The recovery key opens it instead: alice's share is wiped with the unlock, so after a
        // lock nothing of it is left waiting for a second share.
        ok(r.ctl(
            &["unlock", "--control", &d.control, "--key-file", &rec],
            None,
        ));
        assert_eq!(state(&d.status(&r)), "unlocked");
        ok(r.ctl(&["lock", "--control", &d.control], None));
        let s = d.status(&r);
        assert_eq!(state(&s), "locked");
        assert!(!reason(&s).contains("needed shares"), "kept: {s}");
        drop(d);
        let mut a = vec!["--auto-unlock"];
        a.extend(hsm);
        let d = r.daemon("hsm-only", &a);
        let s = d.wait_for(&r, 60, "one share from the HSM", |s| {
            reason(s).contains("1 of 2 needed shares received")
        });
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(state(&d.status(&r)), "locked", "{s}");
    }
}

/// People only: 2 of {alice, bob, carol}, cheap KDF. A wrong share is named, partial shares are
/// forgotten after --share-timeout, and a complete quorum unlocks.
#[test]
fn people_give_shares_at_their_own_terminals_wrong_ones_are_named_and_partial_ones_expire() {
    let r = Rig::new("20M", TOKEN);
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
    let p = text(&ok(r.ctl(&["policy", &vol], None)));
    assert!(
        p.contains("keyslot 1: 2 of {passphrase share alice, passphrase share bob, passphrase share carol}"),
        "{p}"
    );

    let d = r.daemon("people", &["--share-timeout", "3"]);
    // A wrong passphrase for bob: named, nothing kept, exit 3 (wrong secret).
    let o = d.unlock_share(&r, "bob", "pc");
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("\"bob\" is wrong") && t.contains("0 of 2"),
        "{t}"
    );
    assert!(
        !t.contains("alice") && !t.contains("carol"),
        "names other holders: {t}"
    );
    // An unknown name.
    let o = d.unlock_share(&r, "mallory", "x");
    assert!(
        !o.status.success() && text(&o).contains("mallory"),
        "{}",
        text(&o)
    );

    // alice, then the timeout passes: forgotten; bob alone is one of two again.
    ok(d.unlock_share(&r, "alice", "pa"));
    let s = d.status(&r);
    assert!(
        reason(&s).contains("1 of 2 needed shares received (3 holders)"),
        "{s}"
    );
    std::thread::sleep(Duration::from_millis(3500));
    let s = d.status(&r);
    assert!(!reason(&s).contains("needed shares"), "not forgotten: {s}");
    assert!(d.log().contains("forgotten"), "{}", d.log());
    let o = ok(d.unlock_share(&r, "bob", "pb"));
    assert!(text(&o).contains("1 of 2"), "{}", text(&o));
    assert_eq!(state(&d.status(&r)), "locked");
    // carol completes it.
    let o = ok(d.unlock_share(&r, "carol", "pc"));
    assert!(text(&o).contains("unlocked"), "{}", text(&o));
    assert_eq!(state(&d.status(&r)), "unlocked");
    let audit = d.audit();
    for name in ["alice", "bob", "carol"] {
        assert!(audit.contains(&format!("\"share\":\"{name}\"")), "{audit}");
    }
    assert!(
        audit.contains("share_accepted") && audit.contains("unlock_failed"),
        "{audit}"
    );
    for secret in ["\"pa\"", "\"pb\"", "\"pc\""] {
        assert!(!audit.contains(secret), "{audit}");
    }
    // The recovery keyslot still opens with cryptsetup; the header still dumps.
    assert!(cryptsetup(&["luksDump", &vol]).status.success());
    let o = cryptsetup(&[
        "open",
        "--test-passphrase",
        "--key-slot",
        "0",
        "--key-file",
        &rec,
        &vol,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // unenroll removes the quorum: its token, then its keyslot.
    drop(d);
    let o = ok(r.ctl(&["unenroll", &vol, "--slot", "1"], None));
    assert!(
        text(&o).contains("removed token 0 and keyslot 1"),
        "{}",
        text(&o)
    );
    let p = text(&ok(r.ctl(&["policy", &vol], None)));
    assert!(
        p.contains("keyslot 0: a passphrase") && !p.contains("keyslot 1"),
        "{p}"
    );
}

/// A hostile header string in a token is escaped by `policy`.
#[test]
fn policy_escapes_attacker_written_strings() {
    let r = Rig::new("20M", TOKEN);
    let vol = r.vol();
    let tok = r.path("tok.json");
    std::fs::write(
        &tok,
        "{\"type\":\"evil\\u001b[2J\\u202etoken\",\"keyslots\":[\"0\"]}",
    )
    .unwrap();
    let o = cryptsetup(&["token", "import", "--json-file", &tok, &vol]);
    assert!(o.status.success(), "{}", text(&o));
    let p = text(&ok(r.ctl(&["policy", &vol], None)));
    assert!(!p.contains('\u{1b}') && !p.contains('\u{202e}'), "{p:?}");
    assert!(p.contains("evil\\u{1b}[2J\\u{202e}token"), "{p}");
}
