//! `clevis_token`: a LUKS2 token object as `clevis luks bind` (or an attacker) writes it. The
//! decoder must parse or refuse with a reason; a parsed JWE must round-trip through both
//! serializations; and with no operator settings (no Tang server allowed, no TPM named)
//! decryption must fail without any I/O: what the token says never reaches the network or a
//! TPM.

use nbdcrypt::luks2::tokens::clevis as luks;
use nbdcrypt::seal::clevis::{self, jwe::Jwe, ClevisSettings};
use serde_json::Value;

pub fn token(data: &[u8]) {
    let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(data) else {
        // Also try the input as a compact JWE (what sss shares are).
        if let Ok(s) = std::str::from_utf8(data) {
            if let Ok(j) = Jwe::from_compact(s) {
                check_jwe(&j);
            }
        }
        return;
    };
    match luks::parse_token(0, &o) {
        Ok(Some(t)) => check_jwe(&t.jwe),
        Ok(None) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn check_jwe(j: &Jwe) {
    let _ = (clevis::summary(j), format!("{j:?}"));
    let flat = Jwe::from_flattened(&j.to_flattened()).expect("flattened form refused");
    assert!(flat == *j, "flattened round trip changed the JWE");
    let compact = Jwe::from_compact(&j.to_compact()).expect("compact form refused");
    assert!(compact == *j, "compact round trip changed the JWE");
    match clevis::decrypt_jwe(j, &ClevisSettings::default(), 0) {
        Ok(_) => panic!("a clevis JWE decrypted with no operator settings"),
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
