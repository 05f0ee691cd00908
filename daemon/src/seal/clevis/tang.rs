//! clevis's `tang` pin: ECDH-ES on P-521 with the Tang server's exchange key, recovered by the
//! McCallum-Relyea exchange (`POST {url}/rec/{kid}` with a blinded point).
//!
//! Trust comes from the operator, never from the token: the token's URL must be one the
//! operator allowed (`tang-allow = ["URL=THUMBPRINT"]`), checked before any network request;
//! the server must then prove, with an advertisement signed by the key whose thumbprint the
//! operator gave, that the exchange key the token names is its own. The `adv` copy stored in
//! the token (attacker-writable) is never used.

use std::time::Duration;

use p521::ecdsa::signature::Verifier;
use p521::elliptic_curve::sec1::ToSec1Point;
use p521::{AffinePoint, FieldBytes, NonZeroScalar, ProjectivePoint, PublicKey};
use serde_json::{json, Map, Value};

use super::http::{self, HttpError, HttpUrl};
use super::jwe::{
    b64u, b64u_decode, concat_kdf_a256gcm, is_thumbprint, obj_member, str_member,
    thumbprint_matches, thumbprint_s256, Cek, Jwe,
};
use super::{bad, shown};
use crate::crypto::keys::SecretBytes;
use crate::seal::SealError;

const PROVIDER: &str = "tang";
/// Attempts per request while the server is unreachable, and the pause before each retry.
const RETRY_DELAYS: [Duration; 2] = [Duration::from_millis(500), Duration::from_millis(1500)];
/// Keys in an advertisement, signatures on it: Tang advertises two keys and signs once or twice.
const MAX_KEYS: usize = 16;

/// One Tang server the operator trusts: its URL and the thumbprint of its signing key
/// (`tang-show-keys PORT`, or `jose jwk thp -i` on the key file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TangServer {
    pub url: String,
    pub thumbprint: String,
}

impl TangServer {
    /// `URL=THUMBPRINT` (the thumbprint is base64url, so the last `=` separates).
    pub fn parse(s: &str) -> Result<TangServer, String> {
        let (url, thp) = s.rsplit_once('=').ok_or_else(|| {
            format!(
                "tang-allow {s:?}: give URL=THUMBPRINT, e.g. http://tang.example:7500=yf78M8Mm… \
                 (the server's signing-key thumbprint: `tang-show-keys PORT` on the server)"
            )
        })?;
        let url = normalize_url(url);
        HttpUrl::parse(&url).map_err(|e| format!("tang-allow: {e}"))?;
        if !is_thumbprint(thp) {
            return Err(format!(
                "tang-allow {s:?}: {thp:?} is not a JWK thumbprint (43 base64url characters)"
            ));
        }
        Ok(TangServer {
            url,
            thumbprint: thp.to_owned(),
        })
    }
}

/// What the operator allowed; empty: no Tang token is used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TangSettings {
    pub allowed: Vec<TangServer>,
}

fn normalize_url(u: &str) -> String {
    u.trim_end_matches('/').to_owned()
}

fn transient(url: &str, e: String) -> SealError {
    SealError::Unreachable {
        provider: PROVIDER,
        detail: format!("Tang server {url}: {e}"),
    }
}

/// One HTTP request, retried with back-off while the server is unreachable.
fn request_with_retries(
    url: &str,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> Result<(u16, Vec<u8>), SealError> {
    let parsed = HttpUrl::parse(url).map_err(|e| SealError::Untrusted {
        provider: PROVIDER,
        detail: e,
    })?;
    let mut attempt = 0;
    loop {
        match http::request(&parsed, method, path, body) {
            Ok(r) => return Ok(r),
            Err(HttpError::Protocol(e)) => {
                return Err(SealError::Other {
                    provider: PROVIDER,
                    detail: format!(
                        "Tang server {url} answered {method} {path} with no usable HTTP: {e}"
                    ),
                })
            }
            Err(HttpError::Unreachable(e)) => {
                let Some(delay) = RETRY_DELAYS.get(attempt) else {
                    return Err(transient(
                        url,
                        format!("unreachable after {} attempts: {e}", attempt + 1),
                    ));
                };
                tracing::warn!(url, error = %e, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                               "Tang server unreachable; retrying");
                std::thread::sleep(*delay);
                attempt += 1;
            }
        }
    }
}

/// A P-521 point from a JWK, checked to be on the curve and not the identity.
pub fn jwk_point(jwk: &Map<String, Value>, what: &str) -> Result<ProjectivePoint, SealError> {
    if str_member(jwk, "kty", what)? != "EC" || str_member(jwk, "crv", what)? != "P-521" {
        return Err(bad(format!("{what} is not a P-521 EC key")));
    }
    let x = b64u_decode(str_member(jwk, "x", what)?, what, 66)?;
    let y = b64u_decode(str_member(jwk, "y", what)?, what, 66)?;
    if x.len() != 66 || y.len() != 66 {
        return Err(bad(format!("{what}: P-521 coordinates are 66 bytes")));
    }
    let mut sec1 = Vec::with_capacity(133);
    sec1.push(4);
    sec1.extend_from_slice(&x);
    sec1.extend_from_slice(&y);
    let pk = PublicKey::from_sec1_bytes(&sec1)
        .map_err(|_| bad(format!("{what} is not a point on P-521")))?;
    Ok(pk.to_projective())
}

/// The public JWK of a point: `{"crv","kty","x","y"}`.
fn point_jwk(p: &ProjectivePoint) -> Result<Map<String, Value>, SealError> {
    let enc = p.to_affine().to_sec1_point(false);
    let b = enc.as_bytes();
    if b.len() != 133 {
        return Err(bad("the point at infinity has no JWK".into()));
    }
    let mut m = Map::new();
    m.insert("crv".into(), "P-521".into());
    m.insert("kty".into(), "EC".into());
    m.insert("x".into(), b64u(&b[1..67]).into());
    m.insert("y".into(), b64u(&b[67..133]).into());
    Ok(m)
}

/// x-coordinate of a shared point (the ECDH-ES `Z`).
fn x_coord(p: &ProjectivePoint) -> Result<SecretBytes, SealError> {
    let enc = p.to_affine().to_sec1_point(false);
    let b = enc.as_bytes();
    if b.len() != 133 {
        return Err(SealError::Other {
            provider: PROVIDER,
            detail: "the recovered point is the identity (the server's answer is wrong)".into(),
        });
    }
    Ok(SecretBytes::from_slice(&b[1..67]))
}

fn random_scalar() -> Result<NonZeroScalar, SealError> {
    for _ in 0..64 {
        let mut b = [0u8; 66];
        getrandom::fill(&mut b).map_err(|e| SealError::Other {
            provider: PROVIDER,
            detail: format!("no random bytes: {e}"),
        })?;
        b[0] &= 0x01;
        let Ok(fb) = FieldBytes::try_from(&b[..]) else {
            continue;
        };
        let s = NonZeroScalar::from_repr(fb);
        zeroize::Zeroize::zeroize(&mut b);
        if let Some(s) = Option::<NonZeroScalar>::from(s) {
            return Ok(s);
        }
    }
    Err(SealError::Other {
        provider: PROVIDER,
        detail: "could not draw a scalar".into(),
    })
}

fn has_op(jwk: &Map<String, Value>, op: &str) -> bool {
    jwk.get("key_ops")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|o| o.as_str() == Some(op)))
}

/// Fetches `GET {url}/adv` and checks it is signed (ES512) by the key whose thumbprint the
/// operator gave. Returns the advertised key set (`{"keys":[…]}`).
pub fn fetch_verified_adv(url: &str, thumbprint: &str) -> Result<Map<String, Value>, SealError> {
    let (status, body) = request_with_retries(url, "GET", &format!("/adv/{thumbprint}"), None)?;
    let (status, body) = if status == 404 {
        // An older or rotated server may not know the thumbprint: the plain advertisement
        // still has to carry a signature by that key to pass.
        request_with_retries(url, "GET", "/adv", None)?
    } else {
        (status, body)
    };
    if status != 200 {
        return Err(SealError::Other {
            provider: PROVIDER,
            detail: format!("Tang server {url} answered GET /adv with HTTP {status}"),
        });
    }
    verify_adv(url, &body, thumbprint)
}

/// Checks a JWS advertisement (flattened or general JSON form).
pub fn verify_adv(
    url: &str,
    body: &[u8],
    thumbprint: &str,
) -> Result<Map<String, Value>, SealError> {
    let other = |m: String| SealError::Other {
        provider: PROVIDER,
        detail: format!("Tang server {url}: {m}"),
    };
    let jws: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| other(format!("the advertisement is not JSON: {e}")))?;
    let payload_b64 = str_member(&jws, "payload", "the advertisement")?;
    let payload = b64u_decode(payload_b64, "the advertisement payload", 32 * 1024)?;
    let jwks: Map<String, Value> = serde_json::from_slice(&payload)
        .map_err(|e| other(format!("the advertised key set is not JSON: {e}")))?;
    let keys = jwks
        .get("keys")
        .and_then(Value::as_array)
        .filter(|k| k.len() <= MAX_KEYS)
        .ok_or_else(|| other("the advertisement has no (short) \"keys\" array".into()))?;
    let signing = keys
        .iter()
        .filter_map(Value::as_object)
        .find(|k| has_op(k, "verify") && thumbprint_matches(k, thumbprint))
        .ok_or_else(|| SealError::Untrusted {
            provider: PROVIDER,
            detail: format!(
                "Tang server {url} does not advertise the signing key {thumbprint} the operator \
                 allowed (advertised signing keys: {}); a different server, or its keys were \
                 rotated: check with `tang-show-keys` on the server and update tang-allow",
                keys.iter()
                    .filter_map(Value::as_object)
                    .filter(|k| has_op(k, "verify"))
                    .filter_map(|k| thumbprint_s256(k).ok())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
    let vk_point = jwk_point(signing, "the advertised signing key")?;
    let vk = p521::ecdsa::VerifyingKey::from_affine(AffinePoint::from(vk_point))
        .map_err(|_| other("the signing key is not usable".into()))?;
    let sigs: Vec<(&str, &str)> = match jws.get("signatures").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .take(MAX_KEYS)
            .filter_map(Value::as_object)
            .filter_map(|s| Some((s.get("protected")?.as_str()?, s.get("signature")?.as_str()?)))
            .collect(),
        None => vec![(
            str_member(&jws, "protected", "the advertisement")?,
            str_member(&jws, "signature", "the advertisement")?,
        )],
    };
    let verified = sigs.iter().any(|(prot, sig)| {
        let Ok(p) = b64u_decode(prot, "the signature header", 4096) else {
            return false;
        };
        let alg_ok = serde_json::from_slice::<Map<String, Value>>(&p)
            .ok()
            .is_some_and(|h| h.get("alg").and_then(Value::as_str) == Some("ES512"));
        let Ok(sig) = b64u_decode(sig, "the signature", 256) else {
            return false;
        };
        let Ok(sig) = p521::ecdsa::Signature::from_slice(&sig) else {
            return false;
        };
        alg_ok
            && vk
                .verify(format!("{prot}.{payload_b64}").as_bytes(), &sig)
                .is_ok()
    });
    if !verified {
        return Err(SealError::Untrusted {
            provider: PROVIDER,
            detail: format!(
                "the advertisement from Tang server {url} is not signed by the allowed key \
                 {thumbprint}: refused (someone else answered for that address?)"
            ),
        });
    }
    Ok(jwks)
}

/// The exchange key of a verified key set whose thumbprint is `kid`.
fn exchange_key<'a>(jwks: &'a Map<String, Value>, kid: &str) -> Option<&'a Map<String, Value>> {
    jwks.get("keys")?
        .as_array()?
        .iter()
        .filter_map(Value::as_object)
        .find(|k| has_op(k, "deriveKey") && thumbprint_matches(k, kid))
}

/// Recovers the plaintext of a tang JWE.
pub fn decrypt(jwe: &Jwe, settings: &TangSettings) -> Result<SecretBytes, SealError> {
    if jwe.header.get("alg").and_then(Value::as_str) != Some("ECDH-ES") {
        return Err(bad("a tang JWE uses alg ECDH-ES".into()));
    }
    let tang = jwe.pin_header("tang")?;
    let url = normalize_url(str_member(tang, "url", "the tang header")?);
    // Operator config decides which server may be asked: nothing is sent before this check.
    let allowed: Vec<&TangServer> = settings.allowed.iter().filter(|s| s.url == url).collect();
    if allowed.is_empty() {
        return Err(SealError::Untrusted {
            provider: PROVIDER,
            detail: format!(
                "the token names Tang server {}, which is not allowed: if you trust it, add \
                 --tang-allow URL=THUMBPRINT (TOML: tang-allow) with the thumbprint of its \
                 signing key from `tang-show-keys` on the server",
                shown(&url)
            ),
        });
    }
    let kid = str_member(&jwe.header, "kid", "the tang JWE header")?;
    if !is_thumbprint(kid) {
        return Err(bad("the tang JWE's kid is not a key thumbprint".into()));
    }
    let epk = obj_member(&jwe.header, "epk", "the tang JWE header")?;
    let c_pt = jwk_point(epk, "the JWE's epk")?;

    // Trust the exchange key only as the server proves it, under the operator's thumbprint.
    let mut last_err = None;
    let mut s_pt = None;
    for server in &allowed {
        match fetch_verified_adv(&url, &server.thumbprint) {
            Ok(jwks) => match exchange_key(&jwks, kid) {
                Some(k) => {
                    s_pt = Some(jwk_point(k, "the advertised exchange key")?);
                    break;
                }
                None => {
                    last_err = Some(SealError::Untrusted {
                        provider: PROVIDER,
                        detail: format!(
                            "the token's exchange key {kid} is not among the keys Tang server \
                             {url} advertises under the allowed signing key (keys rotated since \
                             the binding?): rebind with `clevis luks regen` or re-enrol"
                        ),
                    })
                }
            },
            Err(e) => last_err = Some(e),
        }
    }
    let Some(s_pt) = s_pt else {
        return Err(last_err.unwrap_or_else(|| bad("no Tang server".into())));
    };

    // McCallum-Relyea: X = C + e·G goes out; the server answers Y = s·X; K = Y − e·S = s·C.
    let mut e = random_scalar()?;
    let x_pt = c_pt + ProjectivePoint::GENERATOR * *e;
    let mut req = point_jwk(&x_pt)?;
    req.insert("alg".into(), "ECMR".into());
    let body = super::jwe::sorted(Value::Object(req)).to_string();
    let (status, answer) = request_with_retries(
        &url,
        "POST",
        &format!("/rec/{kid}"),
        Some(("application/jwk+json", body.as_bytes())),
    )?;
    if status != 200 {
        return Err(SealError::Other {
            provider: PROVIDER,
            detail: format!(
                "Tang server {url} refused the recovery (HTTP {status}){}",
                if status == 404 {
                    ": it no longer holds the exchange key (rotated keys deleted?)"
                } else {
                    ""
                }
            ),
        });
    }
    let y: Map<String, Value> = serde_json::from_slice(&answer).map_err(|e| SealError::Other {
        provider: PROVIDER,
        detail: format!("Tang server {url}: the recovery answer is not JSON: {e}"),
    })?;
    let y_pt = jwk_point(&y, "the Tang server's answer").map_err(|e| SealError::Other {
        provider: PROVIDER,
        detail: format!("Tang server {url}: {e}"),
    })?;
    let k_pt = y_pt - s_pt * *e;
    zeroize::Zeroize::zeroize(&mut e);
    let z = x_coord(&k_pt)?;
    let cek = Cek(concat_kdf_a256gcm(z.expose_secret()));
    drop(z);
    jwe.decrypt(&cek.0)
}

/// Encrypts `plaintext` to the Tang server at `url`, whose advertisement must be signed by the
/// key `thumbprint` names. Offline after the advertisement, as clevis's `encrypt tang`.
pub fn encrypt(url: &str, thumbprint: &str, plaintext: &[u8]) -> Result<Jwe, SealError> {
    let url = normalize_url(url);
    let jwks = fetch_verified_adv(&url, thumbprint)?;
    let exchange = jwks
        .get("keys")
        .and_then(Value::as_array)
        .and_then(|keys| {
            keys.iter()
                .filter_map(Value::as_object)
                .find(|k| has_op(k, "deriveKey"))
        })
        .ok_or_else(|| SealError::Other {
            provider: PROVIDER,
            detail: format!("Tang server {url} advertises no exchange (deriveKey) key"),
        })?;
    let s_pt = jwk_point(exchange, "the advertised exchange key")?;
    let kid = thumbprint_s256(exchange)?;
    let mut c = random_scalar()?;
    let epk = point_jwk(&(ProjectivePoint::GENERATOR * *c))?;
    let z = x_coord(&(s_pt * *c))?;
    zeroize::Zeroize::zeroize(&mut c);
    let cek = Cek(concat_kdf_a256gcm(z.expose_secret()));
    drop(z);
    let header = json!({
        "alg": "ECDH-ES",
        "enc": "A256GCM",
        "kid": kid,
        "epk": epk,
        "clevis": {"pin": "tang", "tang": {"url": url, "adv": jwks}},
    });
    Jwe::encrypt(&header, &cek.0, plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries_parse() {
        let t =
            TangServer::parse("http://127.0.0.1:7500/=yf78M8MmkSCnVRnc0wpmxaJ7g2jGJXR1ue9UAhLMQCk")
                .unwrap();
        assert_eq!(t.url, "http://127.0.0.1:7500");
        assert_eq!(t.thumbprint, "yf78M8MmkSCnVRnc0wpmxaJ7g2jGJXR1ue9UAhLMQCk");
        assert!(TangServer::parse("http://127.0.0.1:7500").is_err());
        assert!(
            TangServer::parse("https://h=yf78M8MmkSCnVRnc0wpmxaJ7g2jGJXR1ue9UAhLMQCk").is_err()
        );
        assert!(TangServer::parse("http://h=short").is_err());
    }

    /// The McCallum-Relyea algebra with a local "server" key: what the client computes from
    /// the server's answer is the ECDH point of encryption time.
    #[test]
    fn ecmr_recovery_gives_the_encryption_point() {
        let s = random_scalar().unwrap(); // server's exchange key
        let s_pt = ProjectivePoint::GENERATOR * *s;
        let c = random_scalar().unwrap(); // client's ephemeral key at encryption
        let c_pt = ProjectivePoint::GENERATOR * *c;
        let z_enc = x_coord(&(s_pt * *c)).unwrap();
        let e = random_scalar().unwrap();
        let x_pt = c_pt + ProjectivePoint::GENERATOR * *e;
        let y_pt = x_pt * *s; // what tangd answers
        let k_pt = y_pt - s_pt * *e;
        assert_eq!(
            x_coord(&k_pt).unwrap().expose_secret(),
            z_enc.expose_secret()
        );
        // The JWK encoding round-trips and refuses off-curve points.
        let jwk = point_jwk(&c_pt).unwrap();
        assert_eq!(jwk_point(&jwk, "t").unwrap(), c_pt);
        let mut off = jwk.clone();
        off.insert("y".into(), b64u(&[1u8; 66]).into());
        assert!(jwk_point(&off, "t").is_err());
    }

    #[test]
    fn an_unallowed_url_is_refused_before_any_request() {
        // Port 9 on a TEST-NET address: a request would hang or fail as Unreachable; the
        // refusal must come first, as Untrusted.
        let hdr = json!({"alg":"ECDH-ES","enc":"A256GCM","kid":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "clevis":{"pin":"tang","tang":{"url":"http://192.0.2.1:9"}}});
        let jwe = Jwe::encrypt(&hdr, &[0u8; 32], b"x").unwrap();
        let settings = TangSettings {
            allowed: vec![TangServer::parse(
                "http://127.0.0.1:1=yf78M8MmkSCnVRnc0wpmxaJ7g2jGJXR1ue9UAhLMQCk",
            )
            .unwrap()],
        };
        let t0 = std::time::Instant::now();
        let Err(e) = decrypt(&jwe, &settings) else {
            panic!("decrypted")
        };
        assert!(matches!(e, SealError::Untrusted { .. }), "{e}");
        assert!(e.to_string().contains("192.0.2.1:9"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn an_unreachable_server_is_retried_then_reported_as_unreachable() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l); // nothing listens there now
        let t0 = std::time::Instant::now();
        let e = fetch_verified_adv(
            &format!("http://127.0.0.1:{port}"),
            "yf78M8MmkSCnVRnc0wpmxaJ7g2jGJXR1ue9UAhLMQCk",
        )
        .unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(e.to_string().contains("after 3 attempts"), "{e}");
        assert!(
            t0.elapsed() >= Duration::from_millis(2000),
            "no back-off: {:?}",
            t0.elapsed()
        );
    }
}
