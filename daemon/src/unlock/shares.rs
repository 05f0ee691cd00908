//! Partial quorums: the shares received so far (people's, given one at a time with
//! `nbdcryptctl unlock --share NAME`, and machine shares unsealed on the way), per quorum token,
//! in locked memory ([`Share`] holds [`crate::crypto::keys::SecretBytes`]: mlocked, wiped on
//! drop), forgotten when the volume is unlocked (by the quorum or any other way), or `timeout`
//! after its first share.
//!
//! A watcher thread wipes expired entries even when nobody asks; every access expires too.
//!
//! It also keeps people's share *passphrases* staged for an online re-encryption
//! (`nbdcryptctl reencrypt --control SOCK --share NAME`): the start re-wraps each person's share
//! of the new quorum under the same passphrase with a fresh salt, which needs the passphrase
//! itself. They are kept under the same rules (locked memory, the same timeout) and wiped when
//! a start used them, and at lock or shutdown (`Reencryptor::stop`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::crypto::keys::SecretBytes;
use crate::seal::shamir::Share;

/// Default time a partial quorum is kept.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

struct Entry {
    keyslot: u32,
    threshold: usize,
    total: usize,
    /// By share index.
    shares: BTreeMap<u8, Share>,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    /// By quorum token id.
    entries: BTreeMap<u32, Entry>,
    /// Passphrases staged for a re-encryption, by share name.
    staged: BTreeMap<String, (SecretBytes, Instant)>,
    watcher: bool,
}

/// Shared by the unlocker (which adds and takes shares) and `status` (which counts them).
#[derive(Clone)]
pub struct ShareStore {
    inner: Arc<Mutex<Inner>>,
    timeout: Duration,
}

impl Default for ShareStore {
    fn default() -> Self {
        ShareStore::new(DEFAULT_TIMEOUT)
    }
}

impl ShareStore {
    pub fn new(timeout: Duration) -> ShareStore {
        ShareStore {
            inner: Arc::new(Mutex::new(Inner::default())),
            timeout: timeout.max(Duration::from_secs(1)),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn expire(inner: &mut Inner, timeout: Duration, now: Instant) {
        inner.entries.retain(|id, e| {
            let keep = now.duration_since(e.since) < timeout;
            if !keep {
                tracing::warn!(
                    token = id,
                    keyslot = e.keyslot,
                    received = e.shares.len(),
                    "quorum incomplete after {} s: its shares are forgotten",
                    timeout.as_secs()
                );
            }
            keep
        });
        inner.staged.retain(|name, (_, since)| {
            let keep = now.duration_since(*since) < timeout;
            if !keep {
                tracing::warn!(
                    share = %name,
                    "a share passphrase staged for re-encryption was not used within {} s: forgotten",
                    timeout.as_secs()
                );
            }
            keep
        });
    }

    /// Stages person `name`'s passphrase for the next re-encryption start (replacing one
    /// staged before). Returns the names staged now.
    pub fn stage_passphrase(&self, name: &str, passphrase: SecretBytes) -> Vec<String> {
        let now = Instant::now();
        let mut inner = self.lock();
        Self::expire(&mut inner, self.timeout, now);
        inner.staged.insert(name.to_owned(), (passphrase, now));
        let names = inner.staged.keys().cloned().collect();
        if !inner.watcher {
            inner.watcher = true;
            drop(inner);
            self.spawn_watcher();
        }
        names
    }

    /// A copy (locked memory too) of the passphrase staged for `name`.
    pub fn staged_passphrase(&self, name: &str) -> Option<SecretBytes> {
        let mut inner = self.lock();
        Self::expire(&mut inner, self.timeout, Instant::now());
        inner
            .staged
            .get(name)
            .map(|(p, _)| SecretBytes::from_slice(p.expose_secret()))
    }

    /// Forgets (wipes) every staged passphrase.
    pub fn clear_staged(&self) {
        self.lock().staged.clear();
    }

    /// Adds a checked share of quorum `token` (replacing one with the same index). Returns how
    /// many distinct shares that quorum now has.
    pub fn add(
        &self,
        token: u32,
        keyslot: u32,
        threshold: usize,
        total: usize,
        share: Share,
    ) -> usize {
        let now = Instant::now();
        let mut inner = self.lock();
        Self::expire(&mut inner, self.timeout, now);
        let e = inner.entries.entry(token).or_insert_with(|| Entry {
            keyslot,
            threshold,
            total,
            shares: BTreeMap::new(),
            since: now,
        });
        // A header rewritten between shares: start over for the new shape.
        if e.keyslot != keyslot || e.threshold != threshold || e.total != total {
            *e = Entry {
                keyslot,
                threshold,
                total,
                shares: BTreeMap::new(),
                since: now,
            };
        }
        e.shares.insert(share.x, share);
        let n = e.shares.len();
        if !inner.watcher {
            inner.watcher = true;
            // Unlocked first: a failed spawn takes the lock again to clear the flag.
            drop(inner);
            self.spawn_watcher();
        }
        n
    }

    /// Indices held for quorum `token`.
    pub fn held(&self, token: u32) -> Vec<u8> {
        let mut inner = self.lock();
        Self::expire(&mut inner, self.timeout, Instant::now());
        inner
            .entries
            .get(&token)
            .map(|e| e.shares.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Runs `f` on the shares held for `token` (for combining), under the lock.
    pub fn with_shares<T>(&self, token: u32, f: impl FnOnce(&[&Share]) -> T) -> T {
        let mut inner = self.lock();
        Self::expire(&mut inner, self.timeout, Instant::now());
        let shares: Vec<&Share> = inner
            .entries
            .get(&token)
            .map(|e| e.shares.values().collect())
            .unwrap_or_default();
        f(&shares)
    }

    /// Forgets (and wipes) the shares of `token`.
    pub fn forget(&self, token: u32) {
        self.lock().entries.remove(&token);
    }

    /// Forgets (and wipes) the shares of every partial quorum; staged passphrases stay.
    pub fn forget_partial_quorums(&self) {
        self.lock().entries.clear();
    }

    /// "quorum (keyslot 2): 1 of 2 needed shares received (3 holders); forgotten in 580 s
    /// unless complete", one per partial quorum; `None` when there is none.
    pub fn status(&self) -> Option<String> {
        let now = Instant::now();
        let mut inner = self.lock();
        Self::expire(&mut inner, self.timeout, now);
        if inner.entries.is_empty() {
            return None;
        }
        Some(
            inner
                .entries
                .values()
                .map(|e| {
                    let left = self.timeout.saturating_sub(now.duration_since(e.since));
                    format!(
                        "quorum (keyslot {}): {} of {} needed shares received ({} holders); \
                         forgotten in {} s unless complete",
                        e.keyslot,
                        e.shares.len(),
                        e.threshold,
                        e.total,
                        left.as_secs()
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    /// Call without holding the lock.
    fn spawn_watcher(&self) {
        let store = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nbdcrypt-shares".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                let mut inner = store.lock();
                Self::expire(&mut inner, store.timeout, Instant::now());
                if inner.entries.is_empty() && inner.staged.is_empty() {
                    inner.watcher = false;
                    return;
                }
            });
        if spawned.is_err() {
            // Expiry still happens at every access.
            self.lock().watcher = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::SecretBytes;

    fn share(x: u8) -> Share {
        Share {
            x,
            y: SecretBytes::from_slice(&[x; 32]),
        }
    }

    #[test]
    fn counts_distinct_shares_and_reports_without_names() {
        let s = ShareStore::new(Duration::from_secs(60));
        assert_eq!(s.status(), None);
        assert_eq!(s.add(3, 2, 2, 3, share(1)), 1);
        assert_eq!(s.add(3, 2, 2, 3, share(1)), 1);
        assert_eq!(s.add(3, 2, 2, 3, share(3)), 2);
        let st = s.status().unwrap();
        assert!(
            st.contains("2 of 2 needed shares received (3 holders)"),
            "{st}"
        );
        assert_eq!(s.held(3), [1, 3]);
        s.with_shares(3, |v| assert_eq!(v.len(), 2));
        s.forget(3);
        assert_eq!(s.status(), None);
    }

    #[test]
    fn an_unlock_forgets_partial_quorums_but_not_staged_passphrases() {
        let s = ShareStore::new(Duration::from_secs(60));
        s.add(3, 2, 2, 3, share(1));
        s.add(4, 5, 2, 2, share(2));
        s.stage_passphrase("alice", SecretBytes::from_slice(b"pw"));
        s.forget_partial_quorums();
        assert_eq!(s.status(), None);
        assert!(s.held(3).is_empty() && s.held(4).is_empty());
        assert!(s.staged_passphrase("alice").is_some());
    }

    #[test]
    fn staged_passphrases_are_copied_on_use_and_forgotten_after_the_timeout() {
        let s = ShareStore::new(Duration::from_secs(1));
        assert_eq!(
            s.stage_passphrase("bob", SecretBytes::from_slice(b"b")),
            ["bob"]
        );
        assert_eq!(
            s.stage_passphrase("alice", SecretBytes::from_slice(b"a")),
            ["alice", "bob"]
        );
        assert_eq!(s.staged_passphrase("alice").unwrap().expose_secret(), b"a");
        assert!(s.staged_passphrase("carol").is_none());
        // Staged passphrases are not shares: status says nothing about them.
        assert_eq!(s.status(), None);
        std::thread::sleep(Duration::from_millis(1600));
        assert!(s.lock().staged.is_empty());
        s.stage_passphrase("alice", SecretBytes::from_slice(b"a"));
        s.clear_staged();
        assert!(s.staged_passphrase("alice").is_none());
    }

    #[test]
    fn partial_quorums_are_forgotten_after_the_timeout_even_unasked() {
        let s = ShareStore::new(Duration::from_secs(1));
        s.add(0, 1, 2, 2, share(1));
        assert!(s.status().is_some());
        std::thread::sleep(Duration::from_millis(1600));
        // The watcher emptied it (look without expiring).
        assert!(s.lock().entries.is_empty());
        assert_eq!(s.held(0), Vec::<u8>::new());
    }
}
