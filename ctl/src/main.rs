//! nbdcryptctl: the operator's command line for nbdcrypt volumes.
//!
//! Offline commands work on a volume file or device directly; online commands talk to a running
//! nbdcryptd over its control socket.

mod offline;
mod secret_input;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Format, unlock, lock and inspect nbdcrypt volumes.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = offline::exit_codes())]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Offline(offline::OfflineCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors exit 1 (as cryptsetup's): 2 means "wrong passphrase".
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Offline(cmd) => offline::run(cmd),
    };
    result.unwrap_or_else(|e| {
        eprintln!("nbdcryptctl: {e:#}");
        ExitCode::from(1)
    })
}
