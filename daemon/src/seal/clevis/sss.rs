//! clevis's `sss` pin: Shamir's secret sharing over GF(p) around other pins. The content key of
//! the outer JWE is the polynomial's constant term (32 bytes big-endian); each child JWE (any
//! pin, compact form, in `clevis.sss.jwe`) holds one share `x ‖ y`, each `len(p)` bytes.
//!
//! Decryption takes the first `t` children that decrypt and interpolates at 0. Encryption uses
//! the fixed prime 2^256 − 189 (clevis draws a fresh safe prime each time; the readers do not
//! care, and Shamir needs only a prime field larger than the secret).

use num_bigint::BigUint;
use serde_json::{json, Value};

use super::jwe::{b64u, b64u_decode, obj_member, Cek, Jwe};
use super::{bad, ClevisSettings, PinSpec};
use crate::crypto::keys::SecretBytes;
use crate::seal::SealError;

/// Children of one sss node, and the largest threshold.
pub const MAX_CHILDREN: usize = 16;

/// 2^256 − 189, the largest prime below 2^256.
pub fn default_prime() -> BigUint {
    (BigUint::from(1u32) << 256u32) - BigUint::from(189u32)
}

fn to_be_fixed(n: &BigUint, len: usize) -> Option<Vec<u8>> {
    let b = n.to_bytes_be();
    if b.len() > len {
        return None;
    }
    let mut out = vec![0u8; len - b.len()];
    out.extend_from_slice(&b);
    Some(out)
}

/// A uniform number in [lo, p).
fn random_below(p: &BigUint, lo: u32) -> Result<BigUint, SealError> {
    let len = p.to_bytes_be().len();
    for _ in 0..1024 {
        let mut b = vec![0u8; len];
        getrandom::fill(&mut b).map_err(|e| SealError::Other {
            provider: "sss",
            detail: format!("no random bytes: {e}"),
        })?;
        let n = BigUint::from_bytes_be(&b);
        zeroize::Zeroize::zeroize(&mut b);
        if n < *p && n >= BigUint::from(lo) {
            return Ok(n);
        }
    }
    Err(SealError::Other {
        provider: "sss",
        detail: "could not draw a number below p".into(),
    })
}

/// Lagrange interpolation at 0 over GF(p). The points' x must be distinct and nonzero mod p.
pub fn interpolate_at_zero(points: &[(BigUint, BigUint)], p: &BigUint) -> Option<BigUint> {
    let two = BigUint::from(2u32);
    if *p <= two {
        return None;
    }
    let pm2 = p - &two;
    let mut k = BigUint::from(0u32);
    for (i, (xi, yi)) in points.iter().enumerate() {
        let mut acc = BigUint::from(1u32);
        for (j, (xj, _)) in points.iter().enumerate() {
            if i == j {
                continue;
            }
            let num = (p - xj % p) % p;
            let den = ((xi % p) + p - xj % p) % p;
            if den == BigUint::from(0u32) {
                return None;
            }
            // Fermat inverse: p is prime for every field we build; for a header's p that is
            // not, the result is garbage and the GCM tag fails.
            acc = acc * num % p * den.modpow(&pm2, p) % p;
        }
        k = (k + acc * (yi % p)) % p;
    }
    Some(k)
}

/// Recovers the plaintext of an sss JWE by decrypting children (through `settings`) until
/// `t` shares are in hand.
pub fn decrypt(jwe: &Jwe, settings: &ClevisSettings, depth: u32) -> Result<SecretBytes, SealError> {
    if jwe.header.get("alg").and_then(Value::as_str) != Some("dir") {
        return Err(bad("an sss JWE uses alg dir".into()));
    }
    let sss = jwe.pin_header("sss")?;
    let p_bytes = b64u_decode(
        sss.get("p").and_then(Value::as_str).unwrap_or(""),
        "sss p",
        64,
    )?;
    if p_bytes.len() != 32 {
        return Err(bad(format!(
            "sss p is {} bytes; A256GCM needs a 32-byte field",
            p_bytes.len()
        )));
    }
    let p = BigUint::from_bytes_be(&p_bytes);
    if p.bits() < 200 {
        return Err(bad("sss p is too small".into()));
    }
    let t = sss
        .get("t")
        .and_then(Value::as_u64)
        .filter(|t| (1..=MAX_CHILDREN as u64).contains(t))
        .ok_or_else(|| bad(format!("sss t must be 1..={MAX_CHILDREN}")))?;
    let children = sss
        .get("jwe")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty() && a.len() <= MAX_CHILDREN)
        .ok_or_else(|| {
            bad(format!(
                "sss jwe must be an array of 1..={MAX_CHILDREN} JWEs"
            ))
        })?;
    let t = usize::try_from(t).unwrap_or(MAX_CHILDREN);
    if t > children.len() {
        return Err(bad(format!(
            "sss t = {t} but only {} shares exist",
            children.len()
        )));
    }
    let mut points: Vec<(BigUint, BigUint)> = Vec::new();
    let mut failures: Vec<(usize, String, SealError)> = Vec::new();
    for (i, c) in children.iter().enumerate() {
        if points.len() == t {
            break;
        }
        let child = match c
            .as_str()
            .ok_or_else(|| bad("an sss share is not a compact JWE string".into()))
            .and_then(Jwe::from_compact)
        {
            Ok(j) => j,
            Err(e) => {
                failures.push((i, "?".into(), e));
                continue;
            }
        };
        let pin = super::shown(child.pin().unwrap_or("?"));
        let share = match super::decrypt_jwe(&child, settings, depth + 1) {
            Ok(s) => s,
            Err(e) => {
                failures.push((i, pin, e));
                continue;
            }
        };
        let s = share.expose_secret();
        if s.len() != 64 {
            failures.push((
                i,
                pin,
                bad(format!("share of {} bytes, expected 64", s.len())),
            ));
            continue;
        }
        let x = BigUint::from_bytes_be(&s[..32]);
        let y = BigUint::from_bytes_be(&s[32..]);
        if x == BigUint::from(0u32) || points.iter().any(|(px, _)| *px == x) {
            failures.push((i, pin, bad("a repeated or zero share".into())));
            continue;
        }
        points.push((x, y));
    }
    if points.len() < t {
        let transient = failures.iter().any(|(_, _, e)| e.is_transient());
        let detail = format!(
            "{} of {t} shares recovered ({} in all): {}",
            points.len(),
            children.len(),
            failures
                .iter()
                .map(|(i, pin, e)| format!("share {} ({pin}): {e}", i + 1))
                .collect::<Vec<_>>()
                .join("; ")
        );
        return Err(if transient {
            SealError::Unreachable {
                provider: "sss",
                detail,
            }
        } else {
            SealError::Other {
                provider: "sss",
                detail,
            }
        });
    }
    let k = interpolate_at_zero(&points, &p).ok_or_else(|| bad("sss: bad shares".into()))?;
    let mut cek = Cek([0u8; 32]);
    let kb = to_be_fixed(&k, 32).ok_or_else(|| bad("sss: secret wider than p".into()))?;
    cek.0.copy_from_slice(&kb);
    jwe.decrypt(&cek.0)
}

/// Encrypts `plaintext` so that any `t` of `pins` recover it.
pub fn encrypt(
    t: usize,
    pins: &[PinSpec],
    plaintext: &[u8],
    settings: &ClevisSettings,
) -> Result<Jwe, SealError> {
    if t == 0 || t > pins.len() || pins.len() > MAX_CHILDREN {
        return Err(bad(format!(
            "sss needs 1 <= t <= number of pins <= {MAX_CHILDREN} (t = {t}, {} pins)",
            pins.len()
        )));
    }
    let p = default_prime();
    let coeffs = (0..t)
        .map(|_| random_below(&p, 0))
        .collect::<Result<Vec<_>, _>>()?;
    let mut cek = Cek([0u8; 32]);
    cek.0
        .copy_from_slice(&to_be_fixed(&coeffs[0], 32).ok_or_else(|| bad("coefficient".into()))?);
    let mut xs: Vec<BigUint> = Vec::new();
    let mut jwes = Vec::new();
    for pin in pins {
        let x = loop {
            let x = random_below(&p, 1)?;
            if !xs.contains(&x) {
                break x;
            }
        };
        // y = Σ e_i x^i (Horner).
        let mut y = BigUint::from(0u32);
        for c in coeffs.iter().rev() {
            y = (y * &x + c) % &p;
        }
        let mut share = to_be_fixed(&x, 32).unwrap_or_default();
        share.extend_from_slice(&to_be_fixed(&y, 32).unwrap_or_default());
        let child = super::encrypt(pin, &share, settings);
        zeroize::Zeroize::zeroize(&mut share);
        jwes.push(Value::String(child?.to_compact()));
        xs.push(x);
    }
    let header = json!({
        "alg": "dir",
        "enc": "A256GCM",
        "clevis": {"pin": "sss", "sss": {"jwe": jwes, "p": b64u(&to_be_fixed(&p, 32).unwrap_or_default()), "t": t}},
    });
    Jwe::encrypt(&header, &cek.0, plaintext)
}

/// The children of an sss header, for listings.
pub fn children(jwe: &Jwe) -> Result<(u64, Vec<Jwe>), SealError> {
    let sss = obj_member(
        super::jwe::obj_member(&jwe.header, "clevis", "the JWE header")?,
        "sss",
        "the clevis header",
    )?;
    let t = sss.get("t").and_then(Value::as_u64).unwrap_or(0);
    let list = sss
        .get("jwe")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .take(MAX_CHILDREN)
                .filter_map(Value::as_str)
                .filter_map(|s| Jwe::from_compact(s).ok())
                .collect()
        })
        .unwrap_or_default();
    Ok((t, list))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_probable_prime(n: &BigUint) -> bool {
        let one = BigUint::from(1u32);
        let nm1 = n - &one;
        let mut d = nm1.clone();
        let mut r = 0;
        while (&d % 2u32) == BigUint::from(0u32) {
            d >>= 1;
            r += 1;
        }
        'witness: for a in [2u32, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47] {
            let mut x = BigUint::from(a).modpow(&d, n);
            if x == one || x == nm1 {
                continue;
            }
            for _ in 1..r {
                x = x.modpow(&BigUint::from(2u32), n);
                if x == nm1 {
                    continue 'witness;
                }
            }
            return false;
        }
        true
    }

    #[test]
    fn the_field_is_a_256_bit_prime() {
        let p = default_prime();
        assert_eq!(p.bits(), 256);
        assert!(is_probable_prime(&p));
        assert!(!is_probable_prime(&(&p - 2u32)));
    }

    #[test]
    fn any_t_shares_interpolate_to_the_secret_and_fewer_do_not() {
        let p = default_prime();
        let coeffs: Vec<BigUint> = (0..3).map(|_| random_below(&p, 0).unwrap()).collect();
        let pts: Vec<(BigUint, BigUint)> = (0..5)
            .map(|_| {
                let x = random_below(&p, 1).unwrap();
                let mut y = BigUint::from(0u32);
                for c in coeffs.iter().rev() {
                    y = (y * &x + c) % &p;
                }
                (x, y)
            })
            .collect();
        for (a, b, c) in [(0, 1, 2), (0, 3, 4), (2, 3, 4), (4, 1, 0)] {
            let subset = [pts[a].clone(), pts[b].clone(), pts[c].clone()];
            assert_eq!(interpolate_at_zero(&subset, &p).unwrap(), coeffs[0]);
        }
        let two = [pts[0].clone(), pts[1].clone()];
        assert_ne!(interpolate_at_zero(&two, &p).unwrap(), coeffs[0]);
        let dup = [pts[0].clone(), pts[0].clone()];
        assert!(interpolate_at_zero(&dup, &p).is_none());
    }
}
