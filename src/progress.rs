//! Progress on stderr: an indicatif bar on a terminal, plain lines when asked for elsewhere.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blkdelta_common::progress::{NoProgress, Progress};
use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::ProgressArgs;

/// Picks the progress display for the switches and for whether stderr is a terminal. A
/// command that `yields` (a receive reading a pipe, whose sender on the same terminal shows
/// the bar) shows none unless asked for with `--progress`, so that two bars never collide.
pub fn make(args: ProgressArgs, verb: &'static str, yields: bool) -> Box<dyn Progress> {
    if args.quiet || (yields && !args.progress) {
        return Box::new(NoProgress);
    }
    if std::io::stderr().is_terminal() {
        return Box::new(Bar::new(verb));
    }
    if args.progress {
        return Box::new(Lines::new(verb));
    }
    Box::new(NoProgress)
}

/// The one line a finished send or receive leaves on stderr (unless `-q`), for terminals,
/// cron mail and the journal alike: what moved, in human units, how long it took, how fast.
pub fn summary(what: &str, bytes: u64, started: Instant, tail: &str) -> String {
    let secs = started.elapsed().as_secs_f64();
    let rate = bytes as f64 / secs.max(1e-3);
    format!(
        "{what} in {:.1} s ({}/s){tail}",
        secs,
        HumanBytes(rate as u64)
    )
}

/// Bytes in human units.
pub fn human(bytes: u64) -> String {
    HumanBytes(bytes).to_string()
}

/// An indicatif bar: bytes, rate and ETA from the stream's totals.
struct Bar(ProgressBar);

impl Bar {
    fn new(verb: &'static str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(verb);
        Bar(bar)
    }
}

impl Progress for Bar {
    fn start(&self, total_bytes: u64) {
        self.0.set_length(total_bytes);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// A plain line on stderr at most once a second, for logs.
struct Lines {
    verb: &'static str,
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
    last: Mutex<Instant>,
}

impl Lines {
    fn new(verb: &'static str) -> Self {
        Lines {
            verb,
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            started: Instant::now(),
            last: Mutex::new(Instant::now()),
        }
    }

    fn line(&self) {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            HumanDuration(Duration::from_secs_f64(
                total.saturating_sub(done) as f64 / rate,
            ))
            .to_string()
        } else {
            "unknown".into()
        };
        let _ = writeln!(
            std::io::stderr(),
            "{} {} of {} ({}/s, ETA {eta})",
            self.verb,
            HumanBytes(done),
            HumanBytes(total),
            HumanBytes(rate as u64)
        );
    }
}

impl Progress for Lines {
    fn start(&self, total_bytes: u64) {
        self.total.store(total_bytes, Ordering::Relaxed);
    }
    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        let mut last = self.last.lock().expect("not poisoned");
        if last.elapsed() >= Duration::from_secs(1) {
            *last = Instant::now();
            drop(last);
            self.line();
        }
    }
    fn finish(&self) {
        self.line();
    }
}
