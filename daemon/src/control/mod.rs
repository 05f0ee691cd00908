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
//! Wiring it into the daemon (after the NBD listeners are bound, before reporting ready):
//!
//! ```ignore
//! let control = ControlPlane::start(&control_path, exports.clone(), info, unlocker, rekeyer, audit, shutdown.clone()).await?;
//! server::run(&config.server, listeners, exports.clone(), shutdown).await?;
//! control.finish().await?; // after shutdown: final flush of an unlocked volume, key wiped
//! ```

pub mod client;
pub mod proto;
pub mod server;
pub mod volume;

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::block;
use crate::export::ExportTable;
use crate::shutdown::Shutdown;

pub use server::ControlListener;
pub use volume::{
    Origin, Policy, Rekeyer, StatusHook, UnlockError, UnlockWith, Unlocker, VolumeHandle,
    VolumeInfo, VolumeManager,
};

/// Where nbdcryptd listens for control requests unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/nbdcrypt/control.sock";

/// Environment variable that overrides `DEFAULT_SOCKET` for nbdcryptctl (and the daemon's flag
/// default, if it chooses to read it).
pub const SOCKET_ENV: &str = "NBDCRYPT_CONTROL";

/// The control socket and the volume manager, started together.
pub struct ControlPlane {
    /// For in-process callers (tests, a future systemd credential unlock at start-up).
    pub volume: VolumeHandle,
    volume_task: JoinHandle<Result<(), block::Error>>,
    server_task: JoinHandle<()>,
}

impl ControlPlane {
    /// Bind the control socket at `socket` (mode 0600) and start the volume manager, locked.
    pub async fn start(
        socket: &Path,
        exports: Arc<ExportTable>,
        info: VolumeInfo,
        unlocker: Unlocker,
        rekeyer: Option<Rekeyer>,
        audit: Arc<crate::audit::AuditLog>,
        shutdown: Shutdown,
    ) -> io::Result<ControlPlane> {
        Self::start_with_status(
            socket, exports, info, unlocker, rekeyer, audit, shutdown, None,
        )
        .await
    }

    /// [`ControlPlane::start`], with words `status` adds while locked (a quorum being
    /// assembled).
    #[allow(clippy::too_many_arguments)]
    pub async fn start_with_status(
        socket: &Path,
        exports: Arc<ExportTable>,
        info: VolumeInfo,
        unlocker: Unlocker,
        rekeyer: Option<Rekeyer>,
        audit: Arc<crate::audit::AuditLog>,
        shutdown: Shutdown,
        status: Option<StatusHook>,
    ) -> io::Result<ControlPlane> {
        let listener = ControlListener::bind(socket).await?;
        let mut manager = VolumeManager::new(exports, info, unlocker).with_audit(audit);
        if let Some(r) = rekeyer {
            manager = manager.with_rekeyer(r);
        }
        if let Some(h) = status {
            manager = manager.with_status_hook(h);
        }
        let (volume, volume_task) = manager.spawn(shutdown.clone());
        let server_task = tokio::spawn(server::run(listener, volume.clone(), shutdown));
        Ok(ControlPlane {
            volume,
            volume_task,
            server_task,
        })
    }

    /// Wait, after shutdown was triggered, for the control socket to close and for the volume
    /// manager to flush and drop an unlocked device. The error is that final flush's.
    pub async fn finish(self) -> Result<(), block::Error> {
        let _ = self.server_task.await;
        match self.volume_task.await {
            Ok(res) => res,
            // The task panicked: nothing was flushed by it.
            Err(_) => Err(block::Error::new(block::ErrorKind::Io)),
        }
    }
}
