//! Reading an unlock secret: from the terminal without echo, a line of standard input, or a key
//! file taken byte for byte. Every read goes through the library's capped secret reader
//! (`nbdcrypt::secret_file`): straight into `SecretBytes` (wiped on drop), never through a growing
//! `Vec`, refused past its cap rather than truncated.
//!
//! Shared by the online `unlock` and the offline commands that need a passphrase.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sys::termios::{self, LocalFlags, SetArg, Termios};

use nbdcrypt::crypto::keys::SecretBytes;
use nbdcrypt::secret_file::{self, Kind};

use crate::exit::Failure;

/// Where the secret comes from.
pub enum Source {
    /// Ask on the controlling terminal, echo off.
    Tty { prompt: String },
    /// The first line of standard input, without its newline.
    StdinLine,
    /// A key file, bytes as-is; `-` is standard input.
    KeyFile(PathBuf),
}

pub fn read(source: &Source) -> Result<SecretBytes, Failure> {
    let secret = match source {
        Source::Tty { prompt } => read_tty(prompt)?,
        Source::StdinLine => secret_file::read_line(&mut raw_stdin()?, Kind::Passphrase)
            .map_err(|e| {
                Failure::error(format!(
                    "cannot read the passphrase from standard input: {e}"
                ))
            })?
            .unwrap_or_else(|| SecretBytes::zeroed(0)),
        Source::KeyFile(path) if path == Path::new("-") => {
            secret_file::read_to_end(&mut raw_stdin()?, Kind::KeyFile).map_err(|e| {
                Failure::error(format!("cannot read the key from standard input: {e}"))
            })?
        }
        Source::KeyFile(path) => secret_file::read_file(path, Kind::KeyFile)
            .map_err(|e| Failure::error(format!("cannot read key file {}: {e}", path.display())))?,
    };
    if secret.is_empty() {
        return Err(Failure::error(match source {
            Source::KeyFile(p) => format!("key file {} is empty", p.display()),
            _ => "empty passphrase".to_owned(),
        }));
    }
    Ok(secret)
}

/// Standard input without std's buffer (which would keep a copy of the secret in ordinary
/// memory): a duplicate of fd 0.
fn raw_stdin() -> Result<File, Failure> {
    io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(|e| Failure::error(format!("cannot duplicate standard input: {e}")))
}

/// Puts the terminal's settings back however `read_tty` ends.
struct EchoOff<'a> {
    tty: &'a File,
    saved: Termios,
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.tty.as_fd(), SetArg::TCSAFLUSH, &self.saved);
    }
}

fn read_tty(prompt: &str) -> Result<SecretBytes, Failure> {
    let no_tty = |e: io::Error| {
        Failure::error(format!(
            "no terminal to ask for the passphrase on ({e}); use --key-file FILE or --stdin"
        ))
    };
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(no_tty)?;
    let saved = termios::tcgetattr(tty.as_fd()).map_err(|e| no_tty(e.into()))?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet
        .local_flags
        .insert(LocalFlags::ECHONL | LocalFlags::ICANON);
    termios::tcsetattr(tty.as_fd(), SetArg::TCSAFLUSH, &quiet).map_err(|e| no_tty(e.into()))?;
    let guard = EchoOff { tty: &tty, saved };
    (&tty).write_all(prompt.as_bytes()).map_err(no_tty)?;
    let _ = (&tty).flush();
    let secret = secret_file::read_line(&mut &tty, Kind::Passphrase)
        .map(|line| line.unwrap_or_else(|| SecretBytes::zeroed(0)))
        .map_err(|e| Failure::error(format!("cannot read the passphrase: {e}")));
    drop(guard);
    secret
}
