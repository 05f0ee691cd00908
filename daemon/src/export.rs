//! The export a server offers: its name, and the device behind it while the volume is unlocked.
//!
//! One volume per daemon. While the volume is locked the table still knows the name, so option
//! replies can say "locked" rather than "unknown".

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::block::BlockDevice;

/// An export that can serve I/O right now.
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// False for the unencrypted comparison mode; shown in logs and status.
    pub encrypted: bool,
    pub stats: IoStats,
}

/// Request counters for status output.
#[derive(Default)]
pub struct IoStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
    pub errors: AtomicU64,
}

impl IoStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Result of looking an export name up during the handshake.
pub enum Lookup {
    Ready(Arc<Export>),
    /// The name is ours but the volume is locked.
    Locked,
    Unknown,
}

pub struct ExportTable {
    name: String,
    description: String,
    current: RwLock<Option<Arc<Export>>>,
    /// Bumped when the export is withdrawn (lock): sessions watching it finish and close.
    generation: watch::Sender<u64>,
    /// Whether a device is published; for readiness/status reporting (systemd STATUS=).
    published: watch::Sender<bool>,
    attached: AtomicUsize,
}

impl ExportTable {
    pub fn new(name: String, description: String) -> Arc<Self> {
        let (generation, _) = watch::channel(0);
        let (published, _) = watch::channel(false);
        Arc::new(ExportTable {
            name,
            description,
            current: RwLock::new(None),
            generation,
            published,
            attached: AtomicUsize::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// "" selects the default (our only) export.
    pub fn lookup(&self, name: &str) -> Lookup {
        if !name.is_empty() && name != self.name {
            return Lookup::Unknown;
        }
        match self.current() {
            Some(e) => Lookup::Ready(e),
            None => Lookup::Locked,
        }
    }

    pub fn current(&self) -> Option<Arc<Export>> {
        // A poisoned lock only means a panic elsewhere mid-swap; the Option is still whole.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Offer `device` (unlock).
    pub fn publish(&self, device: Arc<dyn BlockDevice>, encrypted: bool) -> Arc<Export> {
        let export = Arc::new(Export {
            name: self.name.clone(),
            description: self.description.clone(),
            device,
            encrypted,
            stats: IoStats::default(),
        });
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(export.clone());
        self.published.send_replace(true);
        crate::metrics::METRICS.set_unlocked(true);
        export
    }

    /// Stop offering the device (lock) and tell attached sessions to finish and close.
    pub fn withdraw(&self) -> Option<Arc<Export>> {
        let old = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.generation.send_modify(|g| *g += 1);
        self.published.send_replace(false);
        crate::metrics::METRICS.set_unlocked(false);
        old
    }

    /// Follows lock state: true while a device is published.
    pub fn watch_published(&self) -> watch::Receiver<bool> {
        self.published.subscribe()
    }

    pub fn watch_withdrawal(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Number of sessions in the transmission phase.
    pub fn attached(&self) -> usize {
        self.attached.load(Ordering::Relaxed)
    }

    pub fn attach(self: &Arc<Self>) -> AttachGuard {
        self.attached.fetch_add(1, Ordering::Relaxed);
        AttachGuard(self.clone())
    }
}

/// Counts a session as attached for as long as it lives.
pub struct AttachGuard(Arc<ExportTable>);

impl Drop for AttachGuard {
    fn drop(&mut self) {
        self.0.attached.fetch_sub(1, Ordering::Relaxed);
    }
}
