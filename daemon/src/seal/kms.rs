//! AWS KMS as a seal provider: `Encrypt`/`Decrypt` of the 32-byte keyslot secret under a
//! symmetric KMS key, with the encryption context
//! `{"nbdcrypt:volume": <uuid>, "nbdcrypt:keyslot": "<n>"}` binding the ciphertext to its volume
//! and keyslot (KMS authenticates the context; a copied token fails with
//! `InvalidCiphertextException`, reported as [`SealError::WrongBinding`]).
//!
//! **Threading.** [`SealProvider`] is synchronous. Each `KmsProvider` owns a small
//! current-thread tokio runtime, and every call runs `Runtime::block_on` on a short-lived
//! scoped thread of its own. So a call is safe from anywhere: a plain thread, a
//! `spawn_blocking` task (how the daemon calls providers), even an async task (it blocks that
//! worker for the duration of the call, so don't). The runtime and the SDK client (connection
//! pool, credentials cache) live as long as the provider.
//!
//! **Configuration.** The standard AWS chains (environment, profile files, web identity, ECS,
//! IMDS) supply credentials, and the region unless one is given. An explicit endpoint
//! (`--kms-endpoint`, e.g. a VPC endpoint or a test server) overrides `AWS_ENDPOINT_URL_KMS`.
//! Sealing stores in the token the region used, the explicit endpoint and the key ARN returned by
//! `Encrypt` (an alias is resolved once, at enrolment: re-pointing the alias later does not
//! change which key unseals), plus the encryption context. All of these are informational:
//! the header is writable by whoever holds the disk, so unsealing takes the endpoint and region
//! from the operator's [`KmsSettings`] ([`KmsProvider::for_token`]), accepts only a key among
//! its allowed keys, and refuses — before any network request — a token whose endpoint or
//! region differs from the configured ones (the error names both). `unseal` always rebuilds the
//! encryption context from the volume and keyslot it is asked to open, never from the token.
//!
//! **Time bounds.** Connect 2 s, each attempt 5 s, the whole operation (3 attempts with the
//! SDK's standard backoff) 10 s; a call never takes much longer than [`OPERATION_TIMEOUT`] per
//! request, and `unseal` makes two (`DescribeKey`, `Decrypt`).
//!
//! **Key state.** `unseal` asks `DescribeKey` first: a disabled key or one pending deletion is
//! reported as [`SealError::KeyDisabled`] with its state, a deleted one as `KeyMissing`, before
//! `Decrypt` is attempted (real KMS would refuse Decrypt with `DisabledException` /
//! `KMSInvalidStateException`, which are mapped the same way; test servers may not enforce key
//! state). A principal allowed `kms:Decrypt` but not `kms:DescribeKey` still unseals: a refused
//! `DescribeKey` is skipped.
//!
//! **Secrets.** The plaintext is handed to the SDK as a `Blob` (an ordinary heap copy the SDK
//! owns and drops unwiped) and returned the same way; we copy it into [`SecretBytes`] at once.
//! It is never logged: the SDK redacts `Plaintext` in `Debug`, and our errors carry only codes
//! and messages from KMS.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::KeyState;
use serde_json::{Map, Value};

use super::registry::{Configured, EnrollFlag, Provider, RawSettings, SettingSpec};
use super::{Binding, KmsSettings, SealError, SealProvider, Sealed};
use crate::crypto::keys::SecretBytes;

/// Short name of the provider (logs, audit, `dump`).
pub const PROVIDER: &str = "aws-kms";
/// Token type of secrets sealed by AWS KMS.
pub const TOKEN_TYPE: &str = "nbdcrypt-aws-kms";
/// The AWS KMS token type (old name).
pub const AWS_KMS_TOKEN_TYPE: &str = TOKEN_TYPE;

/// AWS KMS in the provider [`registry`](super::registry).
pub struct Kms;

const SETTINGS: &[SettingSpec] = &[
    SettingSpec {
        key: "kms-endpoint",
        aliases: &[],
        value_name: "URL",
        help: "KMS endpoint URL (a VPC endpoint, a test server); default: the AWS one for the \
               region. Never taken from the volume header: a token naming another is refused",
        repeated: false,
    },
    SettingSpec {
        key: "kms-region",
        aliases: &["region"],
        value_name: "REGION",
        help: "AWS region of the KMS key (default: AWS_REGION / the profile's region)",
        repeated: false,
    },
    SettingSpec {
        key: "kms-allow-key",
        aliases: &[],
        value_name: "ARN",
        help: "A KMS key (key ARN or key id) whose tokens may be unsealed; repeat for several. \
               Without one, KMS tokens are refused before any request",
        repeated: true,
    },
];

fn settings_of(c: &(dyn std::any::Any + Send + Sync)) -> Result<&KmsSettings, SealError> {
    c.downcast_ref::<KmsSettings>()
        .ok_or_else(|| other("internal: settings of another provider"))
}

impl Provider for Kms {
    fn name(&self) -> &'static str {
        PROVIDER
    }
    fn label(&self) -> &'static str {
        "AWS KMS"
    }
    fn token_type(&self) -> &'static str {
        TOKEN_TYPE
    }
    fn key_param(&self) -> &'static str {
        PARAM_KEY_ID
    }
    fn settings(&self) -> &'static [SettingSpec] {
        SETTINGS
    }
    fn configure(&self, raw: &RawSettings) -> Result<Configured, String> {
        let s = KmsSettings {
            endpoint: raw.get("kms-endpoint").map(str::to_owned),
            region: raw.get("kms-region").map(str::to_owned),
            allowed_keys: raw.get_all("kms-allow-key").to_vec(),
        };
        s.validate()?;
        Ok(std::sync::Arc::new(s))
    }
    fn for_token(
        &self,
        params: &Map<String, Value>,
        configured: &(dyn std::any::Any + Send + Sync),
    ) -> Result<Box<dyn SealProvider>, SealError> {
        Ok(Box::new(KmsProvider::for_token(
            params,
            settings_of(configured)?,
        )?))
    }
    fn enroll_flag(&self) -> EnrollFlag {
        EnrollFlag {
            long: "kms",
            value_name: "KEY_ID|ALIAS",
            help: "The KMS key that seals the secret: key id, key ARN, alias/NAME or alias ARN",
        }
    }
    fn for_enroll(
        &self,
        value: &str,
        configured: &(dyn std::any::Any + Send + Sync),
    ) -> Result<Box<dyn SealProvider>, SealError> {
        let s = settings_of(configured)?;
        Ok(Box::new(KmsProvider::new(
            value,
            s.region.clone(),
            s.endpoint.clone(),
        )?))
    }
    fn daemon_config_lines(
        &self,
        key: &str,
        configured: &(dyn std::any::Any + Send + Sync),
    ) -> Vec<String> {
        let mut out = vec![format!("kms-allow-key = [{}]", toml_str(key))];
        if let Ok(s) = settings_of(configured) {
            if let Some(e) = &s.endpoint {
                out.push(format!("kms-endpoint = {}", toml_str(e)));
            }
            if let Some(r) = &s.region {
                out.push(format!("kms-region = {}", toml_str(r)));
            }
        }
        out
    }
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// TCP (and TLS) connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One HTTP attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// One operation, retries included.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per operation (the first plus retries), with the SDK's standard jittered backoff.
pub const MAX_ATTEMPTS: u32 = 3;

/// Token members written by this provider.
pub const PARAM_KEY_ID: &str = "kms-key-id";
pub const PARAM_REGION: &str = "kms-region";
pub const PARAM_ENDPOINT: &str = "kms-endpoint";
pub const PARAM_CONTEXT: &str = "kms-encryption-context";

/// Encryption-context keys.
pub const CONTEXT_VOLUME: &str = "nbdcrypt:volume";
pub const CONTEXT_KEYSLOT: &str = "nbdcrypt:keyslot";

/// Seals with one AWS KMS key.
pub struct KmsProvider {
    /// Key id, key ARN, alias name (`alias/…`) or alias ARN.
    pub key_id: String,
    /// `None`: the standard region chain (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// `None`: the SDK's endpoint resolution (`AWS_ENDPOINT_URL_KMS`, then the regional one).
    pub endpoint: Option<String>,
    /// Test hook: fixed dummy credentials instead of the credential chain.
    test_credentials: bool,
    /// Keys a token may name when unsealing (`Some` when built by [`KmsProvider::for_token`]).
    allowed: Option<Vec<String>>,
    /// Always `Some` until dropped; an `Option` so `Drop` can shut it down without blocking
    /// (dropping a runtime inside an async context would panic).
    rt: Option<tokio::runtime::Runtime>,
    client: tokio::sync::OnceCell<(aws_sdk_kms::Client, Option<String>)>,
}

impl std::fmt::Debug for KmsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsProvider")
            .field("key_id", &self.key_id)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl KmsProvider {
    pub fn new(
        key_id: impl Into<String>,
        region: Option<String>,
        endpoint: Option<String>,
    ) -> Result<KmsProvider, SealError> {
        let key_id = key_id.into();
        if key_id.trim().is_empty() {
            return Err(other("empty KMS key id"));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("nbdcrypt-kms")
            .build()
            .map_err(|e| other(format!("cannot start the KMS client runtime: {e}")))?;
        Ok(KmsProvider {
            key_id,
            region: region.filter(|r| !r.is_empty()),
            endpoint: endpoint.filter(|e| !e.is_empty()),
            test_credentials: false,
            allowed: None,
            rt: Some(rt),
            client: tokio::sync::OnceCell::new(),
        })
    }

    /// Uses the fixed credentials `test`/`test` instead of the credential chain (for test
    /// servers such as moto; never reaches the instance metadata service).
    #[doc(hidden)]
    pub fn with_test_credentials(mut self) -> Self {
        self.test_credentials = true;
        self
    }

    /// The provider that unseals a token: endpoint and region from the operator's `settings`,
    /// the key from the token only if `settings` allows it. Refuses, before any network
    /// request, a token whose key is not allowed or whose (informational) endpoint or region
    /// differs from the configured one; the error names both values.
    pub fn for_token(
        params: &Map<String, Value>,
        settings: &KmsSettings,
    ) -> Result<KmsProvider, SealError> {
        let key = check_token(
            params,
            settings.endpoint.as_deref(),
            settings.region.as_deref(),
            Some(&settings.allowed_keys),
        )?;
        let mut p = KmsProvider::new(key, settings.region.clone(), settings.endpoint.clone())?;
        p.allowed = Some(settings.allowed_keys.clone());
        Ok(p)
    }

    /// Runs `f` on the provider's runtime from a scoped thread of its own (see the module doc).
    fn block_on<T: Send>(
        &self,
        f: impl std::future::Future<Output = Result<T, SealError>> + Send,
    ) -> Result<T, SealError> {
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("nbdcrypt-kms".into())
                .spawn_scoped(s, || match &self.rt {
                    Some(rt) => rt.block_on(f),
                    None => Err(other("the KMS client runtime is shut down")),
                })
                .map_err(|e| other(format!("cannot start the KMS client thread: {e}")))?
                .join()
                .unwrap_or_else(|_| Err(other("the KMS client thread panicked")))
        })
    }

    /// The SDK client and the region it uses, built on first use.
    async fn client(&self) -> Result<&(aws_sdk_kms::Client, Option<String>), SealError> {
        self.client
            .get_or_try_init(|| async {
                let http = aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https();
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    .http_client(http)
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(CONNECT_TIMEOUT)
                            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                            .operation_timeout(OPERATION_TIMEOUT)
                            .build(),
                    )
                    .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
                if let Some(r) = &self.region {
                    loader = loader.region(aws_config::Region::new(r.clone()));
                }
                if let Some(e) = &self.endpoint {
                    loader = loader.endpoint_url(e.clone());
                }
                if self.test_credentials {
                    loader = loader.credentials_provider(aws_sdk_kms::config::Credentials::new(
                        "test",
                        "test",
                        None,
                        None,
                        "nbdcrypt-test",
                    ));
                }
                // Region lookup through IMDS is bounded by the SDK's own IMDS timeouts.
                let conf = tokio::time::timeout(OPERATION_TIMEOUT, loader.load())
                    .await
                    .map_err(|_| unreachable_err("timed out loading the AWS configuration"))?;
                let region = conf.region().map(|r| r.to_string());
                if region.is_none() {
                    return Err(other(
                        "no AWS region: pass --region or set AWS_REGION (or a profile region)",
                    ));
                }
                Ok((aws_sdk_kms::Client::new(&conf), region))
            })
            .await
    }

    fn context(binding: &Binding) -> [(&'static str, String); 2] {
        [
            (CONTEXT_VOLUME, binding.volume_uuid.clone()),
            (CONTEXT_KEYSLOT, binding.keyslot.to_string()),
        ]
    }

    /// `DescribeKey`: Ok(()) if the key is usable or we may not ask.
    async fn check_key_state(
        &self,
        client: &aws_sdk_kms::Client,
        key: &str,
    ) -> Result<(), SealError> {
        match client.describe_key().key_id(key).send().await {
            Ok(out) => {
                let Some(m) = out.key_metadata() else {
                    return Ok(());
                };
                match m.key_state() {
                    None | Some(KeyState::Enabled) => Ok(()),
                    Some(state) => Err(SealError::KeyDisabled {
                        provider: PROVIDER,
                        key: format!("{key} (state {})", state.as_str()),
                    }),
                }
            }
            Err(e) => match map_sdk_error(e, key) {
                // Decrypt decides: a key policy may allow Decrypt without DescribeKey.
                SealError::AccessDenied { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}

impl Drop for KmsProvider {
    fn drop(&mut self) {
        // Safe from any context, async included: nothing waits for the runtime's tasks (idle
        // pooled connections, a DNS lookup in flight), they are dropped or finish on their own.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl SealProvider for KmsProvider {
    fn token_type(&self) -> &'static str {
        TOKEN_TYPE
    }

    fn key_reference(&self) -> String {
        self.key_id.clone()
    }

    fn seal(&self, secret: &SecretBytes, binding: &Binding) -> Result<Sealed, SealError> {
        self.block_on(async {
            let (client, region) = self.client().await?;
            self.check_key_state(client, &self.key_id).await?;
            let mut req = client
                .encrypt()
                .key_id(&self.key_id)
                .plaintext(Blob::new(secret.expose_secret().to_vec()));
            for (k, v) in Self::context(binding) {
                req = req.encryption_context(k, v);
            }
            let out = req
                .send()
                .await
                .map_err(|e| map_sdk_error(e, &self.key_id))?;
            let ciphertext = out
                .ciphertext_blob()
                .map(|b| b.as_ref().to_vec())
                .filter(|c| !c.is_empty())
                .ok_or_else(|| other("Encrypt returned no ciphertext"))?;
            // The ARN of the key that encrypted: aliases resolved once, here.
            let key_arn = out.key_id().unwrap_or(&self.key_id).to_owned();
            let mut params = Map::new();
            params.insert(PARAM_KEY_ID.into(), key_arn.into());
            if let Some(r) = region {
                params.insert(PARAM_REGION.into(), r.clone().into());
            }
            if let Some(e) = &self.endpoint {
                params.insert(PARAM_ENDPOINT.into(), e.clone().into());
            }
            let ctx: Map<String, Value> = Self::context(binding)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Value::String(v)))
                .collect();
            params.insert(PARAM_CONTEXT.into(), Value::Object(ctx));
            Ok(Sealed { ciphertext, params })
        })
    }

    fn unseal(&self, sealed: &Sealed, binding: &Binding) -> Result<SecretBytes, SealError> {
        // The token's key, endpoint and region are checked against the operator's before
        // anything is sent. The token's key id wins over the provider's (they are equal when
        // the provider was built from the token; after an enrolment the provider may hold the
        // alias the token's ARN was resolved from).
        let key = check_token(
            &sealed.params,
            self.endpoint.as_deref(),
            self.region.as_deref(),
            self.allowed.as_deref(),
        )
        .or_else(|e| match (&e, sealed.params.get(PARAM_KEY_ID)) {
            (SealError::BadToken(_), None) if self.allowed.is_none() => Ok(self.key_id.clone()),
            _ => Err(e),
        })?;
        let token_region = match sealed.params.get(PARAM_REGION) {
            Some(Value::String(r)) => Some(r.clone()),
            _ => None,
        };
        self.block_on(async {
            let (client, region) = self.client().await?;
            // The region the chain chose (none configured) must be the token's too.
            if let (Some(t), Some(r)) = (&token_region, region) {
                if t != r {
                    return Err(untrusted(format!(
                        "the token names KMS region {t:?} but the region in use is {r:?} (from \
                         AWS_REGION / the profile); configure --kms-region {t} if that key is \
                         really yours"
                    )));
                }
            }
            self.check_key_state(client, &key).await?;
            let mut req = client
                .decrypt()
                .key_id(&key)
                .ciphertext_blob(Blob::new(sealed.ciphertext.clone()));
            for (k, v) in Self::context(binding) {
                req = req.encryption_context(k, v);
            }
            let out = req.send().await.map_err(|e| map_sdk_error(e, &key))?;
            let plain = out
                .plaintext()
                .map(|p| SecretBytes::from_slice(p.as_ref()))
                .ok_or_else(|| other("Decrypt returned no plaintext"))?;
            drop(out);
            if plain.len() != super::SECRET_LEN {
                return Err(SealError::WrongBinding);
            }
            Ok(plain)
        })
    }
}

/// Does the configuration allow the token's key? Both ARNs: equal. A bare key id on either
/// side: the ARN's key id equals it (the endpoint check makes sure whom we ask).
pub fn key_allowed(token_key: &str, allowed: &[String]) -> bool {
    let id = |k: &str| -> String {
        match k.rsplit_once(":key/") {
            Some((_, id)) if k.starts_with("arn:") => id.to_owned(),
            _ => k.to_owned(),
        }
    };
    allowed.iter().any(|a| {
        let both_arns = a.starts_with("arn:") && token_key.starts_with("arn:");
        a == token_key || (!both_arns && id(a) == id(token_key))
    })
}

fn same_endpoint(a: &str, b: &str) -> bool {
    a.trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim_end_matches('/'))
}

/// The operator's settings against a token's informational copies; returns the key to use.
/// `allowed`: `None` for a provider the operator built for one key (enrol, rekey target).
fn check_token(
    params: &Map<String, Value>,
    endpoint: Option<&str>,
    region: Option<&str>,
    allowed: Option<&[String]>,
) -> Result<String, SealError> {
    let s = |k: &str| -> Result<Option<&str>, SealError> {
        match params.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(SealError::BadToken(format!("{k:?} is not a string"))),
        }
    };
    let key = s(PARAM_KEY_ID)?
        .ok_or_else(|| SealError::BadToken(format!("no {PARAM_KEY_ID:?} in the token")))?;
    if let Some(allowed) = allowed {
        if allowed.is_empty() {
            return Err(SealError::NotConfigured {
                provider: PROVIDER,
                detail: format!(
                    "the token names KMS key {key} but no KMS key is allowed; name the keys this \
                     host may use: nbdcryptd --kms-allow-key ARN (TOML: kms-allow-key = [\"ARN\"]), \
                     nbdcryptctl --kms-allow-key ARN or --config FILE (with --kms-endpoint / \
                     kms-endpoint for a non-AWS endpoint)"
                ),
            });
        }
        if !key_allowed(key, allowed) {
            return Err(untrusted(format!(
                "the token names KMS key {key}, which is not among the allowed keys ({}); \
                 add it to --kms-allow-key (TOML: kms-allow-key) only if it is yours",
                allowed.join(", ")
            )));
        }
    }
    if let Some(t) = s(PARAM_ENDPOINT)? {
        if !endpoint.is_some_and(|c| same_endpoint(c, t)) {
            return Err(untrusted(format!(
                "the token names KMS endpoint {t:?} but the configured endpoint is {}; the \
                 endpoint comes from --kms-endpoint (TOML: kms-endpoint), never from the header",
                endpoint
                    .map(|e| format!("{e:?}"))
                    .unwrap_or_else(|| "none (the AWS default)".into())
            )));
        }
    }
    if let (Some(t), Some(c)) = (s(PARAM_REGION)?, region) {
        if t != c {
            return Err(untrusted(format!(
                "the token names KMS region {t:?} but the configured region is {c:?} \
                 (--kms-region, TOML: kms-region)"
            )));
        }
    }
    Ok(key.to_owned())
}

fn untrusted(detail: String) -> SealError {
    SealError::Untrusted {
        provider: PROVIDER,
        detail,
    }
}

fn other(detail: impl Into<String>) -> SealError {
    SealError::Other {
        provider: PROVIDER,
        detail: detail.into(),
    }
}

fn unreachable_err(detail: impl Into<String>) -> SealError {
    SealError::Unreachable {
        provider: PROVIDER,
        detail: detail.into(),
    }
}

/// Maps an SDK error to what the operator must do about it.
fn map_sdk_error<E, R>(e: SdkError<E, R>, key: &str) -> SealError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    match &e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            map_service_code(err.code(), err.message(), key)
        }
        // A mistake in the client's own configuration: retrying will not help.
        SdkError::DispatchFailure(d) if d.is_user() => other(error_chain(&e)),
        // Connect refused / reset, DNS, TLS, timeouts, and failures to load credentials (the
        // credential chain itself may be a network service): transient.
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            unreachable_err(error_chain(&e))
        }
        // A response we could not read (proxy page, truncated body): treat as transient.
        SdkError::ResponseError(_) => unreachable_err(error_chain(&e)),
        _ => other(error_chain(&e)),
    }
}

/// "dispatch failure: io error: Connection refused (os error 111)": the Display texts of the
/// error and its sources, without the SDK's Debug dumps of requests and responses.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !t.is_empty() && !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cur = c.source();
    }
    text
}

/// Maps a KMS error code (and message) to a [`SealError`].
pub(crate) fn map_service_code(code: Option<&str>, message: Option<&str>, key: &str) -> SealError {
    let detail = match (code, message) {
        (Some(c), Some(m)) if !m.is_empty() => format!("{c}: {m}"),
        (Some(c), _) => c.to_owned(),
        (None, Some(m)) => m.to_owned(),
        (None, None) => "unknown error".to_owned(),
    };
    match code.unwrap_or("") {
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "InvalidClientTokenId"
        | "AccessDenied" => SealError::AccessDenied {
            provider: PROVIDER,
            detail,
        },
        "InvalidCiphertextException" | "IncorrectKeyException" => SealError::WrongBinding,
        "DisabledException" | "KMSInvalidStateException" => SealError::KeyDisabled {
            provider: PROVIDER,
            key: key.to_owned(),
        },
        "NotFoundException" => SealError::KeyMissing {
            provider: PROVIDER,
            key: key.to_owned(),
        },
        "KeyUnavailableException"
        | "DependencyTimeoutException"
        | "KMSInternalException"
        | "ThrottlingException"
        | "LimitExceededException"
        | "ServiceUnavailable"
        | "InternalFailure"
        | "RequestTimeout" => unreachable_err(detail),
        _ => other(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_codes_map_to_operator_actions() {
        let m = |c: &str| map_service_code(Some(c), Some("msg"), "alias/k");
        assert!(matches!(
            m("AccessDeniedException"),
            SealError::AccessDenied { .. }
        ));
        assert!(matches!(
            m("InvalidCiphertextException"),
            SealError::WrongBinding
        ));
        assert!(matches!(
            m("IncorrectKeyException"),
            SealError::WrongBinding
        ));
        assert!(matches!(
            m("DisabledException"),
            SealError::KeyDisabled { .. }
        ));
        assert!(matches!(
            m("KMSInvalidStateException"),
            SealError::KeyDisabled { .. }
        ));
        assert!(matches!(
            m("NotFoundException"),
            SealError::KeyMissing { .. }
        ));
        assert!(m("KeyUnavailableException").is_transient());
        assert!(m("ThrottlingException").is_transient());
        assert!(matches!(m("ValidationException"), SealError::Other { .. }));
        assert!(matches!(
            map_service_code(None, None, "k"),
            SealError::Other { .. }
        ));
        let e = m("KMSInvalidStateException").to_string();
        assert!(e.contains("alias/k") && e.contains("disabled"), "{e}");
    }

    fn settings(allowed: &[&str], endpoint: Option<&str>, region: Option<&str>) -> KmsSettings {
        KmsSettings {
            endpoint: endpoint.map(str::to_owned),
            region: region.map(str::to_owned),
            allowed_keys: allowed.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn provider_for_token_takes_location_from_the_settings() {
        const ARN: &str = "arn:aws:kms:eu-west-1:1:key/x";
        let mut p = Map::new();
        let s = settings(&[ARN], Some("https://kms.example"), Some("eu-west-1"));
        assert!(matches!(
            KmsProvider::for_token(&p, &s),
            Err(SealError::BadToken(_))
        ));
        p.insert(PARAM_KEY_ID.into(), ARN.into());
        p.insert(PARAM_REGION.into(), "eu-west-1".into());
        let k = KmsProvider::for_token(&p, &s).unwrap();
        assert_eq!(k.key_reference(), ARN);
        assert_eq!(k.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            k.endpoint.as_deref(),
            Some("https://kms.example"),
            "from the settings"
        );
        p.insert(PARAM_ENDPOINT.into(), 5.into());
        assert!(matches!(
            KmsProvider::for_token(&p, &s),
            Err(SealError::BadToken(_))
        ));
    }

    #[test]
    fn a_token_disagreeing_with_the_settings_is_refused_naming_both_values() {
        const ARN: &str =
            "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        let mut p = Map::new();
        p.insert(PARAM_KEY_ID.into(), ARN.into());
        let text = |s: &KmsSettings, p: &Map<String, Value>| match KmsProvider::for_token(p, s) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        // Nothing configured: says which flag / key to set.
        let e = text(&settings(&[], None, None), &p);
        assert!(
            e.contains("not configured") && e.contains("--kms-allow-key"),
            "{e}"
        );
        assert!(e.contains("kms-allow-key = "), "{e}");
        // Another key.
        let e = text(
            &settings(
                &["arn:aws:kms:eu-west-1:111122223333:key/other"],
                None,
                None,
            ),
            &p,
        );
        assert!(
            e.contains(ARN) && e.contains("key/other") && e.contains("refused"),
            "{e}"
        );
        // The key by its bare id is fine; by the ARN too.
        assert_eq!(
            text(
                &settings(&["1234abcd-12ab-34cd-56ef-1234567890ab"], None, None),
                &p
            ),
            ""
        );
        assert_eq!(text(&settings(&[ARN], None, None), &p), "");
        // An endpoint the operator did not configure (or another one).
        p.insert(PARAM_ENDPOINT.into(), "http://127.0.0.1:9".into());
        let e = text(&settings(&[ARN], None, None), &p);
        assert!(
            e.contains("http://127.0.0.1:9") && e.contains("none (the AWS default)"),
            "{e}"
        );
        let e = text(&settings(&[ARN], Some("https://vpce.example/"), None), &p);
        assert!(
            e.contains("http://127.0.0.1:9") && e.contains("https://vpce.example/"),
            "{e}"
        );
        assert_eq!(
            text(&settings(&[ARN], Some("http://127.0.0.1:9/"), None), &p),
            ""
        );
        // Another region.
        p.insert(PARAM_REGION.into(), "eu-west-1".into());
        let e = text(
            &settings(&[ARN], Some("http://127.0.0.1:9"), Some("us-east-1")),
            &p,
        );
        assert!(e.contains("eu-west-1") && e.contains("us-east-1"), "{e}");
    }

    #[test]
    fn allowed_keys_match_arn_to_arn_exactly_and_ids_to_their_arn() {
        let arn = "arn:aws:kms:us-east-1:1:key/abc";
        assert!(key_allowed(arn, &["abc".into()]));
        assert!(key_allowed("abc", &[arn.into()]));
        assert!(!key_allowed(
            arn,
            &["arn:aws:kms:us-east-1:2:key/abc".into()]
        ));
        assert!(!key_allowed(arn, &["ab".into()]));
        assert!(!key_allowed(arn, &[]));
        assert!(settings(&["alias/x"], None, None).validate().is_err());
        assert!(settings(&["arn:aws:kms:us-east-1:1:alias/x"], None, None)
            .validate()
            .is_err());
        assert!(settings(&[arn], Some("ftp://x"), None).validate().is_err());
        assert!(settings(&[arn], Some("https://x"), Some("us-east-1"))
            .validate()
            .is_ok());
    }

    /// The daemon may drop a provider from async code: that must not panic.
    #[test]
    fn a_used_provider_can_be_dropped_inside_an_async_context() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let p = KmsProvider::new(
            "alias/none",
            Some("us-east-1".into()),
            Some(format!("http://127.0.0.1:{port}")),
        )
        .unwrap()
        .with_test_credentials();
        let secret = SecretBytes::from_slice(&[1; 32]);
        let b = Binding {
            volume_uuid: "u".into(),
            keyslot: 1,
        };
        assert!(p.seal(&secret, &b).is_err());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move { drop(p) });
    }

    /// A dead endpoint: Unreachable, within the operation timeout, from inside a tokio runtime
    /// too (no "runtime within a runtime" panic).
    #[test]
    fn unreachable_endpoint_is_transient_and_bounded() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let p = KmsProvider::new(
            "alias/none",
            Some("us-east-1".into()),
            Some(format!("http://127.0.0.1:{port}")),
        )
        .unwrap()
        .with_test_credentials();
        let binding = Binding {
            volume_uuid: "u".into(),
            keyslot: 1,
        };
        let sealed = Sealed {
            ciphertext: vec![1; 16],
            params: Map::new(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let start = std::time::Instant::now();
        let r = rt.block_on(async { p.unseal(&sealed, &binding) });
        assert!(
            start.elapsed() < OPERATION_TIMEOUT * 2,
            "{:?}",
            start.elapsed()
        );
        match r {
            Err(e @ SealError::Unreachable { .. }) => {
                assert!(e.is_transient());
                let text = e.to_string();
                // The cause, without the SDK's Debug dumps.
                assert!(text.contains("onnection refused"), "{text}");
                assert!(
                    !text.contains("DispatchFailure {") && text.len() < 300,
                    "{text}"
                );
            }
            Err(e) => panic!("expected Unreachable, got {e}"),
            Ok(_) => panic!("expected Unreachable, got a secret"),
        }
    }
}
