//! PKCS#11 seal provider: a keyslot secret is encrypted inside an HSM with a non-extractable
//! AES key, `CKM_AES_GCM`, a random 96-bit IV and the [`Binding`] as additional data.
//!
//! * The key is named by an RFC 7512 `pkcs11:` URI ([`Pkcs11Uri`]): `token=` (and/or
//!   `serial=`, `manufacturer=`, `model=`) picks the token, `object=` and/or `id=` the key.
//! * The module (the vendor's `.so`) is loaded and `C_Initialize`d once per process and per
//!   library ([`finalize_modules`] at exit). PKCS#11 login state belongs to the token and the
//!   process, not to the session, so every operation (open session, log in, find the key,
//!   encrypt/decrypt, log out, close) runs under one lock per module: one thread's logout can't
//!   pull the login from under another thread.
//! * The PIN comes from the operator ([`PinSource`]: file, environment variable, systemd
//!   credential), never from a stored URI: `pin-value=` is refused by [`Pkcs11Uri::parse`].
//! * Token JSON members ([`Sealed::params`]): `pkcs11-uri` (without PIN), `iv` (base64) and
//!   `mechanism` (`"aes-gcm"`; 12-byte IV, 128-bit tag appended to the ciphertext).
//!
//! SoftHSM2 2.6 reports a GCM authentication failure as `CKR_GENERAL_ERROR`, not
//! `CKR_ENCRYPTED_DATA_INVALID`. On a general error from `C_Decrypt` the provider runs a probe
//! (encrypt and decrypt a dummy with the same key); if the probe works, the token is fine and the
//! failure was the tag: [`SealError::WrongBinding`].

use std::collections::HashMap;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use base64::Engine as _;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::{Slot, TokenInfo};
use cryptoki::types::RawAuthPin;
use zeroize::Zeroize;

use super::{Binding, SealError, SealProvider, Sealed};
use crate::crypto::keys::SecretBytes;

/// LUKS2 token type of secrets sealed by this provider.
pub const TOKEN_TYPE: &str = "nbdcrypt-pkcs11";
/// Module used when neither the operator nor the URI names one.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Token JSON member: the key's URI, without PIN.
pub const PARAM_URI: &str = "pkcs11-uri";
/// Token JSON member: the GCM IV, base64.
pub const PARAM_IV: &str = "iv";
/// Token JSON member: the mechanism, [`MECHANISM_AES_GCM`].
pub const PARAM_MECHANISM: &str = "mechanism";
/// The only mechanism so far: CKM_AES_GCM, 12-byte IV, 128-bit tag appended to the ciphertext.
pub const MECHANISM_AES_GCM: &str = "aes-gcm";

const PROVIDER: &str = "PKCS#11";
const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;
const TAG_LEN: usize = 16;

// ---------------------------------------------------------------------------------------------
// RFC 7512 URIs

/// Why a `pkcs11:` URI or a PIN source was refused. Never contains a PIN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PKCS#11 URI: {0}")]
pub struct UriError(String);

/// The parts of an RFC 7512 `pkcs11:` URI the provider uses. Unknown attributes are ignored.
/// Holds no PIN: `pin-value` is refused by [`Pkcs11Uri::parse`] and taken apart by
/// [`Pkcs11Uri::parse_with_pin_value`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=`: the token label (CKA_LABEL of the token, trailing blanks trimmed).
    pub token: Option<String>,
    /// `manufacturer=`
    pub manufacturer: Option<String>,
    /// `model=`
    pub model: Option<String>,
    /// `serial=`: the token serial number.
    pub serial: Option<String>,
    /// `object=`: the key's CKA_LABEL.
    pub object: Option<String>,
    /// `id=`: the key's CKA_ID, percent-decoded bytes.
    pub id: Option<Vec<u8>>,
    /// `type=secret-key` was given (any other type is refused: the key must be a secret key).
    pub type_secret_key: bool,
    /// `?module-path=`: absolute path of the PKCS#11 library.
    pub module_path: Option<PathBuf>,
    /// `?pin-source=`: where the PIN is read from.
    pub pin_source: Option<PinSource>,
}

impl Pkcs11Uri {
    /// Parses a URI to be stored or logged: `pin-value` is refused.
    pub fn parse(uri: &str) -> Result<Pkcs11Uri, UriError> {
        let (parsed, pin) = Self::parse_inner(uri)?;
        if let Some(mut pin) = pin {
            pin.zeroize();
            return Err(UriError(
                "pin-value is not accepted in a URI that is stored in the LUKS2 header or logged; \
                 use pin-source=file:/path or cred:NAME (or the PIN options)"
                    .into(),
            ));
        }
        Ok(parsed)
    }

    /// Parses a URI typed by the operator, taking `pin-value` (if any) out of it. The returned
    /// URI has no PIN and may be stored.
    pub fn parse_with_pin_value(uri: &str) -> Result<(Pkcs11Uri, Option<SecretBytes>), UriError> {
        let (parsed, pin) = Self::parse_inner(uri)?;
        Ok((parsed, pin.map(SecretBytes::from_vec)))
    }

    fn parse_inner(uri: &str) -> Result<(Pkcs11Uri, Option<Vec<u8>>), UriError> {
        let rest = match uri.split_once(':') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("pkcs11") => rest,
            _ => return Err(UriError("does not start with \"pkcs11:\"".into())),
        };
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') {
            return Err(UriError("a fragment (#) is not allowed".into()));
        }
        let mut out = Pkcs11Uri::default();
        let mut pin: Option<Vec<u8>> = None;
        let mut seen: Vec<&'static str> = Vec::new();
        fn check_dup(name: &'static str, seen: &mut Vec<&'static str>) -> Result<(), UriError> {
            if seen.contains(&name) {
                return Err(UriError(format!("attribute {name} given twice")));
            }
            seen.push(name);
            Ok(())
        }
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| UriError(format!("path attribute {attr:?} has no '='")))?;
            match name {
                "token" => {
                    check_dup("token", &mut seen)?;
                    out.token = Some(decode_utf8(name, value)?);
                }
                "manufacturer" => {
                    check_dup("manufacturer", &mut seen)?;
                    out.manufacturer = Some(decode_utf8(name, value)?);
                }
                "model" => {
                    check_dup("model", &mut seen)?;
                    out.model = Some(decode_utf8(name, value)?);
                }
                "serial" => {
                    check_dup("serial", &mut seen)?;
                    out.serial = Some(decode_utf8(name, value)?);
                }
                "object" => {
                    check_dup("object", &mut seen)?;
                    out.object = Some(decode_utf8(name, value)?);
                }
                "id" => {
                    check_dup("id", &mut seen)?;
                    out.id = Some(percent_decode(name, value)?);
                }
                "type" => {
                    check_dup("type", &mut seen)?;
                    match decode_utf8(name, value)?.as_str() {
                        "secret-key" => out.type_secret_key = true,
                        other => {
                            return Err(UriError(format!(
                                "type={other} is not supported: the sealing key must be a secret (AES) key, type=secret-key"
                            )))
                        }
                    }
                }
                _ => {} // RFC 7512: unknown (library-*, slot-*, vendor x-*) attributes are ignored
            }
        }
        for attr in query.unwrap_or("").split('&').filter(|a| !a.is_empty()) {
            let (name, value) = match attr.split_once('=') {
                Some(nv) => nv,
                // Never echo a query attribute: it might be a mangled pin-value.
                None => return Err(UriError("a query attribute has no '='".into())),
            };
            match name {
                "pin-value" => {
                    check_dup("pin-value", &mut seen)?;
                    // Don't echo the value in errors.
                    pin = Some(percent_decode("pin-value", value).map_err(|_| {
                        UriError("pin-value is not correctly percent-encoded".into())
                    })?);
                }
                "pin-source" => {
                    check_dup("pin-source", &mut seen)?;
                    out.pin_source = Some(PinSource::parse(&decode_utf8(name, value)?)?);
                }
                "module-path" => {
                    check_dup("module-path", &mut seen)?;
                    let path =
                        PathBuf::from(std::ffi::OsString::from_vec(percent_decode(name, value)?));
                    if !path.is_absolute() {
                        return Err(UriError(format!(
                            "module-path {} is not an absolute path",
                            path.display()
                        )));
                    }
                    out.module_path = Some(path);
                }
                _ => {} // module-name and unknown query attributes are ignored
            }
        }
        Ok((out, pin))
    }

    /// Human-readable description of the token part, for error messages.
    pub fn token_description(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.token {
            parts.push(format!("label {t:?}"));
        }
        if let Some(s) = &self.serial {
            parts.push(format!("serial {s:?}"));
        }
        if let Some(m) = &self.manufacturer {
            parts.push(format!("manufacturer {m:?}"));
        }
        if let Some(m) = &self.model {
            parts.push(format!("model {m:?}"));
        }
        if parts.is_empty() {
            "(any)".into()
        } else {
            parts.join(", ")
        }
    }

    /// Human-readable description of the key part, for error messages.
    pub fn key_description(&self) -> String {
        let mut parts = Vec::new();
        if let Some(o) = &self.object {
            parts.push(format!("label {o:?}"));
        }
        if let Some(id) = &self.id {
            parts.push(format!("id {}", encode_all(id)));
        }
        if parts.is_empty() {
            "(any)".into()
        } else {
            parts.join(", ")
        }
    }

    /// The same token and key (ignores module-path and pin-source).
    pub fn same_key(&self, other: &Pkcs11Uri) -> bool {
        self.token == other.token
            && self.serial == other.serial
            && self.manufacturer == other.manufacturer
            && self.model == other.model
            && self.object == other.object
            && self.id == other.id
    }

    fn matches_token(&self, info: &TokenInfo) -> bool {
        fn eq(want: &Option<String>, have: &str) -> bool {
            want.as_deref()
                .is_none_or(|w| w.trim_end_matches(' ') == have.trim_end_matches(' '))
        }
        eq(&self.token, info.label())
            && eq(&self.serial, info.serial_number())
            && eq(&self.manufacturer, info.manufacturer_id())
            && eq(&self.model, info.model())
    }

    fn validate_for_provider(&self) -> Result<(), String> {
        if self.token.is_none() && self.serial.is_none() {
            return Err(format!(
                "URI {self} names no token: add token=LABEL (or serial=)"
            ));
        }
        if self.object.is_none() && self.id.is_none() {
            return Err(format!(
                "URI {self} names no key: add object=LABEL and/or id=%XX"
            ));
        }
        Ok(())
    }
}

/// Canonical form: path attributes, then `module-path` and `pin-source`. Never a PIN.
impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut path: Vec<String> = Vec::new();
        let mut push = |name: &str, v: &Option<String>| {
            if let Some(v) = v {
                path.push(format!("{name}={}", encode_text(v.as_bytes(), false)));
            }
        };
        push("token", &self.token);
        push("manufacturer", &self.manufacturer);
        push("model", &self.model);
        push("serial", &self.serial);
        push("object", &self.object);
        if self.type_secret_key {
            path.push("type=secret-key".into());
        }
        if let Some(id) = &self.id {
            path.push(format!("id={}", encode_all(id)));
        }
        write!(f, "pkcs11:{}", path.join(";"))?;
        let mut query = Vec::new();
        if let Some(m) = &self.module_path {
            query.push(format!(
                "module-path={}",
                encode_text(m.as_os_str().as_bytes(), true)
            ));
        }
        if let Some(p) = &self.pin_source {
            query.push(format!(
                "pin-source={}",
                encode_text(p.to_string().as_bytes(), true)
            ));
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

fn percent_decode(name: &str, value: &str) -> Result<Vec<u8>, UriError> {
    let b = value.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
            match (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => out.push(h * 16 + l),
                _ => {
                    out.zeroize();
                    return Err(UriError(format!(
                        "{name}: '%' not followed by two hex digits"
                    )));
                }
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn decode_utf8(name: &str, value: &str) -> Result<String, UriError> {
    String::from_utf8(percent_decode(name, value)?)
        .map_err(|_| UriError(format!("{name}: not UTF-8 after percent-decoding")))
}

/// Percent-encodes everything but RFC 3986 unreserved characters and ':' ('/' too in query
/// attributes, where RFC 7512 allows it).
fn encode_text(bytes: &[u8], query: bool) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &c in bytes {
        if c.is_ascii_alphanumeric() || b"-._~:".contains(&c) || (query && c == b'/') {
            s.push(c as char);
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s
}

/// Percent-encodes every byte (the usual form of `id=`).
fn encode_all(bytes: &[u8]) -> String {
    bytes.iter().map(|c| format!("%{c:02X}")).collect()
}

// ---------------------------------------------------------------------------------------------
// PINs

/// Where the token user PIN comes from. Syntax (also the `pin-source=` URI attribute):
/// `file:/path` or `/path` (a file; one trailing newline is stripped), `cred:NAME` (a systemd
/// credential, `$CREDENTIALS_DIRECTORY/NAME`; one trailing newline is stripped). Not supported:
/// running a command (`|cmd`), and `env:NAME` — a PIN in the environment is readable through
/// `/proc/PID/environ` and inherited by every child process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    File(PathBuf),
    Credential(String),
}

impl PinSource {
    pub fn parse(s: &str) -> Result<PinSource, UriError> {
        let file = |p: &str| {
            let path = PathBuf::from(p);
            if path.is_absolute() {
                Ok(PinSource::File(path))
            } else {
                Err(UriError(format!("PIN file {p:?} is not an absolute path")))
            }
        };
        if let Some(p) = s.strip_prefix("file://") {
            // file:///path (empty authority) or file://localhost/path
            file(p.strip_prefix("localhost").unwrap_or(p))
        } else if let Some(p) = s.strip_prefix("file:") {
            file(p)
        } else if s.starts_with('/') {
            file(s)
        } else if s.starts_with("env:") {
            Err(UriError(
                "PIN source env:NAME is not accepted: a PIN in the environment is readable through \
                 /proc/PID/environ and inherited by child processes; use file:/path (mode 0600) or \
                 cred:NAME (a systemd credential)"
                    .into(),
            ))
        } else if let Some(name) = s.strip_prefix("cred:") {
            if name.is_empty()
                || name == "."
                || name == ".."
                || name.contains('/')
                || name.contains('\0')
            {
                return Err(UriError(format!("bad systemd credential name {name:?}")));
            }
            Ok(PinSource::Credential(name.to_string()))
        } else if s.starts_with('|') {
            Err(UriError(
                "pin-source=|command is not supported; use file: or cred:".into(),
            ))
        } else {
            // The value is not echoed: an operator may have typed the PIN itself here.
            Err(UriError(
                "PIN source: expected file:/path, /path or cred:NAME; a PIN itself is never \
                 accepted on the command line or in a URI (put it in a file or a systemd credential)"
                    .into(),
            ))
        }
    }

    /// Reads the PIN. Errors name the source, never the PIN.
    pub fn read(&self) -> Result<SecretBytes, SealError> {
        let fail = |detail: String| SealError::LoginFailed {
            provider: PROVIDER,
            detail,
        };
        match self {
            PinSource::File(path) => read_pin_file(path)
                .map_err(|e| fail(format!("cannot read the PIN file {}: {e}", path.display()))),
            PinSource::Credential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    fail(format!(
                        "systemd credential {name} (PIN): $CREDENTIALS_DIRECTORY is not set (not started by systemd with LoadCredential= / SetCredential=?)"
                    ))
                })?;
                let path = Path::new(&dir).join(name);
                read_pin_file(&path).map_err(|e| {
                    fail(format!(
                        "cannot read systemd credential {name} ({}): {e}",
                        path.display()
                    ))
                })
            }
        }
    }
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "file:{}", p.display()),
            PinSource::Credential(n) => write!(f, "cred:{n}"),
        }
    }
}

fn read_pin_file(path: &Path) -> std::io::Result<SecretBytes> {
    crate::secret_file::read_pin_file(path).map_err(std::io::Error::from)
}

// ---------------------------------------------------------------------------------------------
// Modules: loaded and initialized once per process

struct Module {
    ctx: Pkcs11,
    /// Held for a whole session's life: login state is per token and process.
    lock: Mutex<()>,
}

fn modules() -> &'static Mutex<HashMap<PathBuf, Arc<Module>>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
    MODULES.get_or_init(Default::default)
}

fn load_module(path: &Path) -> Result<Arc<Module>, SealError> {
    let unreachable = |what: &str, e: &dyn fmt::Display| SealError::Unreachable {
        provider: PROVIDER,
        detail: format!("cannot {what} PKCS#11 module {}: {e}", path.display()),
    };
    // One entry per library file, whatever the spelling: the same library is one C_Initialize.
    // (A bare name is left to dlopen's search path; its error then names what is missing.)
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut map = modules().lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(m) = map.get(&key) {
        return Ok(m.clone());
    }
    let ctx = Pkcs11::new(&key).map_err(|e| unreachable("load", &e))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Someone else in this process (another library using the same module) got there first.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(unreachable("initialize", &e)),
    }
    let m = Arc::new(Module {
        ctx,
        lock: Mutex::new(()),
    });
    map.insert(key, m.clone());
    Ok(m)
}

/// `C_Finalize` every module this process loaded. Call once, at exit, after the last seal or
/// unseal: it ends every session of every user of those modules in the process. A later seal or
/// unseal loads the module again.
pub fn finalize_modules() {
    let drained: Vec<_> = modules()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain()
        .collect();
    for (path, m) in drained {
        if let Err(e) = m.ctx.clone().finalize() {
            tracing::warn!(module = %path.display(), "C_Finalize failed: {e}");
        }
    }
}

/// The module to load when sealing: the operator's choice (`--pkcs11-module`), else the URI's
/// `module-path`, else [`DEFAULT_MODULE`]. Use it only for a URI the operator typed: when
/// unsealing, a stored URI's `module-path` is not trusted (see [`Pkcs11Provider::from_token_params`]).
pub fn resolve_module(operator: Option<&Path>, uri: &Pkcs11Uri) -> PathBuf {
    operator
        .map(Path::to_path_buf)
        .or_else(|| uri.module_path.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE))
}

// ---------------------------------------------------------------------------------------------
// The provider

/// Short name of the provider in the [`registry`](super::registry) (logs, audit, `dump`).
pub const NAME: &str = "pkcs11";

/// PKCS#11 (HSMs, smart cards) in the provider [`registry`](super::registry).
pub struct Pkcs11Hsm;

const SETTINGS: &[super::registry::SettingSpec] = &[
    super::registry::SettingSpec {
        key: "pkcs11-module",
        aliases: &[],
        value_name: "PATH",
        help: "PKCS#11 module for HSM tokens (default: SoftHSM2's). Never taken from the volume \
               header",
        repeated: false,
    },
    super::registry::SettingSpec {
        key: "pkcs11-pin",
        aliases: &["pin-file"],
        value_name: "SOURCE",
        help: "Where the HSM user PIN comes from: file:/path (or /path) or cred:NAME (a systemd \
               credential)",
        repeated: false,
    },
];

fn settings_of(c: &(dyn std::any::Any + Send + Sync)) -> Result<&super::Pkcs11Settings, SealError> {
    c.downcast_ref::<super::Pkcs11Settings>()
        .ok_or_else(|| SealError::Other {
            provider: NAME,
            detail: "internal: settings of another provider".into(),
        })
}

impl super::registry::Provider for Pkcs11Hsm {
    fn name(&self) -> &'static str {
        NAME
    }
    fn label(&self) -> &'static str {
        "PKCS#11 HSM"
    }
    fn token_type(&self) -> &'static str {
        TOKEN_TYPE
    }
    fn key_param(&self) -> &'static str {
        PARAM_URI
    }
    fn settings(&self) -> &'static [super::registry::SettingSpec] {
        SETTINGS
    }
    fn configure(
        &self,
        raw: &super::registry::RawSettings,
    ) -> Result<super::registry::Configured, String> {
        let pin = match raw.get("pkcs11-pin") {
            Some(p) => Some(PinSource::parse(p).map_err(|e| format!("pkcs11-pin: {e}"))?),
            None => None,
        };
        Ok(Arc::new(super::Pkcs11Settings {
            module: raw.get("pkcs11-module").map(PathBuf::from),
            pin,
        }))
    }
    fn for_token(
        &self,
        params: &serde_json::Map<String, serde_json::Value>,
        configured: &(dyn std::any::Any + Send + Sync),
    ) -> Result<Box<dyn SealProvider>, SealError> {
        super::resolve_pkcs11_with(params, settings_of(configured)?)
    }
    fn enroll_flag(&self) -> super::registry::EnrollFlag {
        super::registry::EnrollFlag {
            long: "pkcs11",
            value_name: "URI",
            help: "The HSM key that seals the secret: a non-extractable AES key, as an RFC 7512 \
                   URI (pkcs11:token=LABEL;object=LABEL or ;id=%01)",
        }
    }
    /// The PIN comes from `--pkcs11-pin` or the URI's `pin-source=` (both typed by the
    /// operator), never from the command line itself; the module from `--pkcs11-module`, else
    /// the URI's `module-path` (typed by the operator here), else SoftHSM2's.
    fn for_enroll(
        &self,
        value: &str,
        configured: &(dyn std::any::Any + Send + Sync),
    ) -> Result<Box<dyn SealProvider>, SealError> {
        let s = settings_of(configured)?;
        let fail = |detail: String| SealError::Other {
            provider: NAME,
            detail,
        };
        let (uri, inline_pin) =
            Pkcs11Uri::parse_with_pin_value(value).map_err(|e| fail(format!("--pkcs11: {e}")))?;
        if inline_pin.is_some() {
            drop(inline_pin);
            return Err(fail(
                "--pkcs11: the URI carries pin-value=: a PIN on the command line is readable by \
                 every local user (ps, /proc) and lands in shell history. Remove pin-value= and \
                 give --pkcs11-pin file:/path/to/pin or --pkcs11-pin cred:NAME (a systemd credential)"
                    .into(),
            ));
        }
        let pin = match (&s.pin, &uri.pin_source) {
            (Some(p), _) => p.read()?,
            (None, Some(src)) => src.read()?,
            (None, None) => {
                return Err(fail(
                    "--pkcs11 needs a PIN: --pkcs11-pin file:/path (or cred:NAME)".into(),
                ))
            }
        };
        let module = resolve_module(s.module.as_deref(), &uri);
        Ok(Box::new(Pkcs11Provider::new(uri, module, pin)?))
    }
    fn describe(&self, params: &serde_json::Map<String, serde_json::Value>) -> String {
        match params
            .get(PARAM_URI)
            .and_then(serde_json::Value::as_str)
            .and_then(|u| Pkcs11Uri::parse(u).ok())
        {
            Some(u) => match (&u.token, &u.object) {
                (Some(t), Some(o)) => format!("HSM {t}/{o}"),
                _ => format!("HSM {}", u.key_description()),
            },
            None => "HSM".into(),
        }
    }
}

/// Seals with an AES key inside a PKCS#11 token. `Send + Sync`; operations on one module are
/// serialized. Calls block (a login is ~2 ms on SoftHSM2, real HSMs can take far longer): from
/// async code, run them in `tokio::task::spawn_blocking`.
pub struct Pkcs11Provider {
    uri: Pkcs11Uri,
    module_path: PathBuf,
    module: Arc<Module>,
    pin: SecretBytes,
}

impl fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Provider")
            .field("uri", &self.uri.to_string())
            .field("module", &self.module_path)
            .finish_non_exhaustive()
    }
}

/// An open, logged-in session: logs out (if it logged in) and closes on drop, on every path.
struct LoggedIn {
    session: Session,
    logged_in: bool,
}

impl Drop for LoggedIn {
    fn drop(&mut self) {
        if self.logged_in {
            if let Err(e) = self.session.logout() {
                tracing::warn!("PKCS#11 C_Logout failed: {}", ck_detail(&e));
            }
        }
        // `session` is dropped next: C_CloseSession.
    }
}

impl Pkcs11Provider {
    /// Loads and initializes `module` (once per process) and checks that `uri` names a token and
    /// a key. Doesn't talk to the token yet. `module`: see [`resolve_module`].
    pub fn new(
        uri: Pkcs11Uri,
        module: PathBuf,
        pin: SecretBytes,
    ) -> Result<Pkcs11Provider, SealError> {
        uri.validate_for_provider()
            .map_err(|detail| SealError::Other {
                provider: PROVIDER,
                detail,
            })?;
        let loaded = load_module(&module)?;
        Ok(Pkcs11Provider {
            uri,
            module_path: module,
            module: loaded,
            pin,
        })
    }

    /// The provider that can unseal a token's secret, from the token's JSON members. `module` is
    /// the operator's (`--pkcs11-module`, default [`DEFAULT_MODULE`]): the stored URI's
    /// `module-path` is ignored, because the LUKS2 header is not authenticated and loading a
    /// library it names would run code chosen by whoever can write the header.
    pub fn from_token_params(
        params: &serde_json::Map<String, serde_json::Value>,
        module: PathBuf,
        pin: SecretBytes,
    ) -> Result<Pkcs11Provider, SealError> {
        let uri = params
            .get(PARAM_URI)
            .ok_or_else(|| SealError::BadToken(format!("PKCS#11 token has no {PARAM_URI}")))?
            .as_str()
            .ok_or_else(|| {
                SealError::BadToken(format!("PKCS#11 token: {PARAM_URI} is not a string"))
            })?;
        let uri = Pkcs11Uri::parse(uri).map_err(|e| SealError::BadToken(e.to_string()))?;
        uri.validate_for_provider().map_err(SealError::BadToken)?;
        Pkcs11Provider::new(uri, module, pin)
    }

    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    pub fn module_path(&self) -> &Path {
        &self.module_path
    }

    fn err(&self, e: CkError) -> SealError {
        map_error(&self.uri, e)
    }

    /// Runs `op` with a logged-in session and the key, under the module lock.
    fn with_key<T>(
        &self,
        for_seal: bool,
        op: impl FnOnce(&Session, ObjectHandle) -> Result<T, SealError>,
    ) -> Result<T, SealError> {
        let ctx = &self.module.ctx;
        let _guard = self
            .module
            .lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);

        let (slot, info) = self.find_slot()?;
        let session = ctx.open_ro_session(slot).map_err(|e| self.err(e))?;
        let mut s = LoggedIn {
            session,
            logged_in: false,
        };
        if info.login_required() {
            self.check_pin_state(&info)?;
            // A copy for cryptoki: heap, not locked, wiped when dropped (secrecy's SecretBox).
            let pin = RawAuthPin::new(Box::new(self.pin.expose_secret().to_vec()));
            match s.session.login_with_raw(UserType::User, &pin) {
                Ok(()) => s.logged_in = true,
                // Logged in by someone else in this process: their login, not ours to end.
                Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(e) => return Err(self.err(e)),
            }
        }

        let key = self.find_key(&s.session, for_seal)?;
        op(&s.session, key)
    }

    /// Don't walk a real HSM into a locked PIN: an unattended unlock that is refused is retried
    /// by the operator, a locked token needs the SO. (SoftHSM2 never locks.)
    fn check_pin_state(&self, info: &TokenInfo) -> Result<(), SealError> {
        let token = self.uri.token_description();
        let refuse = |detail: String| {
            Err(SealError::LoginFailed {
                provider: PROVIDER,
                detail,
            })
        };
        if info.user_pin_locked() {
            return refuse(format!("token {token}: the user PIN is locked (CKF_USER_PIN_LOCKED); the security officer must unblock it"));
        }
        if info.user_pin_final_try() {
            return refuse(format!(
                "token {token}: one PIN attempt left before the PIN locks (CKF_USER_PIN_FINAL_TRY); not trying \
                 unattended. Log in once by hand with the right PIN (e.g. pkcs11-tool --login --test) to reset the counter"
            ));
        }
        if !info.user_pin_initialized() {
            return refuse(format!(
                "token {token}: the user PIN is not initialized (CKF_USER_PIN_INITIALIZED unset)"
            ));
        }
        Ok(())
    }

    fn find_slot(&self) -> Result<(Slot, TokenInfo), SealError> {
        let ctx = &self.module.ctx;
        let slots = ctx
            .get_slots_with_initialized_token()
            .map_err(|e| self.err(e))?;
        let mut found: Vec<(Slot, TokenInfo)> = slots
            .into_iter()
            .filter_map(|s| ctx.get_token_info(s).ok().map(|t| (s, t)))
            .filter(|(_, t)| self.uri.matches_token(t))
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(SealError::KeyMissing {
                provider: PROVIDER,
                key: format!(
                    "token {} (no such token in module {})",
                    self.uri.token_description(),
                    self.module_path.display()
                ),
            }),
            n => Err(SealError::Other {
                provider: PROVIDER,
                detail: format!(
                    "{n} tokens match {}; add serial= to the URI",
                    self.uri.token_description()
                ),
            }),
        }
    }

    fn find_key(&self, session: &Session, for_seal: bool) -> Result<ObjectHandle, SealError> {
        let mut template = vec![Attribute::Class(ObjectClass::SECRET_KEY)];
        if let Some(label) = &self.uri.object {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &self.uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        let keys = session.find_objects(&template).map_err(|e| self.err(e))?;
        let what = format!(
            "secret key {} on token {}",
            self.uri.key_description(),
            self.uri.token_description()
        );
        let key = match keys.as_slice() {
            [key] => *key,
            [] => {
                return Err(SealError::KeyMissing {
                    provider: PROVIDER,
                    key: what,
                })
            }
            _ => {
                return Err(SealError::Other {
                    provider: PROVIDER,
                    detail: format!("{} objects match {what}; add id= to the URI", keys.len()),
                })
            }
        };
        let attrs = session
            .get_attributes(
                key,
                &[
                    AttributeType::KeyType,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .map_err(|e| self.err(e))?;
        let (mut key_type, mut sensitive, mut extractable) = (None, None, None);
        for a in attrs {
            match a {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::Sensitive(b) => sensitive = Some(b),
                Attribute::Extractable(b) => extractable = Some(b),
                _ => {}
            }
        }
        let refuse = |detail: String| {
            Err(SealError::Other {
                provider: PROVIDER,
                detail,
            })
        };
        match key_type {
            Some(t) if t == KeyType::AES => {}
            Some(t) => return refuse(format!("{what} is a {t} key, not AES")),
            None => {
                return refuse(format!(
                    "{what}: the token does not say its key type (CKA_KEY_TYPE)"
                ))
            }
        }
        let exposed = match (sensitive, extractable) {
            (Some(true), Some(false)) => None,
            (_, Some(true)) => Some("extractable (CKA_EXTRACTABLE=true)"),
            (Some(false), _) => Some("not sensitive (CKA_SENSITIVE=false)"),
            _ => Some("of unknown sensitivity (CKA_SENSITIVE/CKA_EXTRACTABLE unreadable)"),
        };
        if let Some(why) = exposed {
            if for_seal {
                return refuse(format!(
                    "refusing to seal with {what}: the key is {why}, so its value can leave the HSM; \
                     generate a sensitive, non-extractable AES key"
                ));
            }
            tracing::warn!(key = %self.uri, "unsealing with a PKCS#11 key that is {why}; rekey to a non-extractable key");
        }
        Ok(key)
    }
}

/// Sorts a PKCS#11 failure by what the operator has to do (see [`SealError`]).
fn map_error(uri: &Pkcs11Uri, e: CkError) -> SealError {
    let token = uri.token_description();
    let detail = format!("token {token}: {}", ck_detail(&e));
    match &e {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::PinIncorrect
            | RvError::PinLenRange
            | RvError::PinInvalid
            | RvError::PinExpired
            | RvError::PinLocked
            | RvError::UserPinNotInitialized => SealError::LoginFailed {
                provider: PROVIDER,
                detail,
            },
            RvError::TokenNotPresent | RvError::TokenNotRecognized => SealError::KeyMissing {
                provider: PROVIDER,
                key: format!("token {token} ({})", ck_detail(&e)),
            },
            RvError::DeviceRemoved | RvError::DeviceError | RvError::DeviceMemory => {
                SealError::Unreachable {
                    provider: PROVIDER,
                    detail,
                }
            }
            _ => SealError::Other {
                provider: PROVIDER,
                detail,
            },
        },
        _ => SealError::Other {
            provider: PROVIDER,
            detail,
        },
    }
}

fn gcm_encrypt(
    session: &Session,
    key: ObjectHandle,
    iv: &[u8; IV_LEN],
    aad: &[u8],
    data: &[u8],
) -> Result<Vec<u8>, CkError> {
    let mut iv = *iv;
    let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())?;
    session.encrypt(&Mechanism::AesGcm(params), key, data)
}

fn gcm_decrypt(
    session: &Session,
    key: ObjectHandle,
    iv: &[u8; IV_LEN],
    aad: &[u8],
    data: &[u8],
) -> Result<Vec<u8>, CkError> {
    let mut iv = *iv;
    let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())?;
    session.decrypt(&Mechanism::AesGcm(params), key, data)
}

fn random_iv() -> Result<[u8; IV_LEN], SealError> {
    let mut iv = [0u8; IV_LEN];
    getrandom::fill(&mut iv).map_err(|e| SealError::Other {
        provider: PROVIDER,
        detail: format!("no random bytes for the IV: {e}"),
    })?;
    Ok(iv)
}

/// Can this key still encrypt and decrypt? Tells a GCM tag mismatch from a broken token when the
/// token reports both as CKR_GENERAL_ERROR (SoftHSM2).
fn probe(session: &Session, key: ObjectHandle) -> bool {
    let Ok(iv) = random_iv() else { return false };
    let aad = b"nbdcrypt-v1\0probe";
    let data = [0u8; 32];
    match gcm_encrypt(session, key, &iv, aad, &data) {
        Ok(ct) => matches!(gcm_decrypt(session, key, &iv, aad, &ct), Ok(pt) if pt == data),
        Err(_) => false,
    }
}

/// "C_Login: CKR_PIN_INCORRECT" rather than the spec's paragraph.
fn ck_detail(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("C_{f:?}: {}", ckr_name(rv)),
        other => other.to_string(),
    }
}

fn ckr_name(rv: &RvError) -> String {
    let debug = format!("{rv:?}");
    if !debug.chars().all(|c| c.is_ascii_alphanumeric()) {
        return debug; // e.g. a vendor-defined code with a number
    }
    let mut s = String::from("CKR");
    for c in debug.chars() {
        if c.is_ascii_uppercase() {
            s.push('_');
        }
        s.push(c.to_ascii_uppercase());
    }
    s
}

impl SealProvider for Pkcs11Provider {
    fn token_type(&self) -> &'static str {
        TOKEN_TYPE
    }

    fn key_reference(&self) -> String {
        self.uri.to_string()
    }

    fn seal(&self, secret: &SecretBytes, binding: &Binding) -> Result<Sealed, SealError> {
        let iv = random_iv()?;
        let aad = binding.aad();
        let ciphertext = self.with_key(true, |session, key| {
            gcm_encrypt(session, key, &iv, &aad, secret.expose_secret()).map_err(|e| self.err(e))
        })?;
        if ciphertext.len() != secret.len() + TAG_LEN {
            return Err(SealError::Other {
                provider: PROVIDER,
                detail: format!(
                    "AES-GCM returned {} bytes for {} (expected the data plus a {TAG_LEN}-byte tag)",
                    ciphertext.len(),
                    secret.len()
                ),
            });
        }
        let mut params = serde_json::Map::new();
        params.insert(PARAM_URI.into(), self.uri.to_string().into());
        params.insert(
            PARAM_IV.into(),
            base64::engine::general_purpose::STANDARD.encode(iv).into(),
        );
        params.insert(PARAM_MECHANISM.into(), MECHANISM_AES_GCM.into());
        Ok(Sealed { ciphertext, params })
    }

    fn unseal(&self, sealed: &Sealed, binding: &Binding) -> Result<SecretBytes, SealError> {
        let bad = |m: String| SealError::BadToken(format!("PKCS#11 token: {m}"));
        let get_str = |name: &str| -> Result<&str, SealError> {
            sealed
                .params
                .get(name)
                .ok_or_else(|| bad(format!("no {name}")))?
                .as_str()
                .ok_or_else(|| bad(format!("{name} is not a string")))
        };
        let mechanism = get_str(PARAM_MECHANISM)?;
        if mechanism != MECHANISM_AES_GCM {
            return Err(bad(format!(
                "unsupported mechanism {mechanism:?} (this version knows {MECHANISM_AES_GCM:?})"
            )));
        }
        let iv = base64::engine::general_purpose::STANDARD
            .decode(get_str(PARAM_IV)?)
            .map_err(|e| bad(format!("{PARAM_IV} is not base64: {e}")))?;
        let iv: [u8; IV_LEN] = iv.as_slice().try_into().map_err(|_| {
            bad(format!(
                "{PARAM_IV} is {} bytes, expected {IV_LEN}",
                iv.len()
            ))
        })?;
        let stored = Pkcs11Uri::parse(get_str(PARAM_URI)?).map_err(|e| bad(e.to_string()))?;
        if !stored.same_key(&self.uri) {
            return Err(bad(format!(
                "sealed with {stored}, but this provider uses {}",
                self.uri
            )));
        }
        if sealed.ciphertext.len() < TAG_LEN {
            return Err(bad(format!(
                "ciphertext is {} bytes, shorter than the GCM tag",
                sealed.ciphertext.len()
            )));
        }
        let aad = binding.aad();
        self.with_key(false, |session, key| {
            match gcm_decrypt(session, key, &iv, &aad, &sealed.ciphertext) {
                Ok(plain) => Ok(SecretBytes::from_vec(plain)),
                Err(CkError::Pkcs11(
                    RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                    _,
                )) => Err(SealError::WrongBinding),
                Err(
                    e @ CkError::Pkcs11(
                        RvError::GeneralError | RvError::FunctionFailed,
                        cryptoki::context::Function::Decrypt,
                    ),
                ) => {
                    if probe(session, key) {
                        Err(SealError::WrongBinding)
                    } else {
                        Err(self.err(e))
                    }
                }
                Err(e) => Err(self.err(e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_object_id_type() {
        let u =
            Pkcs11Uri::parse("pkcs11:token=My%20Token;object=vol-kek;type=secret-key;id=%01%ff")
                .unwrap();
        assert_eq!(u.token.as_deref(), Some("My Token"));
        assert_eq!(u.object.as_deref(), Some("vol-kek"));
        assert_eq!(u.id.as_deref(), Some(&[1u8, 0xff][..]));
        assert!(u.type_secret_key);
        assert_eq!(u.module_path, None);
        assert_eq!(u.pin_source, None);
    }

    #[test]
    fn parses_query_attributes() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=t;object=k?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/nbdcrypt/pin",
        )
        .unwrap();
        assert_eq!(
            u.module_path.as_deref(),
            Some(Path::new("/usr/lib/softhsm/libsofthsm2.so"))
        );
        assert_eq!(
            u.pin_source,
            Some(PinSource::File("/etc/nbdcrypt/pin".into()))
        );
        assert!(Pkcs11Uri::parse("pkcs11:token=t;object=k?pin-source=env:HSM_PIN").is_err());
        let u = Pkcs11Uri::parse("pkcs11:token=t;object=k?pin-source=cred:hsm-pin").unwrap();
        assert_eq!(u.pin_source, Some(PinSource::Credential("hsm-pin".into())));
        let u = Pkcs11Uri::parse("pkcs11:token=t;object=k?pin-source=%2Frun%2Fpin").unwrap();
        assert_eq!(u.pin_source, Some(PinSource::File("/run/pin".into())));
    }

    #[test]
    fn refuses_pin_value_without_echoing_it() {
        let err = Pkcs11Uri::parse("pkcs11:token=t;object=k?pin-value=s3cr3t-1234").unwrap_err();
        assert!(err.to_string().contains("pin-value"), "{err}");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        let err = Pkcs11Uri::parse("pkcs11:token=t;object=k?pin-value=s3cr3t%zz").unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        let err = Pkcs11Uri::parse("pkcs11:token=t?pin-value%3Ds3cr3t").unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn parse_with_pin_value_takes_it_out() {
        let (u, pin) =
            Pkcs11Uri::parse_with_pin_value("pkcs11:token=t;object=k?pin-value=12%2034").unwrap();
        assert_eq!(pin.unwrap().expose_secret(), b"12 34");
        assert!(!u.to_string().contains("pin"));
        let (_, pin) = Pkcs11Uri::parse_with_pin_value("pkcs11:token=t;object=k").unwrap();
        assert!(pin.is_none());
    }

    #[test]
    fn unknown_attributes_are_ignored() {
        let u = Pkcs11Uri::parse(
            "pkcs11:library-manufacturer=SoftHSM;slot-id=3;x-vendor=1;token=t;object=k?module-name=softhsm2&x-foo=bar",
        )
        .unwrap();
        assert_eq!(
            u,
            Pkcs11Uri {
                token: Some("t".into()),
                object: Some("k".into()),
                ..Default::default()
            }
        );
    }

    #[test]
    fn rejects_malformed_uris() {
        for bad in [
            "pkcs12:token=t",
            "token=t",
            "pkcs11:token",
            "pkcs11:token=%4",
            "pkcs11:token=%zz",
            "pkcs11:token=%ff%fe",
            "pkcs11:token=a;token=b",
            "pkcs11:object=k;type=private",
            "pkcs11:object=k?module-path=relative/lib.so",
            "pkcs11:object=k?pin-source=|/bin/echo 1234",
            "pkcs11:object=k?pin-source=relative",
            "pkcs11:object=k?pin-source=cred:../x",
            "pkcs11:object=k#frag",
        ] {
            assert!(Pkcs11Uri::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(Pkcs11Uri::parse("PKCS11:token=t").is_ok());
        assert_eq!(Pkcs11Uri::parse("pkcs11:").unwrap(), Pkcs11Uri::default());
    }

    #[test]
    fn display_round_trips() {
        let u = Pkcs11Uri {
            token: Some("My Token; v=2".into()),
            serial: Some("a1b2".into()),
            object: Some("vol/kek?".into()),
            id: Some(vec![0, 1, 0xfe]),
            type_secret_key: true,
            module_path: Some("/opt/hsm lib/p11.so".into()),
            pin_source: Some(PinSource::File("/etc/pin file".into())),
            ..Default::default()
        };
        let s = u.to_string();
        assert!(s.starts_with("pkcs11:token=My%20Token%3B%20v%3D2;"), "{s}");
        assert!(s.contains("id=%00%01%FE"), "{s}");
        assert_eq!(Pkcs11Uri::parse(&s).unwrap(), u);
        let u = Pkcs11Uri {
            pin_source: Some(PinSource::Credential("pin".into())),
            ..u.clone()
        };
        assert_eq!(Pkcs11Uri::parse(&u.to_string()).unwrap(), u);
    }

    #[test]
    fn provider_needs_token_and_key() {
        let pin = || SecretBytes::from_slice(b"1234");
        for uri in [
            "pkcs11:object=k",
            "pkcs11:token=t",
            "pkcs11:type=secret-key",
        ] {
            let e =
                Pkcs11Provider::new(Pkcs11Uri::parse(uri).unwrap(), DEFAULT_MODULE.into(), pin())
                    .unwrap_err();
            assert!(matches!(e, SealError::Other { .. }), "{uri}: {e}");
        }
    }

    #[test]
    fn missing_module_is_unreachable_with_path() {
        let uri = Pkcs11Uri::parse("pkcs11:token=t;object=k").unwrap();
        let e = Pkcs11Provider::new(
            uri.clone(),
            "/nonexistent/libp11.so".into(),
            SecretBytes::from_slice(b"1"),
        )
        .unwrap_err();
        assert!(matches!(e, SealError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/libp11.so"), "{e}");
        // A file that is not a shared library.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("libfake.so");
        std::fs::write(&fake, b"not an ELF file").unwrap();
        let e = Pkcs11Provider::new(uri, fake.clone(), SecretBytes::from_slice(b"1")).unwrap_err();
        assert!(matches!(e, SealError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains(&fake.display().to_string()), "{e}");
    }

    #[test]
    fn resolve_module_precedence() {
        let with = Pkcs11Uri::parse("pkcs11:token=t;object=k?module-path=/uri/lib.so").unwrap();
        let without = Pkcs11Uri::parse("pkcs11:token=t;object=k").unwrap();
        assert_eq!(
            resolve_module(Some(Path::new("/cli/lib.so")), &with),
            PathBuf::from("/cli/lib.so")
        );
        assert_eq!(resolve_module(None, &with), PathBuf::from("/uri/lib.so"));
        assert_eq!(
            resolve_module(None, &without),
            PathBuf::from(DEFAULT_MODULE)
        );
    }

    #[test]
    fn pin_file_strips_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        for (content, want) in [
            (&b"1234\n"[..], &b"1234"[..]),
            (b"1234\r\n", b"1234"),
            (b"1234", b"1234"),
            (b"12 34\n\n", b"12 34\n"),
            (b"", b""),
        ] {
            let p = dir.path().join("pin");
            std::fs::write(&p, content).unwrap();
            assert_eq!(PinSource::File(p).read().unwrap().expose_secret(), want);
        }
        let Err(e) = PinSource::File(dir.path().join("missing")).read() else {
            panic!("read a missing file")
        };
        assert!(matches!(e, SealError::LoginFailed { .. }), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn pin_source_parse_and_display() {
        for (s, want) in [
            ("file:/a/b", PinSource::File("/a/b".into())),
            ("file:///a/b", PinSource::File("/a/b".into())),
            ("file://localhost/a/b", PinSource::File("/a/b".into())),
            ("/a/b", PinSource::File("/a/b".into())),
            ("cred:pin", PinSource::Credential("pin".into())),
        ] {
            let p = PinSource::parse(s).unwrap();
            assert_eq!(p, want, "{s}");
            assert_eq!(PinSource::parse(&p.to_string()).unwrap(), p);
        }
        for bad in [
            "env:", "env:PIN", "cred:", "cred:a/b", "cred:..", "|cmd", "pin.txt", "file:rel",
        ] {
            assert!(PinSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_are_sorted_by_operator_action() {
        use cryptoki::context::Function;
        let uri = Pkcs11Uri::parse("pkcs11:token=hsm1;object=k").unwrap();
        let map = |rv, f| map_error(&uri, CkError::Pkcs11(rv, f));
        for rv in [
            RvError::PinIncorrect,
            RvError::PinLenRange,
            RvError::PinLocked,
            RvError::PinExpired,
        ] {
            assert!(
                matches!(map(rv, Function::Login), SealError::LoginFailed { .. }),
                "{rv:?}"
            );
        }
        let e = map(RvError::TokenNotPresent, Function::OpenSession);
        assert!(
            matches!(e, SealError::KeyMissing { .. }) && e.to_string().contains("hsm1"),
            "{e}"
        );
        let e = map(RvError::DeviceRemoved, Function::Encrypt);
        assert!(
            matches!(e, SealError::Unreachable { .. }) && e.is_transient(),
            "{e}"
        );
        let e = map(RvError::MechanismInvalid, Function::EncryptInit);
        assert!(matches!(e, SealError::Other { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("C_EncryptInit: CKR_MECHANISM_INVALID"),
            "{e}"
        );
    }

    #[test]
    fn ckr_names() {
        assert_eq!(ckr_name(&RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(ckr_name(&RvError::GeneralError), "CKR_GENERAL_ERROR");
        assert_eq!(
            ck_detail(&CkError::Pkcs11(
                RvError::PinIncorrect,
                cryptoki::context::Function::Login
            )),
            "C_Login: CKR_PIN_INCORRECT"
        );
    }
}
