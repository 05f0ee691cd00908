//! clevis's `tpm2` pin, through the tpm2-tools commands clevis itself runs
//! (`tpm2_createprimary`, `tpm2_load`, `tpm2_unseal`, `tpm2_create`, `tpm2_pcrread`).
//!
//! Why the tools and not the tss-esapi crate: they recreate clevis's storage primary from the
//! same template by construction (a hand-built template that differs in one bit loads nothing),
//! they need no C bindings at build time, and they are already a dependency of clevis-tpm2.
//! Secrets never travel in argv or the environment: the content key goes to `tpm2_create` on
//! its standard input and comes back from `tpm2_unseal` on its standard output (pipes). The
//! files the tools exchange (object contexts, the public and the sealed private blob, none of
//! them secret) live in a private 0700 directory removed afterwards. The TCTI (which TPM) is
//! the operator's (`tpm2-tcti`), never the token's.
//!
//! PCR policies are computed in software (TPM2_PolicyPCR's digest), so sealing opens no trial
//! session (clevis 19's `tpm2_createpolicy` leaks one per bind on a TPM without a resource
//! manager).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Map, Value};
use sha2::Digest;
use zeroize::Zeroize;

use super::bad;
use super::jwe::{b64u, b64u_decode, random_key, str_member, Cek, Jwe};
use crate::crypto::keys::SecretBytes;
use crate::seal::SealError;

const PROVIDER: &str = "tpm2";
const MAX_BLOB: usize = 4096;

/// Which TPM to use: a TCTI string as tpm2-tools takes it (`device:/dev/tpmrm0`,
/// `swtpm:host=127.0.0.1,port=2321`, `tabrmd`). `None`: tpm2 tokens are not used (the operator
/// opts in by naming the TPM; a header alone never makes the daemon run TPM commands).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tpm2Settings {
    pub tcti: Option<String>,
}

impl Tpm2Settings {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.tcti {
            if t.is_empty() || t.len() > 512 || t.bytes().any(|c| c < b' ' || c == 0x7f) {
                return Err(format!("tpm2-tcti {t:?} is not a TCTI string"));
            }
        }
        Ok(())
    }
}

/// A private scratch directory (0700), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, SealError> {
        use std::os::unix::fs::DirBuilderExt;
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| other(format!("no random bytes: {e}")))?;
        let name: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let dir = std::env::temp_dir().join(format!("nbdcrypt-tpm2-{name}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| other(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Scratch(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn other(detail: String) -> SealError {
    SealError::Other {
        provider: PROVIDER,
        detail,
    }
}

fn p(path: &Path) -> &std::ffi::OsStr {
    path.as_os_str()
}

/// Flushes the TPM's transient objects. tpm2-tools saves object contexts to files but leaves
/// the objects loaded; without a resource manager (a TPM on TCP, /dev/tpm0) the TPM's three
/// object slots fill up. clevis does the same between its steps. With /dev/tpmrm0 transient
/// objects are per connection, so only ours are touched.
fn flush_transient(settings: &Tpm2Settings) {
    let _ = run(
        settings,
        "tpm2_flushcontext",
        &[std::ffi::OsStr::new("-t")],
        None,
        None,
    );
}

/// Runs one tpm2-tools command; `stdin` is piped in, stdout returned (wiped by the caller if
/// secret). Errors are sorted by what the operator must do.
fn run(
    settings: &Tpm2Settings,
    tool: &str,
    args: &[&std::ffi::OsStr],
    stdin: Option<&[u8]>,
    pcrs: Option<&str>,
) -> Result<Vec<u8>, SealError> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(t) = &settings.tcti {
        cmd.env("TPM2TOOLS_TCTI", t);
    }
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SealError::NotConfigured {
                provider: PROVIDER,
                detail: format!("{tool} not found: install tpm2-tools"),
            }
        } else {
            other(format!("cannot run {tool}: {e}"))
        }
    })?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as the tool's failure below.
        let _ = pipe.write_all(data);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| other(format!("{tool}: {e}")))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let mut stdout = out.stdout;
    stdout.zeroize();
    let err = String::from_utf8_lossy(&out.stderr);
    // tpm2-tools' own "ERROR: …" lines say what failed; the tss2 library's lines are noise.
    let own: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("ERROR: "))
        .map(|l| l.trim_start_matches("ERROR: "))
        .collect();
    let short: String = if own.is_empty() {
        err.trim().chars().take(300).collect()
    } else {
        own.join("; ").chars().take(300).collect()
    };
    let lower = err.to_ascii_lowercase();
    let tcti = settings.tcti.as_deref().unwrap_or("the default TPM");
    Err(
        if lower.contains("0x99d") || lower.contains("policy check failed") {
            SealError::AccessDenied {
                provider: PROVIDER,
                detail: format!(
                "PCR policy mismatch: the current values of PCRs {} are not the ones the secret \
                 was sealed to (firmware, boot chain or Secure Boot state changed?); unlock \
                 another way and bind again",
                pcrs.unwrap_or("?")
            ),
            }
        } else if lower.contains("integrity check failed") || lower.contains("0x9a2") {
            other(format!(
            "the sealed object does not belong to this TPM ({tcti}): sealed on another machine, \
             or the TPM was cleared since ({tool}: {short})"
        ))
        } else if lower.contains("tcti")
            || lower.contains("connection refused")
            || lower.contains("no such file")
        {
            SealError::Unreachable {
                provider: PROVIDER,
                detail: format!("cannot reach the TPM through {tcti} ({tool}: {short})"),
            }
        } else {
            other(format!("{tool} failed: {short}"))
        },
    )
}

fn check_choice<'a>(
    v: Option<&'a str>,
    default: &'a str,
    allowed: &[&str],
    what: &str,
) -> Result<&'a str, SealError> {
    let v = v.unwrap_or(default);
    if allowed.contains(&v) {
        Ok(v)
    } else {
        Err(bad(format!(
            "tpm2 {what} {:?} is not one of {allowed:?}",
            super::shown(v)
        )))
    }
}

/// `pcr_ids` as clevis writes it ("0,7") or as a JSON array; returns "0,7", checked.
fn pcr_ids(v: &Value) -> Result<String, SealError> {
    let ids: Vec<u64> = match v {
        Value::String(s) => s
            .split(',')
            .map(|x| x.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad("tpm2 pcr_ids is not a list of numbers".into()))?,
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| bad("tpm2 pcr_ids is not a list of numbers".into()))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("tpm2 pcr_ids is not a list".into())),
    };
    if ids.is_empty() || ids.len() > 24 || ids.iter().any(|&i| i > 23) {
        return Err(bad("tpm2 pcr_ids must name PCRs 0..23".into()));
    }
    Ok(ids.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
}

const HASHES: [&str; 4] = ["sha1", "sha256", "sha384", "sha512"];

/// Recovers the plaintext of a tpm2 JWE.
pub fn decrypt(jwe: &Jwe, settings: &Tpm2Settings) -> Result<SecretBytes, SealError> {
    if jwe.header.get("alg").and_then(Value::as_str) != Some("dir") {
        return Err(bad("a tpm2 JWE uses alg dir".into()));
    }
    let h = jwe.pin_header("tpm2")?;
    if settings.tcti.is_none() {
        return Err(SealError::NotConfigured {
            provider: PROVIDER,
            detail: "no TPM configured for clevis tpm2 tokens: give --tpm2-tcti \
                     device:/dev/tpmrm0 (TOML: tpm2-tcti)"
                .into(),
        });
    }
    let s = |k: &str| h.get(k).and_then(Value::as_str);
    let hash = check_choice(s("hash"), "sha256", &HASHES, "hash")?;
    let key = check_choice(s("key"), "ecc", &["ecc", "rsa"], "key")?;
    let public = b64u_decode(
        str_member(h, "jwk_pub", "the tpm2 header")?,
        "jwk_pub",
        MAX_BLOB,
    )?;
    let private = b64u_decode(
        str_member(h, "jwk_priv", "the tpm2 header")?,
        "jwk_priv",
        MAX_BLOB,
    )?;
    let policy = match h.get("pcr_ids") {
        None => None,
        Some(ids) => {
            let bank = check_choice(s("pcr_bank"), "sha1", &HASHES, "pcr_bank")?;
            Some(format!("{bank}:{}", pcr_ids(ids)?))
        }
    };
    let dir = Scratch::new()?;
    let (pubf, privf, prim, obj) = (
        dir.path("jwk.pub"),
        dir.path("jwk.priv"),
        dir.path("primary.ctx"),
        dir.path("object.ctx"),
    );
    std::fs::write(&pubf, &public).map_err(|e| other(format!("scratch file: {e}")))?;
    std::fs::write(&privf, &private).map_err(|e| other(format!("scratch file: {e}")))?;
    let os = |x: &'static str| std::ffi::OsStr::new(x);
    flush_transient(settings);
    run(
        settings,
        "tpm2_createprimary",
        &[
            os("-Q"),
            os("-C"),
            os("o"),
            os("-g"),
            os(hash_static(hash)),
            os("-G"),
            os(if key == "rsa" { "rsa" } else { "ecc" }),
            os("-c"),
            p(&prim),
        ],
        None,
        None,
    )?;
    flush_transient(settings);
    run(
        settings,
        "tpm2_load",
        &[
            os("-Q"),
            os("-C"),
            p(&prim),
            os("-u"),
            p(&pubf),
            os("-r"),
            p(&privf),
            os("-c"),
            p(&obj),
        ],
        None,
        None,
    )?;
    flush_transient(settings);
    let auth = policy.as_ref().map(|pcr| format!("pcr:{pcr}"));
    let mut args = vec![os("-c"), p(&obj)];
    if let Some(a) = &auth {
        args.push(os("-p"));
        args.push(std::ffi::OsStr::new(a.as_str()));
    }
    let out = run(settings, "tpm2_unseal", &args, None, policy.as_deref());
    flush_transient(settings);
    let mut out = out?;
    let result = jwk_key(&out);
    out.zeroize();
    let cek = result?;
    jwe.decrypt(&cek.0)
}

fn hash_static(h: &str) -> &'static str {
    match h {
        "sha1" => "sha1",
        "sha384" => "sha384",
        "sha512" => "sha512",
        _ => "sha256",
    }
}

/// The `k` of the sealed `oct` JWK (clevis seals the JWK JSON plus a newline).
fn jwk_key(sealed: &[u8]) -> Result<Cek, SealError> {
    #[derive(serde::Deserialize)]
    struct OctJwk {
        k: String,
    }
    let mut jwk: OctJwk = serde_json::from_slice(sealed)
        .map_err(|_| other("the unsealed data is not a JWK".into()))?;
    let k = b64u_decode(&jwk.k, "the sealed key", 64);
    jwk.k.zeroize();
    let mut k = k?;
    let mut cek = Cek([0u8; 32]);
    if k.len() != 32 {
        k.zeroize();
        return Err(other("the sealed key is not 32 bytes".into()));
    }
    cek.0.copy_from_slice(&k);
    k.zeroize();
    Ok(cek)
}

/// TPM2_PolicyPCR's policy digest over `pcr_values` (the selected PCRs, ascending, as
/// `tpm2_pcrread -o` writes them), with `name_hash` the policy's hash.
pub fn pcr_policy_digest(name_hash: &str, bank: &str, ids: &[u8], pcr_values: &[u8]) -> Vec<u8> {
    fn h(alg: &str, parts: &[&[u8]]) -> Vec<u8> {
        macro_rules! go {
            ($d:ty) => {{
                let mut d = <$d>::new();
                for p in parts {
                    d.update(p);
                }
                d.finalize().to_vec()
            }};
        }
        match alg {
            "sha1" => go!(sha1::Sha1),
            "sha384" => go!(sha2::Sha384),
            "sha512" => go!(sha2::Sha512),
            _ => go!(sha2::Sha256),
        }
    }
    let bank_id: u16 = match bank {
        "sha1" => 0x0004,
        "sha384" => 0x000c,
        "sha512" => 0x000d,
        _ => 0x000b,
    };
    let mut bitmap = [0u8; 3];
    for &i in ids {
        if let Some(b) = bitmap.get_mut(usize::from(i / 8)) {
            *b |= 1 << (i % 8);
        }
    }
    let mut selection = Vec::new();
    selection.extend_from_slice(&1u32.to_be_bytes());
    selection.extend_from_slice(&bank_id.to_be_bytes());
    selection.push(3);
    selection.extend_from_slice(&bitmap);
    let pcr_digest = h(name_hash, &[pcr_values]);
    let zero = vec![0u8; h(name_hash, &[]).len()];
    h(
        name_hash,
        &[
            &zero,
            &0x0000_017Fu32.to_be_bytes(),
            &selection,
            &pcr_digest,
        ],
    )
}

/// Seals a fresh content key in the TPM (optionally to the current values of `pcr`: bank and
/// ids) and encrypts `plaintext` with it.
pub fn encrypt(
    pcr: Option<(&str, &str)>,
    plaintext: &[u8],
    settings: &Tpm2Settings,
) -> Result<Jwe, SealError> {
    let cek = Cek(random_key()?);
    let dir = Scratch::new()?;
    let (prim, pubf, privf, polf, pcrf) = (
        dir.path("primary.ctx"),
        dir.path("jwk.pub"),
        dir.path("jwk.priv"),
        dir.path("pcr.policy"),
        dir.path("pcr.values"),
    );
    let os = std::ffi::OsStr::new;
    flush_transient(settings);
    run(
        settings,
        "tpm2_createprimary",
        &[
            os("-Q"),
            os("-C"),
            os("o"),
            os("-g"),
            os("sha256"),
            os("-G"),
            os("ecc"),
            os("-c"),
            p(&prim),
        ],
        None,
        None,
    )?;
    flush_transient(settings);
    let mut tpm2_hdr = Map::new();
    tpm2_hdr.insert("hash".into(), "sha256".into());
    tpm2_hdr.insert("key".into(), "ecc".into());
    let mut attrs = "fixedtpm|fixedparent|noda|adminwithpolicy".to_owned();
    if let Some((bank, ids)) = pcr {
        check_choice(Some(bank), "sha256", &HASHES, "pcr_bank")?;
        let ids = pcr_ids(&Value::String(ids.to_owned()))?;
        let list: Vec<u8> = ids.split(',').filter_map(|x| x.parse().ok()).collect();
        let sel = format!("{bank}:{ids}");
        run(
            settings,
            "tpm2_pcrread",
            &[os("-Q"), os(&sel), os("-o"), p(&pcrf)],
            None,
            None,
        )?;
        let values = std::fs::read(&pcrf).map_err(|e| other(format!("PCR values: {e}")))?;
        let digest = pcr_policy_digest("sha256", bank, &list, &values);
        std::fs::write(&polf, digest).map_err(|e| other(format!("scratch file: {e}")))?;
        tpm2_hdr.insert("pcr_bank".into(), bank.into());
        tpm2_hdr.insert("pcr_ids".into(), ids.into());
    } else {
        attrs.push_str("|userwithauth");
    }
    let mut jwk = format!(
        "{{\"alg\":\"A256GCM\",\"k\":\"{}\",\"key_ops\":[\"encrypt\",\"decrypt\"],\"kty\":\"oct\"}}\n",
        b64u(&cek.0)
    )
    .into_bytes();
    let mut args = vec![
        os("-Q"),
        os("-g"),
        os("sha256"),
        os("-C"),
        p(&prim),
        os("-a"),
        os(&attrs),
    ];
    if pcr.is_some() {
        args.push(os("-L"));
        args.push(p(&polf));
    }
    args.extend([os("-i"), os("-"), os("-u"), p(&pubf), os("-r"), p(&privf)]);
    let created = run(settings, "tpm2_create", &args, Some(&jwk), None);
    jwk.zeroize();
    flush_transient(settings);
    created?;
    let public = std::fs::read(&pubf).map_err(|e| other(format!("jwk.pub: {e}")))?;
    let private = std::fs::read(&privf).map_err(|e| other(format!("jwk.priv: {e}")))?;
    tpm2_hdr.insert("jwk_pub".into(), b64u(&public).into());
    tpm2_hdr.insert("jwk_priv".into(), b64u(&private).into());
    let header = json!({
        "alg": "dir",
        "enc": "A256GCM",
        "clevis": {"pin": "tpm2", "tpm2": Value::Object(tpm2_hdr)},
    });
    Jwe::encrypt(&header, &cek.0, plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcr_policy_digest_matches_what_clevis_wrote() {
        // Doc §5.3: sha256 PCRs 0 and 7 all zero gave an authPolicy starting 02e3642b3e29 and
        // ending cf31 (tpm2_createpolicy on swtpm, as clevis 19 ran it).
        let d = pcr_policy_digest("sha256", "sha256", &[0, 7], &[0u8; 64]);
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            hex.starts_with("02e3642b3e29") && hex.ends_with("cf31"),
            "{hex}"
        );
    }

    #[test]
    fn pcr_ids_and_choices_are_checked() {
        assert_eq!(pcr_ids(&json!("0,7")).unwrap(), "0,7");
        assert_eq!(pcr_ids(&json!([0, "7"])).unwrap(), "0,7");
        assert!(pcr_ids(&json!("0,24")).is_err());
        assert!(pcr_ids(&json!("0;rm -rf")).is_err());
        assert!(check_choice(Some("md5"), "sha256", &HASHES, "hash").is_err());
        assert!(jwk_key(b"{\"k\":\"AAAA\"}").is_err());
        let k = jwk_key(format!("{{\"kty\":\"oct\",\"k\":\"{}\"}}\n", b64u(&[5u8; 32])).as_bytes())
            .unwrap();
        assert_eq!(k.0, [5u8; 32]);
    }
}
