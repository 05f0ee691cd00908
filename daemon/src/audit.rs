//! Audit trail of key events: one JSON object per line, never a secret.
//!
//! ```json
//! {"event":"enrol","time":"2026-11-28T22:40:00Z","volume_uuid":"…","keyslot":1,
//!  "provider":"aws-kms","key":"arn:aws:kms:…","peer_uid":0,"peer_pid":4242,"result":"ok"}
//! ```
//!
//! Sinks: a file opened with `O_APPEND` (one `write` per line, so lines from several processes
//! do not interleave), or the `tracing` target `"audit"` (stderr / journald), with the JSON line
//! as the `event` field. Events carry identifiers only (UUIDs, slot numbers, key ids or URIs,
//! error texts); there is no field that could hold key material.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditEventKind {
    UnlockOk,
    UnlockFailed,
    Lock,
    Enrol,
    Unenrol,
    Rekey,
    AddKey,
    RemoveKey,
    HeaderBackup,
    HeaderRestore,
    /// A person's quorum share was accepted; the quorum is not complete yet.
    ShareAccepted,
}

impl AuditEventKind {
    pub fn name(self) -> &'static str {
        match self {
            AuditEventKind::UnlockOk => "unlock_ok",
            AuditEventKind::UnlockFailed => "unlock_failed",
            AuditEventKind::Lock => "lock",
            AuditEventKind::Enrol => "enrol",
            AuditEventKind::Unenrol => "unenrol",
            AuditEventKind::Rekey => "rekey",
            AuditEventKind::AddKey => "add_key",
            AuditEventKind::RemoveKey => "remove_key",
            AuditEventKind::HeaderBackup => "header_backup",
            AuditEventKind::HeaderRestore => "header_restore",
            AuditEventKind::ShareAccepted => "share_accepted",
        }
    }
}

/// One key event. Build with [`AuditEvent::new`] and the `with_*` methods; `time` is taken when
/// the event is created.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub kind: AuditEventKind,
    pub time: String,
    pub volume_uuid: Option<String>,
    pub keyslot: Option<u32>,
    /// "aws-kms", "pkcs11", "passphrase", ...
    pub provider: Option<String>,
    /// KMS key id / ARN, PKCS#11 URI: a reference, never key material.
    pub key: Option<String>,
    pub peer_uid: Option<u32>,
    pub peer_pid: Option<i32>,
    /// Free-form, non-secret details (e.g. `{"token": 0, "old_keyslot": 1}`).
    pub details: Map<String, Value>,
    /// `None`: success. `Some(text)`: the failure, as shown to the operator.
    pub error: Option<String>,
}

impl AuditEvent {
    pub fn new(kind: AuditEventKind) -> AuditEvent {
        AuditEvent {
            kind,
            time: rfc3339_now(),
            volume_uuid: None,
            keyslot: None,
            provider: None,
            key: None,
            peer_uid: None,
            peer_pid: None,
            details: Map::new(),
            error: None,
        }
    }

    pub fn volume(mut self, uuid: &str) -> Self {
        self.volume_uuid = Some(uuid.to_owned());
        self
    }

    pub fn keyslot(mut self, slot: u32) -> Self {
        self.keyslot = Some(slot);
        self
    }

    pub fn provider(mut self, provider: &str, key: Option<&str>) -> Self {
        self.provider = Some(provider.to_owned());
        self.key = key.map(str::to_owned);
        self
    }

    pub fn peer(mut self, uid: u32, pid: i32) -> Self {
        self.peer_uid = Some(uid);
        self.peer_pid = Some(pid);
        self
    }

    /// The calling process as the peer (for `nbdcryptctl`'s offline commands).
    pub fn this_process(self) -> Self {
        self.peer(
            nix::unistd::getuid().as_raw(),
            nix::unistd::getpid().as_raw(),
        )
    }

    pub fn detail(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.details.insert(name.to_owned(), value.into());
        self
    }

    pub fn failed(mut self, error: impl std::fmt::Display) -> Self {
        self.error = Some(error.to_string());
        self
    }

    /// The event as one JSON line (no newline).
    pub fn to_json_line(&self) -> String {
        let mut o = Map::new();
        o.insert("event".into(), self.kind.name().into());
        o.insert("time".into(), self.time.clone().into());
        let opt_s = |v: &Option<String>| v.clone().map(Value::from).unwrap_or(Value::Null);
        o.insert("volume_uuid".into(), opt_s(&self.volume_uuid));
        o.insert(
            "keyslot".into(),
            self.keyslot.map(Value::from).unwrap_or(Value::Null),
        );
        o.insert("provider".into(), opt_s(&self.provider));
        o.insert("key".into(), opt_s(&self.key));
        o.insert(
            "peer_uid".into(),
            self.peer_uid.map(Value::from).unwrap_or(Value::Null),
        );
        o.insert(
            "peer_pid".into(),
            self.peer_pid.map(Value::from).unwrap_or(Value::Null),
        );
        for (k, v) in &self.details {
            o.entry(k.clone()).or_insert_with(|| v.clone());
        }
        o.insert(
            "result".into(),
            if self.error.is_some() { "failed" } else { "ok" }.into(),
        );
        o.insert("error".into(), opt_s(&self.error));
        Value::Object(o).to_string()
    }
}

/// Where audit events go.
#[derive(Debug)]
pub enum AuditLog {
    /// Appended to a file (`O_APPEND`, created 0600).
    File(Mutex<File>),
    /// `tracing::info!(target: "audit", event = <json>)`: stderr or journald, whatever the
    /// subscriber writes to.
    Tracing,
}

impl AuditLog {
    /// Opens (creating, mode 0600) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(AuditLog::File(Mutex::new(f)))
    }

    pub fn tracing() -> AuditLog {
        AuditLog::Tracing
    }

    /// Records one event. A failure to write the audit file is returned (the caller decides
    /// whether that is fatal) and also reported through `tracing`.
    pub fn record(&self, event: &AuditEvent) -> std::io::Result<()> {
        let line = event.to_json_line();
        match self {
            AuditLog::Tracing => {
                tracing::info!(target: "audit", event = %line);
                Ok(())
            }
            AuditLog::File(f) => {
                let mut buf = line.into_bytes();
                buf.push(b'\n');
                let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                // One write: O_APPEND makes it atomic against other appenders for lines this
                // short; write_all only loops on a short write.
                let r = f.write_all(&buf).and_then(|_| f.sync_data());
                if let Err(e) = &r {
                    tracing::error!(target: "audit", "cannot write the audit log: {e}");
                }
                r
            }
        }
    }
}

/// The current time as RFC 3339 in UTC, whole seconds: `2026-11-28T22:40:00Z`.
pub fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the epoch as RFC 3339 UTC (proleptic Gregorian; H. Hinnant's civil_from_days).
pub fn rfc3339(secs: u64) -> String {
    #[allow(clippy::cast_possible_wrap)] // lossless: u64::MAX / 86_400 < i64::MAX
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_497_296), "2026-12-28T22:34:56Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
        let now = rfc3339_now();
        assert_eq!(now.len(), 20);
        assert!(now.ends_with('Z'));
    }

    #[test]
    fn events_are_one_json_line_with_every_field() {
        let e = AuditEvent::new(AuditEventKind::Enrol)
            .volume("0b1f5ad5-1c53-4d3c-9b47-3c2f0f0a0b0c")
            .keyslot(2)
            .provider("aws-kms", Some("alias/vol"))
            .peer(0, 42)
            .detail("token", 1);
        let line = e.to_json_line();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "enrol");
        assert_eq!(v["keyslot"], 2);
        assert_eq!(v["provider"], "aws-kms");
        assert_eq!(v["key"], "alias/vol");
        assert_eq!(v["peer_uid"], 0);
        assert_eq!(v["peer_pid"], 42);
        assert_eq!(v["token"], 1);
        assert_eq!(v["result"], "ok");
        assert_eq!(v["error"], Value::Null);
        let f = AuditEvent::new(AuditEventKind::UnlockFailed).failed("key disabled");
        let v: Value = serde_json::from_str(&f.to_json_line()).unwrap();
        assert_eq!(v["result"], "failed");
        assert_eq!(v["error"], "key disabled");
        assert_eq!(v["volume_uuid"], Value::Null);
    }

    #[test]
    fn file_sink_appends_lines_and_holds_no_key_bytes() {
        use crate::crypto::keys::VolumeKey;
        use crate::seal::SealError;
        // A key whose bytes we know, passing through the code paths that produce events.
        let key_bytes: Vec<u8> = (0u8..64)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        let key = VolumeKey::from_slice(&key_bytes);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "earlier line\n").unwrap();
        let log = AuditLog::open(&path).unwrap();
        let uuid = "7b3c9d2e-0000-4000-8000-000000000001";
        log.record(
            &AuditEvent::new(AuditEventKind::UnlockOk)
                .volume(uuid)
                .keyslot(1)
                .provider("aws-kms", Some("arn:aws:kms:us-east-1:123456789012:key/k"))
                .this_process()
                .detail("key_bits", key.len() * 8),
        )
        .unwrap();
        log.record(
            &AuditEvent::new(AuditEventKind::UnlockFailed)
                .volume(uuid)
                .failed(SealError::WrongBinding),
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "earlier line");
        for l in &lines[1..] {
            serde_json::from_str::<Value>(l).unwrap();
        }
        let hex: String = key_bytes.iter().map(|b| format!("{b:02x}")).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&key_bytes);
        let lower = text.to_lowercase();
        for needle in [&hex[..16], &hex[16..48], &b64[..16], &b64[20..40]] {
            assert!(
                !lower.contains(&needle.to_lowercase()),
                "{needle} in {text}"
            );
        }
        // Mode 0600: the log names keys and volumes.
        use std::os::unix::fs::PermissionsExt;
        let fresh = dir.path().join("new.log");
        AuditLog::open(&fresh).unwrap();
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
