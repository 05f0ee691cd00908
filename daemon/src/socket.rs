//! Binding the daemon's Unix sockets (NBD and control): created root-only with no window in
//! which others could connect, replacing a stale socket but never a live one, and never removing
//! a path that is not a socket.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::{UnixListener, UnixStream};

/// Bind a Unix socket only its owner can use, replacing a stale socket but never a live one, and
/// never removing anything that is not a socket. A missing directory is created with `dir_mode`.
pub async fn bind_private(path: &Path, dir_mode: u32) -> io::Result<UnixListener> {
    let context = |e: io::Error, what: &str| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::create_dir_all(parent).map_err(|e| context(e, "cannot create the directory of"))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(dir_mode))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path).map_err(|e| context(e, "cannot remove the stale socket"))?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; not replacing it", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(context(e, "cannot inspect")),
    }
    // No group/other bits from the start, so there is no window in which others could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| context(e, "cannot listen on"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_path_that_is_not_a_socket_is_refused_and_left_alone() {
        let dir = std::env::temp_dir().join(format!("nbdcrypt-socket-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("precious");
        std::fs::write(&file, b"data").unwrap();
        let e = bind_private(&file, 0o700).await.unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        // A stale socket (nobody listening) is replaced; a live one is not.
        let sock = dir.join("s.sock");
        drop(bind_private(&sock, 0o700).await.unwrap());
        let live = bind_private(&sock, 0o700).await.unwrap();
        assert_eq!(bind_private(&sock, 0o700).await.unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(live);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
