//! Control protocol, LUKS2 tokens of ours, and PKCS#11 URIs / PIN sources.

use serde_json::{Map, Value};

use nbdcrypt::control::proto::{Request, Response};
use nbdcrypt::luks2::Token;
use nbdcrypt::seal::pkcs11::{PinSource, Pkcs11Uri};
use nbdcrypt::luks2::tokens::format as token;

/// `control_proto`: the input is one line, decoded as a request and as a response. Whatever
/// decodes must re-encode to a line that decodes to the same thing.
pub fn proto(data: &[u8]) {
    match Request::decode(data) {
        Ok(req) => {
            let line = req.encode();
            let again = Request::decode(&line).expect("encoded request does not decode");
            assert_eq!(again.kind(), req.kind());
            assert_eq!(format!("{again:?}"), format!("{req:?}"));
            if let (Request::Unlock { secret: a, .. }, Request::Unlock { secret: b, .. }) = (&req, &again) {
                assert!(a.expose_secret() == b.expose_secret(), "secret changed in a round trip");
            }
            if let (Request::ReencryptShare { secret: a, name: n }, Request::ReencryptShare { secret: b, name: m }) = (&req, &again) {
                assert!(a.expose_secret() == b.expose_secret(), "share secret changed in a round trip");
                assert_eq!(n, m);
            }
            if let (Request::Share { secret: a, name: n }, Request::Share { secret: b, name: m }) = (&req, &again) {
                assert!(a.expose_secret() == b.expose_secret(), "share secret changed in a round trip");
                assert_eq!(n, m);
            }
            // Debug never depends on a secret: the same request with another secret of another
            // length prints the same. (A substring check is wrong: a short secret such as "Shar"
            // legitimately occurs in the variant's name or in a share's name.)
            let other = nbdcrypt::crypto::keys::SecretBytes::from_slice(b"a-different-secret-of-another-length");
            let swapped = match &req {
                Request::Unlock { slot, .. } => Some(Request::Unlock { secret: other, slot: *slot }),
                Request::Share { name, .. } => Some(Request::Share { name: name.clone(), secret: other }),
                Request::ReencryptShare { name, .. } => Some(Request::ReencryptShare { name: name.clone(), secret: other }),
                Request::Reencrypt { action, secret: Some(_), max_rate, start } => Some(Request::Reencrypt {
                    action: *action,
                    secret: Some(other),
                    max_rate: *max_rate,
                    start: *start,
                }),
                _ => None,
            };
            if let Some(swapped) = swapped {
                assert_eq!(format!("{req:?}"), format!("{swapped:?}"), "Debug output depends on the secret");
            }
        }
        Err(e) => {
            let _ = (e.to_string(), e.summary());
        }
    }
    match Response::decode(data) {
        Ok(resp) => {
            let line = resp.encode();
            assert_eq!(Response::decode(&line).expect("encoded response does not decode"), resp);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// `seal_token`: the input is a token object as found in a header. Ours must parse or be
/// refused with a reason; one that parses must rebuild into a token that parses the same.
pub fn token(data: &[u8]) {
    let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(data) else { return };
    check_token(o);
}

fn check_token(o: Map<String, Value>) {
    // With no operator settings every provider must refuse before any I/O (no KMS endpoint, no
    // allowed key, no PIN): what the token says never reaches the network or a module.
    let _ = nbdcrypt::luks2::tokens::resolver(&o, &nbdcrypt::seal::SealSettings::default());
    match token::parse_json(&o) {
        Ok(Some(p)) => {
            let _ = (p.key_reference(), format!("{p:?}"));
            if p.sealed.ciphertext.is_empty() {
                return;
            }
            let rebuilt = token::build(p.kind.token_type(), p.keyslot, &p.sealed, &p.created);
            if let Ok(t) = rebuilt {
                let again = token::parse(&t).expect("rebuilt token refused").expect("rebuilt token not ours");
                assert_eq!(again.kind, p.kind);
                assert_eq!(again.keyslot, p.keyslot);
                assert_eq!(again.sealed, p.sealed);
                assert_eq!(again.created, p.created);
            }
        }
        Ok(None) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
    check_quorum(&o);
    if let Ok(t) = Token::from_json(o) {
        let _ = (t.type_name(), t.keyslots());
        let _ = token::parse(&t);
    }
}

/// Quorum tokens (same `seal_token` target): bounded, and one that parses rebuilds into the
/// same token. Nothing here may run a KDF or reach a provider.
fn check_quorum(o: &Map<String, Value>) {
    use nbdcrypt::luks2::tokens::quorum;
    match quorum::parse_json(o) {
        Ok(Some(q)) => {
            assert!(q.threshold >= 1 && q.threshold <= q.shares.len());
            assert!(q.shares.len() <= quorum::MAX_SHARES);
            assert!(q.shares.iter().all(|s| s.x != 0));
            let _ = (q.passphrase_shares(), format!("{q:?}"));
            for s in &q.shares {
                let _ = (s.describe(), s.name());
            }
            let t = quorum::build(&q).expect("a parsed quorum rebuilds");
            let again = quorum::parse(&t).expect("rebuilt quorum refused").expect("rebuilt quorum not a quorum");
            assert_eq!(again, q);
        }
        Ok(None) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// `pkcs11_uri`: the input is a URI (or PIN source) as an operator or a header would give it.
/// A URI that parses must render and compare equal to itself; `pin-value` must never survive
/// into a URI that may be stored.
pub fn pkcs11_uri(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(u) = Pkcs11Uri::parse(s) {
        let _ = (u.token_description(), u.key_description(), format!("{u:?}"));
        assert!(u.same_key(&u));
        // The operator's module always wins over the URI's.
        let op = std::path::Path::new("/operator/module.so");
        assert_eq!(nbdcrypt::seal::pkcs11::resolve_module(Some(op), &u), op);
    }
    match Pkcs11Uri::parse_with_pin_value(s) {
        Ok((u, pin)) => {
            let dbg = format!("{u:?} {} {}", u.token_description(), u.key_description());
            if let Some(pin) = pin {
                let p = String::from_utf8_lossy(pin.expose_secret()).into_owned();
                // Only a PIN made of characters found nowhere else in a plain-ASCII URI can be
                // told apart from the rest of a description (Debug escapes add digits).
                let others = s.replacen(p.as_str(), "", 1);
                let distinct = others.chars().all(|c| c.is_ascii_graphic())
                    && p.chars().all(|c| c.is_ascii_alphanumeric() && !others.contains(c));
                if p.len() >= 6 && distinct {
                    assert!(!dbg.contains(&p), "PIN shows in the URI's description");
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let _ = PinSource::parse(s).map(|p| format!("{p:?}"));
}
