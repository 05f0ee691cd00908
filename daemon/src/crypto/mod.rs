//! Sector crypto and key material: AES-XTS over whole sectors, key types that wipe themselves,
//! and the LUKS2 anti-forensic splitter and key derivation functions.

pub mod af;
pub mod block_hash;
pub mod kdf;
pub mod keys;
pub mod xts;
