//! Binding the daemon's Unix sockets (NBD and control): created with their final mode and no
//! window in which others could connect, replacing a stale socket of ours but never a live one,
//! and never touching anything through a path another user controls:
//!
//! * the socket's directory must belong to us or root and not be writable by others unless it
//!   has the sticky bit (as /tmp and /run/user do): otherwise someone else could swap the path
//!   under us;
//! * the path itself must be missing or a socket (a symlink is refused, never followed);
//! * a stale socket is removed only when lstat says it is a socket owned by us, and removing
//!   uses unlink, which never follows links;
//! * the mode is set at bind (through the umask), never by chmod on a path afterwards, which
//!   would follow a symlink put there in between.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use tokio::net::{UnixListener, UnixStream};

/// Bind a Unix socket only its owner can use (mode 0600). See [`bind`].
pub async fn bind_private(path: &Path, dir_mode: u32) -> io::Result<UnixListener> {
    bind(path, dir_mode, 0o600).await
}

/// Bind a Unix socket with permission bits `mode`, replacing a stale socket of ours but never a
/// live one, and never anything that is not a socket. A missing directory is created with
/// `dir_mode`; an existing one must be safe (see the module docs).
pub async fn bind(path: &Path, dir_mode: u32, mode: u32) -> io::Result<UnixListener> {
    let context = |e: io::Error, what: &str| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(parent)
            .map_err(|e| context(e, "cannot create the directory of"))?;
        // Exactly `dir_mode` whatever the umask, set on the directory we opened without
        // following a link, not by path.
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(parent)
            .map_err(|e| context(e, "cannot open the directory of"))?;
        dir.set_permissions(std::fs::Permissions::from_mode(dir_mode))
            .map_err(|e| context(e, "cannot set the mode of the directory of"))?;
    }
    check_directory(parent, path)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            let me = nix::unistd::geteuid().as_raw();
            if meta.uid() != me {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is a stale socket of another user (uid {}); not removing it (remove it \
                         yourself if it is safe, or choose another path)",
                        path.display(),
                        meta.uid()
                    ),
                ));
            }
            // unlink never follows a symlink, and the directory check above means nobody else
            // can have swapped the entry since the lstat.
            std::fs::remove_file(path).map_err(|e| context(e, "cannot remove the stale socket"))?;
        }
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} is a symbolic link; not following it (give the socket's real path)",
                    path.display()
                ),
            ))
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(context(e, "cannot inspect")),
    }
    // The final mode from the start (bind creates the socket 0777 & !umask), so there is no
    // window in which others could connect and no chmod through a path afterwards.
    // The umask is per process: one bind at a time sets and restores it.
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let bound = {
        let _one = UMASK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(!mode & 0o777));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        bound
    };
    bound.map_err(|e| context(e, "cannot listen on"))
}

/// Remove the socket file at `path` at shutdown, only if it is still a socket owned by us
/// (never whatever else may have been put there; unlink never follows links).
pub fn remove_ours(path: &Path) {
    let me = nix::unistd::geteuid().as_raw();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && meta.uid() == me {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The socket's directory must be ours or root's, and not writable by others unless sticky.
fn check_directory(dir: &Path, path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot inspect the directory of {}: {e}", path.display()),
        )
    })?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("the parent of {} is not a directory", path.display()),
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.permissions().mode();
    let sticky = mode & 0o1000 != 0;
    let unsafe_owner = meta.uid() != me && meta.uid() != 0;
    let group_writable = mode & 0o020 != 0 && meta.gid() != nix::unistd::getegid().as_raw();
    let others_writable = mode & 0o002 != 0 || group_writable;
    if unsafe_owner || (others_writable && !sticky) {
        let why = if unsafe_owner {
            format!("belongs to another user (uid {})", meta.uid())
        } else {
            format!(
                "is writable by other users without the sticky bit (mode {:o})",
                mode & 0o7777
            )
        };
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refusing to bind {}: its directory {} {why}, so others could replace the socket; \
                 use a directory only we (or root) can write, such as /run/nbdcrypt",
                path.display(),
                dir.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("nbdcrypt-socket-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn a_path_that_is_not_a_socket_is_refused_and_left_alone() {
        let dir = Dir::new("file");
        let file = dir.0.join("precious");
        std::fs::write(&file, b"data").unwrap();
        let e = bind_private(&file, 0o700).await.unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        // A stale socket (nobody listening) is replaced; a live one is not.
        let sock = dir.0.join("s.sock");
        drop(bind_private(&sock, 0o700).await.unwrap());
        let live = bind_private(&sock, 0o700).await.unwrap();
        assert_eq!(
            bind_private(&sock, 0o700).await.unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(live);
    }

    #[tokio::test]
    async fn a_symlink_is_never_followed_neither_to_chmod_nor_to_remove() {
        let dir = Dir::new("link");
        // The link points at a stale socket and at a file: both stay as they are.
        let target = dir.0.join("target.sock");
        drop(bind(&target, 0o700, 0o600).await.unwrap());
        let file = dir.0.join("victim");
        std::fs::write(&file, b"data").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        for pointee in [&target, &file] {
            let link = dir.0.join("s.sock");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(pointee, &link).unwrap();
            let e = bind(&link, 0o700, 0o666).await.unwrap_err();
            assert!(e.to_string().contains("symbolic link"), "{e}");
            assert!(std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink());
            assert!(
                std::fs::symlink_metadata(pointee).is_ok(),
                "the link's target was removed"
            );
            assert_eq!(mode_of(pointee), 0o600, "the link's target was chmod'ed");
            remove_ours(&link);
            assert!(
                std::fs::symlink_metadata(&link).is_ok(),
                "remove_ours removed a symlink"
            );
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }

    #[tokio::test]
    async fn the_mode_is_set_at_bind() {
        let dir = Dir::new("mode");
        let sock = dir.0.join("nbd.sock");
        let l = bind(&sock, 0o755, 0o660).await.unwrap();
        assert_eq!(mode_of(&sock), 0o660);
        drop(l);
        remove_ours(&sock);
        let l = bind_private(&sock, 0o700).await.unwrap();
        assert_eq!(mode_of(&sock), 0o600);
        drop(l);
        // A missing directory is created with the mode asked for.
        let nested = dir.0.join("run").join("c.sock");
        drop(bind_private(&nested, 0o700).await.unwrap());
        assert_eq!(mode_of(&dir.0.join("run")), 0o700);
    }

    #[tokio::test]
    async fn a_directory_others_can_write_is_refused_unless_sticky() {
        let dir = Dir::new("dir");
        let open = dir.0.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_private(&open.join("s.sock"), 0o700).await.unwrap_err();
        assert!(e.to_string().contains("writable by other users"), "{e}");
        assert!(
            std::fs::symlink_metadata(open.join("s.sock")).is_err(),
            "nothing was created"
        );
        // Sticky, like /tmp: others cannot remove or rename our entries there.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        drop(bind_private(&open.join("s.sock"), 0o700).await.unwrap());
    }

    #[tokio::test]
    async fn a_stale_socket_of_another_user_or_in_their_directory_is_left_alone() {
        if !nix::unistd::geteuid().is_root() {
            return; // needs chown; CI runs the suite as root
        }
        let dir = Dir::new("owner");
        let sock = dir.0.join("s.sock");
        drop(bind_private(&sock, 0o700).await.unwrap());
        let nobody = Some(nix::unistd::Uid::from_raw(65534));
        nix::unistd::chown(&sock, nobody, None).unwrap();
        let e = bind_private(&sock, 0o700).await.unwrap_err();
        assert!(e.to_string().contains("another user (uid 65534)"), "{e}");
        assert!(std::fs::symlink_metadata(&sock).is_ok());
        remove_ours(&sock);
        assert!(
            std::fs::symlink_metadata(&sock).is_ok(),
            "remove_ours removed another user's socket"
        );
        // A directory owned by another user.
        let theirs = dir.0.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        nix::unistd::chown(&theirs, nobody, None).unwrap();
        let e = bind_private(&theirs.join("s.sock"), 0o700)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("belongs to another user"), "{e}");
    }
}
