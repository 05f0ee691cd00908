//! An upstream NBD backend: nbdcryptd as the client of another NBD server (nbdkit, qemu-nbd,
//! rbd-nbd, another nbdcryptd) that holds the LUKS2 header and the ciphertext.
//!
//! `uri` parses libnbd-style URIs, `handshake` negotiates (STARTTLS, structured replies, GO),
//! `proto` decodes replies (hostile input: bounded, checked, never panics), `transport` is the
//! blocking socket (and TLS session) of the transmission phase, `client` is the
//! connection pool with reconnection, `device` the `BlockDevice` + `HeaderIo` over it.

pub mod client;
pub mod device;
pub mod handshake;
pub mod proto;
pub mod transport;
pub mod uri;

use std::sync::{Arc, Mutex, Weak};

pub use client::Upstream;
pub use device::UpstreamDevice;
pub use uri::{is_upstream_uri, UpstreamUri};

static OPEN: Mutex<Vec<Weak<Upstream>>> = Mutex::new(Vec::new());

/// Opens an upstream and registers it for `status`.
pub fn open(uri: &str, writable: bool) -> Result<Arc<Upstream>, String> {
    let up = Upstream::open(UpstreamUri::parse(uri)?, writable)?;
    if let Ok(mut g) = OPEN.lock() {
        g.retain(|w| w.strong_count() > 0);
        g.push(Arc::downgrade(&up));
    }
    Ok(up)
}

/// Upstream health for the control plane's `status` (None when no upstream is in use): one
/// line per upstream, e.g. `upstream nbd+unix:///?socket=/s: 4/4 connected, 1 reconnects,
/// last error: ...`.
pub fn status_line() -> Option<String> {
    let g = OPEN.lock().ok()?;
    let lines: Vec<String> = g
        .iter()
        .filter_map(Weak::upgrade)
        .map(|u| {
            let h = &u.health;
            let mut s = format!(
                "upstream {}: {} connected (multi-conn {}), {} reconnects, {} failed requests",
                u.uri,
                u.connected(),
                if u.info.has(crate::nbd::wire::TFLAG_CAN_MULTI_CONN) {
                    "yes"
                } else {
                    "no"
                },
                h.reconnects.load(std::sync::atomic::Ordering::Relaxed),
                h.failed_requests.load(std::sync::atomic::Ordering::Relaxed),
            );
            if let Some(e) = h.last_error() {
                s.push_str(&format!(", last error: {e}"));
            }
            if h.durability_lost().is_some() {
                s.push_str(
                    ", FLUSH refused until restart (a connection was lost with acknowledged \
                     writes unflushed)",
                );
            }
            s
        })
        .collect();
    if lines.is_empty() {
        None
    } else {
        Some(lines.join("; "))
    }
}

/// `--plain URI` (comparison mode over an upstream, e.g. to split the hop's cost from the
/// encryption's in a benchmark): the upstream export itself as a device, unencrypted. `None`
/// when `path` is not an upstream URI (then it is a local file).
pub fn plain_device(
    path: &std::path::Path,
    read_only: bool,
    allow_discards: bool,
) -> Option<Result<Arc<dyn crate::block::BlockDevice>, String>> {
    let uri = path.to_str().filter(|p| is_upstream_uri(p))?;
    Some(open(uri, !read_only).map(|up| {
        let dev: Arc<dyn crate::block::BlockDevice> =
            Arc::new(UpstreamDevice::new(up, read_only, allow_discards));
        dev
    }))
}
