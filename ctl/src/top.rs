//! `nbdcryptctl top`: a live view of one or more daemons, refreshed every second.
//!
//! Numbers come over the control socket (`stats` request: the status plus a snapshot of the
//! daemon's monitoring counters), not from `--metrics`: the control socket is there on every
//! daemon (metrics are opt-in), needs no extra port, and is already limited to root and the
//! daemon's user. Rates and latency percentiles are differences between two snapshots.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;

use nbdcrypt::control::client;
use nbdcrypt::control::proto::{Request, Response, StatusReport, VolumeState};
use nbdcrypt::control::DEFAULT_SOCKET;
use nbdcrypt::metrics::snapshot::{percentile, CommandSnapshot, Snapshot};

use crate::exit::Failure;

pub const TOP_ABOUT: &str = "\
A live view of running nbdcryptd daemons: lock state, clients, IOPS and MiB/s per direction,
latency percentiles (request read to reply written), the share of the daemon's CPU spent in
AES-XTS, and the age of the volume's token secrets. Refreshes every second; q (or Ctrl-C) quits.

Give --control once per daemon to watch several. The numbers come over the control socket
(root or the daemon's user), so no --metrics port is needed.";

pub const TOP_EXAMPLES: &str = "\
Examples:
  nbdcryptctl top
  nbdcryptctl top --control /run/nbdcrypt/db.control.sock --control /run/nbdcrypt/wal.control.sock
  nbdcryptctl top --once > snapshot.txt     # one frame (two samples a second apart), no terminal";

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Control socket of a daemon to watch; repeat for several.
    #[arg(long, value_name = "SOCK", env = "NBDCRYPT_CONTROL", default_value = DEFAULT_SOCKET)]
    pub control: Vec<PathBuf>,

    /// Seconds between refreshes.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub interval: f64,

    /// Print one frame to standard output and exit (no screen handling).
    #[arg(long)]
    pub once: bool,
}

/// One sample of one daemon.
type Sample = Result<(StatusReport, Snapshot), String>;

fn sample(sock: &Path) -> Sample {
    match client::call(sock, &Request::Stats) {
        Ok(Response::Ok(mut s)) => match s.metrics.take() {
            Some(m) => Ok((s, *m)),
            None => Err("the daemon sends no metrics (older nbdcryptd?)".into()),
        },
        Ok(Response::Error(e)) => Err(e.message),
        Err(e) => Err(e.to_string()),
    }
}

pub fn run(args: TopArgs) -> Result<(), Failure> {
    let interval = Duration::from_secs_f64(args.interval.clamp(0.1, 3600.0));
    let socks = args.control;
    let mut prev: Vec<Sample> = socks.iter().map(|s| sample(s)).collect();
    if args.once {
        std::thread::sleep(interval);
        let cur: Vec<Sample> = socks.iter().map(|s| sample(s)).collect();
        print!("{}", frame(&socks, &prev, &cur, interval));
        return Ok(());
    }
    let _screen = Screen::enter();
    loop {
        let quit = wait_for_quit(interval);
        let cur: Vec<Sample> = socks.iter().map(|s| sample(s)).collect();
        if quit {
            return Ok(());
        }
        let text = frame(&socks, &prev, &cur, interval).replace('\n', "\r\n");
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\x1b[H\x1b[2J{text}");
        let _ = out.flush();
        prev = cur;
    }
}

/// Wait `d` for a key; true if it was q, Q or Ctrl-C.
fn wait_for_quit(d: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let stdin = std::io::stdin();
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return false,
            Ok(_) => {
                let mut b = [0u8; 64];
                match nix::unistd::read(0, &mut b) {
                    Ok(0) => {
                        // Standard input closed: only a signal stops us now.
                        std::thread::sleep(left);
                        return false;
                    }
                    Ok(n) => {
                        if b[..n].iter().any(|c| matches!(c, b'q' | b'Q' | 3)) {
                            return true;
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The terminal in the alternate screen, keys read one by one without echo; restored on drop.
struct Screen {
    saved: Option<nix::sys::termios::Termios>,
}

impl Screen {
    fn enter() -> Screen {
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok();
        if let Some(t) = &saved {
            let mut raw = t.clone();
            raw.local_flags
                .remove(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG);
            let _ = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw);
        }
        print!("\x1b[?1049h\x1b[?25l\x1b[H\x1b[2Jnbdcrypt top: sampling...\r\n");
        let _ = std::io::stdout().flush();
        Screen { saved }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
        if let Some(t) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin().as_fd(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

/// One screen: a block per daemon.
pub fn frame(socks: &[PathBuf], prev: &[Sample], cur: &[Sample], interval: Duration) -> String {
    let mut o = format!(
        "nbdcrypt top   {}   every {:.1} s   q quits\n\n",
        nbdcrypt::audit::rfc3339_now(),
        interval.as_secs_f64()
    );
    for (i, sock) in socks.iter().enumerate() {
        let p = prev.get(i).and_then(|s| s.as_ref().ok());
        match cur.get(i) {
            Some(Ok(c)) => o.push_str(&block(sock, p, c)),
            Some(Err(e)) => o.push_str(&format!("{}\n  unreachable: {e}\n\n", sock.display())),
            None => {}
        }
    }
    o
}

fn block(
    sock: &Path,
    prev: Option<&(StatusReport, Snapshot)>,
    cur: &(StatusReport, Snapshot),
) -> String {
    let (s, m) = cur;
    let now = m.taken_ms / 1000;
    let mut o = String::new();
    let imp = if m.xts_impl.is_empty() {
        "-"
    } else {
        m.xts_impl.as_str()
    };
    o.push_str(&format!(
        "{}   {}   {} ({imp})   {}\n",
        sock.display(),
        s.volume_uuid,
        s.cipher,
        human(s.size)
    ));
    let since = now.saturating_sub(m.state_since);
    let state = match s.state {
        VolumeState::Unlocked | VolumeState::Locked => {
            format!("{} for {}", s.state, duration(since))
        }
        other => other.to_string(),
    };
    let latch = if m.latched {
        "   FAIL-STOP LATCHED"
    } else {
        ""
    };
    o.push_str(&format!(
        "  state   {state:<24} clients {:<4} in flight {} req / {}{latch}\n",
        s.clients,
        m.in_flight_requests,
        human(m.in_flight_bytes)
    ));
    let (pm, secs) = match prev {
        Some((_, p)) if m.taken_ms > p.taken_ms => {
            (Some(p), (m.taken_ms - p.taken_ms) as f64 / 1000.0)
        }
        _ => (None, 1.0),
    };
    o.push_str("          IOPS      MiB/s     p50        p90        p99\n");
    for name in ["read", "write", "flush"] {
        let (Some(c), pc) = (m.command(name), pm.and_then(|p| p.command(name))) else {
            continue;
        };
        o.push_str(&format!(
            "  {name:<7} {}\n",
            rates(c, pc, secs, &m.bucket_bounds_ns)
        ));
    }
    let errors: u64 = m.commands.iter().map(|c| c.errors).sum();
    let perrors: Option<u64> = pm.map(|p| p.commands.iter().map(|c| c.errors).sum());
    o.push_str(&format!(
        "  errors  {:<9} total {errors}\n",
        perrors.map_or("-".into(), |p| format!(
            "{:.0}/s",
            errors.saturating_sub(p) as f64 / secs
        ))
    ));
    let crypto = pm.map(|p| {
        let xts = (m.encrypt_ns + m.decrypt_ns).saturating_sub(p.encrypt_ns + p.decrypt_ns) as f64;
        let cpu = m.process_cpu_ns.saturating_sub(p.process_cpu_ns) as f64;
        let share = if cpu > 0.0 {
            (100.0 * xts / cpu).min(100.0)
        } else {
            0.0
        };
        format!(
            "{share:.1}% of the daemon's CPU   ({:.2} cores in XTS, {:.2} cores total)",
            xts / (secs * 1e9),
            cpu / (secs * 1e9)
        )
    });
    o.push_str(&format!(
        "  crypto  {}\n",
        crypto.unwrap_or_else(|| "-".into())
    ));
    let key = if m.oldest_token_sealed > 0 {
        format!(
            "token secrets sealed {} ago (oldest), last re-seal {} ago; volume key age unknown",
            duration(now.saturating_sub(m.oldest_token_sealed)),
            duration(now.saturating_sub(m.last_reseal))
        )
    } else {
        "no KMS/HSM token; volume key age unknown (the header records no creation time)".into()
    };
    o.push_str(&format!("  key     {key}\n\n"));
    o
}

fn rates(c: &CommandSnapshot, p: Option<&CommandSnapshot>, secs: f64, bounds: &[u64]) -> String {
    let Some(p) = p else {
        return "-".into();
    };
    let n = c.requests.saturating_sub(p.requests) as f64 / secs;
    let mib = c.bytes.saturating_sub(p.bytes) as f64 / secs / 1048576.0;
    let delta: Vec<u64> = c
        .buckets
        .iter()
        .zip(p.buckets.iter().chain(std::iter::repeat(&0)))
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let pct = |q| percentile(&delta, bounds, q).map_or("-".to_owned(), ms);
    format!(
        "{n:<9.0} {mib:<9.1} {:<10} {:<10} {:<10}",
        pct(0.5),
        pct(0.9),
        pct(0.99)
    )
}

/// A bucket bound as "≤ x ms".
fn ms(ns: u64) -> String {
    let v = ns as f64 / 1e6;
    if v < 1.0 {
        format!("<{v:.2}ms")
    } else {
        format!("<{v:.0}ms")
    }
}

fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn duration(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m{:02}s", s / 60, s % 60),
        7200..=172_799 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d", s / 86400),
    }
}
