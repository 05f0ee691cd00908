//! The one reader of secrets from files and streams, shared by the daemon and nbdcryptctl: key
//! files, PIN files, `--unlock-key-file`, passphrases on standard input.
//!
//! * Every read has a size cap per [`Kind`]; one byte more is an error that names the cap, never
//!   a silently truncated secret.
//! * Bytes go straight into locked [`SecretBytes`]: a regular file into a buffer sized from its
//!   length, a stream into a buffer that grows by copying into a bigger locked buffer and dropping
//!   (wiping) the old one. No `Vec` ever holds a byte of the secret, so no reallocation leaves
//!   an unwiped copy behind; on any error every buffer is wiped before returning.
//! * A path is opened without blocking and without becoming our controlling terminal, then
//!   checked: a regular file or a pipe (`<(command)`, a FIFO) is read; a terminal, another
//!   device, a socket or a directory is refused, since reading it could hang or never end.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::crypto::keys::SecretBytes;

/// What a secret is, which sets its size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A key file (`--key-file`, `--unlock-key-file`): cryptsetup's default limit, 8 MiB.
    KeyFile,
    /// A passphrase typed or piped as a line: cryptsetup's limit, 512 bytes.
    Passphrase,
    /// A PKCS#11 user PIN.
    Pin,
}

impl Kind {
    /// The largest secret of this kind, in bytes.
    pub const fn cap(self) -> usize {
        match self {
            Kind::KeyFile => MAX_KEY_FILE,
            Kind::Passphrase => MAX_PASSPHRASE,
            Kind::Pin => MAX_PIN,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::KeyFile => "key file",
            Kind::Passphrase => "passphrase",
            Kind::Pin => "PIN",
        }
    }
}

/// cryptsetup's default `--keyfile-size` limit (8 MiB).
pub const MAX_KEY_FILE: usize = 8 << 20;
/// cryptsetup's limit for a passphrase (512 bytes).
pub const MAX_PASSPHRASE: usize = 512;
/// A PKCS#11 PIN: tokens take at most a few dozen bytes; 256 leaves room.
pub const MAX_PIN: usize = 256;

/// Why a secret could not be read. Says what and where, never any byte of the secret.
#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    /// More than the cap.
    TooLong {
        kind: Kind,
        cap: usize,
    },
    /// Not a regular file or a pipe.
    NotAFile {
        what: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::TooLong { kind, cap } => {
                write!(f, "longer than {cap} bytes, the limit for a {}", kind.name())
            }
            Error::NotAFile { what } => write!(
                f,
                "is {what}, not a regular file or a pipe (reading it could block forever or never end)"
            ),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(e) => e,
            e @ Error::TooLong { .. } => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            e @ Error::NotAFile { .. } => {
                io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
            }
        }
    }
}

/// The whole of the file at `path`, bytes as-is, at most `kind.cap()` bytes. Errors do not
/// name the path; callers add it.
pub fn read_file(path: &Path, kind: Kind) -> Result<SecretBytes, Error> {
    // O_NONBLOCK: opening a FIFO without a writer (or a terminal, a modem line) returns at once
    // instead of hanging; O_NOCTTY: a terminal never becomes our controlling terminal.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let t = meta.file_type();
    let what = if t.is_file() || t.is_fifo() {
        None
    } else if t.is_char_device() {
        Some("a character device (a terminal, /dev/zero...)")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_dir() {
        Some("a directory")
    } else {
        Some("not a regular file")
    };
    if let Some(what) = what {
        return Err(Error::NotAFile { what });
    }
    if t.is_fifo() {
        // Blocking from here: a pipe with a writer is read to its end; one without gives EOF.
        set_blocking(&file)?;
    }
    let size_hint = if t.is_file() {
        let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
        if len > kind.cap() {
            return Err(Error::TooLong {
                kind,
                cap: kind.cap(),
            });
        }
        // One byte more than the file, to see EOF (or growth) without another buffer.
        Some(len + 1)
    } else {
        None
    };
    read_stream(&mut &file, kind, size_hint)
}

/// All of `r` to its end (a key file on standard input), at most `kind.cap()` bytes.
pub fn read_to_end(r: &mut dyn Read, kind: Kind) -> Result<SecretBytes, Error> {
    read_stream(r, kind, None)
}

/// A PIN file: its bytes without one trailing `\n` or `\r\n`.
pub fn read_pin_file(path: &Path) -> Result<SecretBytes, Error> {
    let raw = read_file(path, Kind::Pin)?;
    let mut pin = raw.expose_secret();
    if let Some(p) = pin.strip_suffix(b"\n") {
        pin = p.strip_suffix(b"\r").unwrap_or(p);
    }
    Ok(SecretBytes::from_slice(pin))
}

/// One line of `r` without its `\n`, read one byte at a time so nothing past it is consumed from
/// an unbuffered source (the next line may be the next secret). `None` at end of input before
/// any byte. At most `kind.cap()` bytes.
pub fn read_line(r: &mut dyn Read, kind: Kind) -> Result<Option<SecretBytes>, Error> {
    let cap = kind.cap();
    let mut buf = SecretBytes::zeroed(cap);
    let mut n = 0;
    // Even the one-byte buffer is locked memory, wiped on drop.
    let mut byte = SecretBytes::zeroed(1);
    loop {
        match r.read(byte.expose_secret_mut()) {
            Ok(0) if n == 0 => return Ok(None),
            Ok(0) => break,
            Ok(_) if byte.expose_secret()[0] == b'\n' => break,
            Ok(_) => {
                if n == cap {
                    return Err(Error::TooLong { kind, cap });
                }
                buf.expose_secret_mut()[n] = byte.expose_secret()[0];
                n += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(SecretBytes::from_slice(&buf.expose_secret()[..n])))
}

/// Read to EOF into locked buffers: start at `size_hint` (a regular file's length + 1) or a page,
/// double by copying into a new locked buffer (the old one is wiped on drop), fail at one byte
/// past the cap.
fn read_stream(
    r: &mut dyn Read,
    kind: Kind,
    size_hint: Option<usize>,
) -> Result<SecretBytes, Error> {
    let cap = kind.cap();
    let limit = cap + 1;
    let mut buf = SecretBytes::zeroed(size_hint.unwrap_or(4096).clamp(1, limit));
    let mut n = 0;
    loop {
        if n == buf.len() {
            if n >= limit {
                return Err(Error::TooLong { kind, cap });
            }
            let mut bigger = SecretBytes::zeroed(n.saturating_mul(2).min(limit));
            bigger.expose_secret_mut()[..n].copy_from_slice(&buf.expose_secret()[..n]);
            buf = bigger; // the old buffer is wiped on drop
        }
        match r.read(&mut buf.expose_secret_mut()[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if n > cap {
        return Err(Error::TooLong { kind, cap });
    }
    if n == buf.len() {
        return Ok(buf);
    }
    Ok(SecretBytes::from_slice(&buf.expose_secret()[..n]))
}

fn set_blocking(file: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let flags = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
    fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("nbdcrypt-secret-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn refused<T>(r: Result<T, Error>) -> Error {
        match r {
            Err(e) => e,
            Ok(_) => panic!("a secret that should have been refused was read"),
        }
    }

    /// A reader that hands out `data` in small pieces, then fails or ends.
    struct Dribble<'a> {
        data: &'a [u8],
        fail_at_end: bool,
    }

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.data.is_empty() {
                return if self.fail_at_end {
                    Err(io::Error::other("device gone"))
                } else {
                    Ok(0)
                };
            }
            let k = buf.len().min(self.data.len()).min(1000);
            buf[..k].copy_from_slice(&self.data[..k]);
            self.data = &self.data[k..];
            Ok(k)
        }
    }

    #[test]
    fn exactly_the_cap_is_accepted_one_byte_more_is_refused_and_names_the_cap() {
        for kind in [Kind::KeyFile, Kind::Passphrase, Kind::Pin] {
            let cap = kind.cap();
            let data: Vec<u8> = (0..cap + 1).map(|i| (i % 251) as u8).collect();
            let at_cap = read_to_end(
                &mut Dribble {
                    data: &data[..cap],
                    fail_at_end: false,
                },
                kind,
            )
            .unwrap();
            assert_eq!(at_cap.expose_secret(), &data[..cap]);
            let e = refused(read_to_end(
                &mut Dribble {
                    data: &data,
                    fail_at_end: false,
                },
                kind,
            ));
            assert!(
                matches!(e, Error::TooLong { cap: c, .. } if c == cap),
                "{e}"
            );
            assert!(e.to_string().contains(&cap.to_string()), "{e}");
        }
        assert_eq!(
            Kind::KeyFile.cap(),
            8 * 1024 * 1024,
            "cryptsetup's default key file limit"
        );
    }

    #[test]
    fn a_file_at_the_cap_is_read_and_one_past_it_is_refused_before_reading() {
        let pin = temp("pin-at-cap", &[b'7'; MAX_PIN]);
        assert_eq!(read_file(&pin, Kind::Pin).unwrap().len(), MAX_PIN);
        let big = temp("pin-too-long", &[b'7'; MAX_PIN + 1]);
        let e = refused(read_file(&big, Kind::Pin));
        assert!(
            e.to_string()
                .contains("longer than 256 bytes, the limit for a PIN"),
            "{e}"
        );
        let empty = temp("empty", b"");
        assert!(read_file(&empty, Kind::KeyFile).unwrap().is_empty());
    }

    #[test]
    fn key_files_keep_every_byte_across_buffer_growth() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let s = read_to_end(
            &mut Dribble {
                data: &data,
                fail_at_end: false,
            },
            Kind::KeyFile,
        )
        .unwrap();
        assert_eq!(s.expose_secret(), &data[..]);
        let f = temp("key", &data);
        assert_eq!(
            read_file(&f, Kind::KeyFile).unwrap().expose_secret(),
            &data[..]
        );
    }

    #[test]
    fn a_failed_or_oversized_read_returns_no_partial_secret() {
        // An error part-way gives an error, never the bytes read so far.
        let r = read_to_end(
            &mut Dribble {
                data: b"partial secret",
                fail_at_end: true,
            },
            Kind::KeyFile,
        );
        assert!(matches!(r, Err(Error::Io(ref e)) if e.to_string() == "device gone"));
        let r = read_line(
            &mut Dribble {
                data: b"partial",
                fail_at_end: true,
            },
            Kind::Passphrase,
        );
        assert!(r.is_err());
        let long = vec![b'x'; MAX_PASSPHRASE + 1];
        assert!(matches!(
            read_line(&mut &long[..], Kind::Passphrase),
            Err(Error::TooLong { .. })
        ));
    }

    #[test]
    fn lines_stop_at_the_newline_and_leave_the_rest() {
        let mut input: &[u8] = b"first\nsecond";
        assert_eq!(
            read_line(&mut input, Kind::Passphrase)
                .unwrap()
                .unwrap()
                .expose_secret(),
            b"first"
        );
        assert_eq!(input, b"second");
        assert_eq!(
            read_line(&mut input, Kind::Passphrase)
                .unwrap()
                .unwrap()
                .expose_secret(),
            b"second"
        );
        assert!(read_line(&mut input, Kind::Passphrase).unwrap().is_none());
    }

    #[test]
    fn pin_files_lose_one_trailing_newline() {
        for (bytes, want) in [
            (&b"1234\n"[..], &b"1234"[..]),
            (b"1234\r\n", b"1234"),
            (b"12 34", b"12 34"),
            (b"1\n\n", b"1\n"),
        ] {
            let p = temp("pin", bytes);
            assert_eq!(read_pin_file(&p).unwrap().expose_secret(), want);
        }
    }

    #[test]
    fn devices_and_directories_are_refused_without_hanging_and_pipes_are_read() {
        for (path, what) in [
            ("/dev/null", "character device"),
            ("/dev/zero", "character device"),
            ("/", "directory"),
        ] {
            let e = refused(read_file(Path::new(path), Kind::KeyFile));
            assert!(e.to_string().contains(what), "{path}: {e}");
        }
        // A FIFO nobody writes to: an immediate (empty) end, not a hang.
        let dir = std::env::temp_dir().join(format!("nbdcrypt-secret-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(
            &fifo,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .unwrap();
        assert!(read_file(&fifo, Kind::KeyFile).unwrap().is_empty());
        // A pipe, like `--key-file <(command)` (/dev/fd/63): read to its end.
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w, b"from a pipe").unwrap();
        drop(w);
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&r));
        assert_eq!(
            read_file(Path::new(&path), Kind::KeyFile)
                .unwrap()
                .expose_secret(),
            b"from a pipe"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
