//! Progress for long work (bench, header restore, re-encryption, wipes): a bar redrawn in place
//! when the output is a terminal, plain lines ("label: 40% (400 MiB of 1 GiB)") at every 10%
//! otherwise, so logs and pipes get a readable record instead of carriage returns.
//!
//! Progress goes to standard error, so `--json` output on standard output stays clean.
//!
//! ```ignore
//! let mut p = Progress::new("restoring header", total_bytes);
//! p.set(done_bytes);
//! p.finish();
//! ```

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    tty: bool,
    /// Last tenth printed in line mode.
    last_tenth: u64,
    last_draw: Option<Instant>,
    start: Instant,
    finished: bool,
    /// Units for the count: bytes get MiB, anything else is printed as a count.
    bytes: bool,
}

impl Progress {
    /// Progress over `total` bytes.
    pub fn new(label: &str, total: u64) -> Progress {
        Self::with(label, total, std::io::stderr().is_terminal(), true)
    }

    /// Progress over `total` steps (not bytes).
    pub fn steps(label: &str, total: u64) -> Progress {
        Self::with(label, total, std::io::stderr().is_terminal(), false)
    }

    /// Explicit mode (tests, or a caller that knows better).
    pub fn with(label: &str, total: u64, tty: bool, bytes: bool) -> Progress {
        Progress {
            label: label.to_owned(),
            total,
            done: 0,
            tty,
            last_tenth: 0,
            last_draw: None,
            start: Instant::now(),
            finished: false,
            bytes,
        }
    }

    pub fn add(&mut self, n: u64) {
        self.set(self.done.saturating_add(n));
    }

    pub fn set(&mut self, done: u64) {
        self.done = done.min(self.total);
        if let Some(line) = self.render(false) {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(line.as_bytes());
            let _ = e.flush();
        }
    }

    /// Print the final state (100% or wherever it stopped) and end the line.
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Some(line) = self.render(true) {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    /// What to print now, if anything: bars at most 10 times a second, lines at each tenth.
    pub fn render(&mut self, last: bool) -> Option<String> {
        let pct = if self.total == 0 {
            100
        } else {
            u64::try_from(u128::from(self.done) * 100 / u128::from(self.total)).unwrap_or(100)
        };
        let amount = if self.bytes {
            format!("{} of {} MiB", self.done >> 20, self.total >> 20)
        } else {
            format!("{} of {}", self.done, self.total)
        };
        if self.tty {
            let now = Instant::now();
            if !last
                && self
                    .last_draw
                    .is_some_and(|t| now - t < Duration::from_millis(100))
            {
                return None;
            }
            self.last_draw = Some(now);
            let width = 30u64;
            let filled = usize::try_from(pct * width / 100).unwrap_or(0);
            let bar = format!(
                "{}{}",
                "#".repeat(filled),
                "-".repeat(usize::try_from(width).unwrap_or(30) - filled.min(30))
            );
            let end = if last { "\n" } else { "" };
            return Some(format!("\r{} [{bar}] {pct:>3}% {amount}{end}", self.label));
        }
        let tenth = pct / 10;
        if last {
            let secs = self.start.elapsed().as_secs_f64();
            return Some(format!(
                "{}: {pct}% ({amount}) in {secs:.1} s\n",
                self.label
            ));
        }
        if tenth > self.last_tenth && tenth < 10 {
            self.last_tenth = tenth;
            return Some(format!("{}: {}% ({amount})\n", self.label, tenth * 10));
        }
        None
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_terminal_it_prints_a_line_per_tenth_then_a_summary() {
        let mut p = Progress::with("copy", 1000, false, false);
        let mut lines = Vec::new();
        for i in (0..=1000).step_by(50) {
            p.done = i;
            lines.extend(p.render(false));
        }
        p.finished = true;
        let end = p.render(true).unwrap();
        assert_eq!(lines.len(), 9, "{lines:?}");
        assert_eq!(lines[0], "copy: 10% (100 of 1000)\n");
        assert!(lines.iter().all(|l| !l.contains('\r')));
        assert!(end.starts_with("copy: 100% (1000 of 1000) in "), "{end}");
    }

    #[test]
    fn on_a_terminal_it_redraws_one_line() {
        let mut p = Progress::with("bench", 4 << 20, true, true);
        p.done = 2 << 20;
        let s = p.render(false).unwrap();
        assert!(
            s.starts_with("\rbench [###############---------------]  50% 2 of 4 MiB"),
            "{s}"
        );
        assert!(!s.ends_with('\n'));
        assert!(p.render(true).unwrap().ends_with('\n'));
    }
}
