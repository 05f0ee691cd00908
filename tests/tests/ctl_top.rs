//! `nbdcryptctl top` driven in a real terminal (tmux): it shows the daemon's state, clients and
//! the write rate while a client writes, and quits on `q`.

use nbdcrypt_tests::raw::*;
use nbdcrypt_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PASS: &[u8] = b"top passphrase";

/// A tmux server of our own (its socket in the test's temp dir), killed on drop.
struct Tmux {
    sock: PathBuf,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.sock).env("TERM", "xterm-256color");
        c
    }

    fn start(dir: &Path, command: &str) -> Tmux {
        let t = Tmux {
            sock: dir.join("tmux.sock"),
        };
        let out = t
            .cmd()
            .args([
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "120",
                "-y",
                "40",
                command,
            ])
            .output()
            .expect("tmux must be installed");
        assert!(
            out.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn alive(&self) -> bool {
        self.cmd()
            .args(["has-session", "-t", "top"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn keys(&self, keys: &str) {
        let _ = self.cmd().args(["send-keys", "-t", "top", keys]).output();
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

/// The IOPS column of the `write` row, if the screen has one with a number.
fn write_iops(screen: &str) -> Option<u64> {
    screen
        .lines()
        .find(|l| l.trim_start().starts_with("write "))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn top_shows_state_clients_and_write_rate_and_quits_on_q() {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, 4 * MIB, 4096, "pbkdf2", PASS);
    let d = Daemon::volume_in(dir, &img, &[]);
    assert!(d.unlock(PASS).ok());

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (sock, stop) = (d.sock.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut c, _) = Client::connect_go(&sock);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(c.write(i, (i % 256) * 4096, &[i as u8; 4096], 0), 0);
                i += 1;
            }
        })
    };

    let cmd = format!(
        "{} top --control {}",
        ctl_binary().display(),
        d.control().display()
    );
    let tmux = Tmux::start(d.dir(), &cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut screen;
    loop {
        screen = tmux.screen();
        let ok = screen.contains("state   unlocked for")
            && screen.contains("clients 1 ")
            && write_iops(&screen).is_some_and(|n| n > 0)
            && screen.contains("% of the daemon's CPU");
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "top never showed the writes:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(screen.contains("aes-xts-plain64"), "{screen}");
    assert!(screen.contains("volume key age unknown"), "{screen}");

    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    // Locked: the next frames say so.
    assert!(d.ctl("lock", &["--force"]).ok());
    let deadline = Instant::now() + Duration::from_secs(15);
    // ("unlocked for" contains "locked for": match the state column.)
    while !tmux.screen().contains("state   locked for") {
        assert!(
            Instant::now() < deadline,
            "top never showed the lock:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    tmux.keys("q");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.alive() {
        assert!(
            Instant::now() < deadline,
            "top did not quit on q:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
