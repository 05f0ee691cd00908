//! nbdcryptd's socket paths as another local user could prepare them: a symlink at the socket
//! path is never followed (its target is neither removed nor chmod'ed), a directory others can
//! write without the sticky bit is refused, and `--socket-mode` takes effect at bind.

use nbdcrypt_tests::*;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `nbdcryptd --plain DIR/disk.img --unix SOCK ARGS`, expected to fail at start.
fn start_fails(dir: &Path, sock: &Path, args: &[&str]) -> Out {
    let img = dir.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    run(
        Command::new(daemon_binary())
            .arg("--plain")
            .arg(&img)
            .arg("--unix")
            .arg(sock)
            .args(args),
        Duration::from_secs(20),
    )
    .failure()
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_symlink_at_the_socket_path_is_refused_and_its_target_left_alone() {
    let dir = tempdir();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("nbd.sock");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let out = start_fails(dir.path(), &link, &["--socket-mode", "0666"]);
    assert!(out.stderr.contains("symbolic link"), "{}", out.details());
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert_eq!(
        mode_of(&victim),
        0o600,
        "the target was chmod'ed through the link"
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_directory_others_can_write_without_the_sticky_bit_is_refused() {
    let dir = tempdir();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = start_fails(dir.path(), &open.join("nbd.sock"), &[]);
    assert!(
        out.stderr.contains("writable by other users"),
        "{}",
        out.details()
    );
    assert!(
        std::fs::read_dir(&open).unwrap().next().is_none(),
        "nothing was created there"
    );
}

#[test]
fn socket_mode_is_the_mode_of_the_bound_socket() {
    let d = Daemon::plain(MIB, &["--socket-mode", "0660"]);
    let meta = std::fs::symlink_metadata(&d.sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(mode_of(&d.sock), 0o660);
    let d2 = Daemon::plain(MIB, &[]);
    assert_eq!(
        mode_of(&d2.sock),
        0o600,
        "the default lets only the owner connect"
    );
}
