//! Exit codes and the error type every command returns; `main` prints it and exits.
//!
//! Shared by the online commands and the offline ones (`offline/`), so scripts can rely on one
//! table for every subcommand.

/// Success (also: `unlock` of an unlocked volume, `lock` of a locked one: nothing to do).
pub const OK: u8 = 0;
/// Something failed: no daemon, permission denied, unreadable key file, internal error.
pub const ERROR: u8 = 1;
/// The command line was wrong (clap uses this code for its own usage errors).
pub const USAGE: u8 = 2;
/// The passphrase or key file opened no keyslot.
pub const WRONG_SECRET: u8 = 3;
/// Not now: rate limited after wrong passphrases, clients attached, or another unlock/lock in
/// progress. Trying again later can succeed.
pub const TRY_LATER: u8 = 4;

/// The exit-code table for `--help` texts.
pub const EXIT_CODES: &str = "\
Exit status:
  0  success (or nothing to do: already unlocked / already locked)
  1  error (daemon not running, permission denied, unreadable key file, internal error)
  2  usage error (bad flags or arguments)
  3  wrong passphrase or key file
  4  try again later (rate limited after wrong passphrases, clients attached, busy)";

/// A failed command: what to print and how to exit.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Failure::new(ERROR, message)
    }
}
