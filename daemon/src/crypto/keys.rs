//! Key material. Every type here zeroizes on drop, has no Debug/Display, and is read only
//! through `expose_secret()`, so a grep finds every place a secret is touched.
//!
//! (Locked memory arrives with `sys`; the API below stays the same.)

use zeroize::Zeroize;

/// A secret byte string of any length (passphrase, key-file contents, derived key).
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn from_slice(bytes: &[u8]) -> Self {
        SecretBytes(bytes.to_vec())
    }

    /// Takes ownership of `bytes`; the vector's buffer is wiped when this value drops.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        SecretBytes(bytes)
    }

    pub fn zeroed(len: usize) -> Self {
        SecretBytes(vec![0; len])
    }

    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    pub fn expose_secret_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for SecretBytes {
    #[inline(never)]
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// The LUKS2 volume key: both AES-XTS halves (32 or 64 bytes).
pub struct VolumeKey(SecretBytes);

impl VolumeKey {
    pub fn from_slice(bytes: &[u8]) -> Self {
        VolumeKey(SecretBytes::from_slice(bytes))
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
