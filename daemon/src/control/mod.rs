//! The control plane: how an operator unlocks, locks and inspects the running daemon.
//!
//! ```text
//!  nbdcryptctl ──client──> control.sock ──server──> VolumeManager task ──> ExportTable
//!               one JSON line each way      peer-credential check   publish / withdraw
//! ```
//!
//! - `proto`: the versioned request/response types and their wire form (shared with ctl).
//! - `server`: the root-only Unix socket, peer-credential check, one task per client.
//! - `volume`: the one task that owns lock state, the unlocked device and the rate limit.
//! - `client`: a blocking client for `nbdcryptctl` (one request, one response).
//!
//! Wiring it into the daemon:
//!
//! ```ignore
//! let (volume, volume_task) = VolumeManager::new(exports.clone(), info, unlocker).spawn(shutdown.clone());
//! let control = ControlListener::bind(&control_path).await?;
//! tokio::spawn(control::server::run(control, volume, shutdown.clone()));
//! // ... server::run(...) returns after shutdown ...
//! volume_task.await??; // final flush of the unlocked device
//! ```

pub mod client;
pub mod proto;
pub mod server;
pub mod volume;

pub use server::ControlListener;
pub use volume::{Origin, Policy, UnlockError, Unlocker, VolumeHandle, VolumeInfo, VolumeManager};

/// Where nbdcryptd listens for control requests unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/nbdcrypt/control.sock";

/// Environment variable that overrides `DEFAULT_SOCKET` for nbdcryptctl (and the daemon's flag
/// default, if it chooses to read it).
pub const SOCKET_ENV: &str = "NBDCRYPT_CONTROL";
