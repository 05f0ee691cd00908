//! A local unprivileged user against a daemon run by root (SECURITY.md, attacker 2): with the
//! sockets' directory open to everybody, so that only the daemon's own defences stand in the way,
//! uid 65534 can neither control the daemon, nor attach to the export, nor read the daemon's
//! memory or environment. Each check has a positive control run as root.
//!
//! The unprivileged side runs through util-linux's `setpriv` (real uid/gid change, no
//! capabilities); the test needs root, as CI has.

use nbdcrypt_tests::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const PASS: &[u8] = b"local-user test passphrase";
const NOBODY: &str = "65534";

/// `setpriv` as uid/gid 65534 with no supplementary groups and no capabilities.
fn as_nobody(program: &Path) -> Command {
    let mut c = tool("setpriv");
    c.args([
        "--reuid",
        NOBODY,
        "--regid",
        NOBODY,
        "--clear-groups",
        "--inh-caps=-all",
        "--",
    ])
    .arg(program);
    c
}

/// Make `path` and its parents up to `/` traversable by others (tempdirs are 0700), so that the
/// daemon's socket modes are what keeps other users out.
fn open_up(path: &Path) {
    for p in path.ancestors() {
        if p == Path::new("/") {
            break;
        }
        let mode = std::fs::metadata(p).unwrap().permissions().mode();
        if mode & 0o005 != 0o005 {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode | 0o005)).unwrap();
        }
    }
}

#[test]
fn an_unprivileged_user_can_neither_control_nor_attach_nor_read_the_daemons_memory() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    assert_eq!(euid, Some("0"), "this test needs root (CI runs as root)");
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, 16 << 20, 4096, "pbkdf2", PASS);
    let d = Daemon::volume_in(dir, &img, &[]);
    open_up(d.dir());
    // The binaries must be runnable by nobody too (the build tree is root's).
    let ctl = d.dir().join("nbdcryptctl");
    std::fs::copy(ctl_binary(), &ctl).unwrap();
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let control = d.control();
    let key = d.dir().join("pass.key");
    std::fs::write(&key, PASS).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();

    // The control socket: mode 0600, owned by root.
    let out = run(
        as_nobody(&ctl)
            .args(["unlock", "--key-file"])
            .arg(&key)
            .arg("--control")
            .arg(&control),
        Duration::from_secs(30),
    );
    assert!(!out.ok(), "nobody unlocked the daemon:\n{}", out.details());
    assert!(
        out.stderr.to_lowercase().contains("permission denied"),
        "the refusal should say permission denied:\n{}",
        out.details()
    );
    let out = run(
        as_nobody(&ctl).args(["status", "--control"]).arg(&control),
        Duration::from_secs(30),
    );
    assert!(!out.ok(), "nobody read the status:\n{}", out.details());
    assert_eq!(
        d.state(),
        "locked",
        "positive control: root reads the status, and nobody's unlock failed"
    );

    // Unlock as root; the NBD socket (mode 0600) still keeps nobody out.
    d.unlock(PASS).success();
    assert_eq!(d.state(), "unlocked");
    let nbd_sock = d.dir().join("nbd.sock");
    let uri = format!("nbd+unix:///nbdcrypt?socket={}", nbd_sock.display());
    let nbdinfo = path_of("nbdinfo");
    let out = run(as_nobody(&nbdinfo).arg(&uri), Duration::from_secs(30));
    assert!(
        !out.ok(),
        "nobody attached to the export:\n{}",
        out.details()
    );
    let out = nbdinfo_ok(&uri);
    assert!(
        out.contains("size"),
        "positive control: root attaches:\n{out}"
    );

    // The daemon's memory, environment and fds: not dumpable, so /proc/PID/* is root's.
    let pid = d.pid().to_string();
    let cat = path_of("cat");
    for f in ["mem", "environ", "maps"] {
        let p = format!("/proc/{pid}/{f}");
        let out = run(as_nobody(&cat).arg(&p), Duration::from_secs(10));
        assert!(!out.ok(), "nobody read {p}:\n{}", out.details());
    }
    let out = run(
        as_nobody(&path_of("ls")).arg(format!("/proc/{pid}/fd")),
        Duration::from_secs(10),
    );
    assert!(
        !out.ok(),
        "nobody listed the daemon's descriptors:\n{}",
        out.details()
    );
}

fn path_of(tool_name: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(tool_name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{tool_name} not found on PATH"))
}

fn nbdinfo_ok(uri: &str) -> String {
    nbdinfo(&[uri]).success().stdout
}

/// Negative control: the same unprivileged user does attach when the operator opens the NBD
/// socket up with `--socket-mode 0666` — so the refusal above comes from the socket's mode, not
/// from something else in the way (setpriv, directory permissions, the client).
#[test]
fn with_socket_mode_0666_the_same_unprivileged_user_attaches() {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, 16 << 20, 4096, "pbkdf2", PASS);
    let d = Daemon::volume_in(dir, &img, &["--socket-mode", "0666"]);
    open_up(d.dir());
    d.unlock(PASS).success();
    let uri = format!(
        "nbd+unix:///nbdcrypt?socket={}",
        d.dir().join("nbd.sock").display()
    );
    let out = run(
        as_nobody(&path_of("nbdinfo")).arg(&uri),
        Duration::from_secs(30),
    );
    assert!(
        out.ok(),
        "nobody should attach to a 0666 socket:\n{}",
        out.details()
    );
}
