//! `enqueue`'s progress: a bar on a terminal, a line every 2 s otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Progress reporting: a bar on a terminal, plain lines otherwise.
pub(super) enum Progress {
    Bar(indicatif::ProgressBar),
    Lines {
        total: usize,
        last: Instant,
        started: Instant,
    },
}

impl Progress {
    pub(super) fn new(total: usize) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} jobs  {per_sec}  ETA {eta}",
            ) {
                bar.set_style(style);
            }
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                total,
                last: Instant::now(),
                started: Instant::now(),
            }
        }
    }

    /// For a run whose total is not known ahead (`--from-user-pool`): a
    /// spinner with the count and rate on a terminal, a line every 2 s
    /// otherwise.
    pub(super) fn unbounded() -> Self {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{spinner} {pos} jobs  {per_sec}")
            {
                bar.set_style(style);
            }
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                total: usize::MAX,
                last: Instant::now(),
                started: Instant::now(),
            }
        }
    }

    pub(super) fn set(&mut self, done: usize) {
        match self {
            Progress::Bar(bar) => bar.set_position(done as u64),
            Progress::Lines {
                total,
                last,
                started,
            } => {
                if last.elapsed() >= Duration::from_secs(2) || done == *total {
                    *last = Instant::now();
                    let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
                    if *total == usize::MAX {
                        eprintln!("enqueued {done} ({rate:.0}/s)");
                    } else {
                        eprintln!("enqueued {done}/{total} ({rate:.0}/s)");
                    }
                }
            }
        }
    }

    pub(super) fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish();
        }
    }
}
