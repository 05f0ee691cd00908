//! Reading a passphrase or key for the offline commands, cryptsetup style:
//!
//! - `--key-file F`: the file's bytes as-is (newlines included), at most [`MAX_KEY_FILE`];
//! - `--key-file -`: all of standard input as-is;
//! - no key file, standard input is a terminal: a prompt on `/dev/tty` with echo off (new
//!   passphrases are asked twice);
//! - no key file, standard input is not a terminal: one line of standard input without its
//!   newline (a second secret, e.g. the new passphrase of `add-key`, is the next line).
//!
//! Files and standard input are read by the library's capped secret reader
//! ([`nbdcrypt::secret_file`]): every byte lands in [`SecretBytes`], buffers grow by copying into a
//! new locked buffer and dropping (wiping) the old one, so no reallocation leaves a copy behind,
//! and a secret past its cap is refused, never truncated.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use nix::sys::termios::{self, LocalFlags, SetArg, SpecialCharacterIndices, Termios};

use nbdcrypt::crypto::keys::SecretBytes;
use nbdcrypt::secret_file::{self, Kind};

/// cryptsetup's limit for an interactive passphrase (512 characters).
pub const MAX_PASSPHRASE: usize = secret_file::MAX_PASSPHRASE;

/// Where a secret comes from, decided once from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Prompt on the terminal (stdin is a tty) or read one line of standard input.
    Interactive,
    /// A key file (`-` = standard input), bytes as-is.
    KeyFile(PathBuf),
}

impl Source {
    pub fn from_arg(key_file: Option<&Path>) -> Source {
        match key_file {
            Some(p) => Source::KeyFile(p.to_path_buf()),
            None => Source::Interactive,
        }
    }

    fn is_stdin(&self) -> bool {
        match self {
            Source::KeyFile(p) => p == Path::new("-"),
            Source::Interactive => !io::stdin().is_terminal(),
        }
    }
}

/// Refuses two key files that both read standard input to the end.
pub fn check_distinct(a: &Source, b: &Source) -> anyhow::Result<()> {
    let whole_stdin = |s: &Source| matches!(s, Source::KeyFile(p) if p == Path::new("-"));
    if whole_stdin(a) && b.is_stdin() || whole_stdin(b) && a.is_stdin() {
        bail!("only one secret can come from standard input when `--key-file -` reads all of it");
    }
    Ok(())
}

/// An existing passphrase (asked once).
pub fn read_existing(source: &Source, prompt: &str) -> anyhow::Result<SecretBytes> {
    read(source, prompt, false)
}

/// A new passphrase (asked twice on a terminal). Empty secrets are refused.
pub fn read_new(source: &Source, prompt: &str) -> anyhow::Result<SecretBytes> {
    read(source, prompt, true)
}

fn read(source: &Source, prompt: &str, confirm: bool) -> anyhow::Result<SecretBytes> {
    let secret = match source {
        Source::KeyFile(p) if p == Path::new("-") => {
            secret_file::read_to_end(&mut raw_stdin()?, Kind::KeyFile)
                .map_err(|e| anyhow!("cannot read the key from standard input: {e}"))?
        }
        Source::KeyFile(p) => secret_file::read_file(p, Kind::KeyFile).map_err(|e| match e {
            secret_file::Error::Io(e) => {
                anyhow!("cannot open key file {}: {}", p.display(), io_reason(&e))
            }
            e => anyhow!("cannot read key file {}: {e}", p.display()),
        })?,
        Source::Interactive if io::stdin().is_terminal() => {
            let first = prompt_tty(prompt)?;
            if confirm {
                let again = prompt_tty("Verify passphrase: ")?;
                if again.expose_secret() != first.expose_secret() {
                    bail!("passphrases do not match");
                }
            }
            first
        }
        Source::Interactive => secret_file::read_line(&mut raw_stdin()?, Kind::Passphrase)
            .map_err(|e| anyhow!("cannot read the passphrase from standard input: {e}"))?
            .ok_or_else(|| anyhow!("no passphrase on standard input (end of input)"))?,
    };
    if secret.is_empty() {
        match source {
            Source::KeyFile(p) => bail!("key file {} is empty", p.display()),
            Source::Interactive => bail!("empty passphrase"),
        }
    }
    Ok(secret)
}

/// Asks for `YES` on the terminal. Without a terminal on standard input there is nobody to
/// ask: the caller must pass `--yes`.
pub fn confirm(question: &str) -> anyhow::Result<bool> {
    if !io::stdin().is_terminal() {
        bail!("{question}\nrefusing without confirmation: standard input is not a terminal (pass --yes)");
    }
    let mut tty = open_tty()?;
    write!(
        tty,
        "{question}\nAre you sure? (type 'YES' in capital letters): "
    )
    .and_then(|()| tty.flush())
    .context("cannot write to /dev/tty")?;
    let answer = secret_file::read_line(&mut tty, Kind::Passphrase)
        .map_err(|e| anyhow!("cannot read the answer from /dev/tty: {e}"))?
        .ok_or_else(|| anyhow!("no answer (end of input)"))?;
    Ok(answer.expose_secret() == b"YES")
}

/// Lowercase reason for an I/O error ("no such file or directory", "permission denied").
pub fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such file or directory".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => {
            let s = e.to_string();
            // "Is a directory (os error 21)" -> "is a directory (os error 21)"
            let mut c = s.chars();
            match c.next() {
                Some(f) => f.to_lowercase().chain(c).collect(),
                None => s,
            }
        }
    }
}

/// Standard input without std's buffer (which would keep a copy of the secret in ordinary
/// memory): a duplicate of fd 0.
fn raw_stdin() -> anyhow::Result<File> {
    let fd = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot duplicate standard input")?;
    Ok(File::from(fd))
}

fn open_tty() -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|e| anyhow!("cannot open /dev/tty: {}", io_reason(&e)))
}

/// Restores the terminal settings when dropped, also on early return.
struct EchoOff<'a> {
    tty: &'a File,
    saved: Termios,
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.tty.as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Prompts on `/dev/tty` and reads a line with echo off. The terminal is in non-canonical mode
/// without signals while reading, so Ctrl-C cancels the prompt (instead of killing the process
/// with echo still off) and the settings are always restored.
fn prompt_tty(prompt: &str) -> anyhow::Result<SecretBytes> {
    let mut tty = open_tty()?;
    let saved = termios::tcgetattr(tty.as_fd()).context("cannot read the terminal settings")?;
    let mut quiet = saved.clone();
    quiet
        .local_flags
        .remove(LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG);
    quiet.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
    quiet.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
    tty.write_all(prompt.as_bytes())
        .and_then(|()| tty.flush())
        .context("cannot write to /dev/tty")?;
    let line = {
        termios::tcsetattr(tty.as_fd(), SetArg::TCSANOW, &quiet)
            .context("cannot turn off echo on /dev/tty")?;
        let _guard = EchoOff { tty: &tty, saved };
        let mut reader = &tty;
        read_tty_line(&mut reader, MAX_PASSPHRASE)
    };
    let _ = tty.write_all(b"\n");
    line.context("cannot read the passphrase from /dev/tty")?
        .ok_or_else(|| anyhow!("no passphrase (end of input on /dev/tty)"))
}

/// A line typed on a terminal in non-canonical mode: Enter ends it, Backspace and Ctrl-U edit it,
/// Ctrl-C cancels, Ctrl-D on an empty line is end of input (`None`).
fn read_tty_line(r: &mut dyn Read, max: usize) -> io::Result<Option<SecretBytes>> {
    let mut buf = SecretBytes::zeroed(max);
    let mut n = 0;
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) if n == 0 => return Ok(None),
            Ok(0) => break,
            Ok(_) => match byte[0] {
                b'\n' | b'\r' => break,
                0x03 => return Err(io::Error::other("interrupted")),
                0x04 if n == 0 => return Ok(None),
                0x7f | 0x08 => {
                    if n > 0 {
                        n -= 1;
                        buf.expose_secret_mut()[n] = 0;
                    }
                }
                0x15 => {
                    buf.expose_secret_mut()[..n].fill(0);
                    n = 0;
                }
                b => {
                    if n == max {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("passphrase longer than {max} bytes"),
                        ));
                    }
                    buf.expose_secret_mut()[n] = b;
                    n += 1;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(SecretBytes::from_slice(&buf.expose_secret()[..n])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tty_line_editing() {
        let mut input: &[u8] = b"ab\x7fc\x15xyz\x08w\rrest";
        let line = read_tty_line(&mut input, 64).unwrap().unwrap();
        assert_eq!(line.expose_secret(), b"xyw");
        let mut input: &[u8] = b"secret\x03\n";
        assert!(read_tty_line(&mut input, 64).is_err());
        let mut input: &[u8] = b"\x04";
        assert!(read_tty_line(&mut input, 64).unwrap().is_none());
    }
}
