//! The PKCS#11 seal provider against a real SoftHSM2 token.
//!
//! PKCS#11 is once per process (C_Initialize reads SOFTHSM2_CONF once), so every test runs in a
//! child process of its own: the parent makes a throwaway SoftHSM2 config and token directory in
//! a temp dir (softhsm2-util + pkcs11-tool, as in docs/kms-hsm-testing.md §2.2), then re-runs this
//! test binary filtered to that one test with SOFTHSM2_CONF pointing there. Works under `cargo
//! test` (threads) and `cargo nextest` alike.
//!
//! Missing SoftHSM2 or pkcs11-tool is a failure, not a skip: `apt-get install -y softhsm2 opensc`
//! (scripts/test.sh does it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nbdcrypt::crypto::keys::SecretBytes;
use nbdcrypt::seal::pkcs11::{PinSource, Pkcs11Provider, Pkcs11Uri, DEFAULT_MODULE, TOKEN_TYPE};
use nbdcrypt::seal::{Binding, SealError, SealProvider, Sealed};

const TOKEN: &str = "nbdcrypt-test";
const SO_PIN: &str = "87654321";
const PIN: &str = "1234";
/// AES-256, sensitive, never extractable (the sealing key).
const KEK: &str = "vol-kek";
/// A second such key: the rekey target.
const KEK2: &str = "vol-kek-2";
/// AES-256, extractable: must be refused.
const EXTRACTABLE: &str = "extractable-kek";
/// Set in the child: the temp dir holding the token.
const CHILD_ENV: &str = "NBDCRYPT_PKCS11_TEST_DIR";

fn module() -> PathBuf {
    PathBuf::from(DEFAULT_MODULE)
}

fn require_tools() {
    let mut missing = Vec::new();
    if !Path::new(DEFAULT_MODULE).exists() || which("softhsm2-util").is_none() {
        missing.push("softhsm2");
    }
    if which("pkcs11-tool").is_none() {
        missing.push("opensc");
    }
    assert!(
        missing.is_empty(),
        "the PKCS#11 tests need SoftHSM2 ({DEFAULT_MODULE}, softhsm2-util) and pkcs11-tool: \
         install them with `apt-get install -y {}` (scripts/test.sh installs them)",
        missing.join(" ")
    );
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Throwaway token in `dir` (the doc's verified script): token TOKEN with three AES-256 keys.
fn make_token(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("tokens")).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
             slots.removable = false\nslots.mechanisms = ALL\nlibrary.reset_on_fork = false\n",
            dir.join("tokens").display()
        ),
    )
    .unwrap();
    run(Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            TOKEN,
            "--so-pin",
            SO_PIN,
            "--pin",
            PIN,
        ]));
    for (label, id, extra) in [
        (KEK, "01", None),
        (KEK2, "02", None),
        (EXTRACTABLE, "03", Some("--extractable")),
    ] {
        let mut cmd = Command::new("pkcs11-tool");
        cmd.env("SOFTHSM2_CONF", &conf)
            .args([
                "--module",
                DEFAULT_MODULE,
                "--token-label",
                TOKEN,
                "--login",
                "--pin",
                PIN,
            ])
            .args([
                "--keygen",
                "--key-type",
                "AES:32",
                "--label",
                label,
                "--id",
                id,
            ])
            .args([
                "--usage-decrypt",
                "--usage-wrap",
                "--sensitive",
                "--private",
            ])
            .args(extra);
        run(&mut cmd);
    }
    conf
}

/// Runs `body` in a child process with its own SoftHSM2 token.
fn isolated(name: &str, body: impl FnOnce()) {
    if std::env::var_os(CHILD_ENV).is_some() {
        body();
        return;
    }
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let conf = make_token(dir.path());
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(CHILD_ENV, dir.path())
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        out.status.success(),
        "test {name} failed in its SoftHSM2 child process"
    );
    assert!(
        stdout.contains("1 passed"),
        "test {name} did not run in the child process"
    );
}

macro_rules! hsm_test {
    ($(#[$m:meta])* fn $name:ident() $body:block) => {
        $(#[$m])*
        #[test]
        fn $name() {
            isolated(stringify!($name), || $body)
        }
    };
}

fn child_dir() -> PathBuf {
    PathBuf::from(std::env::var_os(CHILD_ENV).expect("runs in the child"))
}

/// `unwrap_err` without `Debug` on the success type (SecretBytes has none, on purpose).
fn err<T>(r: Result<T, SealError>) -> SealError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

fn uri(s: &str) -> Pkcs11Uri {
    Pkcs11Uri::parse(s).unwrap()
}

fn provider_for(object: &str, pin: &str) -> Pkcs11Provider {
    Pkcs11Provider::new(
        uri(&format!(
            "pkcs11:token={TOKEN};object={object};type=secret-key"
        )),
        module(),
        SecretBytes::from_slice(pin.as_bytes()),
    )
    .unwrap()
}

fn provider() -> Pkcs11Provider {
    provider_for(KEK, PIN)
}

fn binding() -> Binding {
    Binding {
        volume_uuid: "2f4c5e3a-9d1b-4c8e-a7f0-123456789abc".into(),
        keyslot: 1,
    }
}

fn secret() -> SecretBytes {
    SecretBytes::from_slice(&(0u8..32).collect::<Vec<_>>())
}

hsm_test! {
    fn round_trip() {
        let p = provider();
        assert_eq!(p.token_type(), TOKEN_TYPE);
        assert_eq!(p.token_type(), "nbdcrypt-pkcs11");
        assert_eq!(p.key_reference(), format!("pkcs11:token={TOKEN};object={KEK};type=secret-key"));
        let sealed = p.seal(&secret(), &binding()).unwrap();
        assert_eq!(sealed.ciphertext.len(), 32 + 16);
        assert_eq!(sealed.params["mechanism"], "aes-gcm");
        assert_eq!(sealed.params["pkcs11-uri"], p.key_reference());
        let iv = sealed.params["iv"].as_str().unwrap();
        use base64::Engine as _;
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(iv).unwrap().len(), 12);
        assert_eq!(p.unseal(&sealed, &binding()).unwrap().expose_secret(), secret().expose_secret());
        // Twice: sessions and logins were cleaned up after the first round.
        assert_eq!(p.unseal(&sealed, &binding()).unwrap().expose_secret(), secret().expose_secret());
    }
}

hsm_test! {
    fn key_found_by_id_alone() {
        let by_id = Pkcs11Provider::new(uri(&format!("pkcs11:token={TOKEN};id=%01")), module(), SecretBytes::from_slice(PIN.as_bytes())).unwrap();
        let sealed = by_id.seal(&secret(), &binding()).unwrap();
        // Same key as object=vol-kek, but a different URI: go through the token params.
        let back = Pkcs11Provider::from_token_params(&sealed.params, module(), SecretBytes::from_slice(PIN.as_bytes())).unwrap();
        assert_eq!(back.unseal(&sealed, &binding()).unwrap().expose_secret(), secret().expose_secret());
    }
}

hsm_test! {
    fn ciphertext_differs_from_secret_and_between_seals() {
        let p = provider();
        let a = p.seal(&secret(), &binding()).unwrap();
        let b = p.seal(&secret(), &binding()).unwrap();
        assert_ne!(&a.ciphertext[..32], secret().expose_secret());
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_ne!(a.params["iv"], b.params["iv"]);
        assert_eq!(p.unseal(&a, &binding()).unwrap().expose_secret(), secret().expose_secret());
        assert_eq!(p.unseal(&b, &binding()).unwrap().expose_secret(), secret().expose_secret());
    }
}

hsm_test! {
    fn other_binding_or_tampering_is_wrong_binding() {
        let p = provider();
        let sealed = p.seal(&secret(), &binding()).unwrap();
        let other_volume = Binding { volume_uuid: "11111111-2222-3333-4444-555555555555".into(), ..binding() };
        let other_slot = Binding { keyslot: 2, ..binding() };
        for b in [other_volume, other_slot] {
            let e = err(p.unseal(&sealed, &b));
            assert!(matches!(e, SealError::WrongBinding), "{b:?}: {e}");
        }
        let mut tampered = sealed.clone();
        tampered.ciphertext[40] ^= 1;
        let e = err(p.unseal(&tampered, &binding()));
        assert!(matches!(e, SealError::WrongBinding), "{e}");
        let mut other_iv = sealed.clone();
        other_iv.params.insert("iv".into(), "AAAAAAAAAAAAAAAA".into());
        let e = err(p.unseal(&other_iv, &binding()));
        assert!(matches!(e, SealError::WrongBinding), "{e}");
        // And the right binding still opens it.
        assert_eq!(p.unseal(&sealed, &binding()).unwrap().expose_secret(), secret().expose_secret());
    }
}

hsm_test! {
    fn malformed_sealed_params_are_bad_token() {
        let p = provider();
        let sealed = p.seal(&secret(), &binding()).unwrap();
        let edits: Vec<(&str, serde_json::Value)> = vec![
            ("mechanism", "aes-kw".into()),
            ("iv", "not base64!".into()),
            ("iv", "AAAA".into()),
            ("iv", 5.into()),
            ("pkcs11-uri", "pkcs11:token=t;object=k?pin-value=1234".into()),
        ];
        for (k, v) in edits {
            let mut s = sealed.clone();
            s.params.insert(k.into(), v.clone());
            let e = err(p.unseal(&s, &binding()));
            assert!(matches!(e, SealError::BadToken(_)), "{k}={v}: {e}");
            assert!(!e.to_string().contains("1234"), "{e}");
        }
        let mut s = sealed.clone();
        s.params.remove("iv");
        assert!(matches!(err(p.unseal(&s, &binding())), SealError::BadToken(_)));
        let short = Sealed { ciphertext: vec![0; 8], params: sealed.params.clone() };
        assert!(matches!(err(p.unseal(&short, &binding())), SealError::BadToken(_)));

        let mut params = sealed.params.clone();
        params.remove("pkcs11-uri");
        let e = Pkcs11Provider::from_token_params(&params, module(), SecretBytes::from_slice(PIN.as_bytes())).unwrap_err();
        assert!(matches!(e, SealError::BadToken(_)), "{e}");
        params.insert("pkcs11-uri".into(), "pkcs11:token=t".into());
        let e = Pkcs11Provider::from_token_params(&params, module(), SecretBytes::from_slice(PIN.as_bytes())).unwrap_err();
        assert!(matches!(e, SealError::BadToken(_)), "{e}");
    }
}

hsm_test! {
    fn wrong_pin_is_login_failed() {
        let p = provider_for(KEK, "9999-wrong");
        let e = p.seal(&secret(), &binding()).unwrap_err();
        assert!(matches!(e, SealError::LoginFailed { .. }), "{e}");
        assert!(e.to_string().contains("CKR_PIN_INCORRECT"), "{e}");
        assert!(!e.to_string().contains("9999"), "PIN in error: {e}");
        assert!(!format!("{e:?}").contains("9999"), "PIN in error: {e:?}");
        assert!(!format!("{p:?}").contains("9999"), "PIN in Debug: {p:?}");
        let sealed = provider().seal(&secret(), &binding()).unwrap();
        let e = err(p.unseal(&sealed, &binding()));
        assert!(matches!(e, SealError::LoginFailed { .. }), "{e}");
        // A failed login does not poison the next, correct one.
        assert_eq!(provider().unseal(&sealed, &binding()).unwrap().expose_secret(), secret().expose_secret());
    }
}

hsm_test! {
    fn missing_key_label_is_key_missing_naming_it() {
        let p = provider_for("no-such-kek", PIN);
        let e = p.seal(&secret(), &binding()).unwrap_err();
        assert!(matches!(e, SealError::KeyMissing { .. }), "{e}");
        assert!(e.to_string().contains("no-such-kek"), "{e}");
        assert!(e.to_string().contains(TOKEN), "{e}");
    }
}

hsm_test! {
    fn missing_token_label_is_key_missing() {
        let p = Pkcs11Provider::new(uri(&format!("pkcs11:token=no-such-token;object={KEK}")), module(), SecretBytes::from_slice(PIN.as_bytes())).unwrap();
        let e = p.seal(&secret(), &binding()).unwrap_err();
        assert!(matches!(e, SealError::KeyMissing { .. }), "{e}");
        assert!(e.to_string().contains("no-such-token"), "{e}");
    }
}

hsm_test! {
    fn extractable_key_is_refused() {
        let p = provider_for(EXTRACTABLE, PIN);
        let e = p.seal(&secret(), &binding()).unwrap_err();
        assert!(matches!(e, SealError::Other { .. }), "{e}");
        assert!(e.to_string().contains("extractable"), "{e}");
        assert!(e.to_string().contains(EXTRACTABLE), "{e}");
    }
}

hsm_test! {
    fn rekey_target_seals_independently() {
        let old = provider();
        let new = provider_for(KEK2, PIN);
        let old_blob = old.seal(&secret(), &binding()).unwrap();
        let new_blob = new.seal(&secret(), &binding()).unwrap();
        assert_eq!(new.unseal(&new_blob, &binding()).unwrap().expose_secret(), secret().expose_secret());
        assert_eq!(old.unseal(&old_blob, &binding()).unwrap().expose_secret(), secret().expose_secret());
        // The old blob does not open with the new key: refused because it names another key...
        assert!(new.unseal(&old_blob, &binding()).is_err());
        assert!(old.unseal(&new_blob, &binding()).is_err());
        // ... and, with the key reference forged to the new key, by AES-GCM itself.
        let mut forged = old_blob.clone();
        forged.params.insert("pkcs11-uri".into(), new.key_reference().into());
        let e = err(new.unseal(&forged, &binding()));
        assert!(matches!(e, SealError::WrongBinding), "{e}");
        // Through the token params (what the token layer does), each blob picks its own key.
        for blob in [&old_blob, &new_blob] {
            let p = Pkcs11Provider::from_token_params(&blob.params, module(), SecretBytes::from_slice(PIN.as_bytes())).unwrap();
            assert_eq!(p.unseal(blob, &binding()).unwrap().expose_secret(), secret().expose_secret());
        }
    }
}

hsm_test! {
    fn pin_from_file_env_and_credentials() {
        let dir = child_dir();
        let file = dir.join("pin.txt");
        std::fs::write(&file, format!("{PIN}\n")).unwrap();
        let creds = dir.join("creds");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(creds.join("hsm-pin"), PIN).unwrap();
        std::env::set_var("CREDENTIALS_DIRECTORY", &creds);

        let sealed = provider().seal(&secret(), &binding()).unwrap();
        for source in [
            format!("file:{}", file.display()),
            "cred:hsm-pin".to_string(),
        ] {
            let u = uri(&format!("pkcs11:token={TOKEN};object={KEK}?pin-source={source}"));
            let pin = u.pin_source.as_ref().unwrap().read().unwrap();
            assert_eq!(pin.expose_secret(), PIN.as_bytes(), "{source}");
            let p = Pkcs11Provider::new(u.clone(), module(), pin).unwrap();
            assert!(p.key_reference().contains("pin-source="), "{}", p.key_reference());
            assert_eq!(p.unseal(&sealed, &binding()).unwrap().expose_secret(), secret().expose_secret(), "{source}");
        }
        let e = err(PinSource::Credential("other".into()).read());
        assert!(e.to_string().contains("other"), "{e}");
        std::env::remove_var("CREDENTIALS_DIRECTORY");
        let e = err(PinSource::Credential("hsm-pin".into()).read());
        assert!(e.to_string().contains("CREDENTIALS_DIRECTORY"), "{e}");
    }
}

hsm_test! {
    fn stored_module_path_is_not_loaded_on_unseal() {
        let with_module = uri(&format!("pkcs11:token={TOKEN};object={KEK}?module-path=/nonexistent/evil.so"));
        let p = Pkcs11Provider::new(with_module, module(), SecretBytes::from_slice(PIN.as_bytes())).unwrap();
        let sealed = p.seal(&secret(), &binding()).unwrap();
        assert!(sealed.params["pkcs11-uri"].as_str().unwrap().contains("module-path"));
        let back = Pkcs11Provider::from_token_params(&sealed.params, module(), SecretBytes::from_slice(PIN.as_bytes())).unwrap();
        assert_eq!(back.module_path(), module());
        assert_eq!(back.unseal(&sealed, &binding()).unwrap().expose_secret(), secret().expose_secret());
    }
}

hsm_test! {
    /// The header is the attacker's: a stored URI's `pin-source` (and `module-path`) is never
    /// used. The token names a PIN file holding a wrong PIN; the operator's settings win.
    fn stored_pin_source_is_not_read_on_unseal() {
        let dir = child_dir();
        let wrong = dir.join("attacker-pin");
        std::fs::write(&wrong, "9999").unwrap();
        let good = dir.join("operator-pin");
        std::fs::write(&good, PIN).unwrap();
        let stored = uri(&format!(
            "pkcs11:token={TOKEN};object={KEK}?module-path=/nonexistent/evil.so&pin-source=file:{}",
            wrong.display()
        ));
        let p = Pkcs11Provider::new(stored, module(), SecretBytes::from_slice(PIN.as_bytes())).unwrap();
        let sealed = p.seal(&secret(), &binding()).unwrap();
        assert!(sealed.params["pkcs11-uri"].as_str().unwrap().contains("pin-source"));
        let token = nbdcrypt::luks2::tokens::format::build(TOKEN_TYPE, 1, &sealed, "t").unwrap();
        let mut raw = nbdcrypt::seal::registry::RawSettings::default();
        raw.set("pkcs11-module", vec![module().display().to_string()]);
        raw.set("pkcs11-pin", vec![PinSource::File(good).to_string()]);
        let settings = nbdcrypt::seal::SealSettings::from_raw(raw).unwrap();
        let back = nbdcrypt::luks2::tokens::resolver(token.json(), &settings).unwrap();
        assert_eq!(back.unseal(&sealed, &binding()).unwrap().expose_secret(), secret().expose_secret());
        // No PIN configured: refused, naming the option, even though the token names a source.
        let e = err(nbdcrypt::luks2::tokens::resolver(token.json(), &Default::default()).map(|_| ()));
        assert!(e.to_string().contains("--pkcs11-pin"), "{e}");
    }
}

hsm_test! {
    fn concurrent_seal_unseal_from_threads() {
        let p = std::sync::Arc::new(provider());
        let other = std::sync::Arc::new(provider_for(KEK2, PIN));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let p = if i % 2 == 0 { p.clone() } else { other.clone() };
                std::thread::spawn(move || {
                    for n in 0..20u32 {
                        let b = Binding { volume_uuid: format!("vol-{i}"), keyslot: n };
                        let s = p.seal(&secret(), &b).unwrap();
                        assert_eq!(p.unseal(&s, &b).unwrap().expose_secret(), secret().expose_secret());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}

hsm_test! {
    /// Not an assertion: prints the median of 20 seal+unseal round trips (after one warm-up),
    /// each a full open session / login / find key / AES-GCM / logout / close, for the record.
    fn round_trip_latency() {
        let p = provider();
        let median = |mut v: Vec<Duration>| {
            v.sort();
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2
        };
        let (mut seal, mut unseal, mut total) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..21 {
            let t0 = Instant::now();
            let s = p.seal(&secret(), &binding()).unwrap();
            let t1 = Instant::now();
            p.unseal(&s, &binding()).unwrap();
            let t2 = Instant::now();
            if i > 0 {
                seal.push(t1 - t0);
                unseal.push(t2 - t1);
                total.push(t2 - t0);
            }
        }
        let (min, max) = (*total.iter().min().unwrap(), *total.iter().max().unwrap());
        println!(
            "PKCS#11 SoftHSM2 round trip (n=20): median {:?} (seal {:?}, unseal {:?}; min {min:?}, max {max:?})",
            median(total),
            median(seal),
            median(unseal)
        );
    }
}

/// The test's own look at the token, through the same (already initialized) module: (open
/// sessions other than this look's, if the token says: SoftHSM2 doesn't; logged in?).
fn token_state() -> (Option<u64>, bool) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::session::SessionState;
    let p11 = Pkcs11::new(DEFAULT_MODULE).unwrap();
    match p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => panic!("{e}"),
    }
    let slot = p11
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| p11.get_token_info(*s).unwrap().label() == TOKEN)
        .unwrap();
    let sessions = p11.get_token_info(slot).unwrap().session_count();
    let s = p11.open_ro_session(slot).unwrap();
    let logged_in = !matches!(
        s.get_session_info().unwrap().session_state(),
        SessionState::RoPublic
    );
    (sessions, logged_in)
}

hsm_test! {
    /// SoftHSM2 does not report its session count (ulSessionCount is unavailable), so this checks
    /// the login state: a session left open and logged in would show here.
    fn sessions_closed_and_logged_out_on_every_path() {
        let p = provider();
        let sealed = p.seal(&secret(), &binding()).unwrap();
        assert_eq!(token_state(), (None, false), "after seal");
        p.unseal(&sealed, &binding()).unwrap();
        assert_eq!(token_state(), (None, false), "after unseal");
        err(p.unseal(&sealed, &Binding { keyslot: 7, ..binding() }));
        assert_eq!(token_state(), (None, false), "after a wrong binding");
        err(provider_for("no-such-kek", PIN).seal(&secret(), &binding()));
        assert_eq!(token_state(), (None, false), "after a missing key");
        err(provider_for(EXTRACTABLE, PIN).seal(&secret(), &binding()));
        assert_eq!(token_state(), (None, false), "after refusing a key");
        err(provider_for(KEK, "0000").seal(&secret(), &binding()));
        assert_eq!(token_state(), (None, false), "after a wrong PIN");
    }
}
