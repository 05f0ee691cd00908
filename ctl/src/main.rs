//! nbdcryptctl: the operator's command line for nbdcrypt volumes.
//!
//! Online commands (`online`) talk to a running nbdcryptd over its control socket; offline
//! commands (`offline/`, to come: `format`, `add-key`, ...) work on a volume file or device
//! directly. Each subcommand is a variant of `Command` whose arguments live beside its code.
//! Every command returns `Result<(), Failure>`; `main` prints the failure and exits with its
//! code (table in `exit`).

mod bench;
mod cli_gen;
mod exit;
mod offline;
mod online;
pub mod progress;
mod reencrypt_online;
mod secret;
mod secret_input;
mod share;
mod top;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

const LONG_ABOUT: &str = "\
Unlock, lock and inspect nbdcrypt volumes.

nbdcryptd serves an encrypted LUKS2 volume over NBD. It starts locked: clients see no export
until an operator unlocks it. The online commands talk to nbdcryptd over its control socket
(root-only; default /run/nbdcrypt/control.sock, or $NBDCRYPT_CONTROL, or --control SOCK).";

const AFTER_HELP: &str = "\
Examples:
  nbdcryptctl unlock                        # asks for the passphrase
  nbdcryptctl status
  nbdcryptctl lock --force                  # disconnect clients, flush, wipe the key

";

/// Unlock, lock and inspect nbdcrypt volumes.
#[derive(Parser, Debug)]
#[command(
    name = "nbdcryptctl",
    version,
    about,
    long_about = LONG_ABOUT,
    after_help = concat_help(),
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run from argv: boxing the large offline variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Unlock the running daemon's volume with a passphrase or key file.
    #[command(long_about = online::UNLOCK_ABOUT, after_help = with_exit_codes(online::UNLOCK_EXAMPLES))]
    Unlock(online::UnlockArgs),
    /// Lock the volume: withdraw the export, flush, wipe the key.
    #[command(long_about = online::LOCK_ABOUT, after_help = with_exit_codes(online::LOCK_EXAMPLES))]
    Lock(online::LockArgs),
    /// Show lock state, volume, export, clients and I/O counters.
    #[command(long_about = online::STATUS_ABOUT, after_help = with_exit_codes(online::STATUS_EXAMPLES))]
    Status(online::StatusArgs),
    /// Wait until the volume is unlocked (for ordering services after unlock).
    #[command(long_about = online::WAIT_ABOUT, after_help = with_exit_codes(online::WAIT_EXAMPLES))]
    WaitUnlocked(online::WaitArgs),
    /// Live view of running daemons: state, clients, IOPS, MiB/s, latency, crypto CPU share.
    #[command(long_about = top::TOP_ABOUT, after_help = top::TOP_EXAMPLES)]
    Top(top::TopArgs),
    /// Measure AES-XTS speed (like cryptsetup benchmark), or end to end with --volume.
    #[command(long_about = bench::BENCH_ABOUT, after_help = bench::BENCH_EXAMPLES)]
    Bench(bench::BenchArgs),
    /// Print a shell completion script (bash, zsh, fish) for nbdcryptctl or nbdcryptd.
    #[command(after_help = cli_gen::COMPLETIONS_EXAMPLES)]
    Completions(cli_gen::CompletionsArgs),
    /// Write man pages for nbdcryptctl (and each subcommand) and nbdcryptd into DIR.
    #[command(after_help = cli_gen::MAN_EXAMPLES)]
    Man(cli_gen::ManArgs),
    #[command(flatten)]
    Offline(offline::OfflineCommand),
}

fn main() -> ExitCode {
    // `reencrypt --control SOCK ...` is the online form (a running daemon), parsed on its own;
    // `reencrypt VOLUME ...` (offline) is the offline subcommand below.
    if let Some(code) = reencrypt_online::dispatch() {
        return code;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are "errors" too, printed to stdout.
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let result = match cli.command {
        Command::Offline(cmd) => {
            return offline::run(cmd).unwrap_or_else(|e| {
                eprintln!("nbdcryptctl: {e:#}");
                ExitCode::from(exit::ERROR)
            })
        }
        Command::Unlock(args) => online::unlock(args),
        Command::Lock(args) => online::lock(args),
        Command::Status(args) => online::status(args),
        Command::WaitUnlocked(args) => online::wait_unlocked(args),
        Command::Top(args) => top::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Completions(args) => cli_gen::completions(args),
        Command::Man(args) => cli_gen::man(args),
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(f) => {
            eprintln!("nbdcryptctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn concat_help() -> String {
    format!("{AFTER_HELP}{}", exit::EXIT_CODES)
}

fn with_exit_codes(examples: &str) -> String {
    format!("{examples}\n\n{}", exit::EXIT_CODES)
}
