//! Quorum enrolment and opening on real volume files, with people's shares (cheap PBKDF2) and a
//! hostile-token table. Machine shares (moto, SoftHSM2) are exercised in `ctl/tests/quorum.rs`.

use std::fs::{File, OpenOptions};
use std::path::Path;

use serde_json::json;

use super::*;
use crate::luks2::{format, FormatParams};

const PASS: &[u8] = b"recovery passphrase";
const CHEAP: KdfParams = KdfParams::Pbkdf2 {
    hash: HashAlg::Sha256,
    iterations: 1000,
};

fn volume(dir: &Path) -> (File, Luks2Header, VolumeKey) {
    let p = dir.join("v.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.set_len(20 << 20).unwrap();
    let mut params = FormatParams::new(CHEAP);
    params.digest_iterations = 1000;
    let (h, vk) = format(&f, &params, &SecretBytes::from_slice(PASS)).unwrap();
    (f, h, vk)
}

fn person(name: &str) -> NewHolder<'static> {
    NewHolder::Passphrase {
        name: name.into(),
        passphrase: SecretBytes::from_slice(format!("pass of {name}").as_bytes()),
        kdf: CHEAP,
    }
}

fn pass(name: &str) -> SecretBytes {
    SecretBytes::from_slice(format!("pass of {name}").as_bytes())
}

fn enrolled(dir: &Path) -> (File, Luks2Header, VolumeKey, u32, QuorumToken) {
    let (f, mut h, vk) = volume(dir);
    let e = enroll(
        &f,
        &mut h,
        &vk,
        2,
        &[person("alice"), person("bob"), person("carol")],
    )
    .unwrap();
    let q = parse(h.token(e.token_id).unwrap()).unwrap().unwrap();
    (f, h, vk, e.token_id, q)
}

#[test]
fn any_two_of_three_people_open_the_keyslot_and_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (f, h, vk, _, q) = enrolled(dir.path());
    assert_eq!((q.threshold, q.shares.len(), q.keyslot), (2, 3, 1));
    let l = KdfLimits::default();
    let shares: Vec<Share> = ["alice", "bob", "carol"]
        .iter()
        .map(|n| open_passphrase_share(&h, &q, n, &pass(n), &l).unwrap())
        .collect();
    for (a, b) in [(0, 1), (1, 2), (2, 0)] {
        let key = open_keyslot(&f, &h, &q, &[&shares[a], &shares[b]]).unwrap();
        assert_eq!(key.expose_secret(), vk.expose_secret());
    }
    match open_keyslot(&f, &h, &q, &[&shares[0]]) {
        Err(QuorumError::NotEnough { have, need, total }) => {
            assert_eq!((have, need, total), (1, 2, 3))
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    // The passphrase keyslot still opens: the quorum took a keyslot of its own.
    h.unlock_slot(&f, 0, &SecretBytes::from_slice(PASS), &l)
        .unwrap();
}

#[test]
fn a_wrong_passphrase_is_named_and_an_unknown_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_f, h, _vk, _, q) = enrolled(dir.path());
    let l = KdfLimits::default();
    match open_passphrase_share(&h, &q, "bob", &pass("alice"), &l) {
        Err(e @ QuorumError::WrongShare { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains("\"bob\"") && !m.contains("alice") && !m.contains("carol"),
                "{m}"
            );
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(matches!(
        open_passphrase_share(&h, &q, "mallory", &pass("mallory"), &l),
        Err(QuorumError::UnknownShare(_))
    ));
}

#[test]
fn a_share_moved_to_another_index_or_volume_fails_its_tag() {
    let dir = tempfile::tempdir().unwrap();
    let (_f, h, _vk, id, _) = enrolled(dir.path());
    let mut j = h.token(id).unwrap().json().clone();
    // Swap alice's and bob's indices: each share now fails its tag.
    let shares = j["shares"].as_array_mut().unwrap();
    let (a, b) = (shares[0]["x"].clone(), shares[1]["x"].clone());
    shares[0]["x"] = b;
    shares[1]["x"] = a;
    let q = parse_json(&j).unwrap().unwrap();
    let l = KdfLimits::default();
    assert!(matches!(
        open_passphrase_share(&h, &q, "alice", &pass("alice"), &l),
        Err(QuorumError::WrongShare { .. })
    ));
    // The same token on another volume (other UUID): every share fails.
    let dir2 = tempfile::tempdir().unwrap();
    let (_f2, h2, _) = volume(dir2.path());
    let q = parse(h.token(id).unwrap()).unwrap().unwrap();
    assert!(matches!(
        open_passphrase_share(&h2, &q, "carol", &pass("carol"), &l),
        Err(QuorumError::WrongShare { .. })
    ));
}

#[test]
fn build_then_parse_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (_f, h, _vk, id, q) = enrolled(dir.path());
    let t = build(&q).unwrap();
    assert_eq!(t.json(), h.token(id).unwrap().json());
    assert_eq!(parse(&t).unwrap().unwrap(), q);
    assert_eq!(
        q.shares
            .iter()
            .map(StoredShare::describe)
            .collect::<Vec<_>>(),
        [
            "passphrase share alice",
            "passphrase share bob",
            "passphrase share carol"
        ]
    );
}

#[test]
fn enrolment_refuses_bad_quorums_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let (f, mut h, vk) = volume(dir.path());
    let before = h.keyslots().len();
    for (k, holders) in [
        (0, vec![person("a")]),
        (3, vec![person("a"), person("b")]),
        (1, vec![person("a"), person("a")]),
        (1, vec![person("bad name")]),
        (1, vec![]),
    ] {
        assert!(enroll(&f, &mut h, &vk, k, &holders).is_err());
    }
    assert_eq!(h.keyslots().len(), before);
    assert_eq!(h.tokens().count(), 0);
}

fn base() -> Value {
    json!({"type": "nbdcrypt-quorum", "keyslots": ["1"], "nbdcrypt_version": 1, "threshold": 1,
           "shares": [{"x": 1, "holder": "passphrase", "name": "alice",
                       "tag": B64.encode([0u8; 32]), "sealed": B64.encode([0u8; 32]),
                       "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": 1000,
                               "salt": B64.encode([0u8; 32])}}]})
}

#[test]
fn hostile_tokens_are_refused_with_a_reason() {
    let share = base()["shares"][0].clone();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = base();
        f(&mut v);
        v.as_object().unwrap().clone()
    };
    let cases: Vec<(Map<String, Value>, &str)> = vec![
        (with(&|v| v["threshold"] = json!(0)), "threshold"),
        (with(&|v| v["threshold"] = json!(2)), "threshold"),
        (with(&|v| v["threshold"] = json!(-1)), "threshold"),
        (with(&|v| v["shares"] = json!([])), "0 shares"),
        (
            with(&|v| v["shares"] = Value::Array(vec![share.clone(); MAX_SHARES + 1])),
            "17 shares",
        ),
        (with(&|v| v["shares"][0]["x"] = json!(0)), "\"x\""),
        (with(&|v| v["shares"][0]["x"] = json!(256)), "\"x\""),
        (
            with(&|v| {
                let mut s2 = share.clone();
                s2["name"] = json!("bob");
                v["shares"] = json!([share.clone(), s2]);
            }),
            "appears twice",
        ),
        (
            with(&|v| {
                let mut s2 = share.clone();
                s2["x"] = json!(2);
                v["shares"] = json!([share.clone(), s2]);
            }),
            "name \"alice\" appears twice",
        ),
        (
            with(&|v| v["shares"][0]["name"] = json!("../../x")),
            "\"name\"",
        ),
        (
            with(&|v| v["shares"][0]["name"] = json!("a".repeat(65))),
            "\"name\"",
        ),
        (with(&|v| v["shares"][0]["tag"] = json!("AAAA")), "32 bytes"),
        (
            with(&|v| v["shares"][0]["sealed"] = json!("AAAA")),
            "32 bytes",
        ),
        (with(&|v| v["shares"][0]["sealed"] = json!(7)), "\"sealed\""),
        (
            with(&|v| v["shares"][0]["holder"] = json!("evil")),
            "not known",
        ),
        (
            with(&|v| v["shares"][0]["kdf"]["type"] = json!("scrypt")),
            "kdf",
        ),
        (
            with(&|v| v["shares"][0]["kdf"]["iterations"] = json!(1u64 << 40)),
            "32-bit",
        ),
        (
            with(&|v| v["shares"][0]["kdf"]["salt"] = json!("AA==")),
            "salt",
        ),
        (with(&|v| v["keyslots"] = json!(["1", "2"])), "exactly one"),
        (with(&|v| v["keyslots"] = json!(["99"])), "keyslot number"),
        (with(&|v| v["nbdcrypt_version"] = json!(9)), "newer"),
        (with(&|v| v["shares"] = json!({})), "not an array"),
    ];
    for (o, want) in cases {
        match parse_json(&o) {
            Err(e) => assert!(e.to_string().contains(want), "{e} should contain {want:?}"),
            Ok(q) => panic!("accepted {o:?}: {q:?}"),
        }
    }
    assert!(parse_json(&with(&|_| {})).unwrap().is_some());
    assert!(
        parse_json(&json!({"type": "clevis"}).as_object().unwrap().clone())
            .unwrap()
            .is_none()
    );
}

#[test]
fn an_expensive_kdf_from_the_header_is_refused_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let (_f, h, _vk, id, _) = enrolled(dir.path());
    let mut j = h.token(id).unwrap().json().clone();
    j["shares"][0]["kdf"] = json!({"type": "argon2id", "time": 1000, "memory": 4194304, "cpus": 4,
                                    "salt": B64.encode([0u8; 32])});
    let q = parse_json(&j).unwrap().unwrap();
    let t = std::time::Instant::now();
    assert!(matches!(
        open_passphrase_share(&h, &q, "alice", &pass("alice"), &KdfLimits::default()),
        Err(QuorumError::Kdf { .. })
    ));
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}
