//! Enrol / unenrol / unlock / rekey on real volume files, with an in-process provider that
//! binds its ciphertext like KMS does (wrong volume or keyslot: `WrongBinding`). The KMS
//! provider itself is tested against a moto server in `ctl/tests/kms.rs`.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::*;
use crate::luks2::tokens::format::AWS_KMS_TOKEN_TYPE;
use crate::luks2::{format, FormatParams, Token};
use crate::seal::Sealed;

const VOL_SIZE: u64 = 20 << 20;
const PASS: &[u8] = b"recovery passphrase";

/// Seals by XOR with a keystream from (key, binding) plus a tag: any change of binding or
/// ciphertext fails like a KMS encryption-context mismatch.
struct FakeKms {
    name: String,
    key: [u8; 32],
    /// Unseal always fails (a key that stopped working right after sealing).
    broken_unseal: bool,
}

impl FakeKms {
    fn new(name: &str) -> FakeKms {
        let key: [u8; 32] = Sha256::digest(name.as_bytes()).into();
        FakeKms {
            name: name.into(),
            key,
            broken_unseal: false,
        }
    }

    fn stream(&self, b: &Binding, what: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(b.aad());
        h.update(what);
        h.finalize().into()
    }
}

impl SealProvider for FakeKms {
    fn token_type(&self) -> &'static str {
        AWS_KMS_TOKEN_TYPE
    }
    fn key_reference(&self) -> String {
        self.name.clone()
    }
    fn seal(&self, secret: &SecretBytes, b: &Binding) -> Result<Sealed, SealError> {
        let ks = self.stream(b, b"stream");
        let mut ct: Vec<u8> = secret
            .expose_secret()
            .iter()
            .zip(ks.iter())
            .map(|(a, k)| a ^ k)
            .collect();
        let tag = self.stream(b, &ct);
        ct.extend_from_slice(&tag[..16]);
        let mut params = Map::new();
        params.insert("kms-key-id".into(), self.name.clone().into());
        Ok(Sealed {
            ciphertext: ct,
            params,
        })
    }
    fn unseal(&self, sealed: &Sealed, b: &Binding) -> Result<SecretBytes, SealError> {
        if self.broken_unseal {
            return Err(SealError::KeyDisabled {
                provider: "fake",
                key: self.name.clone(),
            });
        }
        if sealed.ciphertext.len() != 48 {
            return Err(SealError::WrongBinding);
        }
        let (ct, tag) = sealed.ciphertext.split_at(32);
        if self.stream(b, ct)[..16] != *tag {
            return Err(SealError::WrongBinding);
        }
        let ks = self.stream(b, b"stream");
        Ok(SecretBytes::from_vec(
            ct.iter().zip(ks.iter()).map(|(a, k)| a ^ k).collect(),
        ))
    }
}

/// A resolver that knows the named fake keys.
fn resolver(
    names: &[&str],
) -> impl Fn(&Map<String, Value>) -> Result<Box<dyn SealProvider>, SealError> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    move |t: &Map<String, Value>| {
        let id = t.get("kms-key-id").and_then(Value::as_str).unwrap_or("");
        if names.iter().any(|n| n == id) {
            Ok(Box::new(FakeKms::new(id)))
        } else {
            Err(SealError::KeyMissing {
                provider: "fake",
                key: id.into(),
            })
        }
    }
}

#[track_caller]
fn expect_err<T>(r: Result<T, EnrollError>) -> EnrollError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

/// A fresh volume with one passphrase keyslot (0).
fn volume(dir: &Path, name: &str) -> (PathBuf, File, Luks2Header, VolumeKey) {
    let p = dir.join(name);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.set_len(VOL_SIZE).unwrap();
    let mut params = FormatParams::new(KdfParams::Pbkdf2 {
        hash: HashAlg::Sha256,
        iterations: 1000,
    });
    params.digest_iterations = 1000;
    let (h, vk) = format(&f, &params, &SecretBytes::from_slice(PASS)).unwrap();
    (p, f, h, vk)
}

fn reread(f: &File) -> Luks2Header {
    Luks2Header::read(f).unwrap().0
}

fn passphrase_opens(f: &File, h: &Luks2Header, vk: &VolumeKey) -> bool {
    h.unlock(f, &SecretBytes::from_slice(PASS), &KdfLimits::default())
        .map(|(k, _)| k.expose_secret() == vk.expose_secret())
        .unwrap_or(false)
}

#[test]
fn enrol_then_unlock_by_token() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, f, mut h, vk) = volume(dir.path(), "a.img");
    let e = enroll(&f, &mut h, &vk, &FakeKms::new("key-a")).unwrap();
    assert_eq!(
        e,
        Enrolled {
            keyslot: 1,
            token_id: 0
        }
    );

    let h = reread(&f);
    let t = h.token(0).unwrap().json().clone();
    assert_eq!(t["type"], "nbdcrypt-aws-kms");
    assert_eq!(t["keyslots"], json!(["1"]));
    assert_eq!(t["nbdcrypt_version"], 1);
    assert_eq!(t["kms-key-id"], "key-a");
    assert!(t["created"].as_str().unwrap().ends_with('Z'));
    let slot = h.keyslots().into_iter().find(|k| k.id == 1).unwrap();
    assert_eq!(slot.kdf, Some(TOKEN_KEYSLOT_KDF));
    assert!(slot.for_data);

    let (key, ks, tid) = unlock_with_tokens(&f, &h, &resolver(&["key-a"])).unwrap();
    assert_eq!(key.expose_secret(), vk.expose_secret());
    assert_eq!((ks, tid), (1, 0));
    assert!(passphrase_opens(&f, &h, &vk));

    // The unsealed secret's base64 is the keyslot passphrase (systemd convention).
    let p = token::parse(h.token(0).unwrap()).unwrap().unwrap();
    let secret = FakeKms::new("key-a")
        .unseal(&p.sealed, &binding(&h, 1))
        .unwrap();
    let pass = passphrase_for(&secret);
    assert_eq!(pass.len(), 44);
    assert!(h.unlock_slot(&f, 1, &pass, &KdfLimits::default()).is_ok());

    // Without the provider: a clear failure naming the token, slot and key.
    let err = expect_err(unlock_with_tokens(&f, &h, &resolver(&[])));
    let msg = err.to_string();
    assert!(
        msg.contains("token 0") && msg.contains("keyslot 1") && msg.contains("key-a"),
        "{msg}"
    );
    assert!(matches!(
        err.seal_error(),
        Some(SealError::KeyMissing { .. })
    ));
}

#[test]
fn a_token_copied_to_another_volume_is_wrong_binding() {
    let dir = tempfile::tempdir().unwrap();
    let (_pa, fa, mut ha, vka) = volume(dir.path(), "a.img");
    let (_pb, fb, mut hb, vkb) = volume(dir.path(), "b.img");
    enroll(&fa, &mut ha, &vka, &FakeKms::new("key-a")).unwrap();
    // B gets a keyslot 1 of its own, and A's token bound to it.
    hb.add_keyslot(
        &fb,
        &vkb,
        &SecretBytes::from_slice(b"other"),
        &TOKEN_KEYSLOT_KDF,
    )
    .unwrap();
    let mut copied = ha.token(0).unwrap().json().clone();
    copied.insert("keyslots".into(), json!(["1"]));
    hb.add_token(&fb, Token::from_json(copied).unwrap())
        .unwrap();
    let err = expect_err(unlock_with_tokens(&fb, &hb, &resolver(&["key-a"])));
    assert!(
        matches!(err.seal_error(), Some(SealError::WrongBinding)),
        "{err}"
    );
    assert!(
        err.to_string().contains("does not belong to this volume"),
        "{err}"
    );

    // Same volume, token moved to another keyslot: also refused.
    ha.add_keyslot(
        &fa,
        &vka,
        &SecretBytes::from_slice(b"x"),
        &TOKEN_KEYSLOT_KDF,
    )
    .unwrap();
    let mut moved = ha.token(0).unwrap().json().clone();
    moved.insert("keyslots".into(), json!(["2"]));
    ha.remove_token(&fa, 0).unwrap();
    ha.add_token(&fa, Token::from_json(moved).unwrap()).unwrap();
    let err = expect_err(unlock_with_tokens(&fa, &ha, &resolver(&["key-a"])));
    assert!(
        matches!(err.seal_error(), Some(SealError::WrongBinding)),
        "{err}"
    );
}

#[test]
fn other_tools_tokens_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, f, mut h, vk) = volume(dir.path(), "a.img");
    let foreign = json!({"type": "systemd-tpm2", "keyslots": ["0"], "tpm2-blob": "AAAA"});
    let fid = h
        .add_token(
            &f,
            Token::from_json(foreign.as_object().unwrap().clone()).unwrap(),
        )
        .unwrap();
    assert!(matches!(
        unlock_with_tokens(&f, &h, &resolver(&["key-a"])),
        Err(EnrollError::NoTokens)
    ));
    let e = enroll(&f, &mut h, &vk, &FakeKms::new("key-a")).unwrap();
    assert_ne!(e.token_id, fid);
    assert!(unlock_with_tokens(&f, &h, &resolver(&["key-a"])).is_ok());
    assert!(matches!(
        unenroll(&f, &mut h, UnenrollTarget::Token(fid)),
        Err(EnrollError::NotOurToken { .. })
    ));
    assert!(matches!(
        unenroll(&f, &mut h, UnenrollTarget::Keyslot(0)),
        Err(EnrollError::NoTokenForKeyslot(0))
    ));
    assert_eq!(reread(&f).tokens().count(), 2);
}

#[test]
fn unenrol_removes_token_then_keyslot_and_keeps_the_last_keyslot() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, f, mut h, vk) = volume(dir.path(), "a.img");
    let a = enroll(&f, &mut h, &vk, &FakeKms::new("key-a")).unwrap();
    let b = enroll(&f, &mut h, &vk, &FakeKms::new("key-b")).unwrap();
    assert_eq!((a.keyslot, b.keyslot), (1, 2));

    let u = unenroll(&f, &mut h, UnenrollTarget::Keyslot(1)).unwrap();
    assert_eq!((u.token_id, u.keyslot), (a.token_id, Some(1)));
    assert_eq!(u.key.as_deref(), Some("key-a"));
    let u = unenroll(&f, &mut h, UnenrollTarget::Token(b.token_id)).unwrap();
    assert_eq!(u.keyslot, Some(2));
    let disk = reread(&f);
    assert_eq!(disk.tokens().count(), 0);
    assert_eq!(
        disk.keyslots().iter().map(|k| k.id).collect::<Vec<_>>(),
        vec![0]
    );
    assert!(passphrase_opens(&f, &disk, &vk));

    // Only a token keyslot left: unenrolling it would lose the data.
    let c = enroll(&f, &mut h, &vk, &FakeKms::new("key-c")).unwrap();
    h.remove_keyslot(&f, 0).unwrap();
    let err = unenroll(&f, &mut h, UnenrollTarget::Token(c.token_id)).unwrap_err();
    assert!(
        matches!(err, EnrollError::LastKeyslot(k) if k == c.keyslot),
        "{err}"
    );
    let disk = reread(&f);
    assert!(
        disk.token(c.token_id).is_some(),
        "the token must survive a refused unenrol"
    );
    assert!(unlock_with_tokens(&f, &disk, &resolver(&["key-c"])).is_ok());
}

#[test]
fn rekey_moves_to_the_new_key_and_retires_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, f, mut h, vk) = volume(dir.path(), "a.img");
    let a = enroll(&f, &mut h, &vk, &FakeKms::new("key-a")).unwrap();
    let r = rekey(&f, &mut h, a.token_id, &vk, &FakeKms::new("key-b")).unwrap();
    assert_eq!(r.old, a);
    assert_ne!(r.new.keyslot, a.keyslot);
    let disk = reread(&f);
    assert!(disk.token(a.token_id).is_none());
    assert!(!disk.keyslots().iter().any(|k| k.id == a.keyslot));
    assert!(unlock_with_tokens(&f, &disk, &resolver(&["key-a"])).is_err());
    let (key, slot, tid) = unlock_with_tokens(&f, &disk, &resolver(&["key-b"])).unwrap();
    assert_eq!(key.expose_secret(), vk.expose_secret());
    assert_eq!((slot, tid), (r.new.keyslot, r.new.token_id));
    assert!(passphrase_opens(&f, &disk, &vk));
    // Rekey to the same key (fresh secret): works too.
    let r2 = rekey(&f, &mut h, r.new.token_id, &vk, &FakeKms::new("key-b")).unwrap();
    assert!(unlock_with_tokens(&f, &reread(&f), &resolver(&["key-b"])).is_ok());
    assert_ne!(r2.new.keyslot, r.new.keyslot);
}

#[test]
fn rekey_that_does_not_verify_keeps_the_old_token() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, f, mut h, vk) = volume(dir.path(), "a.img");
    let a = enroll(&f, &mut h, &vk, &FakeKms::new("key-a")).unwrap();
    let mut broken = FakeKms::new("key-b");
    broken.broken_unseal = true;
    let err = rekey(&f, &mut h, a.token_id, &vk, &broken).unwrap_err();
    assert!(matches!(err, EnrollError::VerifyFailed { .. }), "{err}");
    let disk = reread(&f);
    assert_eq!(disk.tokens().count(), 1);
    assert_eq!(disk.keyslots().len(), 2);
    assert!(unlock_with_tokens(&f, &disk, &resolver(&["key-a"])).is_ok());
}

/// Crash after the k-th header write of a rekey, for every k: the volume still opens with the
/// old or the new token (and always with the passphrase), and what is on disk is one of the
/// states the documented order allows.
#[test]
fn rekey_is_crash_safe_after_every_header_write() {
    let dir = tempfile::tempdir().unwrap();
    let (template, f, mut h, vk) = volume(dir.path(), "template.img");
    let a = enroll(&f, &mut h, &vk, &FakeKms::new("key-a")).unwrap();
    drop(f);
    // 4 writes: new keyslot, new token, old token removed, old keyslot removed.
    let mut completed = false;
    for k in 1..=5u32 {
        let p = dir.path().join(format!("crash{k}.img"));
        std::fs::copy(&template, &p).unwrap();
        let f = open_rw(&p);
        let mut h = reread(&f);
        let mut crash = CrashPoint {
            done: 0,
            limit: k,
            after_write: None,
        };
        let r = rekey_inner(
            &f,
            &mut h,
            a.token_id,
            &vk,
            &FakeKms::new("key-b"),
            &mut crash,
        );
        match r {
            Err(EnrollError::SimulatedCrash(n)) => assert_eq!(n, k),
            Ok(_) => completed = true,
            Err(e) => panic!("k={k}: {e}"),
        }
        drop(h);
        // "Reboot": everything from disk.
        let disk = reread(&f);
        let old_works = unlock_with_tokens(&f, &disk, &resolver(&["key-a"])).is_ok();
        let new_works = unlock_with_tokens(&f, &disk, &resolver(&["key-b"])).is_ok();
        assert!(old_works || new_works, "k={k}: neither token opens");
        let (key, _, _) = unlock_with_tokens(&f, &disk, &resolver(&["key-a", "key-b"])).unwrap();
        assert_eq!(key.expose_secret(), vk.expose_secret());
        assert!(passphrase_opens(&f, &disk, &vk), "k={k}");
        // Old usable until the new one exists (k >= 2); after that the new one works.
        if k < 2 {
            assert!(old_works && !new_works, "k={k}");
        } else {
            assert!(new_works, "k={k}");
        }
        if k >= 3 {
            assert!(disk.token(a.token_id).is_none(), "k={k}");
        }
        let n_tokens = disk.tokens().count();
        let n_slots = disk.keyslots().len();
        let expect = match k {
            1 => (1, 3), // orphan new keyslot, old token+slot intact
            2 => (2, 3), // both enrolments
            3 => (1, 3), // old token gone, old keyslot left (unopenable)
            _ => (1, 2), // done
        };
        assert_eq!((n_tokens, n_slots), expect, "k={k}");
    }
    assert!(completed, "with 5 allowed writes the rekey must complete");
}

/// A crash in the middle of a header commit: the primary copy written but not the secondary,
/// or the primary torn (garbage) with the secondary still old. Built from the on-disk images
/// after k-1 and k complete writes of a rekey; each must open with the old or the new token.
#[test]
fn rekey_survives_a_crash_inside_a_header_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (template, f, mut h, vk) = volume(dir.path(), "template.img");
    let a = enroll(&f, &mut h, &vk, &FakeKms::new("key-a")).unwrap();
    let hdr_size = usize::try_from(h.hdr_size()).unwrap();
    drop(f);
    // images[k]: the volume after k header writes of one rekey run (k = 0..=4).
    let p = dir.path().join("run.img");
    std::fs::copy(&template, &p).unwrap();
    let images = std::rc::Rc::new(std::cell::RefCell::new(vec![std::fs::read(&p).unwrap()]));
    {
        let f = open_rw(&p);
        let mut h = reread(&f);
        let (snap, path) = (images.clone(), p.clone());
        let mut crash = CrashPoint {
            done: 0,
            limit: u32::MAX,
            after_write: Some(Box::new(move |_| {
                snap.borrow_mut().push(std::fs::read(&path).unwrap())
            })),
        };
        rekey_inner(
            &f,
            &mut h,
            a.token_id,
            &vk,
            &FakeKms::new("key-b"),
            &mut crash,
        )
        .unwrap();
    }
    let images = images.borrow().clone();
    assert_eq!(images.len(), 5);
    let both = resolver(&["key-a", "key-b"]);
    for k in 1..=4usize {
        let (before, after) = (&images[k - 1], &images[k]);
        // Primary of step k on disk, secondary still from step k-1.
        let mut half = after.clone();
        half[hdr_size..2 * hdr_size].copy_from_slice(&before[hdr_size..2 * hdr_size]);
        // Primary torn mid-write, secondary from step k-1; keyslot areas as of step k.
        let mut torn = after.clone();
        torn[hdr_size..2 * hdr_size].copy_from_slice(&before[hdr_size..2 * hdr_size]);
        for b in &mut torn[64..hdr_size / 2] {
            *b = 0xa5;
        }
        for (name, img) in [("half", half), ("torn", torn)] {
            let p = dir.path().join(format!("{name}{k}.img"));
            std::fs::write(&p, &img).unwrap();
            let f = open_rw(&p);
            let (disk, _) = Luks2Header::read(&f).unwrap_or_else(|e| panic!("{name} k={k}: {e}"));
            let (key, _, _) = unlock_with_tokens(&f, &disk, &both)
                .unwrap_or_else(|e| panic!("{name} k={k}: no token opens: {e}"));
            assert_eq!(key.expose_secret(), vk.expose_secret());
            assert!(passphrase_opens(&f, &disk, &vk), "{name} k={k}");
        }
    }
}
