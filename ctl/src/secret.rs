//! Reading an unlock secret: from the terminal without echo, a line of standard input, or a key
//! file taken byte for byte. Every byte lands in `SecretBytes` (wiped on drop) through a buffer
//! allocated once at full size, so no reallocation leaves a copy behind.
//!
//! Shared by the online `unlock` and the offline commands that need a passphrase.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sys::termios::{self, LocalFlags, SetArg, Termios};

use nbdcrypt::control::proto::MAX_SECRET_LEN;
use nbdcrypt::crypto::keys::SecretBytes;

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
        Source::StdinLine => read_capped(&mut io::stdin().lock(), true)
            .map_err(|e| Failure::error(format!("cannot read the passphrase from standard input: {e}")))?,
        Source::KeyFile(path) if path == Path::new("-") => read_capped(&mut io::stdin().lock(), false)
            .map_err(|e| Failure::error(format!("cannot read the key from standard input: {e}")))?,
        Source::KeyFile(path) => {
            let mut f = File::open(path)
                .map_err(|e| Failure::error(format!("cannot open key file {}: {e}", path.display())))?;
            read_capped(&mut f, false)
                .map_err(|e| Failure::error(format!("cannot read key file {}: {e}", path.display())))?
        }
    };
    if secret.is_empty() {
        return Err(Failure::error(match source {
            Source::KeyFile(p) => format!("key file {} is empty", p.display()),
            _ => "empty passphrase".to_owned(),
        }));
    }
    Ok(secret)
}

/// Read to EOF (or through the first newline if `line`, which is dropped) into a buffer that
/// never grows; fail past `MAX_SECRET_LEN` bytes.
fn read_capped(r: &mut dyn Read, line: bool) -> io::Result<SecretBytes> {
    let mut buf = SecretBytes::zeroed(MAX_SECRET_LEN + 1);
    let mut n = 0;
    loop {
        if n == buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("longer than {MAX_SECRET_LEN} bytes"),
            ));
        }
        let got = match r.read(&mut buf.expose_secret_mut()[n..]) {
            Ok(0) => break,
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if line {
            if let Some(i) = buf.expose_secret()[n..n + got].iter().position(|&b| b == b'\n') {
                n += i;
                break;
            }
        }
        n += got;
    }
    Ok(SecretBytes::from_slice(&buf.expose_secret()[..n]))
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
    let tty = OpenOptions::new().read(true).write(true).open("/dev/tty").map_err(no_tty)?;
    let saved = termios::tcgetattr(tty.as_fd()).map_err(|e| no_tty(e.into()))?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet.local_flags.insert(LocalFlags::ECHONL | LocalFlags::ICANON);
    termios::tcsetattr(tty.as_fd(), SetArg::TCSAFLUSH, &quiet).map_err(|e| no_tty(e.into()))?;
    let guard = EchoOff { tty: &tty, saved };
    (&tty).write_all(prompt.as_bytes()).map_err(no_tty)?;
    let _ = (&tty).flush();
    let secret = read_capped(&mut &tty, true)
        .map_err(|e| Failure::error(format!("cannot read the passphrase: {e}")));
    drop(guard);
    secret
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_ends_at_its_newline_and_keeps_other_bytes() {
        let s = read_capped(&mut &b"pass word\r\nrest"[..], true).unwrap();
        assert_eq!(s.expose_secret(), b"pass word\r");
        let s = read_capped(&mut &b"no newline"[..], true).unwrap();
        assert_eq!(s.expose_secret(), b"no newline");
    }

    #[test]
    fn a_key_file_is_taken_as_is() {
        let s = read_capped(&mut &b"\x00key\nwith newlines\n"[..], false).unwrap();
        assert_eq!(s.expose_secret(), b"\x00key\nwith newlines\n");
    }

    #[test]
    fn an_oversized_secret_is_refused() {
        let big = vec![b'a'; MAX_SECRET_LEN + 1];
        assert!(read_capped(&mut &big[..], false).is_err());
        let max = vec![b'a'; MAX_SECRET_LEN];
        assert_eq!(read_capped(&mut &max[..], false).unwrap().len(), MAX_SECRET_LEN);
    }
}
