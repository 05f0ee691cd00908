//! nbdcryptd: flags → Config → server::run.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use tracing::{error, info, warn};

use nbdcrypt::audit::AuditLog;
use nbdcrypt::block::file::FileDevice;
use nbdcrypt::block::latch::Latch;
use nbdcrypt::block::BlockDevice;
use nbdcrypt::config::{Args, Config, Mode};
use nbdcrypt::control::proto::{ErrorKind, Request, Response};
use nbdcrypt::control::{self, ControlPlane, Origin, UnlockWith, Unlocker};
use nbdcrypt::demo;
use nbdcrypt::export::ExportTable;
use nbdcrypt::notify;
use nbdcrypt::seal::SealSettings;
use nbdcrypt::server::{self, Listeners};
use nbdcrypt::shutdown;
use nbdcrypt::sys;
use nbdcrypt::unlock::{UnlockError, Volume, VolumeInfo};

fn main() -> ExitCode {
    let args = match Args::parse_with_config_file() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nbdcryptd: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&args.log_level);
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nbdcryptd: {e}");
            return ExitCode::from(2);
        }
    };
    // Key material must never reach a core file.
    if let Err(e) = sys::disable_core_dumps() {
        warn!(error = %e, "could not disable core dumps");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nbdcryptd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    if let Mode::Demo { dir } = &config.mode {
        let dir = dir.clone();
        let files = tokio::task::spawn_blocking(move || demo::prepare(&dir))
            .await?
            .map_err(|e| anyhow!(e))?;
        if files.created {
            info!(volume = %files.volume.display(), "created the demo volume");
        }
    }
    let exports = ExportTable::new(config.export_name.clone(), config.description.clone());
    let mut listeners = Listeners::bind(&config.server).await?;
    nbdcrypt::metrics::METRICS.started();
    let (trigger, shutdown) = shutdown::channel();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received: shutting down");
        notify::stopping();
        trigger.trigger();
    });

    if config.mode == Mode::Plain {
        let backing: Arc<dyn BlockDevice> = match nbdcrypt::upstream::plain_device(
            &config.backing,
            config.file.read_only,
            config.file.allow_discards,
        ) {
            Some(up) => up.map_err(|e| anyhow!(e))?,
            None => Arc::new(
                FileDevice::open(&config.backing, config.file.clone())
                    .map_err(|e| anyhow!("cannot open {}: {e}", config.backing.display()))?,
            ),
        };
        let device: Arc<dyn BlockDevice> = Arc::new(Latch::new(backing));
        exports.publish(device.clone(), false);
        let metrics_sock = start_metrics(&config, &exports, "").await?;
        warn!(path = %config.backing.display(), size = device.size(),
              "serving UNENCRYPTED (plain comparison mode): data is stored in the clear");
        info!(unix = ?config.server.unix, tcp = ?config.server.tcp, export = %config.export_name, "listening");
        notify::ready("serving UNENCRYPTED (plain mode)");
        server::run(&config.server, listeners, exports, shutdown).await?;
        tokio::task::spawn_blocking(move || device.flush())
            .await?
            .map_err(|e| anyhow!("final flush failed: {e}"))?;
        info!("flushed; exiting");
        remove_metrics_socket(metrics_sock);
        return Ok(());
    }

    let (volume, info) = Volume::open(&config.backing, config.file.clone())
        .with_context(|| format!("cannot serve {}", config.backing.display()))?;
    let volume = volume
        .pinned(config.pin.clone(), config.pin_file.clone())
        .with_context(|| format!("cannot serve {}", config.backing.display()))?;
    if config.pin.key_digest.is_some() {
        info!("volume pinned: every unlock checks the volume key against the configured digest");
    }
    info!(path = %info.path.display(), uuid = %info.uuid, cipher = info.cipher, key_bits = info.key_bits,
          sector_size = info.sector_size, size = info.size, "LUKS2 volume opened; locked");
    let audit = Arc::new(match &config.audit_log {
        Some(path) => AuditLog::open(path)
            .with_context(|| format!("cannot open the audit log {}", path.display()))?,
        None => AuditLog::tracing(),
    });
    let volume = volume.with_share_timeout(config.share_timeout);
    volume.refresh_token_metrics();
    let metrics_sock = start_metrics(&config, &exports, &info.uuid).await?;
    let volume = Arc::new(if config.allow_expensive_kdf {
        volume.with_kdf_limits(nbdcrypt::crypto::kdf::KdfLimits::allow_expensive())
    } else {
        volume
    });
    let rekeyer: nbdcrypt::control::Rekeyer = {
        let (volume, seal) = (volume.clone(), config.seal.clone());
        Box::new(move |slot| volume.rekey_tokens(slot, &seal))
    };
    listeners.set_audit(audit.clone());
    let reencryptor = Arc::new(nbdcrypt::control::reencrypt::Reencryptor::new(
        Arc::new(nbdcrypt::unlock::VolumeBackend {
            volume: volume.clone(),
            seal: config.seal.clone(),
        }),
        audit.clone(),
        info.uuid.clone(),
    ));
    let quorum_status: control::StatusHook = {
        let shares = volume.shares().clone();
        Arc::new(move || shares.status())
    };
    let hooks = control::ControlHooks {
        rekeyer: Some(rekeyer),
        reencryptor: Some(reencryptor),
        status: Some(quorum_status),
    };
    let control = ControlPlane::start_with(
        &config.control,
        exports.clone(),
        control_info(&info),
        unlocker(volume, config.seal.clone()),
        hooks,
        audit,
        shutdown.clone(),
    )
    .await?;
    info!(unix = ?config.server.unix, tcp = ?config.server.tcp, control = %config.control.display(),
          export = %config.export_name, "listening");

    if let Some(key_file) = &config.unlock_key_file {
        unlock_at_start(&control, key_file).await?;
    }
    if config.auto_unlock && exports.current().is_none() {
        spawn_auto_unlock(control.volume.clone(), shutdown.clone());
    }
    notify::follow_lock_state(exports.clone());
    notify::ready(if exports.current().is_some() {
        "unlocked"
    } else {
        "locked"
    });
    if let Mode::Demo { dir } = &config.mode {
        print_demo_banner(dir, &config, &info);
    }
    server::run(&config.server, listeners, exports, shutdown).await?;
    control
        .finish()
        .await
        .map_err(|e| anyhow!("final flush failed: {e}"))?;
    info!("flushed; exiting");
    remove_metrics_socket(metrics_sock);
    Ok(())
}

/// `--metrics`: serve Prometheus metrics on their own thread.
async fn start_metrics(
    config: &Config,
    exports: &Arc<ExportTable>,
    uuid: &str,
) -> anyhow::Result<Option<std::path::PathBuf>> {
    let Some(addr) = &config.metrics else {
        return Ok(None);
    };
    let mode = match config.mode {
        Mode::Volume => "volume",
        Mode::Demo { .. } => "demo",
        Mode::Plain => "plain",
    };
    nbdcrypt::metrics::serve(addr, exports.clone(), mode, uuid.to_owned())
        .await
        .with_context(|| format!("cannot serve metrics at {addr}"))
}

fn remove_metrics_socket(path: Option<std::path::PathBuf>) {
    if let Some(p) = path {
        nbdcrypt::socket::remove_ours(&p);
    }
}

fn control_info(info: &VolumeInfo) -> control::VolumeInfo {
    control::VolumeInfo {
        uuid: info.uuid.clone(),
        cipher: info.cipher.to_owned(),
        sector_size: info.sector_size,
        size: info.size,
    }
}

/// The one place the control plane reaches into LUKS2 and the seal providers.
fn unlocker(volume: Arc<Volume>, seal: SealSettings) -> Unlocker {
    Box::new(move |with: UnlockWith| {
        let result = match with {
            UnlockWith::Secret { secret, slot } => volume.unlock(&secret, slot),
            UnlockWith::Tokens => volume.unlock_with_tokens(&seal),
            UnlockWith::Share { name, secret } => volume.unlock_with_share(&name, &secret, &seal),
        };
        // Key derivation and expansion left temporaries on this thread's stack.
        nbdcrypt::sys::scrub_stack();
        match result {
            Ok((device, opened)) => {
                info!(keyslot = opened, "keyslot opened");
                Ok(device)
            }
            Err(UnlockError::WrongPassphrase) => Err(control::UnlockError::WrongPassphrase),
            Err(UnlockError::Tokens { message, transient }) => {
                Err(control::UnlockError::Tokens { message, transient })
            }
            Err(UnlockError::WrongShare(m)) => Err(control::UnlockError::WrongShare(m)),
            Err(UnlockError::SharePending(m)) => Err(control::UnlockError::SharePending(m)),
            Err(UnlockError::Pin(e)) => {
                error!(error = %e, "unlock refused by the volume pin; staying locked");
                Err(control::UnlockError::Refused(e.to_string()))
            }
            Err(e) => Err(control::UnlockError::Other(e.to_string())),
        }
    })
}

/// `--auto-unlock`: try the tokens now, and again with growing pauses while a provider is
/// unreachable. The control socket is up throughout, so an operator can unlock another way.
fn spawn_auto_unlock(
    volume: nbdcrypt::control::VolumeHandle,
    mut shutdown: nbdcrypt::shutdown::Shutdown,
) {
    const DELAYS: [u64; 6] = [1, 2, 4, 8, 16, 30];
    let origin = Origin {
        uid: nix::unistd::geteuid().as_raw(),
        pid: Some(nix::unistd::getpid().as_raw()),
    };
    tokio::spawn(async move {
        for (attempt, delay) in std::iter::once(0).chain(DELAYS).enumerate() {
            if delay > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(delay)) => {}
                    _ = shutdown.triggered() => return,
                }
            }
            match volume.call(Request::UnlockToken, origin).await {
                Response::Ok(_) => {
                    info!(attempt, "auto-unlock: unlocked by token");
                    return;
                }
                Response::Error(e)
                    if e.kind == ErrorKind::ProviderUnreachable || e.kind == ErrorKind::Busy =>
                {
                    warn!(attempt, error = %e.message, "auto-unlock: will retry");
                }
                Response::Error(e) if e.kind == ErrorKind::AlreadyUnlocked => return,
                Response::Error(e) => {
                    error!(error = %e.message, "auto-unlock failed; staying locked (unlock with nbdcryptctl)");
                    return;
                }
            }
        }
        error!("auto-unlock gave up: the KMS/HSM stayed unreachable; staying locked (unlock with nbdcryptctl)");
    });
}

async fn unlock_at_start(control: &ControlPlane, key_file: &std::path::Path) -> anyhow::Result<()> {
    let path = key_file.to_owned();
    let secret = tokio::task::spawn_blocking(move || demo::read_key_file(&path))
        .await?
        .map_err(|e| anyhow!(e))?;
    let origin = Origin {
        uid: nix::unistd::geteuid().as_raw(),
        pid: Some(nix::unistd::getpid().as_raw()),
    };
    match control
        .volume
        .call(Request::Unlock { secret, slot: None }, origin)
        .await
    {
        Response::Ok(_) => {
            info!(key_file = %key_file.display(), "unlocked with the key file");
            Ok(())
        }
        // Stay up, locked: an operator can still unlock another way.
        Response::Error(e) => {
            error!(key_file = %key_file.display(), error = %e.message,
                   "unlock with the key file failed; staying locked");
            Ok(())
        }
    }
}

fn print_demo_banner(dir: &std::path::Path, config: &Config, info: &VolumeInfo) {
    let abs = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let sock = abs(config
        .server
        .unix
        .as_deref()
        .unwrap_or(std::path::Path::new("nbd.sock")));
    let ctl = abs(&config.control);
    let dir = abs(dir);
    let (sock, ctl, dir) = (sock.display(), ctl.display(), dir.display());
    let name = &config.export_name;
    eprintln!(
        "
nbdcrypt demo: {vol} ({size} MiB, LUKS2 {cipher}, {ss}-byte sectors), unlocked with {dir}/demo.key

  inspect     nbdinfo 'nbd+unix:///{name}?socket={sock}'
  kernel      sudo nbd-client -unix {sock} /dev/nbd0 -N {name} -b 4096
  no nbd.ko   mkdir -p {dir}/fuse && nbdfuse {dir}/fuse --unix {sock} &
              sudo losetup -f --show {dir}/fuse/nbd     # then mkfs.ext4 / mount the loop device
  status      nbdcryptctl status --control {ctl}
  lock        nbdcryptctl lock --force --control {ctl}
  recovery    sudo cryptsetup open --key-file {dir}/demo.key {vol} demo   # stock cryptsetup opens it

Ctrl-C stops the daemon (in-flight requests finish, data is flushed).
",
        vol = info.path.display(),
        size = info.size >> 20,
        cipher = info.cipher,
        ss = info.sector_size,
    );
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon can still be stopped by SIGKILL; never exit early.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn init_logging(level: &str) {
    use std::io::IsTerminal;
    let filter = std::env::var("NBDCRYPT_LOG").unwrap_or_else(|_| level.to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
