//! powercut-fs BACKING MOUNTPOINT: mounts the power-cut filesystem in the foreground.
//!
//! Control by writing to MOUNTPOINT/.powercut (`cut`, `cut tear SEED`, `arm K [tear SEED]`,
//! `disarm`, `on`; read it for the counters) or by signal: SIGUSR1 cuts (power stays off),
//! SIGUSR2 switches the power on, SIGINT/SIGTERM unmount and exit.

use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 || args[1].starts_with('-') {
        eprintln!(
            "usage: powercut-fs BACKING MOUNTPOINT\n\n{}",
            include_str!("usage.txt")
        );
        return ExitCode::from(2);
    }
    let (backing, mountpoint) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
    // Block the signals in every thread (the FUSE thread inherits the mask); this one waits.
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGINT,
        Signal::SIGTERM,
    ] {
        set.add(s);
    }
    if let Err(e) = set.thread_block() {
        eprintln!("powercut-fs: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let mounted = match powercut::mount(&backing, &mountpoint) {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "powercut-fs: cannot mount {} on {}: {e} (needs /dev/fuse and root, or fusermount3 \
                 from Debian's fuse3 package)",
                backing.display(),
                mountpoint.display()
            );
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "powercut-fs: {} mounted on {}",
        backing.display(),
        mountpoint.display()
    );
    loop {
        match set.wait() {
            Ok(Signal::SIGUSR1) => {
                mounted.cut(None);
                eprintln!("powercut-fs: power cut");
            }
            Ok(Signal::SIGUSR2) => {
                mounted.power_on();
                eprintln!("powercut-fs: power on");
            }
            Ok(_) => break,
            Err(e) => {
                eprintln!("powercut-fs: sigwait: {e}");
                break;
            }
        }
    }
    mounted.unmount();
    ExitCode::SUCCESS
}
