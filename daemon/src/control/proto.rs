//! Control protocol v1: typed requests and responses, and their wire form.
//!
//! One JSON object per line over a Unix stream socket; the client sends one request line and
//! reads one response line. Every message carries `"v": 1`. A server that sees another version
//! answers `bad_request` naming both versions; a client that sees another version stops.
//!
//! ```text
//! -> {"v":1,"op":"unlock","secret":"aHVudGVyMg==","slot":0}     secret: base64 (or an array of
//! -> {"v":1,"op":"unlock_token"}
//! -> {"v":1,"op":"rekey","slot":1}                             slot optional: every token
//! -> {"v":1,"op":"lock","force":false}                           byte values); slot optional
//! -> {"v":1,"op":"status"}
//! -> {"v":1,"op":"share","name":"alice","secret":"…"}         a person's quorum share
//! -> {"v":1,"op":"stats"}                                     status plus "metrics" (top)
//! <- {"v":1,"status":{"state":"unlocked","volume_uuid":"…",…}}
//! <- {"v":1,"error":{"kind":"rate_limited","message":"…","retry_after_secs":4}}
//! ```
//!
//! Requests are strict: unknown fields, unknown ops and fields that do not belong to the op are
//! refused, so a typo never silently changes meaning. Responses are additive: a client ignores
//! fields it does not know, and keeps unknown error kinds and states as `Unknown`.
//!
//! Secrets: the unlock secret is decoded straight from the request line into `SecretBytes`
//! (never a `String`); callers wipe the line afterwards. `Request` has a hand-written `Debug`
//! that never shows the secret. (serde_json copies a string into a scratch buffer it does not
//! wipe only when the string contains escapes, which base64 never needs.)
//!
//! This module knows bytes and types, not sockets: `control::server` and `control::client` move
//! the lines.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, Zeroizing};

use crate::crypto::keys::SecretBytes;

/// The protocol version this build speaks, sent as `"v"` in every message.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request or response line, newline included. Checked before anything is parsed.
pub const MAX_LINE: usize = 12 * 1024 * 1024;

/// The longest unlock secret (passphrase or key file) accepted, in bytes: cryptsetup's default
/// key-file limit (8 MiB). Its base64 form (about 11.2 MiB) fits in `MAX_LINE`.
pub const MAX_SECRET_LEN: usize = 8 * 1024 * 1024;

/// What an online re-encryption start may change or drop besides the key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// Drop the old key's keyslots the daemon cannot carry over (neither the secret nor a
    /// token opens them) instead of refusing.
    pub drop_unopened: bool,
    /// New volume key size in bits (256 or 512); `None` keeps the current one.
    pub key_bits: Option<u32>,
    /// New encryption sector size (512 to 4096); `None` keeps the current one.
    pub sector_size: Option<u32>,
}

/// A control request.
pub enum Request {
    /// Try the secret against the keyslots (only `slot` if given) and publish the export.
    Unlock {
        secret: SecretBytes,
        slot: Option<u32>,
    },
    /// Unlock with the KMS/HSM tokens in the header (the daemon unseals them).
    UnlockToken,
    /// Re-seal the token of keyslot `slot` (every token when `None`) with a fresh secret under
    /// the same KMS/HSM key; the data and the lock state are untouched.
    Rekey {
        slot: Option<u32>,
    },
    /// Withdraw the export and wipe the key; `force` disconnects attached clients first.
    Lock {
        force: bool,
    },
    Status,
    /// A person's share of a quorum (`nbdcryptctl unlock --share NAME`): their passphrase.
    Share {
        name: String,
        secret: SecretBytes,
    },
    /// Online re-encryption of the volume key: start, pause, resume, or its status
    /// (see `control::reencrypt`). `secret` (start only) opens the keyslots to carry over.
    Reencrypt {
        action: ReencryptAction,
        secret: Option<SecretBytes>,
        max_rate: Option<u64>,
        /// Start only: what the start may change or drop.
        start: StartOptions,
    },
    /// The status plus a snapshot of the monitoring counters (`nbdcryptctl top`).
    Stats,
    /// A person's passphrase for their share of a quorum keyslot, staged for the next online
    /// re-encryption start (`nbdcryptctl reencrypt --control SOCK --share NAME`), so that the
    /// quorum is carried to the new key with a share re-wrapped under the same passphrase.
    ReencryptShare {
        name: String,
        secret: SecretBytes,
    },
}

/// What a `reencrypt` request does.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReencryptAction {
    Start,
    Pause,
    Resume,
    Status,
}

/// Progress of an online re-encryption, in `status` while one exists (running, paused,
/// finished or failed since the last unlock).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ReencryptReport {
    pub state: ReencryptState,
    /// Bytes of plaintext already under the new key (the frontier).
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Recent re-encryption rate, bytes per second (0 while paused).
    pub rate_bytes_per_sec: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<u64>,
    /// `--max-rate` in bytes per second; `None`: unthrottled (still backs off under load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<u64>,
    /// True while the worker yields to heavy client I/O.
    #[serde(default)]
    pub backing_off: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReencryptState {
    Running,
    Paused,
    Finished,
    Failed,
    #[serde(other)]
    Unknown,
}

impl fmt::Display for ReencryptState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReencryptState::Running => "running",
            ReencryptState::Paused => "paused",
            ReencryptState::Finished => "finished",
            ReencryptState::Failed => "failed",
            ReencryptState::Unknown => "unknown",
        })
    }
}

/// Longest share name on the wire.
pub const MAX_SHARE_NAME: usize = 64;

/// What a request asks for, without its contents: for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Unlock,
    UnlockToken,
    Rekey,
    Lock,
    Status,
    Reencrypt,
    Share,
    Stats,
    ReencryptShare,
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestKind::Unlock => "unlock",
            RequestKind::UnlockToken => "unlock-token",
            RequestKind::Rekey => "rekey",
            RequestKind::Lock => "lock",
            RequestKind::Status => "status",
            RequestKind::Reencrypt => "reencrypt",
            RequestKind::Share => "share",
            RequestKind::Stats => "stats",
            RequestKind::ReencryptShare => "reencrypt-share",
        })
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Not even the length: it says how long a passphrase is.
            Request::Unlock { slot, .. } => f
                .debug_struct("Unlock")
                .field("secret", &"<redacted>")
                .field("slot", slot)
                .finish(),
            Request::UnlockToken => f.write_str("UnlockToken"),
            Request::Rekey { slot } => f.debug_struct("Rekey").field("slot", slot).finish(),
            Request::Lock { force } => f.debug_struct("Lock").field("force", force).finish(),
            Request::Status => f.write_str("Status"),
            Request::Reencrypt {
                action,
                max_rate,
                start,
                ..
            } => f
                .debug_struct("Reencrypt")
                .field("action", action)
                .field("secret", &"<redacted>")
                .field("max_rate", max_rate)
                .field("start", start)
                .finish(),
            Request::Share { name, .. } => f
                .debug_struct("Share")
                .field("name", name)
                .field("secret", &"<redacted>")
                .finish(),
            Request::Stats => f.write_str("Stats"),
            Request::ReencryptShare { name, .. } => f
                .debug_struct("ReencryptShare")
                .field("name", name)
                .field("secret", &"<redacted>")
                .finish(),
        }
    }
}

/// A control response: every successful request answers with the volume's status after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ok(StatusReport),
    Error(ErrorReply),
}

/// Lock state as the status shows it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    Locked,
    /// A passphrase is being checked (key derivation takes seconds); still locked until it ends.
    Unlocking,
    Unlocked,
    /// The export is withdrawn; waiting for attached clients to close before the key is wiped.
    Locking,
    /// A state a newer daemon knows and this build does not.
    #[serde(other)]
    Unknown,
}

impl fmt::Display for VolumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VolumeState::Locked => "locked",
            VolumeState::Unlocking => "unlocking",
            VolumeState::Unlocked => "unlocked",
            VolumeState::Locking => "locking",
            VolumeState::Unknown => "unknown",
        })
    }
}

/// The volume and its export as the daemon sees them now.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub state: VolumeState,
    pub volume_uuid: String,
    /// As LUKS2 names it, e.g. `aes-xts-plain64`.
    pub cipher: String,
    pub sector_size: u32,
    /// Bytes of plaintext the export offers.
    pub size: u64,
    pub export_name: String,
    /// NBD sessions in the transmission phase.
    pub clients: u64,
    /// Counters since the last unlock (each unlock starts from zero).
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub errors: u64,
    /// Why the volume is locked (or why a lock is pending); `None` while unlocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_reason: Option<String>,
    /// The online re-encryption, if one ran or runs since the last unlock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reencrypt: Option<Box<ReencryptReport>>,
    /// Monitoring counters since the daemon started (answer to `stats` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Box<crate::metrics::snapshot::Snapshot>>,
    /// Health of the upstream NBD export the volume lives on (`--volume nbd://…`): connections
    /// up, reconnects, failed requests, last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// When the volume key in use was created (Unix seconds), from the header's
    /// `nbdcrypt-volume-key` token; `None` when no token records it (e.g. a cryptsetup-made key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_key_created: Option<u64>,
}

/// A refused or failed request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    /// For a person: what went wrong and what to do.
    pub message: String,
    /// With `rate_limited` (and a lock still waiting for clients): seconds until trying again
    /// makes sense.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

impl ErrorReply {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorReply {
            kind,
            message: message.into(),
            retry_after_secs: None,
        }
    }
}

/// What class of failure an error is; clients pick exit codes from it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No keyslot opened with the secret. Says nothing about which keyslots exist.
    WrongPassphrase,
    /// Too many wrong secrets in a row; `retry_after_secs` says how long to wait.
    RateLimited,
    /// Clients are attached (lock without force), or another unlock/lock is in progress.
    Busy,
    AlreadyUnlocked,
    AlreadyLocked,
    /// The request was malformed, too long, or of another protocol version.
    BadRequest,
    /// The peer is neither root nor the daemon's own user.
    PermissionDenied,
    /// The daemon failed (I/O error opening the volume, a failed flush, a bug).
    Internal,
    /// No KMS/HSM token opened the volume (refused, wrong binding, no token).
    TokenFailed,
    /// A KMS/HSM was unreachable: worth retrying later; other unlock methods still work.
    ProviderUnreachable,
    /// A kind a newer daemon knows and this build does not.
    #[serde(other)]
    Unknown,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::WrongPassphrase => "wrong_passphrase",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Busy => "busy",
            ErrorKind::AlreadyUnlocked => "already_unlocked",
            ErrorKind::AlreadyLocked => "already_locked",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Internal => "internal",
            ErrorKind::TokenFailed => "token_failed",
            ErrorKind::ProviderUnreachable => "provider_unreachable",
            ErrorKind::Unknown => "unknown",
        })
    }
}

/// Why a line could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message longer than {limit} bytes")]
    TooLong { limit: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message has no protocol version (\"v\")")]
    MissingVersion,
    #[error(
        "protocol version {got} is not supported; this build speaks version {PROTOCOL_VERSION}"
    )]
    UnsupportedVersion { got: u64 },
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl DecodeError {
    /// A summary that never contains message content, for logs.
    pub fn summary(&self) -> &'static str {
        match self {
            DecodeError::TooLong { .. } => "too long",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::MissingVersion => "no version",
            DecodeError::UnsupportedVersion { .. } => "unsupported version",
            DecodeError::Invalid(_) => "invalid",
        }
    }
}

impl Request {
    pub fn kind(&self) -> RequestKind {
        match self {
            Request::Unlock { .. } => RequestKind::Unlock,
            Request::UnlockToken => RequestKind::UnlockToken,
            Request::Rekey { .. } => RequestKind::Rekey,
            Request::Lock { .. } => RequestKind::Lock,
            Request::Status => RequestKind::Status,
            Request::Reencrypt { .. } => RequestKind::Reencrypt,
            Request::Share { .. } => RequestKind::Share,
            Request::Stats => RequestKind::Stats,
            Request::ReencryptShare { .. } => RequestKind::ReencryptShare,
        }
    }

    /// The wire line, newline included, in a buffer that is wiped when dropped.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        if let Request::Reencrypt {
            action,
            secret,
            max_rate,
            start,
        } = self
        {
            let secret_len = secret.as_ref().map_or(0, |s| s.len());
            let mut out = Zeroizing::new(Vec::with_capacity(base64_len(secret_len) + 128));
            let wire = WireReencryptOut {
                v: PROTOCOL_VERSION,
                op: Op::Reencrypt,
                action: *action,
                secret: secret.as_ref().map(SecretOut),
                max_rate: *max_rate,
                drop_unopened: start.drop_unopened.then_some(true),
                key_size: start.key_bits,
                sector_size: start.sector_size,
            };
            serde_json::to_writer(&mut *out, &wire).expect("request serializes");
            out.push(b'\n');
            return out;
        }
        let mut name = None;
        let (op, secret, slot, force) = match self {
            Request::Share { name: n, secret } => {
                name = Some(n.as_str());
                (Op::Share, Some(SecretOut(secret)), None, None)
            }
            Request::Unlock { secret, slot } => (Op::Unlock, Some(SecretOut(secret)), *slot, None),
            Request::UnlockToken => (Op::UnlockToken, None, None, None),
            Request::Rekey { slot } => (Op::Rekey, None, *slot, None),
            Request::Lock { force } => (Op::Lock, None, None, Some(*force)),
            Request::Status => (Op::Status, None, None, None),
            Request::Reencrypt { .. } => (Op::Reencrypt, None, None, None),
            Request::Stats => (Op::Stats, None, None, None),
            Request::ReencryptShare { name: n, secret } => {
                name = Some(n.as_str());
                (Op::ReencryptShare, Some(SecretOut(secret)), None, None)
            }
        };
        let secret_len = secret.as_ref().map_or(0, |s| s.0.len());
        // Sized up front so the vector never reallocates and leaves a copy of the secret behind.
        let mut out = Zeroizing::new(Vec::with_capacity(base64_len(secret_len) + 128));
        let wire = WireRequestOut {
            v: PROTOCOL_VERSION,
            op,
            secret,
            slot,
            force,
            name,
        };
        // Serializing these types into a Vec cannot fail: no maps with non-string keys, no I/O.
        serde_json::to_writer(&mut *out, &wire).expect("request serializes");
        out.push(b'\n');
        out
    }

    /// Parse one line (with or without its newline). The caller wipes `line` afterwards.
    pub fn decode(line: &[u8]) -> Result<Request, DecodeError> {
        if line.len() > MAX_LINE {
            return Err(DecodeError::TooLong { limit: MAX_LINE });
        }
        check_version(line)?;
        let wire: WireRequest =
            serde_json::from_slice(line).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        wire.into_request()
    }
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error(ErrorReply::new(kind, message))
    }

    /// The wire line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        let wire = match self {
            Response::Ok(s) => WireResponse {
                v: PROTOCOL_VERSION,
                status: Some(s.clone()),
                error: None,
            },
            Response::Error(e) => WireResponse {
                v: PROTOCOL_VERSION,
                status: None,
                error: Some(e.clone()),
            },
        };
        // Plain structs of strings and integers: serialization cannot fail.
        let mut out = serde_json::to_vec(&wire).expect("response serializes");
        out.push(b'\n');
        out
    }

    pub fn decode(line: &[u8]) -> Result<Response, DecodeError> {
        if line.len() > MAX_LINE {
            return Err(DecodeError::TooLong { limit: MAX_LINE });
        }
        check_version(line)?;
        let wire: WireResponse =
            serde_json::from_slice(line).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        match (wire.status, wire.error) {
            (Some(s), None) => Ok(Response::Ok(s)),
            (None, Some(e)) => Ok(Response::Error(e)),
            _ => Err(DecodeError::Malformed(
                "a response has exactly one of status and error".into(),
            )),
        }
    }
}

/// Read `"v"` alone first, so a message of another version is reported as such rather than as
/// whatever its unknown fields would break.
fn check_version(line: &[u8]) -> Result<(), DecodeError> {
    #[derive(Deserialize)]
    struct Peek {
        v: Option<u64>,
    }
    let peek: Peek =
        serde_json::from_slice(line).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    match peek.v {
        None => Err(DecodeError::MissingVersion),
        Some(v) if v == u64::from(PROTOCOL_VERSION) => Ok(()),
        Some(got) => Err(DecodeError::UnsupportedVersion { got }),
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Op {
    Unlock,
    UnlockToken,
    Rekey,
    Lock,
    Status,
    Reencrypt,
    Share,
    Stats,
    ReencryptShare,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    #[allow(dead_code)] // checked by `check_version`; listed so it is not an unknown field
    v: u64,
    op: Op,
    #[serde(default)]
    secret: Option<SecretIn>,
    #[serde(default)]
    slot: Option<u32>,
    #[serde(default)]
    force: Option<bool>,
    #[serde(default)]
    action: Option<ReencryptAction>,
    #[serde(default)]
    max_rate: Option<u64>,
    name: Option<String>,
    #[serde(default)]
    drop_unopened: Option<bool>,
    #[serde(default)]
    key_size: Option<u32>,
    #[serde(default)]
    sector_size: Option<u32>,
}

impl WireRequest {
    /// The first field given that only a re-encryption start may carry.
    fn start_only_field(&self) -> Option<&'static str> {
        [
            ("drop_unopened", self.drop_unopened.is_some()),
            ("key_size", self.key_size.is_some()),
            ("sector_size", self.sector_size.is_some()),
        ]
        .into_iter()
        .find_map(|(name, given)| given.then_some(name))
    }

    fn into_request(self) -> Result<Request, DecodeError> {
        let misplaced = |field: &str| {
            Err(DecodeError::Invalid(format!(
                "\"{field}\" does not belong to a {:?} request",
                self.op
            )))
        };
        if self.op != Op::Reencrypt {
            if self.action.is_some() {
                return misplaced("action");
            }
            if self.max_rate.is_some() {
                return misplaced("max_rate");
            }
            if let Some(field) = self.start_only_field() {
                return misplaced(field);
            }
        }
        if self.name.is_some() && !matches!(self.op, Op::Share | Op::ReencryptShare) {
            return misplaced("name");
        }
        match self.op {
            Op::Reencrypt => {
                if self.slot.is_some() {
                    return misplaced("slot");
                }
                if self.force.is_some() {
                    return misplaced("force");
                }
                let Some(action) = self.action else {
                    return Err(DecodeError::Invalid(
                        "reencrypt needs \"action\" (start, pause, resume or status)".into(),
                    ));
                };
                if self.secret.is_some() && action != ReencryptAction::Start {
                    return misplaced("secret");
                }
                if self.max_rate == Some(0) {
                    return Err(DecodeError::Invalid(
                        "\"max_rate\" must be positive (bytes per second)".into(),
                    ));
                }
                if let Some(field) = self
                    .start_only_field()
                    .filter(|_| action != ReencryptAction::Start)
                {
                    return misplaced(field);
                }
                if let Some(k) = self.key_size.filter(|k| !matches!(k, 256 | 512)) {
                    return Err(DecodeError::Invalid(format!(
                        "\"key_size\" {k} is not 256 (AES-128-XTS) or 512 (AES-256-XTS)"
                    )));
                }
                if let Some(s) = self
                    .sector_size
                    .filter(|s| !matches!(s, 512 | 1024 | 2048 | 4096))
                {
                    return Err(DecodeError::Invalid(format!(
                        "\"sector_size\" {s} is not 512, 1024, 2048 or 4096"
                    )));
                }
                Ok(Request::Reencrypt {
                    action,
                    secret: self.secret.map(|s| s.0),
                    max_rate: self.max_rate,
                    start: StartOptions {
                        drop_unopened: self.drop_unopened.unwrap_or(false),
                        key_bits: self.key_size,
                        sector_size: self.sector_size,
                    },
                })
            }
            Op::Share | Op::ReencryptShare => {
                if self.slot.is_some() {
                    return misplaced("slot");
                }
                if self.force.is_some() {
                    return misplaced("force");
                }
                let name = match self.name {
                    Some(n) if !n.is_empty() && n.len() <= MAX_SHARE_NAME => n,
                    _ => {
                        return Err(DecodeError::Invalid(format!(
                            "share needs \"name\" (1 to {MAX_SHARE_NAME} bytes)"
                        )))
                    }
                };
                match (self.secret, self.op) {
                    (Some(SecretIn(secret)), Op::Share) => Ok(Request::Share { name, secret }),
                    (Some(SecretIn(secret)), _) => Ok(Request::ReencryptShare { name, secret }),
                    (None, _) => Err(DecodeError::Invalid("share needs \"secret\"".into())),
                }
            }
            Op::Unlock => {
                if self.force.is_some() {
                    return misplaced("force");
                }
                match self.secret {
                    Some(SecretIn(secret)) => Ok(Request::Unlock {
                        secret,
                        slot: self.slot,
                    }),
                    None => Err(DecodeError::Invalid("unlock needs \"secret\"".into())),
                }
            }
            Op::UnlockToken => {
                if self.secret.is_some() {
                    return misplaced("secret");
                }
                if self.slot.is_some() {
                    return misplaced("slot");
                }
                if self.force.is_some() {
                    return misplaced("force");
                }
                Ok(Request::UnlockToken)
            }
            Op::Rekey => {
                if self.secret.is_some() {
                    return misplaced("secret");
                }
                if self.force.is_some() {
                    return misplaced("force");
                }
                Ok(Request::Rekey { slot: self.slot })
            }
            Op::Lock => {
                if self.secret.is_some() {
                    return misplaced("secret");
                }
                if self.slot.is_some() {
                    return misplaced("slot");
                }
                Ok(Request::Lock {
                    force: self.force.unwrap_or(false),
                })
            }
            Op::Status => {
                if self.secret.is_some() {
                    return misplaced("secret");
                }
                if self.slot.is_some() {
                    return misplaced("slot");
                }
                if self.force.is_some() {
                    return misplaced("force");
                }
                Ok(Request::Status)
            }
            Op::Stats => {
                if self.secret.is_some() || self.slot.is_some() || self.force.is_some() {
                    return misplaced("secret, slot or force");
                }
                Ok(Request::Stats)
            }
        }
    }
}

#[derive(Serialize)]
struct WireRequestOut<'a> {
    v: u32,
    op: Op,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<SecretOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slot: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    force: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

#[derive(Serialize)]
struct WireReencryptOut<'a> {
    v: u32,
    op: Op,
    action: ReencryptAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<SecretOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_rate: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drop_unopened: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sector_size: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct WireResponse {
    v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<StatusReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ErrorReply>,
}

/// The secret as read from a request: base64 text or an array of byte values.
struct SecretIn(SecretBytes);

impl<'de> Deserialize<'de> for SecretIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SecretVisitor).map(SecretIn)
    }
}

struct SecretVisitor;

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = SecretBytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the secret as base64 text or an array of bytes, at most {MAX_SECRET_LEN} bytes"
        )
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<SecretBytes, E> {
        let estimate = base64::decoded_len_estimate(text.len());
        if estimate > MAX_SECRET_LEN + 2 {
            return Err(E::custom(format_args!(
                "secret longer than {MAX_SECRET_LEN} bytes"
            )));
        }
        let mut scratch = SecretBytes::zeroed(estimate);
        // The error names only a position and a byte class, never the text.
        let n = BASE64
            .decode_slice(text.as_bytes(), scratch.expose_secret_mut())
            .map_err(|_| E::custom("secret is not valid base64 (standard alphabet, padded)"))?;
        if n > MAX_SECRET_LEN {
            return Err(E::custom(format_args!(
                "secret longer than {MAX_SECRET_LEN} bytes"
            )));
        }
        Ok(SecretBytes::from_slice(&scratch.expose_secret()[..n]))
    }

    fn visit_string<E: de::Error>(self, mut text: String) -> Result<SecretBytes, E> {
        let secret = self.visit_str(&text);
        text.zeroize();
        secret
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SecretBytes, A::Error> {
        // Fixed-size scratch: a growing Vec would leave copies behind in freed memory.
        let mut scratch = SecretBytes::zeroed(MAX_SECRET_LEN);
        let mut n = 0;
        while let Some(byte) = seq.next_element::<u8>()? {
            let Some(slot) = scratch.expose_secret_mut().get_mut(n) else {
                return Err(de::Error::custom(format_args!(
                    "secret longer than {MAX_SECRET_LEN} bytes"
                )));
            };
            *slot = byte;
            n += 1;
        }
        Ok(SecretBytes::from_slice(&scratch.expose_secret()[..n]))
    }
}

struct SecretOut<'a>(&'a SecretBytes);

impl Serialize for SecretOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes = self.0.expose_secret();
        let mut text = Zeroizing::new(vec![0u8; base64_len(bytes.len())]);
        // The buffer is exactly base64_len long, which is what encode_slice needs.
        let n = BASE64
            .encode_slice(bytes, &mut text[..])
            .expect("buffer sized for base64");
        // Base64 output is ASCII.
        let text = std::str::from_utf8(&text[..n]).expect("base64 is ASCII");
        s.serialize_str(text)
    }
}

/// Padded base64 length of `n` bytes.
fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> StatusReport {
        StatusReport {
            state: VolumeState::Unlocked,
            volume_uuid: "0b9a4b0e-5f4e-4f41-9a57-5d0c8a4a6b1e".into(),
            cipher: "aes-xts-plain64".into(),
            sector_size: 4096,
            size: 1 << 30,
            export_name: "nbdcrypt".into(),
            clients: 2,
            reads: 10,
            writes: 20,
            bytes_read: 40960,
            bytes_written: 81920,
            flushes: 3,
            errors: 0,
            locked_reason: None,
            reencrypt: None,
            metrics: None,
            upstream: None,
            volume_key_created: Some(1_700_000_000),
        }
    }

    fn decode_str(s: &str) -> Result<Request, DecodeError> {
        Request::decode(s.as_bytes())
    }

    #[test]
    fn unlock_round_trips_with_every_byte_value() {
        let bytes: Vec<u8> = (0..=255u8).chain(b"\n\"\\".iter().copied()).collect();
        let req = Request::Unlock {
            secret: SecretBytes::from_slice(&bytes),
            slot: Some(3),
        };
        let line = req.encode();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        match Request::decode(&line).unwrap() {
            Request::Unlock { secret, slot } => {
                assert_eq!(secret.expose_secret(), &bytes[..]);
                assert_eq!(slot, Some(3));
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn lock_and_status_round_trip() {
        for force in [false, true] {
            let line = Request::Lock { force }.encode();
            assert!(
                matches!(Request::decode(&line).unwrap(), Request::Lock { force: f } if f == force)
            );
        }
        let line = Request::Status.encode();
        assert_eq!(&line[..], b"{\"v\":1,\"op\":\"status\"}\n");
        assert!(matches!(Request::decode(&line).unwrap(), Request::Status));
    }

    #[test]
    fn lock_without_force_means_no_force() {
        assert!(matches!(
            decode_str(r#"{"v":1,"op":"lock"}"#).unwrap(),
            Request::Lock { force: false }
        ));
    }

    #[test]
    fn unlock_accepts_the_secret_as_an_array_of_bytes() {
        match decode_str(r#"{"v":1,"op":"unlock","secret":[104,105,0,255]}"#).unwrap() {
            Request::Unlock { secret, slot: None } => {
                assert_eq!(secret.expose_secret(), b"hi\0\xff")
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let req = Request::Unlock {
            secret: SecretBytes::from_slice(b"hunter2"),
            slot: None,
        };
        let shown = format!("{req:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("aHVudGVyMg"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn response_round_trips() {
        let ok = Response::Ok(status());
        assert_eq!(Response::decode(&ok.encode()).unwrap(), ok);
        let locked = Response::Ok(StatusReport {
            state: VolumeState::Locked,
            locked_reason: Some("locked by uid 0".into()),
            metrics: None,
            ..status()
        });
        assert_eq!(Response::decode(&locked.encode()).unwrap(), locked);
        let err = Response::Error(ErrorReply {
            kind: ErrorKind::RateLimited,
            message: "wait".into(),
            retry_after_secs: Some(8),
        });
        let line = err.encode();
        assert!(std::str::from_utf8(&line)
            .unwrap()
            .contains(r#""kind":"rate_limited""#));
        assert_eq!(Response::decode(&line).unwrap(), err);
    }

    #[test]
    fn request_with_an_unknown_field_is_rejected() {
        let e = decode_str(r#"{"v":1,"op":"status","verbose":true}"#).unwrap_err();
        assert!(
            matches!(&e, DecodeError::Malformed(m) if m.contains("verbose")),
            "{e}"
        );
    }

    #[test]
    fn request_with_an_unknown_op_is_rejected() {
        let e = decode_str(r#"{"v":1,"op":"format"}"#).unwrap_err();
        assert!(matches!(e, DecodeError::Malformed(_)), "{e}");
    }

    #[test]
    fn request_of_another_version_is_rejected_as_such_even_with_unknown_fields() {
        let e = decode_str(r#"{"v":2,"op":"status","new_thing":1}"#).unwrap_err();
        assert!(
            matches!(e, DecodeError::UnsupportedVersion { got: 2 }),
            "{e}"
        );
        assert!(e.to_string().contains("version 1"));
    }

    #[test]
    fn request_without_a_version_is_rejected() {
        assert!(matches!(
            decode_str(r#"{"op":"status"}"#).unwrap_err(),
            DecodeError::MissingVersion
        ));
    }

    #[test]
    fn fields_that_do_not_belong_to_the_op_are_rejected() {
        for bad in [
            r#"{"v":1,"op":"status","force":true}"#,
            r#"{"v":1,"op":"lock","secret":"aGk="}"#,
            r#"{"v":1,"op":"lock","slot":1}"#,
            r#"{"v":1,"op":"unlock","secret":"aGk=","force":true}"#,
            r#"{"v":1,"op":"unlock"}"#,
        ] {
            assert!(
                matches!(decode_str(bad), Err(DecodeError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_base64_is_rejected_without_echoing_it() {
        let e = decode_str(r#"{"v":1,"op":"unlock","secret":"hunter2!"}"#).unwrap_err();
        assert!(matches!(e, DecodeError::Malformed(_)));
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn not_json_and_not_an_object_are_malformed() {
        for bad in [
            "",
            "hello",
            "[1,2]",
            "{\"v\":1",
            "{\"v\":\"1\",\"op\":\"status\"}",
        ] {
            assert!(
                matches!(decode_str(bad), Err(DecodeError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn oversized_line_is_rejected_before_parsing() {
        let line = vec![b' '; MAX_LINE + 1];
        assert!(matches!(
            Request::decode(&line),
            Err(DecodeError::TooLong { limit: MAX_LINE })
        ));
        assert!(matches!(
            Response::decode(&line),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn oversized_secret_is_rejected() {
        let too_long = SecretBytes::zeroed(MAX_SECRET_LEN + 1);
        let line = Request::Unlock {
            secret: too_long,
            slot: None,
        }
        .encode();
        assert!(line.len() <= MAX_LINE);
        let e = Request::decode(&line).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        // The largest allowed secret fits in a line.
        let max = Request::Unlock {
            secret: SecretBytes::zeroed(MAX_SECRET_LEN),
            slot: Some(31),
        }
        .encode();
        assert!(max.len() <= MAX_LINE);
        assert!(Request::decode(&max).is_ok());
    }

    #[test]
    fn response_tolerates_unknown_fields_kinds_and_states() {
        let line =
            br#"{"v":1,"error":{"kind":"quota_exceeded","message":"m","hint":"x"},"extra":1}"#;
        match Response::decode(line).unwrap() {
            Response::Error(e) => assert_eq!(e.kind, ErrorKind::Unknown),
            other => panic!("{other:?}"),
        }
        let mut v = serde_json::to_value(status()).unwrap();
        v["state"] = "suspended".into();
        v["new_counter"] = 5.into();
        let line = serde_json::to_vec(&serde_json::json!({"v": 1, "status": v})).unwrap();
        match Response::decode(&line).unwrap() {
            Response::Ok(s) => assert_eq!(s.state, VolumeState::Unknown),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn response_of_another_version_is_rejected() {
        let e = Response::decode(br#"{"v":7,"status":{}}"#).unwrap_err();
        assert!(matches!(e, DecodeError::UnsupportedVersion { got: 7 }));
    }

    #[test]
    fn response_with_both_or_neither_is_malformed() {
        assert!(Response::decode(br#"{"v":1}"#).is_err());
        let both = format!(
            r#"{{"v":1,"status":{},"error":{{"kind":"busy","message":"m"}}}}"#,
            serde_json::to_string(&status()).unwrap()
        );
        assert!(Response::decode(both.as_bytes()).is_err());
    }

    #[test]
    fn decoding_never_panics_on_truncated_or_corrupted_lines() {
        let unlock = Request::Unlock {
            secret: SecretBytes::from_slice(b"pass"),
            slot: Some(1),
        }
        .encode();
        let ok = Response::Ok(status()).encode();
        for line in [&unlock[..], &ok[..]] {
            for cut in 0..line.len() {
                let _ = Request::decode(&line[..cut]);
                let _ = Response::decode(&line[..cut]);
            }
            // Every byte replaced by a few troublesome values, one position at a time.
            for i in 0..line.len() {
                for b in [0u8, b'"', b'\\', b'{', b'9', 0xff] {
                    let mut bad = line.to_vec();
                    bad[i] = b;
                    let _ = Request::decode(&bad);
                    let _ = Response::decode(&bad);
                }
            }
        }
    }

    #[test]
    fn reencrypt_share_requests_round_trip_and_never_show_the_secret() {
        let req = Request::ReencryptShare {
            name: "alice".into(),
            secret: SecretBytes::from_slice(b"alice's words"),
        };
        let line = req.encode();
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.contains(r#""op":"reencrypt_share""#), "{text}");
        match Request::decode(&line).unwrap() {
            Request::ReencryptShare { name, secret } => {
                assert_eq!(name, "alice");
                assert_eq!(secret.expose_secret(), b"alice's words");
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{req:?}").contains("words"));
        assert_eq!(req.kind().to_string(), "reencrypt-share");
        // No name, or a misplaced field: refused.
        for bad in [
            r#"{"v":1,"op":"reencrypt_share","secret":"YQ=="}"#,
            r#"{"v":1,"op":"reencrypt_share","name":"a"}"#,
            r#"{"v":1,"op":"reencrypt_share","name":"a","secret":"YQ==","slot":1}"#,
        ] {
            assert!(Request::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn reencrypt_requests_round_trip_and_never_show_the_secret() {
        let req = Request::Reencrypt {
            action: ReencryptAction::Start,
            secret: Some(SecretBytes::from_slice(b"hunter2")),
            max_rate: Some(200 << 20),
            start: StartOptions {
                drop_unopened: true,
                key_bits: Some(256),
                sector_size: Some(512),
            },
        };
        let line = req.encode();
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.contains(r#""op":"reencrypt""#), "{text}");
        assert!(text.contains(r#""action":"start""#), "{text}");
        match Request::decode(&line).unwrap() {
            Request::Reencrypt {
                action: ReencryptAction::Start,
                secret: Some(s),
                max_rate: Some(r),
                start:
                    StartOptions {
                        drop_unopened: true,
                        key_bits: Some(256),
                        sector_size: Some(512),
                    },
            } => {
                assert_eq!(s.expose_secret(), b"hunter2");
                assert_eq!(r, 200 << 20);
            }
            other => panic!("{other:?}"),
        }
        let shown = format!("{req:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("aHVudGVyMg"),
            "{shown}"
        );
        for action in ["pause", "resume", "status"] {
            let r = decode_str(&format!(
                r#"{{"v":1,"op":"reencrypt","action":"{action}"}}"#
            ));
            assert!(
                matches!(r, Ok(Request::Reencrypt { secret: None, .. })),
                "{action}"
            );
        }
    }

    #[test]
    fn reencrypt_requests_refuse_misplaced_and_missing_fields() {
        for bad in [
            r#"{"v":1,"op":"reencrypt"}"#,
            r#"{"v":1,"op":"reencrypt","action":"spin"}"#,
            r#"{"v":1,"op":"reencrypt","action":"pause","secret":"aGk="}"#,
            r#"{"v":1,"op":"reencrypt","action":"start","slot":1}"#,
            r#"{"v":1,"op":"reencrypt","action":"start","force":true}"#,
            r#"{"v":1,"op":"reencrypt","action":"start","max_rate":0}"#,
            r#"{"v":1,"op":"status","action":"start"}"#,
            r#"{"v":1,"op":"lock","max_rate":5}"#,
            r#"{"v":1,"op":"reencrypt","action":"pause","key_size":256}"#,
            r#"{"v":1,"op":"reencrypt","action":"resume","sector_size":512}"#,
            r#"{"v":1,"op":"reencrypt","action":"status","drop_unopened":true}"#,
            r#"{"v":1,"op":"status","sector_size":512}"#,
            r#"{"v":1,"op":"reencrypt","action":"start","key_size":128}"#,
            r#"{"v":1,"op":"reencrypt","action":"start","key_size":4294967295}"#,
            r#"{"v":1,"op":"reencrypt","action":"start","sector_size":8192}"#,
            r#"{"v":1,"op":"reencrypt","action":"start","sector_size":0}"#,
        ] {
            assert!(decode_str(bad).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn a_status_with_reencrypt_progress_round_trips_and_older_clients_ignore_it() {
        let s = StatusReport {
            reencrypt: Some(Box::new(ReencryptReport {
                state: ReencryptState::Running,
                done_bytes: 1 << 20,
                total_bytes: 1 << 30,
                rate_bytes_per_sec: 200 << 20,
                eta_secs: Some(5),
                max_rate: None,
                backing_off: true,
                error: None,
            })),
            ..status()
        };
        let ok = Response::Ok(s);
        assert_eq!(Response::decode(&ok.encode()).unwrap(), ok);
        // An unknown state from a newer daemon decodes as Unknown.
        let line = String::from_utf8(ok.encode())
            .unwrap()
            .replace("running", "rewinding");
        match Response::decode(line.as_bytes()).unwrap() {
            Response::Ok(s) => assert_eq!(s.reencrypt.unwrap().state, ReencryptState::Unknown),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn share_requests_round_trip_and_refuse_misplaced_or_missing_names() {
        let r = Request::Share {
            name: "alice".into(),
            secret: SecretBytes::from_slice(b"alice's words"),
        };
        let line = r.encode();
        let back = Request::decode(&line).unwrap();
        match &back {
            Request::Share { name, secret } => {
                assert_eq!(name, "alice");
                assert_eq!(secret.expose_secret(), b"alice's words");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(back.kind(), RequestKind::Share);
        let dbg = format!("{back:?}");
        assert!(dbg.contains("alice") && !dbg.contains("words"), "{dbg}");
        for bad in [
            r#"{"v":1,"op":"share","secret":"eA=="}"#,
            r#"{"v":1,"op":"share","name":"","secret":"eA=="}"#,
            r#"{"v":1,"op":"share","name":"alice"}"#,
            r#"{"v":1,"op":"share","name":"alice","secret":"eA==","slot":1}"#,
            r#"{"v":1,"op":"unlock","name":"alice","secret":"eA=="}"#,
            r#"{"v":1,"op":"status","name":"alice"}"#,
        ] {
            assert!(
                matches!(
                    Request::decode(bad.as_bytes()),
                    Err(DecodeError::Invalid(_))
                ),
                "{bad}"
            );
        }
        let long = format!(
            r#"{{"v":1,"op":"share","name":"{}","secret":"eA=="}}"#,
            "a".repeat(MAX_SHARE_NAME + 1)
        );
        assert!(Request::decode(long.as_bytes()).is_err());
    }
}
