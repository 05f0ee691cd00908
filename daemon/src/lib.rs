//! nbdcrypt: an AES-XTS encrypted LUKS2 volume served over NBD.
//!
//! A request travels top to bottom through these layers:
//!
//! ```text
//!  socket (server)  ->  nbd::codec  ->  nbd::handshake / nbd::session
//!      ->  block::BlockDevice  (block::latch -> block::crypt -> block::file)  ->  file or device
//! ```
//!
//! `nbdcryptctl` reuses the on-disk format (`luks2`), the sector crypto (`crypto`) and the
//! control protocol from this library.
#![deny(unsafe_code)]

pub mod audit;
pub mod block;
pub mod config;
pub mod config_file;
pub mod control;
pub mod crypto;
pub mod demo;
pub mod export;
pub mod luks2;
pub mod nbd;
pub mod notify;
pub mod seal;
pub mod secret_file;
pub mod server;
pub mod shutdown;
pub mod socket;
pub mod sys;
pub mod unlock;
