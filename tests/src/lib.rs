//! Test harness: starts the real binaries in a temporary directory.
//!
//! * [`Daemon`] runs `nbdcryptd` (from the workspace target dir, or `$NBDCRYPTD`) on a Unix
//!   socket inside a [`tempfile::TempDir`], waits until the socket accepts, kills it on `Drop`
//!   and prints its stderr when the test fails. A daemon that dies on its own during a test, or
//!   logs a panic of any of its threads, fails that test.
//! * [`tool`] / [`run`] run the external NBD clients (nbdinfo, nbdsh, nbdcopy, qemu-io,
//!   qemu-img, fio) with a time limit. A missing tool fails the test: CI installs all of them
//!   (`scripts/test.sh`), so absence is a bug, not a reason to skip.
//! * [`raw`] is a tiny hand-written NBD client over `UnixStream` for the wire-level tests.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// The default export name of nbdcryptd.
pub const EXPORT: &str = "nbdcrypt";

/// How long the daemon may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Path of the `nbdcryptd` binary under test: `$NBDCRYPTD`, else the target directory this test
/// executable was built into (`target/debug/deps/..` -> `target/debug/nbdcryptd`, which also
/// honours `CARGO_TARGET_DIR`), else `<workspace>/target/debug/nbdcryptd`.
pub fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NBDCRYPTD") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "$NBDCRYPTD={} does not exist", p.display());
        return p;
    }
    let beside_tests = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("nbdcryptd")));
    let in_workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/nbdcryptd");
    for p in beside_tests.iter().chain([&in_workspace]) {
        if p.is_file() {
            return p.clone();
        }
    }
    panic!(
        "nbdcryptd binary not found at {}: run `cargo build --workspace --bins` first \
         (./scripts/test.sh does), or set $NBDCRYPTD",
        beside_tests.as_ref().unwrap_or(&in_workspace).display()
    );
}

/// A running `nbdcryptd`, killed on drop.
pub struct Daemon {
    child: Option<Child>,
    dir: TempDir,
    /// The Unix socket it listens on.
    pub sock: PathBuf,
    /// The backing file (`--plain PATH`), if any.
    pub image: PathBuf,
    log: PathBuf,
    args: Vec<OsString>,
    /// Set once the test has deliberately stopped the daemon.
    stopped: bool,
}

impl Daemon {
    /// Serve a fresh sparse plain file of `size` bytes: `--plain DIR/disk.img --unix DIR/nbd.sock`
    /// followed by `extra`.
    pub fn plain(size: u64, extra: &[&str]) -> Daemon {
        let dir = tempdir();
        let image = dir.path().join("disk.img");
        File::create(&image).unwrap().set_len(size).unwrap();
        Self::plain_in(dir, extra)
    }

    /// Serve a plain file holding exactly `contents`.
    pub fn plain_with(contents: &[u8], extra: &[&str]) -> Daemon {
        let dir = tempdir();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, contents).unwrap();
        Self::plain_in(dir, extra)
    }

    /// Serve `dir/disk.img` (which the caller prepared) on `dir/nbd.sock`.
    pub fn plain_in(dir: TempDir, extra: &[&str]) -> Daemon {
        let image = dir.path().join("disk.img");
        let sock = dir.path().join("nbd.sock");
        let mut args: Vec<OsString> = vec![
            "--plain".into(),
            image.clone().into(),
            "--unix".into(),
            sock.clone().into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        Self::start_in(dir, args)
    }

    /// Serve a fresh LUKS2 volume that cryptsetup formats (aes-xts-plain64, `sector_size`-byte
    /// sectors, a cheap PBKDF2 keyslot) in a `file_size`-byte file, unlocked at start with a
    /// random key file: `--volume DIR/disk.img --unlock-key-file DIR/key --control
    /// DIR/control.sock --unix DIR/nbd.sock` followed by `extra`.
    pub fn luks(file_size: u64, sector_size: u32, extra: &[&str]) -> Daemon {
        let dir = tempdir();
        luks_format_keyfile(dir.path(), file_size, sector_size);
        Self::luks_in(dir, extra)
    }

    /// Serve the LUKS2 volume `dir/disk.img` with key `dir/key` (see [`luks_format`]).
    pub fn luks_in(dir: TempDir, extra: &[&str]) -> Daemon {
        let p = |n: &str| OsString::from(dir.path().join(n));
        let mut args = vec![
            "--volume".into(),
            p("disk.img"),
            "--unlock-key-file".into(),
            p("key"),
            "--control".into(),
            p("control.sock"),
            "--unix".into(),
            p("nbd.sock"),
        ];
        args.extend(extra.iter().map(OsString::from));
        Self::start_in(dir, args)
    }

    /// Start with a full argument list. `{dir}` inside an argument is replaced by the temporary
    /// directory. The arguments must contain `--unix SOCK`.
    pub fn start(args: &[&str]) -> Daemon {
        let dir = tempdir();
        let d = dir.path().to_str().unwrap().to_owned();
        let args = args
            .iter()
            .map(|a| OsString::from(a.replace("{dir}", &d)))
            .collect();
        Self::start_in(dir, args)
    }

    /// Start in `dir` with `args` (the socket is the value after `--unix`, the image the value
    /// after `--plain`).
    pub fn start_in(dir: TempDir, args: Vec<OsString>) -> Daemon {
        Self::start_bin_in(&daemon_binary(), dir, args)
    }

    /// [`Daemon::start_in`] with another `nbdcryptd` binary (e.g. a test-only build variant).
    pub fn start_bin_in(bin: &Path, dir: TempDir, args: Vec<OsString>) -> Daemon {
        let value_of = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from)
        };
        let sock = value_of("--unix").expect("Daemon::start needs --unix SOCK");
        let image = value_of("--plain")
            .or_else(|| value_of("--volume"))
            .unwrap_or_default();
        let log = dir.path().join("nbdcryptd.log");
        let child = Command::new(bin)
            .args(&args)
            .current_dir(dir.path())
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join("nbdcryptd.stdout")).unwrap())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut d = Daemon {
            child: Some(child),
            dir,
            sock,
            image,
            log,
            args,
            stopped: false,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.stopped = true;
                panic!(
                    "nbdcryptd {:?} exited with {st} before listening on {}\n{}",
                    self.args,
                    self.sock.display(),
                    self.log_banner()
                );
            }
            // The control socket (if any) may come up after the NBD one: a test that asks for
            // `status` right away needs both.
            let control = self
                .args
                .iter()
                .position(|a| a == "--control")
                .and_then(|i| self.args.get(i + 1));
            if UnixStream::connect(&self.sock).is_ok()
                && control.is_none_or(|c| UnixStream::connect(self.dir.path().join(c)).is_ok())
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "nbdcryptd did not accept on {} within {START_TIMEOUT:?}\n{}",
                    self.sock.display(),
                    self.log_banner()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// `nbd+unix:///nbdcrypt?socket=SOCK`
    pub fn uri(&self) -> String {
        self.uri_for(EXPORT)
    }

    pub fn uri_for(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_banner(&self) -> String {
        format!(
            "---- nbdcryptd stderr ----\n{}---- end of nbdcryptd stderr ----",
            self.log()
        )
    }

    /// Panics (with the log) unless the process is still running.
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
            self.stopped = true;
            panic!(
                "nbdcryptd died during the test: {st}\n{}",
                self.log_banner()
            );
        }
    }

    /// Send a signal to the daemon.
    pub fn signal(&self, sig: i32) {
        let signal = nix::sys::signal::Signal::try_from(sig).expect("not a signal number");
        let r = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
        assert!(r.is_ok(), "kill({}, {sig}) failed: {r:?}", self.pid());
    }

    /// Wait up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.stopped = true;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait up to `timeout`; panics if it does not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.stopped = true;
        self.signal(libc::SIGTERM);
        match self.wait_exit(timeout) {
            Some(st) => st,
            None => panic!(
                "nbdcryptd did not exit within {timeout:?} of SIGTERM\n{}",
                self.log_banner()
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let died = match child.try_wait() {
            Ok(Some(st)) => Some(st),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        };
        if std::thread::panicking() {
            eprintln!("{}", self.log_banner());
        } else if let (Some(st), false) = (died, self.stopped) {
            panic!(
                "nbdcryptd died during the test: {st}\n{}",
                self.log_banner()
            );
        } else if self.log().contains("panicked at") {
            // A panic in a connection or worker thread is a bug even if the process survived.
            panic!("nbdcryptd panicked during the test\n{}", self.log_banner());
        }
    }
}

/// `cryptsetup luksFormat` a LUKS2 volume into `dir/disk.img` (`file_size` bytes) with a random
/// 32-byte key in `dir/key`.
pub fn luks_format_keyfile(dir: &Path, file_size: u64, sector_size: u32) {
    let img = dir.join("disk.img");
    let key = dir.join("key");
    std::fs::write(
        &key,
        random_bytes(file_size ^ 0xc0ffee ^ u64::from(sector_size), 32),
    )
    .unwrap();
    File::create(&img).unwrap().set_len(file_size).unwrap();
    let mut c = tool("cryptsetup");
    c.args([
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--cipher",
        "aes-xts-plain64",
    ])
    .args([
        "--key-size",
        "512",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
    ])
    .arg(format!("--sector-size={sector_size}"))
    .arg("--key-file")
    .arg(&key)
    .arg(&img);
    run(&mut c, Duration::from_secs(60)).success();
}

pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("nbdcrypt-test.")
        .tempdir()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// External tools

/// Debian package that provides each tool (for the error message).
fn package_of(tool: &str) -> &'static str {
    match tool {
        "nbdinfo" | "nbdcopy" | "nbdfuse" => "libnbd-bin",
        "nbdsh" => "python3-libnbd",
        "qemu-io" | "qemu-img" => "qemu-utils",
        "fio" => "fio",
        "nbdkit" => "nbdkit",
        "cmp" => "diffutils",
        "systemd-analyze" => "systemd",
        "cryptsetup" => "cryptsetup-bin",
        "gzip" => "gzip",
        "mkfs.ext4" | "e2fsck" | "debugfs" => "e2fsprogs",
        _ => "?",
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // cryptsetup lives in /usr/sbin, which a non-login PATH may lack.
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// An upstream NBD server (nbdkit on a Unix socket), killed on drop; [`Upstream::kill`] and
/// [`Upstream::start`] restart it on the same socket, as an upstream crash and restart.
pub struct Upstream {
    child: Option<Child>,
    /// Its `nbd+unix` URI.
    pub uri: String,
    pub sock: PathBuf,
    argv: Vec<String>,
}

impl Upstream {
    /// `nbdkit -f -U DIR/NAME.sock ARGS...` (foreground, so the test owns the process), once it
    /// listens.
    pub fn nbdkit(dir: &Path, name: &str, args: &[&str]) -> Upstream {
        let sock = dir.join(format!("{name}.sock"));
        let mut argv: Vec<String> = vec!["-f".into(), "-U".into(), sock.display().to_string()];
        argv.extend(args.iter().map(|s| s.to_string()));
        let mut u = Upstream {
            child: None,
            uri: format!("nbd+unix:///?socket={}", sock.display()),
            sock,
            argv,
        };
        u.start();
        u
    }

    /// Starts it (again), removing the socket a killed nbdkit leaves behind.
    pub fn start(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        let child = tool("nbdkit")
            .args(&self.argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdkit");
        self.child = Some(child);
        wait_for_socket(&self.sock);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` (e.g. SIGSTOP to hold requests in flight there, SIGCONT to let them go).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().expect("nbdkit runs").id();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
        nix::sys::signal::kill(pid, sig).expect("signal nbdkit");
    }
}

/// `nbdcryptctl format URI --yes` with a cheap KDF and a random key (from `seed`) in
/// `dir/key`; returns the key file.
pub fn format_upstream(dir: &Path, uri: &str, seed: u64) -> PathBuf {
    let key = dir.join("key");
    std::fs::write(&key, random_bytes(seed, 32)).expect("write the key");
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("format"),
        OsStr::new(uri),
        OsStr::new("--yes"),
        OsStr::new("--key-file"),
        key.as_os_str(),
    ];
    args.extend(
        ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
            .iter()
            .map(OsStr::new),
    );
    nbdcryptctl(&args).success();
    key
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (10 s at most) until something listens on the Unix socket `sock`.
pub fn wait_for_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never listened",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `Command` for an external tool; fails the test if the tool is not installed.
pub fn tool(name: &str) -> Command {
    let p = which(name).unwrap_or_else(|| {
        panic!(
            "required tool `{name}` is not installed (Debian package {}); \
             ./scripts/test.sh installs every tool the tests need",
            package_of(name)
        )
    });
    let mut c = Command::new(p);
    if name == "nbdsh" {
        // nbdsh is `python3 -m nbd`: make sure it finds Debian's python3 (which has the nbd
        // module from python3-libnbd) before any other python3 on PATH (pyenv etc.).
        let old = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![PathBuf::from("/usr/bin"), PathBuf::from("/bin")];
        paths.extend(std::env::split_paths(&old));
        c.env("PATH", std::env::join_paths(paths).unwrap());
    }
    c
}

/// Output of a finished command.
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics with the command and its output unless it exited 0.
    #[track_caller]
    pub fn success(self) -> Out {
        assert!(
            self.ok(),
            "{} failed: {}\n{}",
            self.what,
            self.status,
            self.details()
        );
        self
    }

    /// Panics unless the command exited with a non-zero status (not a signal or a timeout).
    #[track_caller]
    pub fn failure(self) -> Out {
        assert!(
            matches!(self.code(), Some(c) if c != 0),
            "{} was expected to fail but exited {}\n{}",
            self.what,
            self.status,
            self.details()
        );
        self
    }

    pub fn details(&self) -> String {
        format!(
            "---- stdout ----\n{}\n---- stderr ----\n{}",
            self.stdout, self.stderr
        )
    }
}

/// Run `cmd` to completion, killing it after `timeout` (which fails the test).
#[track_caller]
pub fn run(cmd: &mut Command, timeout: Duration) -> Out {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
            panic!("{what} did not finish within {timeout:?}\n---- stdout ----\n{stdout}\n---- stderr ----\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
    Out {
        status,
        stdout,
        stderr,
        what,
    }
}

/// Default time limit for one external tool run.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// `nbdinfo ARGS...`
#[track_caller]
pub fn nbdinfo(args: &[&str]) -> Out {
    run(tool("nbdinfo").args(args), TOOL_TIMEOUT)
}

/// Python prelude for [`nbdsh`] scripts: `URI`, `SOCK`, `SIZE`-agnostic helpers.
const NBDSH_PRELUDE: &str = r#"
import os, errno, sys
URI = os.environ["NBD_URI"]
IMAGE = os.environ.get("IMAGE")
def expect_err(fn, errnum, what):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == errnum, "%s: expected errno %d, got %r (%s)" % (what, errnum, e.errnum, e.string)
        return e
    raise AssertionError("%s: expected errno %d, but it succeeded" % (what, errnum))
"#;

/// Run a Python script under `nbdsh -c` (the handle `h` and module `nbd` are predefined, `URI`
/// holds `uri`, `expect_err(fn, errno, what)` asserts an `nbd.Error` with that errno). The script
/// is not connected: call `h.connect_uri(URI)` (after `h.set_opt_mode(True)` if wanted).
#[track_caller]
pub fn nbdsh(uri: &str, script: &str) -> Out {
    nbdsh_env(uri, &[], script)
}

/// [`nbdsh`] against a daemon: `URI` is its default export, `IMAGE` its backing file.
#[track_caller]
pub fn nbdsh_d(d: &Daemon, script: &str) -> Out {
    let img = d.image.to_str().unwrap().to_owned();
    nbdsh_env(&d.uri(), &[("IMAGE", &img)], script)
}

/// [`nbdsh`] with extra environment variables (read them with `os.environ`).
#[track_caller]
pub fn nbdsh_env(uri: &str, env: &[(&str, &str)], script: &str) -> Out {
    let code = format!("{NBDSH_PRELUDE}\n{}", dedent(script));
    let mut c = tool("nbdsh");
    c.env("NBD_URI", uri).arg("-c").arg(&code);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut out = run(&mut c, TOOL_TIMEOUT);
    let numbered: Vec<String> = code
        .lines()
        .enumerate()
        .map(|(i, l)| format!("{:4} {l}", i + 1))
        .collect();
    out.what = format!("nbdsh (URI {uri}) script\n{}\n", numbered.join("\n"));
    out
}

/// Remove the common leading whitespace of all non-empty lines (so scripts can be indented in
/// Rust source).
pub fn dedent(s: &str) -> String {
    let indent = s
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    s.lines()
        .map(|l| {
            if l.len() >= indent {
                &l[indent..]
            } else {
                l.trim_start()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Data

/// Deterministic pseudo-random bytes (xorshift64*), so failures are reproducible.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Read `len` bytes at `off` from a file.
pub fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).unwrap();
    buf
}

/// Index of the first differing byte, for readable assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

// ---------------------------------------------------------------------------------------------
// Raw protocol client

/// A minimal NBD client written against the spec, for wire-level tests (no libnbd).
pub mod raw {
    use super::*;
    use std::io;

    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

    pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
    pub const FLAG_NO_ZEROES: u16 = 2;
    pub const C_FIXED_NEWSTYLE: u32 = 1;
    pub const C_NO_ZEROES: u32 = 2;

    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_STARTTLS: u32 = 5;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_LIST_META_CONTEXT: u32 = 9;
    pub const OPT_SET_META_CONTEXT: u32 = 10;
    pub const OPT_EXTENDED_HEADERS: u32 = 11;

    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
    pub const REP_ERR_POLICY: u32 = 0x8000_0002;
    pub const REP_ERR_INVALID: u32 = 0x8000_0003;
    pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
    pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_NAME: u16 = 1;
    pub const INFO_DESCRIPTION: u16 = 2;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    pub const TF_HAS_FLAGS: u16 = 1 << 0;
    pub const TF_READ_ONLY: u16 = 1 << 1;
    pub const TF_SEND_FLUSH: u16 = 1 << 2;
    pub const TF_SEND_FUA: u16 = 1 << 3;
    pub const TF_SEND_TRIM: u16 = 1 << 5;
    pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const TF_SEND_DF: u16 = 1 << 7;
    pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
    pub const TF_SEND_CACHE: u16 = 1 << 10;
    pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_CACHE: u16 = 5;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_BLOCK_STATUS: u16 = 7;

    pub const CMD_FLAG_FUA: u16 = 1 << 0;
    pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
    pub const CMD_FLAG_DF: u16 = 1 << 2;
    pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
    pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

    pub const REPLY_FLAG_DONE: u16 = 1;
    pub const CHUNK_NONE: u16 = 0;
    pub const CHUNK_OFFSET_DATA: u16 = 1;
    pub const CHUNK_OFFSET_HOLE: u16 = 2;
    pub const CHUNK_BLOCK_STATUS: u16 = 5;
    pub const CHUNK_ERROR: u16 = 0x8001;
    pub const CHUNK_ERROR_OFFSET: u16 = 0x8002;

    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;

    /// Per-read/write socket timeout, so no test can hang on a silent server.
    pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

    #[derive(Debug, Clone)]
    pub struct OptReply {
        pub opt: u32,
        pub typ: u32,
        pub data: Vec<u8>,
    }

    impl OptReply {
        pub fn is_error(&self) -> bool {
            self.typ & 0x8000_0000 != 0
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Export {
        pub size: u64,
        pub flags: u16,
    }

    pub struct Client {
        pub s: UnixStream,
        /// Handshake flags the server sent in its greeting.
        pub server_flags: u16,
    }

    pub fn be16(b: &[u8]) -> u16 {
        u16::from_be_bytes(b[..2].try_into().unwrap())
    }
    pub fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }
    pub fn be64(b: &[u8]) -> u64 {
        u64::from_be_bytes(b[..8].try_into().unwrap())
    }

    /// INFO/GO option payload: name, and the info items requested.
    pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// LIST/SET_META_CONTEXT payload.
    pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    impl Client {
        /// Connect, read and check the greeting; do not answer it yet.
        pub fn connect_no_flags(sock: &Path) -> Client {
            let s = UnixStream::connect(sock)
                .unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut c = Client { s, server_flags: 0 };
            let g = c.read_n(18).expect("reading the 18-byte greeting");
            assert_eq!(be64(&g[0..]), NBDMAGIC, "greeting: bad NBDMAGIC");
            assert_eq!(
                be64(&g[8..]),
                IHAVEOPT,
                "greeting: bad IHAVEOPT (oldstyle?)"
            );
            c.server_flags = be16(&g[16..]);
            c
        }

        /// Connect and answer the greeting with `client_flags`.
        pub fn connect_with(sock: &Path, client_flags: u32) -> Client {
            let mut c = Self::connect_no_flags(sock);
            c.send(&client_flags.to_be_bytes()).unwrap();
            c
        }

        /// Connect as a fixed-newstyle client that also asks for NO_ZEROES.
        pub fn connect(sock: &Path) -> Client {
            Self::connect_with(sock, C_FIXED_NEWSTYLE | C_NO_ZEROES)
        }

        /// Connect and GO to the default export (simple replies only).
        pub fn connect_go(sock: &Path) -> (Client, Export) {
            let mut c = Self::connect(sock);
            let e = c.go(super::EXPORT);
            (c, e)
        }

        pub fn send(&mut self, b: &[u8]) -> io::Result<()> {
            self.s.write_all(b)
        }

        pub fn read_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
            let mut v = vec![0u8; n];
            self.s.read_exact(&mut v)?;
            Ok(v)
        }

        pub fn send_opt_header(&mut self, opt: u32, len: u32) -> io::Result<()> {
            let mut b = Vec::with_capacity(16);
            b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&opt.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            self.send(&b)
        }

        pub fn send_opt(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
            let mut b = Vec::with_capacity(16 + data.len());
            b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&opt.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            self.send(&b)
        }

        /// Read one option reply and check its magic.
        pub fn read_opt_reply(&mut self) -> io::Result<OptReply> {
            let h = self.read_n(20)?;
            if be64(&h) != OPT_REPLY_MAGIC {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad option reply magic {:#x}", be64(&h)),
                ));
            }
            let len = be32(&h[16..]) as usize;
            assert!(len <= 64 * 1024, "option reply of {len} bytes");
            let data = self.read_n(len)?;
            Ok(OptReply {
                opt: be32(&h[8..]),
                typ: be32(&h[12..]),
                data,
            })
        }

        /// Read replies to `opt` until the final one (ACK or an error), which is returned last.
        pub fn opt_replies(&mut self, opt: u32) -> Vec<OptReply> {
            let mut v = Vec::new();
            loop {
                let r = self
                    .read_opt_reply()
                    .unwrap_or_else(|e| panic!("reading reply to option {opt} (after {v:?}): {e}"));
                assert_eq!(r.opt, opt, "option reply echoes the wrong option: {r:?}");
                let fin = r.typ == REP_ACK || r.is_error();
                v.push(r);
                if fin || v.len() > 1000 {
                    return v;
                }
            }
        }

        /// Send `opt` with `data` and return the final reply (plus the earlier ones).
        pub fn option(&mut self, opt: u32, data: &[u8]) -> (OptReply, Vec<OptReply>) {
            self.send_opt(opt, data).unwrap();
            let mut v = self.opt_replies(opt);
            let last = v.pop().unwrap();
            (last, v)
        }

        /// LIST; asserts ACK and returns the export names.
        pub fn list(&mut self) -> Vec<String> {
            let (last, servers) = self.option(OPT_LIST, &[]);
            assert_eq!(last.typ, REP_ACK, "LIST final reply: {last:?}");
            servers
                .iter()
                .map(|r| {
                    assert_eq!(r.typ, REP_SERVER, "LIST reply: {r:?}");
                    let l = be32(&r.data) as usize;
                    String::from_utf8(r.data[4..4 + l].to_vec()).unwrap()
                })
                .collect()
        }

        /// STRUCTURED_REPLY; returns the final reply type.
        pub fn structured_reply(&mut self) -> u32 {
            self.option(OPT_STRUCTURED_REPLY, &[]).0.typ
        }

        /// GO with no info requests; asserts ACK and returns size/flags from INFO_EXPORT.
        pub fn go(&mut self, name: &str) -> Export {
            let (last, infos) = self.option(OPT_GO, &info_payload(name, &[]));
            assert_eq!(
                last.typ, REP_ACK,
                "GO final reply: {last:?} (after {infos:?})"
            );
            export_from_infos(&infos).expect("GO succeeded without NBD_INFO_EXPORT")
        }

        /// Send a compact request.
        pub fn request(
            &mut self,
            flags: u16,
            typ: u16,
            cookie: u64,
            offset: u64,
            len: u32,
            payload: &[u8],
        ) -> io::Result<()> {
            let mut b = Vec::with_capacity(28 + payload.len());
            b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
            b.extend_from_slice(&typ.to_be_bytes());
            b.extend_from_slice(&cookie.to_be_bytes());
            b.extend_from_slice(&offset.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(payload);
            self.send(&b)
        }

        /// Read a simple reply header: (error, cookie).
        pub fn simple_reply(&mut self) -> io::Result<(u32, u64)> {
            let h = self.read_n(16)?;
            if be32(&h) != SIMPLE_REPLY_MAGIC {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad simple reply magic {:#x}", be32(&h)),
                ));
            }
            Ok((be32(&h[4..]), be64(&h[8..])))
        }

        /// Read one structured reply chunk: (flags, type, cookie, payload).
        pub fn chunk(&mut self) -> io::Result<(u16, u16, u64, Vec<u8>)> {
            let h = self.read_n(20)?;
            if be32(&h) != STRUCTURED_REPLY_MAGIC {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "bad structured reply magic {:#x} (simple reply to a structured request?)",
                        be32(&h)
                    ),
                ));
            }
            let len = be32(&h[16..]) as usize;
            assert!(len <= 33 * 1024 * 1024, "chunk of {len} bytes");
            let payload = self.read_n(len)?;
            Ok((be16(&h[4..]), be16(&h[6..]), be64(&h[8..]), payload))
        }

        /// WRITE and wait for its reply; returns the error value.
        pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8], flags: u16) -> u32 {
            self.request(flags, CMD_WRITE, cookie, offset, data.len() as u32, data)
                .unwrap();
            let (err, c) = self.simple_reply().expect("reply to WRITE");
            assert_eq!(c, cookie, "WRITE reply cookie");
            err
        }

        /// READ and wait for its reply; Err(error) on a non-zero error.
        pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
            self.request(0, CMD_READ, cookie, offset, len, &[]).unwrap();
            let (err, c) = self.simple_reply().expect("reply to READ");
            assert_eq!(c, cookie, "READ reply cookie");
            if err != 0 {
                return Err(err);
            }
            Ok(self.read_n(len as usize).expect("READ payload"))
        }

        /// True if the server closes the connection (EOF or reset) within `timeout`; any bytes
        /// it sends before closing are discarded.
        pub fn closed_within(&mut self, timeout: Duration) -> bool {
            let deadline = Instant::now() + timeout;
            let mut buf = [0u8; 4096];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                self.s
                    .set_read_timeout(Some(left.min(Duration::from_millis(200))))
                    .unwrap();
                match self.s.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue
                    }
                    Err(_) => return true,
                }
            }
        }
    }

    pub fn export_from_infos(infos: &[OptReply]) -> Option<Export> {
        infos.iter().find_map(|r| {
            (r.typ == REP_INFO && be16(&r.data) == INFO_EXPORT).then(|| {
                assert_eq!(r.data.len(), 12, "INFO_EXPORT must be 12 bytes: {r:?}");
                Export {
                    size: be64(&r.data[2..]),
                    flags: be16(&r.data[10..]),
                }
            })
        })
    }

    /// A second, independent client does a complete LIST + GO + READ: the server still serves
    /// others.
    #[track_caller]
    pub fn assert_server_serves(sock: &Path) {
        let mut c = Client::connect(sock);
        let names = c.list();
        assert!(
            names.iter().any(|n| n == super::EXPORT),
            "LIST from a second client: {names:?}"
        );
        let e = c.go(super::EXPORT);
        let n = e.size.min(4096) as u32;
        c.read(7, 0, n).expect("READ from a second client");
    }
}

// ---------------------------------------------------------------------------------------------
// nbdinfo helpers

pub use serde_json;

/// `nbdinfo --json URI`, parsed; returns the first export object and the whole document.
#[track_caller]
pub fn nbdinfo_json(uri: &str) -> (serde_json::Value, serde_json::Value) {
    let out = nbdinfo(&["--json", uri]).success();
    let doc: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --json output is not JSON ({e}):\n{}", out.stdout));
    let export = doc["exports"][0].clone();
    assert!(
        export.is_object(),
        "nbdinfo --json has no export:\n{}",
        out.stdout
    );
    (export, doc)
}

// ---------------------------------------------------------------------------------------------
// Model-checked concurrent client

/// Drive one connection the way the Linux kernel does (compact requests, simple replies, up to
/// `depth` requests in flight, cookies = generation << 32 | tag) with `total` random READ /
/// WRITE / WRITE_ZEROES / FLUSH requests, some with FUA, at unaligned offsets. Requests in flight
/// never overlap, so a model of the export predicts every READ. Checks each reply's cookie,
/// error and data, and returns the model (the export's expected content).
///
/// The session works on the region `base .. base + initial.len()` of the export; `initial` is
/// that region's content at the start. Sessions on disjoint regions may run at the same time.
pub fn kernel_style_session(
    sock: &Path,
    base: u64,
    initial: Vec<u8>,
    depth: usize,
    total: u64,
    seed: u64,
) -> Vec<u8> {
    use raw::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Condvar, Mutex};

    const SLOT: u64 = 64 * 1024;
    #[derive(Clone, Copy)]
    enum Op {
        Read,
        Write(u64),
        Zero,
        Flush,
    }
    struct St {
        model: Vec<u8>,
        busy: Vec<bool>,
        inflight: HashMap<u64, (Op, u64, u32, usize)>, // cookie -> (op, offset, len, slot)
        done: u64,
        failure: Option<String>,
    }
    let size = initial.len() as u64;
    let slots = (size / SLOT) as usize;
    assert!(
        slots >= depth,
        "region too small for {depth} non-overlapping requests"
    );
    let (mut c, e) = Client::connect_go(sock);
    assert!(base + size <= e.size, "region outside the export");
    let st = Arc::new((
        Mutex::new(St {
            model: initial,
            busy: vec![false; slots],
            inflight: HashMap::new(),
            done: 0,
            failure: None,
        }),
        Condvar::new(),
    ));
    let mut rd = Client {
        s: c.s.try_clone().unwrap(),
        server_flags: 0,
    };
    let st_r = st.clone();
    let reader = std::thread::spawn(move || {
        let (lock, cv) = &*st_r;
        for _ in 0..total {
            let r = rd.simple_reply();
            let mut s = lock.lock().unwrap();
            let (err, cookie) = match r {
                Ok(x) => x,
                Err(e) => {
                    s.failure = Some(format!("reading a reply after {} replies: {e}", s.done));
                    cv.notify_all();
                    return;
                }
            };
            let Some((op, off, len, slot)) = s.inflight.remove(&cookie) else {
                s.failure = Some(format!("reply with unknown cookie {cookie:#x}"));
                cv.notify_all();
                return;
            };
            if err != 0 {
                s.failure = Some(format!("request {cookie:#x} failed with error {err}"));
                cv.notify_all();
                return;
            }
            let (o, l) = (off.saturating_sub(base) as usize, len as usize); // FLUSH: offset 0
            match op {
                Op::Read => {
                    drop(s);
                    let data = rd.read_n(l);
                    s = lock.lock().unwrap();
                    match data {
                        Ok(d) if d == s.model[o..o + l] => {}
                        Ok(d) => {
                            let at = first_difference(&d, &s.model[o..o + l]);
                            s.failure = Some(format!(
                                "READ {cookie:#x} at {off} len {len} differs at {at:?}"
                            ));
                        }
                        Err(e) => s.failure = Some(format!("READ payload: {e}")),
                    }
                }
                Op::Write(seed) => s.model[o..o + l].copy_from_slice(&random_bytes(seed, l)),
                Op::Zero => s.model[o..o + l].fill(0),
                Op::Flush => {}
            }
            if slot != usize::MAX {
                s.busy[slot] = false;
            }
            s.done += 1;
            cv.notify_all();
            if s.failure.is_some() {
                return;
            }
        }
    });

    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (lock, cv) = &*st;
    let deadline = Instant::now() + Duration::from_secs(120);
    for n in 0..total {
        let pick = rnd();
        let mut s = lock.lock().unwrap();
        // Wait for room: fewer than `depth` in flight.
        while s.failure.is_none() && s.inflight.len() >= depth {
            assert!(
                Instant::now() < deadline,
                "session did not finish within 120 s"
            );
            s = cv.wait_timeout(s, Duration::from_millis(100)).unwrap().0;
        }
        if let Some(f) = &s.failure {
            panic!("{f}");
        }
        let generation = n >> 8;
        let cookie = (generation << 32) | (n & 0xff);
        let kind = pick % 16;
        let flags = if pick % 7 == 0 { CMD_FLAG_FUA } else { 0 };
        if kind == 0 {
            s.inflight.insert(cookie, (Op::Flush, 0, 0, usize::MAX));
            drop(s);
            c.request(0, CMD_FLUSH, cookie, 0, 0, &[]).unwrap();
            continue;
        }
        let start = (pick >> 8) as usize % slots;
        let slot = (0..slots)
            .map(|i| (start + i) % slots)
            .find(|&i| !s.busy[i])
            .expect("a free slot");
        s.busy[slot] = true;
        let len = 1 + (pick >> 24) % SLOT;
        let off = base + slot as u64 * SLOT + (pick >> 40) % (SLOT - len + 1);
        let len = len as u32;
        match kind {
            1..=6 => {
                s.inflight.insert(cookie, (Op::Read, off, len, slot));
                drop(s);
                c.request(flags, CMD_READ, cookie, off, len, &[]).unwrap();
            }
            7..=13 => {
                let wseed = pick ^ 0xabcdef;
                s.inflight
                    .insert(cookie, (Op::Write(wseed), off, len, slot));
                drop(s);
                c.request(
                    flags,
                    CMD_WRITE,
                    cookie,
                    off,
                    len,
                    &random_bytes(wseed, len as usize),
                )
                .unwrap();
            }
            _ => {
                s.inflight.insert(cookie, (Op::Zero, off, len, slot));
                drop(s);
                c.request(flags, CMD_WRITE_ZEROES, cookie, off, len, &[])
                    .unwrap();
            }
        }
    }
    reader.join().expect("reply reader");
    let s = lock.lock().unwrap();
    if let Some(f) = &s.failure {
        panic!("{f}");
    }
    assert_eq!(s.done, total, "replies received");
    s.model.clone()
}

/// nbdsh script: every base:allocation extent flagged ZERO must read back as zeroes (a server
/// that reports ciphertext holes as zero would make nbdcopy/qemu-img skip real data).
pub const ZERO_EXTENTS_READ_AS_ZERO: &str = r#"
    h.add_meta_context("base:allocation")
    h.connect_uri(URI)
    size = h.get_size()
    extents = []
    off = 0
    while off < size:
        got = []
        def cb(ctx, o, entries, err):
            got.extend(zip(entries[0::2], entries[1::2]))
            return 0
        h.block_status(min(size - off, 32 << 20), off, cb)
        assert got, "no extents at %d" % off
        for l, f in got:
            l = min(l, size - off)
            extents.append((off, l, f))
            off += l
            if off >= size:
                break
    zero_bytes = 0
    for o, l, f in extents:
        if f & nbd.STATE_ZERO:
            for p in range(o, o + l, 1 << 20):
                n = min(1 << 20, o + l - p)
                assert h.pread(n, p) == bytes(n), "extent at %d (len %d, flags %d) is flagged ZERO but reads non-zero near %d" % (o, l, f, p)
                zero_bytes += n
    print("extents:", len(extents), "zero bytes:", zero_bytes)
"#;
// Encrypted volumes: `--volume`, the control socket, nbdcryptctl, cryptsetup and verify.py

/// Path of the `nbdcryptctl` binary: `$NBDCRYPTCTL`, else beside `nbdcryptd` (see
/// [`daemon_binary`]).
pub fn ctl_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NBDCRYPTCTL") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "$NBDCRYPTCTL={} does not exist", p.display());
        return p;
    }
    let p = daemon_binary().with_file_name("nbdcryptctl");
    assert!(
        p.is_file(),
        "nbdcryptctl binary not found at {}: run `cargo build --workspace --bins` first \
         (./scripts/test.sh does), or set $NBDCRYPTCTL",
        p.display()
    );
    p
}

/// Time limit for one nbdcryptctl run (an unlock runs a KDF; the tests use tiny costs).
pub const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// `nbdcryptctl ARGS...` with a time limit.
#[track_caller]
pub fn nbdcryptctl(args: &[&OsStr]) -> Out {
    run(
        Command::new(ctl_binary())
            .args(args)
            .env_remove("NBDCRYPT_CONTROL"),
        CTL_TIMEOUT,
    )
}

use std::ffi::OsStr;

impl Daemon {
    /// Serve the LUKS2 volume `path`: `--volume PATH --unix DIR/nbd.sock --control
    /// DIR/control.sock` followed by `extra` (`{dir}` in `extra` is the temporary directory).
    /// The daemon starts locked; this waits until both sockets accept.
    pub fn volume(path: &Path, extra: &[&str]) -> Daemon {
        Self::volume_in(tempdir(), path, extra)
    }

    /// [`Daemon::volume`] with the temporary directory given (so key files can be put in it
    /// before the start).
    pub fn volume_in(dir: TempDir, path: &Path, extra: &[&str]) -> Daemon {
        let d = dir.path().to_str().unwrap().to_owned();
        let mut args: Vec<OsString> = vec![
            "--volume".into(),
            path.into(),
            "--unix".into(),
            dir.path().join("nbd.sock").into(),
            "--control".into(),
            dir.path().join("control.sock").into(),
        ];
        args.extend(extra.iter().map(|a| OsString::from(a.replace("{dir}", &d))));
        let mut daemon = Self::start_in(dir, args);
        daemon.image = path.to_path_buf();
        daemon.wait_control();
        daemon
    }

    fn wait_control(&mut self) {
        let control = self.control();
        let deadline = Instant::now() + START_TIMEOUT;
        while UnixStream::connect(&control).is_err() {
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "the control socket {} did not accept within {START_TIMEOUT:?}\n{}",
                control.display(),
                self.log_banner()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The control socket (the value after `--control`).
    pub fn control(&self) -> PathBuf {
        self.args
            .iter()
            .position(|a| a == "--control")
            .and_then(|i| self.args.get(i + 1))
            .map(PathBuf::from)
            .expect("this daemon has no --control")
    }

    /// `nbdcryptctl SUBCOMMAND --control SOCK ARGS...`
    #[track_caller]
    pub fn ctl(&self, subcommand: &str, args: &[&str]) -> Out {
        let control = self.control();
        let mut v: Vec<&OsStr> = vec![
            OsStr::new(subcommand),
            OsStr::new("--control"),
            control.as_os_str(),
        ];
        v.extend(args.iter().map(OsStr::new));
        nbdcryptctl(&v)
    }

    /// `nbdcryptctl unlock --key-file F` where F (in the temp dir) holds exactly `secret`.
    #[track_caller]
    pub fn unlock(&self, secret: &[u8]) -> Out {
        let f = self.dir().join(format!("unlock-{}.key", unique()));
        std::fs::write(&f, secret).unwrap();
        let out = self.ctl("unlock", &["--key-file", f.to_str().unwrap()]);
        let _ = std::fs::remove_file(&f);
        out
    }

    /// `nbdcryptctl status --json`, parsed.
    #[track_caller]
    pub fn status(&self) -> serde_json::Value {
        let out = self.ctl("status", &["--json"]).success();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{}", out.stdout))
    }

    /// The `state` of `status --json` (locked, unlocking, unlocked, locking).
    #[track_caller]
    pub fn state(&self) -> String {
        self.status()["state"]
            .as_str()
            .expect("status has a string `state`")
            .to_owned()
    }

    /// Poll `status` until the state is `want`; panics with the last status after `timeout`.
    #[track_caller]
    pub fn wait_state(&self, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if s["state"] == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "state did not become {want} within {timeout:?}: {s:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A process-wide counter for unique file names.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The directory of the cryptsetup-made test vectors (`shared/testdata/luks2`):
/// `CARGO_MANIFEST_DIR/../../shared/testdata/luks2` (CI clones `shared/` beside the repository),
/// else `/work/shared/testdata/luks2`. Fails the test if neither exists.
pub fn luks2_testdata() -> PathBuf {
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/luks2");
    let fixed = PathBuf::from("/work/shared/testdata/luks2");
    for p in [&beside, &fixed] {
        if p.join("verify.py").is_file() {
            return p.clone();
        }
    }
    panic!(
        "LUKS2 test vectors not found: neither {} nor {} holds verify.py; clone the `shared` \
         repository beside this one (CI does)",
        beside.display(),
        fixed.display()
    );
}

/// Uncompress test vector `name` (e.g. `tv-a-ss4096.img`, from `name.gz`) into `dir`; returns
/// the path of the copy.
pub fn gunzip_vector(name: &str, dir: &Path) -> PathBuf {
    let src = luks2_testdata().join(format!("{name}.gz"));
    assert!(src.is_file(), "test vector {} is missing", src.display());
    let dst = dir.join(name);
    let o = tool("gzip")
        .arg("-dc")
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("gzip -dc {}: {e}", src.display()));
    assert!(
        o.status.success(),
        "gzip -dc {} failed: {}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let data = o.stdout;
    std::fs::write(&dst, data).unwrap();
    dst
}

/// Debian's python3 (`/usr/bin/python3`), which has `cryptography` and `argon2` from apt; another
/// python3 earlier on PATH (pyenv) may lack them.
pub fn python3() -> Command {
    let p = Path::new("/usr/bin/python3");
    assert!(
        p.is_file(),
        "/usr/bin/python3 is missing (Debian package python3)"
    );
    Command::new(p)
}

/// `/usr/bin/python3 verify.py ARGS...`
#[track_caller]
pub fn verify_py(args: &[&OsStr]) -> Out {
    let script = luks2_testdata().join("verify.py");
    run(python3().arg(script).args(args), TOOL_TIMEOUT)
}

/// `verify.py pattern N`: the known plaintext of the test vectors.
#[track_caller]
pub fn vector_pattern(n: u64) -> Vec<u8> {
    let script = luks2_testdata().join("verify.py");
    let o = python3()
        .arg(script)
        .args(["pattern", &n.to_string()])
        .output()
        .expect("running verify.py pattern");
    assert!(
        o.status.success(),
        "verify.py pattern {n} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.stdout.len() as u64, n, "verify.py pattern {n} length");
    o.stdout
}

/// Decrypt the data segment of `image` with `volume_key_hex` using verify.py (not our code).
#[track_caller]
pub fn verify_py_plaintext(image: &Path, volume_key_hex: &str) -> Vec<u8> {
    let out_file = image.with_extension(format!("plain-{}", unique()));
    verify_py(&[
        image.as_os_str(),
        OsStr::new("--volume-key"),
        OsStr::new(volume_key_hex),
        OsStr::new("--no-pattern"),
        OsStr::new("--dump-plaintext"),
        out_file.as_os_str(),
    ])
    .success();
    let v = std::fs::read(&out_file).unwrap();
    let _ = std::fs::remove_file(&out_file);
    v
}

/// `cryptsetup ARGS...` (cryptsetup lives in /usr/sbin or /sbin, which may not be on PATH).
pub fn cryptsetup() -> Command {
    if which("cryptsetup").is_some() {
        return tool("cryptsetup");
    }
    for p in ["/usr/sbin/cryptsetup", "/sbin/cryptsetup"] {
        if Path::new(p).is_file() {
            return Command::new(p);
        }
    }
    tool("cryptsetup") // fails with the package name
}

/// Key-derivation settings for `cryptsetup luksFormat` / `luksAddKey`, cheap enough for tests.
pub fn cheap_kdf(kdf: &str) -> Vec<String> {
    let mut v = vec!["--pbkdf".to_owned(), kdf.to_owned()];
    match kdf {
        "pbkdf2" => v.extend(["--pbkdf-force-iterations", "1000"].map(String::from)),
        _ => v.extend(
            [
                "--pbkdf-memory",
                "32768",
                "--pbkdf-force-iterations",
                "4",
                "--pbkdf-parallel",
                "1",
            ]
            .map(String::from),
        ),
    }
    v
}

/// `cryptsetup luksFormat --type luks2` a new file `path` of `data_size` bytes of data (plus
/// cryptsetup's default 16 MiB of metadata) with `sector_size`, `kdf` and the passphrase
/// `passphrase` (no trailing newline).
#[track_caller]
pub fn luks_format(path: &Path, data_size: u64, sector_size: u32, kdf: &str, passphrase: &[u8]) {
    let ss = sector_size.to_string();
    let mut args = vec![
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--sector-size",
        &ss,
    ];
    let kdf_args = cheap_kdf(kdf);
    args.extend(kdf_args.iter().map(String::as_str));
    luks_format_args(path, 16 * MIB + data_size, passphrase, &args);
}

/// `cryptsetup luksFormat --type luks2 --batch-mode ARGS... --key-file (passphrase) PATH` on a
/// new sparse file of `file_size` bytes. `args` must choose the KDF (see [`cheap_kdf`]).
#[track_caller]
pub fn luks_format_args(path: &Path, file_size: u64, passphrase: &[u8], args: &[&str]) {
    File::create(path).unwrap().set_len(file_size).unwrap();
    let key = path.with_extension(format!("fmtkey-{}", unique()));
    std::fs::write(&key, passphrase).unwrap();
    let mut c = cryptsetup();
    c.args(["luksFormat", "--type", "luks2", "--batch-mode"])
        .args(args)
        .arg("--key-file")
        .arg(&key)
        .arg(path);
    run(&mut c, TOOL_TIMEOUT).success();
    let _ = std::fs::remove_file(&key);
}

/// `cryptsetup luksAddKey`: add `new` (with `kdf`), authorised by `existing`.
#[track_caller]
pub fn luks_add_key(path: &Path, existing: &[u8], new: &[u8], kdf: &str) {
    let k_old = path.with_extension(format!("oldkey-{}", unique()));
    let k_new = path.with_extension(format!("newkey-{}", unique()));
    std::fs::write(&k_old, existing).unwrap();
    std::fs::write(&k_new, new).unwrap();
    let mut c = cryptsetup();
    c.args(["luksAddKey", "--batch-mode"])
        .args(cheap_kdf(kdf))
        .arg("--key-file")
        .arg(&k_old)
        .arg(path)
        .arg(&k_new);
    run(&mut c, TOOL_TIMEOUT).success();
    let _ = std::fs::remove_file(&k_old);
    let _ = std::fs::remove_file(&k_new);
}

/// The volume key as lowercase hex, from `cryptsetup luksDump --dump-volume-key`.
#[track_caller]
pub fn luks_volume_key(path: &Path, passphrase: &[u8]) -> String {
    let k = path.with_extension(format!("dumpkey-{}", unique()));
    std::fs::write(&k, passphrase).unwrap();
    let mut c = cryptsetup();
    c.args([
        "luksDump",
        "--dump-volume-key",
        "--batch-mode",
        "--key-file",
    ])
    .arg(&k)
    .arg(path);
    let out = run(&mut c, TOOL_TIMEOUT).success();
    let _ = std::fs::remove_file(&k);
    // "MK dump:\t08 c1 ... \n\t\t98 76 ..." : hex byte tokens from the MK dump line on.
    let mut hex = String::new();
    let mut in_dump = false;
    for line in out.stdout.lines() {
        let rest = if let Some(r) = line.strip_prefix("MK dump:") {
            in_dump = true;
            r
        } else if in_dump {
            line
        } else {
            continue;
        };
        let toks: Vec<&str> = rest.split_whitespace().collect();
        if toks.is_empty()
            || !toks
                .iter()
                .all(|t| t.len() == 2 && t.chars().all(|c| c.is_ascii_hexdigit()))
        {
            break;
        }
        toks.iter()
            .for_each(|t| hex.push_str(&t.to_ascii_lowercase()));
    }
    assert!(
        !hex.is_empty(),
        "no `MK dump:` in cryptsetup luksDump output\n{}",
        out.details()
    );
    hex
}

/// `cryptsetup luksUUID`.
#[track_caller]
pub fn luks_uuid(path: &Path) -> String {
    let mut c = cryptsetup();
    c.arg("luksUUID").arg(path);
    run(&mut c, TOOL_TIMEOUT).success().stdout.trim().to_owned()
}

/// `nbdcopy SRC DST` (files or URIs) with a time limit.
#[track_caller]
pub fn nbdcopy(src: &OsStr, dst: &OsStr) -> Out {
    run(tool("nbdcopy").arg(src).arg(dst), TOOL_TIMEOUT)
}

/// Read the whole export `uri` into memory with nbdcopy (through a file in `dir`).
#[track_caller]
pub fn read_export(uri: &str, dir: &Path) -> Vec<u8> {
    let f = dir.join(format!("export-{}.bin", unique()));
    nbdcopy(OsStr::new(uri), f.as_os_str()).success();
    let v = std::fs::read(&f).unwrap();
    let _ = std::fs::remove_file(&f);
    v
}

/// Write `data` (which must be exactly the export's size) to the export with nbdcopy.
#[track_caller]
pub fn write_export(uri: &str, dir: &Path, data: &[u8]) {
    let f = dir.join(format!("source-{}.bin", unique()));
    std::fs::write(&f, data).unwrap();
    nbdcopy(f.as_os_str(), OsStr::new(uri)).success();
    let _ = std::fs::remove_file(&f);
}

/// `cryptsetup luksDump` of `img` (no locks: the image may be a copy beside a live daemon).
pub fn luks_dump(img: &Path) -> String {
    run(
        cryptsetup().args(["luksDump", "--disable-locks"]).arg(img),
        TOOL_TIMEOUT,
    )
    .success()
    .stdout
}

/// After a finished re-encryption: cryptsetup sees none left in `img`'s header, and the volume
/// key it recovers with `passphrase` decrypts (verify.py, independent of our code) the start of
/// the data area to `data`. Returns that key (hex).
pub fn assert_finished_and_cryptsetup_decrypts(
    img: &Path,
    passphrase: &[u8],
    data: &[u8],
    what: &str,
) -> String {
    let dump = luks_dump(img);
    assert!(!dump.contains("reencrypt"), "{what}: {dump}");
    let key = luks_volume_key(img, passphrase);
    assert_same_bytes(&verify_py_plaintext(img, &key)[..data.len()], data, what);
    key
}

/// Panics with the first differing offset unless `got == want`.
#[track_caller]
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: differs at byte {i} (sector-512 {}, sector-4096 {}); lengths {} and {}; \
             got {:02x?}, want {:02x?}",
            i / 512,
            i / 4096,
            got.len(),
            want.len(),
            &got[i..got.len().min(i + 16)],
            &want[i..want.len().min(i + 16)]
        );
    }
}

impl Daemon {
    /// The `reencrypt` object of `status` (state, done_bytes, ...).
    pub fn reencrypt_status(&self) -> serde_json::Value {
        self.status()["reencrypt"].clone()
    }

    /// Waits until the online re-encryption says "finished"; panics if it fails, if the daemon
    /// dies, or after `timeout`.
    #[track_caller]
    pub fn wait_reencrypt_finished(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_alive();
            let r = self.reencrypt_status();
            match r["state"].as_str() {
                Some("finished") => return,
                Some("failed") => panic!("re-encryption failed: {r:#}\n{}", self.log()),
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "not finished within {timeout:?}: {r:#}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait (up to 10 s) until `status` counts `n` attached clients. A client that has just
    /// closed its socket is counted until the daemon has noticed.
    #[track_caller]
    pub fn wait_clients(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.status();
            if s["clients"] == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "status did not reach {n} clients within 10 s: {s:#}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nbdcryptctl lock` (without --force) once the clients that just disconnected are gone.
    #[track_caller]
    pub fn lock_idle(&self) -> Out {
        self.wait_clients(0);
        self.ctl("lock", &[])
    }
}

// ---------------------------------------------------------------------------------------------
// Power-cut trials (tests/powercut_*.rs): a volume on the power-cut filesystem (tests/powercut).

pub mod powercut_rig {
    use super::*;
    use std::sync::OnceLock;

    pub use powercut::{Mounted, Status};

    /// `$NBDCRYPT_POWERCUT_TRIALS` or `default`.
    pub fn trial_count(default: usize) -> usize {
        std::env::var("NBDCRYPT_POWERCUT_TRIALS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    }

    /// Seed from `$NBDCRYPT_POWERCUT_SEED` or the clock; printed so a run can be repeated.
    pub fn seed() -> u64 {
        let s = std::env::var("NBDCRYPT_POWERCUT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("power-cut seed: NBDCRYPT_POWERCUT_SEED={s}");
        s
    }

    /// xorshift64*.
    pub struct Rng(u64);
    #[allow(clippy::should_implement_trait)]
    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in `lo..hi`.
        pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
            lo + self.next() % (hi - lo)
        }
        /// True with probability 1/n.
        pub fn one_in(&mut self, n: u64) -> bool {
            self.next().is_multiple_of(n)
        }
    }

    /// A temporary directory `backing/` (the durable disk) mounted through the power-cut
    /// filesystem at `mnt/`. Unmounted on drop.
    pub struct Rig {
        pub fs: Option<Mounted>,
        pub backing: PathBuf,
        pub mnt: PathBuf,
        pub dir: TempDir,
    }

    impl Rig {
        /// Mounts over an empty `backing/`; `prepare` may fill it first (it is durable as is).
        pub fn new(prepare: impl FnOnce(&Path)) -> Rig {
            let dir = tempdir();
            let backing = dir.path().join("backing");
            let mnt = dir.path().join("mnt");
            std::fs::create_dir(&backing).unwrap();
            std::fs::create_dir(&mnt).unwrap();
            prepare(&backing);
            let fs = powercut::mount(&backing, &mnt).unwrap_or_else(|e| {
                panic!("mounting the power-cut filesystem: {e} (needs /dev/fuse and root)")
            });
            Rig {
                fs: Some(fs),
                backing,
                mnt,
                dir,
            }
        }
        pub fn fs(&self) -> &Mounted {
            self.fs.as_ref().unwrap()
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            if let Some(fs) = self.fs.take() {
                fs.unmount();
            }
        }
    }

    fn target_dir() -> PathBuf {
        // target/debug/deps/THIS-EXE -> target
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .unwrap()
            .to_path_buf()
    }

    /// `nbdcryptd` built with the test-only `test-skip-fdatasync` feature, in its own target dir
    /// (`target/powercut-nosync`, seeded with hard links to this build's dependencies so only the
    /// nbdcrypt crate compiles). Built once per test process.
    pub fn nosync_daemon_binary() -> PathBuf {
        static BIN: OnceLock<PathBuf> = OnceLock::new();
        BIN.get_or_init(|| {
            let main = target_dir().join("debug");
            let alt = target_dir().join("powercut-nosync");
            let alt_debug = alt.join("debug");
            if !alt_debug.join("deps").exists() {
                std::fs::create_dir_all(&alt_debug).unwrap();
                for d in ["deps", "build", ".fingerprint"] {
                    if main.join(d).exists() {
                        // Hard links: new artifacts get new names, nothing is rewritten in place.
                        let st = Command::new("cp")
                            .arg("-al")
                            .arg(main.join(d))
                            .arg(&alt_debug)
                            .status();
                        if !matches!(st, Ok(s) if s.success()) {
                            eprintln!(
                                "warning: cannot seed {} from {}: a full build follows",
                                alt.display(),
                                main.display()
                            );
                        }
                    }
                }
            }
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
            let mut c = Command::new(cargo);
            c.args(["build", "--quiet", "-p", "nbdcrypt", "--bin", "nbdcryptd"])
                .args(["--features", "test-skip-fdatasync", "--manifest-path"])
                .arg(&manifest)
                .arg("--target-dir")
                .arg(&alt);
            run(&mut c, Duration::from_secs(1800)).success();
            let bin = alt_debug.join("nbdcryptd");
            assert!(bin.is_file(), "{} was not built", bin.display());
            bin
        })
        .clone()
    }
}
