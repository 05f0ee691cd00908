//! Shamir secret sharing over GF(2^8) (our own, small implementation; no crate).
//!
//! Each byte of the secret is the constant term of its own random polynomial of degree k-1;
//! share `x` (1..=255) holds the polynomial values at `x`. Any k shares give the secret back by
//! Lagrange interpolation at 0; fewer give no information about it (every value of the secret
//! is equally likely). The field is GF(2^8) with the AES polynomial x^8+x^4+x^3+x+1 (0x11b).
//!
//! Arithmetic is branch-free and table-free (no secret-dependent memory access or branches):
//! multiplication by shift-and-add with masks, inversion as a^254. The cost is a few thousand
//! operations per 32-byte secret: nothing next to a KDF or a KMS round trip.
//!
//! Shares are [`SecretBytes`] (locked, wiped memory). Nothing here authenticates a share: a
//! wrong share gives a wrong secret silently. Callers tag each share (`luks2::tokens::quorum`).

use crate::crypto::keys::SecretBytes;

/// Most shares one secret can have (x is a non-zero byte).
pub const MAX_SHARES: usize = 255;

/// One share: the evaluation point `x` (1..=255) and the values there.
pub struct Share {
    pub x: u8,
    pub y: SecretBytes,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("x", &self.x)
            .field("y", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    #[error("a quorum of {k} out of {n} shares is impossible (need 1 <= k <= n <= {MAX_SHARES})")]
    BadThreshold { k: usize, n: usize },
    #[error("no shares given")]
    NoShares,
    #[error("share index 0 is not valid (it would be the secret itself)")]
    ZeroIndex,
    #[error("share index {0} appears twice")]
    DuplicateIndex(u8),
    #[error("shares have different lengths")]
    LengthMismatch,
    #[error("more than {MAX_SHARES} shares")]
    TooManyShares,
    #[error("empty secret")]
    EmptySecret,
    #[error("cannot get random bytes: {0}")]
    Random(String),
}

/// Multiplication in GF(2^8) mod 0x11b, constant time.
fn mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    for _ in 0..8 {
        // mask = 0xff if the low bit of b is set, else 0.
        let mask = (b & 1).wrapping_neg();
        p ^= a & mask;
        let carry = (a >> 7).wrapping_neg();
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
    }
    p
}

/// Multiplicative inverse (a^254); inv(0) = 0, never asked for by the callers below.
fn inv(a: u8) -> u8 {
    // 254 = 0b11111110: square-and-multiply with a fixed sequence.
    let mut result = 1u8;
    let mut base = a;
    let mut e = 254u8;
    for _ in 0..8 {
        let mask = (e & 1).wrapping_neg();
        let prod = mul(result, base);
        result = (prod & mask) | (result & !mask);
        base = mul(base, base);
        e >>= 1;
    }
    result
}

/// Splits `secret` into shares at `xs` (distinct, non-zero), any `k` of which recover it.
pub fn split_at(secret: &[u8], k: usize, xs: &[u8]) -> Result<Vec<Share>, ShamirError> {
    let n = xs.len();
    if k == 0 || k > n || n > MAX_SHARES {
        return Err(ShamirError::BadThreshold { k, n });
    }
    if secret.is_empty() {
        return Err(ShamirError::EmptySecret);
    }
    check_indices(xs.iter().copied())?;
    // coefficients[i * (k-1) + j]: coefficient j+1 of byte i's polynomial.
    let mut coefficients = SecretBytes::zeroed(secret.len() * (k - 1));
    getrandom::fill(coefficients.expose_secret_mut())
        .map_err(|e| ShamirError::Random(e.to_string()))?;
    let c = coefficients.expose_secret();
    let mut shares = Vec::with_capacity(n);
    for &x in xs {
        let mut y = SecretBytes::zeroed(secret.len());
        for (i, out) in y.expose_secret_mut().iter_mut().enumerate() {
            // Horner: ((c_{k-1} x + c_{k-2}) x + ...) x + s
            let mut acc = 0u8;
            for j in (0..k - 1).rev() {
                acc = mul(acc, x) ^ c[i * (k - 1) + j];
            }
            *out = mul(acc, x) ^ secret[i];
        }
        shares.push(Share { x, y });
    }
    Ok(shares)
}

/// Splits `secret` into `n` shares at x = 1..=n, any `k` of which recover it.
pub fn split(secret: &[u8], k: usize, n: usize) -> Result<Vec<Share>, ShamirError> {
    if n == 0 || n > MAX_SHARES {
        return Err(ShamirError::BadThreshold { k, n });
    }
    let xs: Vec<u8> = (1..=n).filter_map(|x| u8::try_from(x).ok()).collect();
    split_at(secret, k, &xs)
}

fn check_indices(xs: impl Iterator<Item = u8>) -> Result<(), ShamirError> {
    let mut seen = [false; 256];
    let mut count = 0usize;
    for x in xs {
        count += 1;
        if count > MAX_SHARES {
            return Err(ShamirError::TooManyShares);
        }
        if x == 0 {
            return Err(ShamirError::ZeroIndex);
        }
        let slot = &mut seen[usize::from(x)];
        if *slot {
            return Err(ShamirError::DuplicateIndex(x));
        }
        *slot = true;
    }
    Ok(())
}

/// Recovers the secret from shares (all of them are used: pass exactly the threshold's worth,
/// or more; with fewer the result is a wrong secret, which the caller's check must catch).
pub fn combine(shares: &[&Share]) -> Result<SecretBytes, ShamirError> {
    let Some(first) = shares.first() else {
        return Err(ShamirError::NoShares);
    };
    check_indices(shares.iter().map(|s| s.x))?;
    let len = first.y.len();
    if len == 0 {
        return Err(ShamirError::EmptySecret);
    }
    if shares.iter().any(|s| s.y.len() != len) {
        return Err(ShamirError::LengthMismatch);
    }
    // Lagrange basis at 0: l_i = prod_{j != i} x_j / (x_j - x_i); minus is xor.
    let basis: Vec<u8> = shares
        .iter()
        .map(|si| {
            let (mut num, mut den) = (1u8, 1u8);
            for sj in shares {
                if sj.x != si.x {
                    num = mul(num, sj.x);
                    den = mul(den, sj.x ^ si.x);
                }
            }
            mul(num, inv(den))
        })
        .collect();
    let mut out = SecretBytes::zeroed(len);
    for (s, l) in shares.iter().zip(&basis) {
        for (o, y) in out.expose_secret_mut().iter_mut().zip(s.y.expose_secret()) {
            *o ^= mul(*y, *l);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Vec<u8> {
        (0..32u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect()
    }

    #[test]
    fn field_arithmetic_matches_the_aes_field() {
        // FIPS-197 4.2: {57} * {83} = {c1}; {57} * {13} = {fe}.
        assert_eq!(mul(0x57, 0x83), 0xc1);
        assert_eq!(mul(0x57, 0x13), 0xfe);
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "inverse of {a}");
            assert_eq!(mul(a, 1), a);
            assert_eq!(mul(a, 0), 0);
        }
        // Commutative and associative on a sample.
        for a in (0..=255u8).step_by(7) {
            for b in (0..=255u8).step_by(11) {
                assert_eq!(mul(a, b), mul(b, a));
                assert_eq!(mul(mul(a, b), 3), mul(a, mul(b, 3)));
            }
        }
    }

    #[test]
    fn any_k_of_n_recover_the_secret_and_fewer_do_not() {
        let s = secret();
        for (k, n) in [(1, 1), (1, 3), (2, 3), (3, 5), (5, 5)] {
            let shares = split(&s, k, n).unwrap();
            assert_eq!(shares.len(), n);
            // every subset of size k
            for mask in 0u32..(1 << n) {
                let subset: Vec<&Share> = shares
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, s)| s)
                    .collect();
                if subset.len() == k {
                    assert_eq!(combine(&subset).unwrap().expose_secret(), &s[..]);
                } else if !subset.is_empty() && subset.len() < k {
                    assert_ne!(combine(&subset).unwrap().expose_secret(), &s[..]);
                }
            }
        }
    }

    #[test]
    fn shares_at_chosen_points_and_large_indices() {
        let s = secret();
        let shares = split_at(&s, 2, &[7, 200, 255]).unwrap();
        assert_eq!(
            combine(&[&shares[2], &shares[0]]).unwrap().expose_secret(),
            &s[..]
        );
        let all = split(&s, 200, 255).unwrap();
        let pick: Vec<&Share> = all.iter().rev().take(200).collect();
        assert_eq!(combine(&pick).unwrap().expose_secret(), &s[..]);
    }

    #[test]
    fn a_single_share_says_nothing_with_k_at_least_two() {
        // Two splits of the same secret give unrelated shares at the same point.
        let s = secret();
        let a = split(&s, 2, 2).unwrap();
        let b = split(&s, 2, 2).unwrap();
        assert_ne!(a[0].y.expose_secret(), b[0].y.expose_secret());
        assert_ne!(a[0].y.expose_secret(), &s[..]);
    }

    #[test]
    fn a_wrong_share_gives_a_wrong_secret() {
        let s = secret();
        let mut shares = split(&s, 2, 3).unwrap();
        shares[1].y.expose_secret_mut()[0] ^= 1;
        let got = combine(&[&shares[0], &shares[1]]).unwrap();
        assert_ne!(got.expose_secret(), &s[..]);
    }

    fn cerr(shares: &[&Share]) -> ShamirError {
        match combine(shares) {
            Ok(_) => panic!("combined"),
            Err(e) => e,
        }
    }

    #[test]
    fn hostile_counts_and_indices_are_refused() {
        let s = secret();
        assert_eq!(
            split(&s, 0, 3).unwrap_err(),
            ShamirError::BadThreshold { k: 0, n: 3 }
        );
        assert_eq!(
            split(&s, 4, 3).unwrap_err(),
            ShamirError::BadThreshold { k: 4, n: 3 }
        );
        assert!(split(&s, 2, 256).is_err());
        assert!(split(&s, 2, 0).is_err());
        assert_eq!(split(&[], 1, 1).unwrap_err(), ShamirError::EmptySecret);
        assert_eq!(
            split_at(&s, 2, &[1, 0]).unwrap_err(),
            ShamirError::ZeroIndex
        );
        assert_eq!(
            split_at(&s, 2, &[3, 3]).unwrap_err(),
            ShamirError::DuplicateIndex(3)
        );
        let shares = split(&s, 2, 3).unwrap();
        assert_eq!(cerr(&[]), ShamirError::NoShares);
        assert_eq!(
            cerr(&[&shares[0], &shares[0]]),
            ShamirError::DuplicateIndex(1)
        );
        let zero = Share {
            x: 0,
            y: SecretBytes::from_slice(&s),
        };
        assert_eq!(cerr(&[&zero, &shares[1]]), ShamirError::ZeroIndex);
        let short = Share {
            x: 9,
            y: SecretBytes::from_slice(&s[..5]),
        };
        assert_eq!(cerr(&[&shares[0], &short]), ShamirError::LengthMismatch);
        let empty = Share {
            x: 9,
            y: SecretBytes::zeroed(0),
        };
        assert_eq!(cerr(&[&empty]), ShamirError::EmptySecret);
        // 256 shares cannot have distinct non-zero indices.
        let many: Vec<Share> = (0..256)
            .map(|i| Share {
                x: u8::try_from(i % 255 + 1).unwrap(),
                y: SecretBytes::from_slice(&[1]),
            })
            .collect();
        let refs: Vec<&Share> = many.iter().collect();
        assert_eq!(cerr(&refs), ShamirError::TooManyShares);
    }

    #[test]
    fn debug_never_shows_share_values() {
        let shares = split(&[0x42; 4], 1, 1).unwrap();
        let d = format!("{:?}", shares[0]);
        assert!(d.contains("redacted") && !d.contains("66"), "{d}");
    }
}
