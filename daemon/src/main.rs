//! nbdcryptd: flags → Config → server::run.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing::{error, info, warn};

use nbdcrypt::block::file::FileDevice;
use nbdcrypt::block::latch::Latch;
use nbdcrypt::block::BlockDevice;
use nbdcrypt::config::{Args, Config};
use nbdcrypt::export::ExportTable;
use nbdcrypt::server::{self, Listeners};
use nbdcrypt::shutdown;

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(&args.log_level);
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nbdcryptd: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
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
            eprintln!("nbdcryptd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let device = FileDevice::open(&config.backing, config.file.clone()).map_err(|e| {
        anyhow::anyhow!("cannot open {}: {e}", config.backing.display())
    })?;
    let device: Arc<dyn BlockDevice> = Arc::new(Latch::new(Arc::new(device)));
    let exports = ExportTable::new(config.export_name.clone(), config.description.clone());
    exports.publish(device.clone(), false);
    warn!(path = %config.backing.display(), size = device.size(),
          "serving UNENCRYPTED (plain comparison mode): data is stored in the clear");

    let listeners = Listeners::bind(&config.server).await?;
    let (trigger, shutdown) = shutdown::channel();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received: shutting down");
        trigger.trigger();
    });
    info!(unix = ?config.server.unix, tcp = ?config.server.tcp, export = %config.export_name,
          "listening");
    server::run(&config.server, listeners, exports.clone(), shutdown).await?;

    let dev = device.clone();
    tokio::task::spawn_blocking(move || dev.flush())
        .await?
        .map_err(|e| anyhow::anyhow!("final flush failed: {e}"))?;
    info!("flushed; exiting");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        // Without signal handlers the daemon can still be stopped by SIGKILL; never exit early.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn init_logging(level: &str) {
    let filter = std::env::var("NBDCRYPT_LOG").unwrap_or_else(|_| level.to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
