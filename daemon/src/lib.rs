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
// The cast lints guard code that handles disk and peer input. Unit tests build their inputs with
// deliberate casts (fillers, offsets into in-memory models), as the tests and benches crates do, so
// they are exempt; the library itself is still checked, in its non-test build.
#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        clippy::cast_sign_loss
    )
)]

pub mod audit;
pub mod block;
pub mod config;
pub mod config_file;
pub mod control;
pub mod crypto;
pub mod demo;
pub mod export;
pub mod luks2;
pub mod metrics;
pub mod nbd;
pub mod notify;
pub mod seal;
pub mod secret_file;
pub mod server;
pub mod shutdown;
pub mod socket;
pub mod tls;
// `unsafe_code` is denied workspace-wide; `sys` is one of the three fenced modules allowed it. Its
// invariants: each block wraps one system or allocator call and states its SAFETY argument (see
// the module docs and every `// SAFETY:` comment in sys.rs).
#[allow(unsafe_code)]
pub mod sys;
pub mod unlock;
pub mod upstream;
