//! nbdcryptctl: the operator's command line for nbdcrypt volumes.
//!
//! Offline commands work on a volume file or device directly; online commands talk to a running
//! nbdcryptd over its control socket.

use clap::Parser;

/// Format, unlock, lock and inspect nbdcrypt volumes.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
