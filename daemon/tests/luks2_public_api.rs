//! Black-box use of `nbdcrypt::luks2` as another module (or `nbdcryptctl`) would use it: only
//! public items. Needs `shared/testdata/luks2` beside the repository (or at /work/shared); its
//! absence fails the test.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::PathBuf;

use nbdcrypt::crypto::keys::SecretBytes;
use nbdcrypt::luks2::{
    format, FormatError, FormatParams, HashAlg, KdfLimits, KdfParams, Luks2Header, RepairNeeded,
    SegmentSize, Token,
};

fn testdata() -> PathBuf {
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/luks2");
    for d in [beside, PathBuf::from("/work/shared/testdata/luks2")] {
        if d.join("README.md").exists() {
            return d;
        }
    }
    panic!("LUKS2 test data missing: check out `shared/` beside the repository");
}

fn tv_a(dir: &std::path::Path) -> File {
    let mut data = Vec::new();
    let gz = File::open(testdata().join("tv-a-ss4096.img.gz")).unwrap();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut data)
        .unwrap();
    let p = dir.join("a.img");
    std::fs::write(&p, data).unwrap();
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

#[test]
fn open_a_cryptsetup_volume_through_the_public_api() {
    let dir = tempfile::tempdir().unwrap();
    let f = tv_a(dir.path());
    let (hdr, repair) = Luks2Header::read(&f).unwrap();
    assert_eq!(repair, RepairNeeded::None);
    let seg = hdr.data_segment();
    assert_eq!(
        (seg.offset, seg.size, seg.sector_size),
        (16_777_216, SegmentSize::Dynamic, 4096)
    );
    let pass = SecretBytes::from_slice(b"tv-a-argon2id-passphrase");
    let (key, slot) = hdr.unlock(&f, &pass, &KdfLimits::default()).unwrap();
    assert_eq!((key.len(), slot), (64, 1));
    let wrong = SecretBytes::from_slice(b"nope");
    assert!(matches!(
        hdr.unlock(&f, &wrong, &KdfLimits::default()),
        Err(FormatError::WrongPassphrase)
    ));
}

#[test]
fn format_enroll_a_token_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.set_len(17 << 20).unwrap();
    let mut params = FormatParams::new(KdfParams::Argon2id {
        time: 4,
        memory_kib: 1024,
        cpus: 1,
    });
    params.digest_iterations = 1000;
    let recovery = SecretBytes::from_slice(b"recovery");
    let (mut hdr, vk) = format(&f, &params, &recovery).unwrap();
    let sealed = SecretBytes::from_slice(b"c2VhbGVkLXNlY3JldA==");
    let slot = hdr
        .add_keyslot(
            &f,
            &vk,
            &sealed,
            &KdfParams::Pbkdf2 {
                hash: HashAlg::Sha512,
                iterations: 1000,
            },
        )
        .unwrap();
    let token = Token::from_json(
        serde_json::from_str(&format!(
            r#"{{"type":"nbdcrypt-test","keyslots":["{slot}"]}}"#
        ))
        .unwrap(),
    )
    .unwrap();
    let id = hdr.add_token(&f, token).unwrap();
    let (again, _) = Luks2Header::read(&f).unwrap();
    assert_eq!(again.token(id).unwrap().keyslots(), &[slot]);
    let (k, s) = again.unlock(&f, &sealed, &KdfLimits::default()).unwrap();
    assert_eq!((k.expose_secret(), s), (vk.expose_secret(), slot));
}
