//! Key material. Every type here keeps its bytes in one locked, page-aligned heap allocation
//! ([`crate::sys::LockedBuf`]: `mlock`ed best effort, excluded from core dumps, wiped then
//! unlocked on drop), has no `Debug`/`Display`/`Clone`, and is read only through
//! `expose_secret()`, so a grep finds every place a secret is touched.
//!
//! Moving a key moves a pointer, never the bytes, so no stale copies are left behind.

use zeroize::Zeroize;

use crate::sys::LockedBuf;

/// A secret byte string of any length (passphrase, key-file contents, derived key).
pub struct SecretBytes(LockedBuf);

impl SecretBytes {
    /// Copies `bytes` into locked memory. The caller still owns (and should wipe) `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Self {
        SecretBytes(LockedBuf::from_slice(bytes))
    }

    /// Takes ownership of `bytes`: they are copied into locked memory and the vector's buffer
    /// (its whole capacity) is wiped at once.
    pub fn from_vec(mut bytes: Vec<u8>) -> Self {
        let secret = SecretBytes::from_slice(&bytes);
        bytes.zeroize();
        secret
    }

    /// `len` zero bytes in locked memory, to be filled through `expose_secret_mut()`.
    pub fn zeroed(len: usize) -> Self {
        SecretBytes(LockedBuf::zeroed(len))
    }

    pub fn expose_secret(&self) -> &[u8] {
        self.0.as_slice()
    }

    pub fn expose_secret_mut(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The LUKS2 volume key: both AES-XTS halves (32 or 64 bytes).
pub struct VolumeKey(SecretBytes);

impl VolumeKey {
    pub fn from_slice(bytes: &[u8]) -> Self {
        VolumeKey(SecretBytes::from_slice(bytes))
    }

    /// Wraps bytes that are already in locked memory (e.g. the output of an AF merge) without
    /// another copy.
    pub fn from_secret(bytes: SecretBytes) -> Self {
        VolumeKey(bytes)
    }

    pub fn expose_secret(&self) -> &[u8] {
        self.0.expose_secret()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_bytes_from_slice_round_trips() {
        let s = SecretBytes::from_slice(b"correct horse");
        assert_eq!(s.expose_secret(), b"correct horse");
        assert_eq!(s.len(), 13);
        assert!(!s.is_empty());
    }

    #[test]
    fn secret_bytes_from_vec_keeps_contents() {
        let s = SecretBytes::from_vec(vec![1, 2, 3]);
        assert_eq!(s.expose_secret(), &[1, 2, 3]);
    }

    #[test]
    fn secret_bytes_zeroed_is_zero_and_writable() {
        let mut s = SecretBytes::zeroed(64);
        assert!(s.expose_secret().iter().all(|&b| b == 0));
        s.expose_secret_mut()[63] = 0xaa;
        assert_eq!(s.expose_secret()[63], 0xaa);
    }

    #[test]
    fn empty_secrets_are_allowed() {
        assert!(SecretBytes::zeroed(0).is_empty());
        assert!(SecretBytes::from_vec(Vec::new()).is_empty());
        assert!(VolumeKey::from_slice(&[]).is_empty());
    }

    #[test]
    fn moving_a_key_does_not_move_its_bytes() {
        let key = VolumeKey::from_slice(&[5u8; 64]);
        let before = key.expose_secret().as_ptr();
        let moved = Box::new(key);
        assert_eq!(moved.expose_secret().as_ptr(), before);
        assert_eq!(moved.len(), 64);
    }

    #[test]
    fn volume_key_from_secret_takes_the_buffer() {
        let secret = SecretBytes::from_slice(&[9u8; 32]);
        let ptr = secret.expose_secret().as_ptr();
        let key = VolumeKey::from_secret(secret);
        assert_eq!(key.expose_secret().as_ptr(), ptr);
        assert_eq!(key.expose_secret(), &[9u8; 32]);
    }
}
