//! systemd readiness and status (Type=notify units). Outside systemd ($NOTIFY_SOCKET unset)
//! every call is a no-op.

use std::sync::Arc;

use sd_notify::NotifyState;
use tracing::debug;

use crate::export::ExportTable;

/// The daemon listens and the control socket is up (the volume may still be locked).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: finishing requests in flight"),
    ]);
}

/// Keep STATUS= in step with lock state, so `systemctl status` shows locked/unlocked.
pub fn follow_lock_state(exports: Arc<ExportTable>) {
    let mut rx = exports.watch_published();
    tokio::spawn(async move {
        loop {
            let unlocked = *rx.borrow_and_update();
            let status = if unlocked {
                format!("unlocked: serving export {:?}", exports.name())
            } else {
                format!(
                    "locked: unlock with `nbdcryptctl unlock` (export {:?})",
                    exports.name()
                )
            };
            send(&[NotifyState::Status(&status)]);
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        debug!(error = %e, "sd_notify failed");
    }
}
