//! Server-wide shutdown: a latched flag every task can wait on.

use tokio::sync::watch;

/// Cloneable handle: `triggered()` resolves once shutdown has begun, however late one asks.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    pub async fn triggered(&mut self) {
        // An error means the trigger was dropped, which only happens when the server is exiting.
        let _ = self.rx.wait_for(|v| *v).await;
    }
}
