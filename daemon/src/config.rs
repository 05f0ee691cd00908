//! Command line → `Config`. `Args` is what the user typed; `Config` is checked and resolved, and
//! nothing past `main` sees `Args`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::block::file::FileOptions;
use crate::nbd::wire::MAX_PAYLOAD;
use crate::server::ServerConfig;

const ABOUT: &str = "Serve an AES-XTS encrypted LUKS2 volume over NBD (Network Block Device).";

const LONG_ABOUT: &str = "\
Serve an AES-XTS encrypted LUKS2 volume over NBD (Network Block Device).

nbdcryptd listens on a Unix socket (root-only by default) and, when asked, on TCP. Clients such as
nbd-client (the Linux kernel client), nbdfuse, qemu and fio attach to it; a filesystem and a
database go on top. The volume is a LUKS2 volume: stock cryptsetup opens it through a passphrase
keyslot, and nbdcryptd serves volumes cryptsetup made (aes-xts-plain64).

Modes (exactly one):
  --volume PATH  serve the LUKS2 volume in PATH (file or block device). The daemon starts
                 LOCKED and offers no export until `nbdcryptctl unlock` (or --unlock-key-file).
  --volume URI   the same, with the LUKS2 header and the ciphertext on another NBD server
                 (nbdkit S3/ceph/file, rbd-nbd, qemu-nbd, another nbdcryptd):
                 nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, and over TLS
                 nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR (DIR/ca-cert.pem, optional
                 client-cert.pem + client-key.pem, libnbd's layout), nbds+unix://...
                 FLUSH/FUA are passed through (an upstream without FLUSH is refused writable);
                 an upstream failure fails the request with EIO and the daemon reconnects.
                 No claim and no header lock exist on an upstream: keeping a second writer
                 away is best effort, yours (README \"Encrypting remote storage\").
  --demo [DIR]   try it out: creates DIR (default ./nbdcrypt-demo) with a random key file and a
                 256 MiB LUKS2 volume file, serves it on DIR/nbd.sock, unlocks it, and prints
                 how to attach it.
  --plain PATH   serve PATH UNENCRYPTED, byte for byte. For comparisons and benchmarks only;
                 every log line about the export says encrypted=false.

Attach the export (name given by --name, default \"nbdcrypt\"):
  nbd-client -unix /run/nbdcrypt/nbdcryptd.sock /dev/nbd0 -N nbdcrypt -b 4096
  nbdfuse /mnt/nbd --unix /run/nbdcrypt/nbdcryptd.sock && losetup -f --show /mnt/nbd/nbd
  nbdinfo 'nbd+unix:///nbdcrypt?socket=/run/nbdcrypt/nbdcryptd.sock'

Durability: FLUSH is answered after fdatasync of the backing store; FUA writes are on stable
storage before their reply. After a failed write or flush every later flush fails, so a
database on top never sees a successful fsync over lost data.

Keys: where KMS keys come from is the operator's, never the volume header's (--kms-endpoint,
--kms-region, --kms-allow-key); a token naming anything else is refused before any request.
Pin the volume (--volume-uuid, --volume-key-digest: `nbdcryptctl pin VOLUME`) and a header
replaced by whoever can write the disk is refused at start or at unlock, and stays locked.

SIGTERM stops accepting clients, finishes requests in flight, flushes and exits 0.";

#[derive(Parser, Debug)]
#[command(name = "nbdcryptd", version, about = ABOUT, long_about = LONG_ABOUT)]
#[command(group = clap::ArgGroup::new("mode").multiple(false))]
pub struct Args {
    /// Read settings from a TOML file (one volume per file); flags given here win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Serve the LUKS2 volume in PATH (file or block device) or at an upstream NBD URI
    /// (nbd://, nbds://, nbd+unix://, nbds+unix://); starts locked.
    #[arg(long, value_name = "PATH", group = "mode")]
    pub volume: Option<PathBuf>,

    /// Demo: create (if absent), serve and unlock a volume in DIR, and print how to attach it.
    #[arg(long, value_name = "DIR", group = "mode", num_args = 0..=1,
          default_missing_value = "nbdcrypt-demo")]
    pub demo: Option<PathBuf>,

    /// Serve PATH (file or block device) UNENCRYPTED; comparison mode.
    #[arg(long, value_name = "PATH", group = "mode")]
    pub plain: Option<PathBuf>,

    /// Unlock the volume at start with the contents of FILE (a systemd credential, say).
    #[arg(long, value_name = "FILE")]
    pub unlock_key_file: Option<PathBuf>,

    /// At start, unlock with the volume's KMS/HSM tokens (bounded retries with backoff while a
    /// provider is unreachable; the daemon stays up, locked, if they all fail).
    #[arg(long)]
    pub auto_unlock: bool,

    /// Run keyslot KDFs above the default caps (argon2 > 1 GiB or 16 GiB-passes, PBKDF2 > 20M
    /// iterations). Only for a volume whose header you trust.
    #[arg(long)]
    pub allow_expensive_kdf: bool,

    /// Every key provider's settings (`--kms-endpoint`, `--pkcs11-pin`, ...), from the
    /// provider registry (`seal::registry`).
    #[command(flatten)]
    pub providers: crate::seal::registry::SettingFlags,

    /// Seconds the shares of an incomplete quorum (`nbdcryptctl unlock --share`) are kept, in
    /// locked memory, from the first one; then they are forgotten and the quorum starts over.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub share_timeout: u64,

    /// Pin the volume: refuse to start on a volume with another LUKS2 UUID (`nbdcryptctl pin`).
    #[arg(long, value_name = "UUID")]
    pub volume_uuid: Option<String>,

    /// Pin the volume key: refuse any unlock whose volume key does not match this LUKS2 digest
    /// (pbkdf2:HASH:ITERATIONS:SALT:DIGEST, printed by `nbdcryptctl pin`).
    #[arg(long, value_name = "DIGEST")]
    pub volume_key_digest: Option<String>,

    /// Append key events (unlock, lock) as JSON lines to FILE; default: the log (journald).
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,

    /// Control socket for nbdcryptctl (unlock, lock, status).
    #[arg(
        long,
        value_name = "SOCK",
        env = "NBDCRYPT_CONTROL",
        default_value = "/run/nbdcrypt/control.sock"
    )]
    pub control: PathBuf,

    /// With --plain: create PATH as a file of SIZE bytes (suffixes K, M, G, T) if it is absent.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub create: Option<u64>,

    /// Unix socket to listen on.
    #[arg(
        long,
        value_name = "SOCK",
        default_value = "/run/nbdcrypt/nbdcryptd.sock"
    )]
    pub unix: PathBuf,

    /// Permissions of the Unix socket (octal). The default lets only its owner connect.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Also listen on TCP at ADDR:PORT (needs --tls require, or --insecure-tcp).
    #[arg(long, value_name = "ADDR:PORT")]
    pub tcp: Option<SocketAddr>,

    /// TLS (NBD_OPT_STARTTLS): off; on (offered, plaintext still allowed); require (on TCP,
    /// nothing but STARTTLS before TLS: no export is listed or attached in plaintext). The
    /// Unix socket offers TLS when this is not off but never requires it.
    #[arg(long, value_name = "MODE", default_value = "off")]
    pub tls: crate::tls::TlsMode,

    /// Directory with server-cert.pem and server-key.pem (and ca-cert.pem for
    /// --tls-verify-peer): nbdkit's and qemu-nbd's layout. SIGHUP reloads them.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,

    /// Mutual TLS: require a client certificate signed by DIR/ca-cert.pem; its subject goes
    /// to the log and the audit log.
    #[arg(long)]
    pub tls_verify_peer: bool,

    /// Allow plaintext NBD over TCP. Anyone on the network path can read and alter the data.
    #[arg(long)]
    pub insecure_tcp: bool,

    /// Export name clients ask for; the empty name selects it too.
    #[arg(long, value_name = "NAME", default_value = "nbdcrypt")]
    pub name: String,

    /// Free-text description shown by `nbdinfo`.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub description: String,

    /// Refuse writes, trims and zeroing (clients see a read-only disk).
    #[arg(long)]
    pub read_only: bool,

    /// Honour TRIM by punching holes (file) or discarding (device). On an encrypted volume this
    /// shows an observer which blocks are unused (as dm-crypt's allow-discards does).
    #[arg(long)]
    pub allow_discards: bool,

    /// Use O_DIRECT for page-aligned requests (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,

    /// Seconds a client may take to finish the handshake.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub handshake_timeout: u64,

    /// Most clients connected at once.
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub max_connections: usize,

    /// Request bytes one connection may have in flight (back-pressure beyond that).
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    pub max_conn_bytes: u64,

    /// Request bytes all connections together may have in flight.
    #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = parse_size)]
    pub max_server_bytes: u64,

    /// Worker threads per connection: how many of its requests run at once.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub threads: usize,

    /// Serve Prometheus metrics at ADDR: 127.0.0.1:PORT (GET /metrics), or a Unix socket path
    /// (mode 0660). Lock state, I/O rates and latency, errors, key age; never key material.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Log level (error, warn, info, debug, trace) or a tracing filter; NBDCRYPT_LOG overrides.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}

/// What the daemon serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// A LUKS2 volume, locked until unlocked.
    Volume,
    /// Create-if-absent, unlock with the demo key, print attach commands.
    Demo { dir: PathBuf },
    /// Unencrypted comparison mode.
    Plain,
}

impl Args {
    /// Parse the command line, then fill in from `--config FILE` what it did not set.
    pub fn parse_with_config_file() -> Result<Args, String> {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Args::command().get_matches();
        let mut args = Args::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        if let Some(path) = args.config.clone() {
            let (file, text) = crate::config_file::load(&path)?;
            let from_cli =
                |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
            file.apply(&mut args, &path, &text, from_cli)?;
        }
        Ok(args)
    }
}

/// Everything the daemon needs, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub backing: PathBuf,
    pub unlock_key_file: Option<PathBuf>,
    pub auto_unlock: bool,
    /// KMS and PKCS#11 settings: where keys may come from (never the header).
    pub seal: crate::seal::SealSettings,
    /// How long an incomplete quorum's shares are kept (`--share-timeout`).
    pub share_timeout: Duration,
    /// Which volume may be unlocked (UUID, volume-key digest); empty: any.
    pub pin: crate::seal::pin::VolumePin,
    /// The `--config` file the volume-key digest came from (not the command line): a finished
    /// re-encryption moves the pin there to the new key.
    pub pin_file: Option<PathBuf>,
    pub allow_expensive_kdf: bool,
    pub audit_log: Option<PathBuf>,
    pub control: PathBuf,
    pub file: FileOptions,
    pub export_name: String,
    pub description: String,
    pub server: ServerConfig,
    /// `--metrics`: where to serve Prometheus metrics.
    pub metrics: Option<crate::metrics::http::MetricsAddr>,
}

impl Config {
    pub fn from_args(a: Args) -> Result<Config, String> {
        let tls = crate::tls::settings_from_args(
            a.tls,
            a.tls_certificates.clone(),
            a.tls_verify_peer,
            a.tcp.is_some(),
            a.insecure_tcp,
        )?;
        if a.name.len() > 256 {
            return Err("--name is longer than 256 bytes".into());
        }
        let min_conn = u64::from(MAX_PAYLOAD) + 4096;
        if a.max_conn_bytes < min_conn {
            return Err(format!(
                "--max-conn-bytes must be at least {min_conn} (one 32 MiB request)"
            ));
        }
        if a.max_server_bytes < a.max_conn_bytes {
            return Err("--max-server-bytes must be at least --max-conn-bytes".into());
        }
        let (mode, backing, unix, control, key) = match (a.volume, a.demo, a.plain) {
            (Some(v), None, None) => (Mode::Volume, v, a.unix, a.control, a.unlock_key_file),
            (None, None, Some(p)) => {
                if a.unlock_key_file.is_some() {
                    return Err("--unlock-key-file makes no sense with --plain".into());
                }
                (Mode::Plain, p, a.unix, a.control, None)
            }
            (None, Some(dir), None) => (
                Mode::Demo { dir: dir.clone() },
                dir.join("volume.img"),
                dir.join("nbd.sock"),
                dir.join("control.sock"),
                Some(a.unlock_key_file.unwrap_or_else(|| dir.join("demo.key"))),
            ),
            _ => return Err("give exactly one of --volume, --demo, --plain".into()),
        };
        if a.create.is_some() && mode != Mode::Plain {
            return Err(
                "--create works with --plain only; use `nbdcryptctl format --size` for volumes"
                    .into(),
            );
        }
        if a.auto_unlock && mode == Mode::Plain {
            return Err("--auto-unlock makes no sense with --plain".into());
        }
        let seal = crate::seal::SealSettings::from_raw(a.providers.raw)?;
        let pin = crate::seal::pin::VolumePin::parse(
            a.volume_uuid.as_deref(),
            a.volume_key_digest.as_deref(),
        )?;
        let pin_file = match (&a.config, &a.volume_key_digest) {
            (Some(file), Some(digest)) => std::fs::read_to_string(file)
                .ok()
                .filter(|t| {
                    t.lines().any(|l| {
                        crate::seal::pin::is_pin_line(l)
                            && l.contains(crate::seal::pin::KEY_DIGEST)
                            && l.contains(digest.trim())
                    })
                })
                .map(|_| file.clone()),
            _ => None,
        };
        if !pin.is_empty() && mode != Mode::Volume {
            return Err(
                "--volume-uuid / --volume-key-digest pin a --volume; they make no sense here"
                    .into(),
            );
        }
        let metrics = match a.metrics.as_deref() {
            Some(m) => Some(crate::metrics::http::MetricsAddr::parse(m)?),
            None => None,
        };
        Ok(Config {
            metrics,
            mode,
            backing,
            unlock_key_file: key,
            auto_unlock: a.auto_unlock,
            seal,
            share_timeout: Duration::from_secs(a.share_timeout.clamp(1, 86_400)),
            pin,
            pin_file,
            allow_expensive_kdf: a.allow_expensive_kdf,
            audit_log: a.audit_log,
            control,
            file: FileOptions {
                read_only: a.read_only,
                create_size: a.create,
                allow_discards: a.allow_discards,
                direct: a.direct,
                unclaimed: false,
            },
            export_name: a.name,
            description: a.description,
            server: ServerConfig {
                unix: Some(unix),
                socket_mode: a.socket_mode,
                tcp: a.tcp,
                handshake_timeout: Duration::from_secs(a.handshake_timeout.max(1)),
                max_connections: a.max_connections.max(1),
                max_connection_bytes: a.max_conn_bytes,
                max_server_bytes: a.max_server_bytes,
                threads: a.threads.clamp(1, 256),
                tls,
            },
        })
    }
}

/// "64M", "1G", "4096", "1.5G" → bytes (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let m = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
    };
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("size {s:?} is too large"));
    }
    let f: f64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    if !(f >= 0.0 && f * (mult as f64) < u64::MAX as f64) {
        return Err(format!("size {s:?} is out of range"));
    }
    // In range (checked above); `as` drops the fraction, which is what a byte count wants.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok((f * mult as f64) as u64)
}

pub fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal permission mode like 0600"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert!(parse_mode("999").is_err());
    }
}
