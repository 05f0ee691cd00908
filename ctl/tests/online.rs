//! nbdcryptctl's online commands against a real control socket served in-process (a fake
//! unlocker stands in for LUKS2): output, exit codes, and how the secret is read.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use nbdcrypt::block::{self, BlockDevice, Caps, Extent, ZeroFlags};
use nbdcrypt::control::proto::{Request, Response};
use nbdcrypt::control::{self, ControlPlane, Origin, UnlockError, VolumeHandle, VolumeInfo};
use nbdcrypt::export::ExportTable;
use nbdcrypt::shutdown::{self, ShutdownTrigger};

const PASS: &[u8] = b"correct horse";
/// A key file with bytes a line reader would mangle.
const KEY: &[u8] = b"\x00\x01key\nfile\n";

struct Mem(Mutex<Vec<u8>>);

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn caps(&self) -> Caps {
        Caps {
            read_only: false,
            trim: false,
            fast_zero: false,
            min_block: 512,
            preferred_block: 4096,
            rotational: false,
        }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), block::Error> {
        let o = usize::try_from(offset).unwrap();
        buf.copy_from_slice(&self.0.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, _: bool) -> Result<(), block::Error> {
        let o = usize::try_from(offset).unwrap();
        self.0.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), block::Error> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), block::Error> {
        Err(block::Error::new(block::ErrorKind::Unsupported))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<(), block::Error> {
        Err(block::Error::new(block::ErrorKind::Unsupported))
    }
    fn cache(&self, _: u64, _: u64) -> Result<(), block::Error> {
        Ok(())
    }
    fn extents(&self, _: u64, length: u64) -> Result<Vec<Extent>, block::Error> {
        Ok(vec![Extent {
            length,
            hole: false,
            zero: false,
        }])
    }
}

/// A control server on its own runtime thread; shut down on drop.
struct Daemon {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    exports: Arc<ExportTable>,
    volume: VolumeHandle,
    runtime: tokio::runtime::Runtime,
    trigger: ShutdownTrigger,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}

fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let exports = ExportTable::new("vol".into(), String::new());
    let info = VolumeInfo {
        uuid: "3f1c2a9e-7d1b-4c55-8e0f-2b6a9d4c1e77".into(),
        cipher: "aes-xts-plain64".into(),
        sector_size: 4096,
        size: 1 << 20,
    };
    let unlocker: control::Unlocker = Box::new(|with: control::UnlockWith| {
        let control::UnlockWith::Secret { secret, .. } = with else {
            return Err(control::UnlockError::Tokens {
                message: "no tokens".into(),
                transient: false,
            });
        };
        if secret.expose_secret() == PASS || secret.expose_secret() == KEY {
            Ok(Arc::new(Mem(Mutex::new(vec![0; 1 << 20]))) as Arc<dyn BlockDevice>)
        } else {
            Err(UnlockError::WrongPassphrase)
        }
    });
    let (trigger, sd) = shutdown::channel();
    let plane = runtime
        .block_on(ControlPlane::start(
            &sock,
            exports.clone(),
            info,
            unlocker,
            None,
            Arc::new(nbdcrypt::audit::AuditLog::tracing()),
            sd,
        ))
        .unwrap();
    let volume = plane.volume.clone();
    Daemon {
        _dir: dir,
        sock,
        exports,
        volume,
        runtime,
        trigger,
    }
}

fn ctl(sock: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nbdcryptctl"))
        .args(args)
        .env("NBDCRYPT_CONTROL", sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn text(o: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn status_unlock_lock_with_documented_exit_codes() {
    let d = daemon();
    let s = ctl(&d.sock, &["status"], b"");
    assert_eq!(code(&s), 0, "{}", text(&s));
    let out = String::from_utf8_lossy(&s.stdout);
    assert!(out.contains("state        locked"), "{out}");
    assert!(out.contains("volume uuid  3f1c2a9e"), "{out}");

    let wrong = ctl(&d.sock, &["unlock", "--stdin"], b"hunter2\n");
    assert_eq!(code(&wrong), 3, "{}", text(&wrong));
    assert!(text(&wrong).contains("wrong passphrase"));

    // The newline ends the passphrase and is not part of it.
    let good = ctl(&d.sock, &["unlock", "--stdin"], b"correct horse\nignored");
    assert_eq!(code(&good), 0, "{}", text(&good));
    assert!(String::from_utf8_lossy(&good.stdout).contains("unlocked"));
    assert!(d.exports.current().is_some());

    let again = ctl(&d.sock, &["unlock", "--stdin"], b"anything\n");
    assert_eq!(code(&again), 0, "{}", text(&again));
    assert!(text(&again).contains("already unlocked"));

    let json = ctl(&d.sock, &["status", "--json"], b"");
    assert_eq!(code(&json), 0, "{}", text(&json));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["state"], "unlocked");
    assert_eq!(v["size"], 1 << 20);

    // Refused while a client is attached; --force works.
    let session = d.exports.attach();
    let busy = ctl(&d.sock, &["lock"], b"");
    assert_eq!(code(&busy), 4, "{}", text(&busy));
    assert!(text(&busy).contains("--force"));
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(session);
    });
    let forced = ctl(&d.sock, &["lock", "--force"], b"");
    releaser.join().unwrap();
    assert_eq!(code(&forced), 0, "{}", text(&forced));
    assert!(d.exports.current().is_none());

    let locked = ctl(&d.sock, &["lock"], b"");
    assert_eq!(code(&locked), 0, "{}", text(&locked));
    assert!(text(&locked).contains("already locked"));
}

#[test]
fn key_files_are_used_byte_for_byte_from_a_file_or_stdin() {
    let d = daemon();
    let key = d._dir.path().join("vol.key");
    std::fs::write(&key, KEY).unwrap();
    let o = ctl(
        &d.sock,
        &["unlock", "--key-file", key.to_str().unwrap(), "--slot", "0"],
        b"",
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = ctl(&d.sock, &["lock"], b"");
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = ctl(&d.sock, &["unlock", "--key-file", "-"], KEY);
    assert_eq!(code(&o), 0, "{}", text(&o));
}

#[test]
fn repeated_wrong_passphrases_exit_4_with_the_wait() {
    let d = daemon();
    for _ in 0..3 {
        assert_eq!(code(&ctl(&d.sock, &["unlock", "--stdin"], b"nope\n")), 3);
    }
    let o = ctl(&d.sock, &["unlock", "--stdin"], b"correct horse\n");
    assert_eq!(code(&o), 4, "{}", text(&o));
    assert!(text(&o).contains("try again in 1 s"), "{}", text(&o));
}

#[test]
fn errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let o = ctl(&missing, &["status"], b"");
    assert_eq!(code(&o), 1);
    assert!(
        text(&o).contains("is nbdcryptd running? no control socket at"),
        "{}",
        text(&o)
    );
    let o = ctl(&missing, &["lock", "--bogus"], b"");
    assert_eq!(code(&o), 2, "{}", text(&o));
    let o = ctl(&missing, &["unlock", "--stdin", "--key-file", "x"], b"");
    assert_eq!(code(&o), 2, "{}", text(&o));
    // --control wins over the environment.
    let d = daemon();
    let o = ctl(
        &missing,
        &["status", "--control", d.sock.to_str().unwrap()],
        b"",
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
}

#[test]
fn the_volume_handle_and_the_socket_see_the_same_state() {
    let d = daemon();
    let origin = Origin { uid: 0, pid: None };
    let r = d.runtime.block_on(d.volume.call(Request::Status, origin));
    assert!(matches!(r, Response::Ok(_)));
    assert_eq!(code(&ctl(&d.sock, &["unlock", "--stdin"], PASS)), 0);
    match d.runtime.block_on(d.volume.call(Request::Status, origin)) {
        Response::Ok(s) => assert_eq!(s.state.to_string(), "unlocked"),
        other => panic!("{other:?}"),
    }
}
