//! Pacing a byte stream to a rate (`send --bwlimit`): [`Paced`] wraps a writer and holds what
//! goes through it to a number of bytes per second; [`parse_rate`] reads a rate as the command
//! line gives it.
//!
//! A token bucket: credit accrues at the rate, up to a burst of a tenth of a second's worth (at
//! least 64 KiB), and a write sleeps until there is credit for it. The bucket starts empty, so
//! from the first byte on the bytes written never run ahead of the rate; the burst only lets a
//! writer that was held up (by a slow reader downstream, by the scheduler) make up for the time
//! it lost. Credit is counted from the clock, not from the sleeps, so a sleep that overruns
//! costs nothing:
//!
//! ```text
//! credit ▲  burst ┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄┄
//!        │        ╱│    ╱│    ╱│         accrues at the rate;
//!        │      ╱  │  ╱  │  ╱  │         each write spends its length
//!        │    ╱    │╱    │╱    │╱
//!        └──────────────────────────────► time
//!          sleep  write sleep  write
//! ```
//!
//! A write larger than the burst is passed on in pieces of at most the burst (a short write, as
//! [`Write::write`] allows), so what reaches the inner writer is smooth whatever the sizes of the
//! writes; small writes at a high rate sleep at least a millisecond at a time, never spin.

use std::io::{self, Write};
use std::time::{Duration, Instant};

/// The smallest burst, so that small rates still pass on writes of a useful size.
const MIN_BURST_BYTES: u64 = 64 << 10;

/// The shortest sleep: a writer of small pieces at a high rate waits for a millisecond's credit
/// at a time, rather than sleeping thousands of times a second.
const MIN_SLEEP: Duration = Duration::from_millis(1);

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A writer that passes writes on to `W` at no more than a given number of bytes per second.
///
/// ```
/// use std::io::Write;
/// use blkdelta_send::pace::{parse_rate, Paced};
///
/// let mut out = Paced::new(Vec::new(), parse_rate("64M").unwrap());
/// out.write_all(b"a stream").unwrap(); // 8 bytes: the shortest sleep, 1 ms
/// assert_eq!(out.into_inner(), b"a stream");
/// ```
#[derive(Debug)]
pub struct Paced<W: Write> {
    inner: W,
    bucket: Bucket,
}

impl<W: Write> Paced<W> {
    /// Paces writes into `inner` to `bytes_per_sec` (bytes, not bits), with a burst of a tenth
    /// of a second's worth, at least 64 KiB. The first write waits for its credit too.
    ///
    /// # Panics
    ///
    /// If `bytes_per_sec` is 0 (a rate from [`parse_rate`] never is).
    pub fn new(inner: W, bytes_per_sec: u64) -> Self {
        Paced {
            inner,
            bucket: Bucket::new(bytes_per_sec, Instant::now()),
        }
    }

    /// The inner writer (unflushed: [`Write::flush`] first if it buffers).
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for Paced<W> {
    /// Sleeps until there is credit for the first burst of `buf`, then writes it (or less, as
    /// the inner writer takes it) and spends the credit of what was written.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return self.inner.write(buf);
        }
        let burst = usize::try_from(self.bucket.burst_bytes).unwrap_or(usize::MAX);
        let piece = &buf[..buf.len().min(burst)];
        loop {
            match self.bucket.wait(piece.len() as u64, Instant::now()) {
                Duration::ZERO => break,
                wait => std::thread::sleep(wait),
            }
        }
        let written = self.inner.write(piece)?;
        self.bucket.spend(written as u64);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The token bucket, on a clock given to it.
#[derive(Debug)]
struct Bucket {
    bytes_per_sec: u64,
    burst_bytes: u64,
    /// Credit in billionths of a byte, so that the credit earned in a nanosecond (the rate in
    /// bytes per second) is a whole number and none is lost to rounding.
    credit_nanobytes: u128,
    /// When the credit was last brought up to date.
    updated: Instant,
}

impl Bucket {
    fn new(bytes_per_sec: u64, now: Instant) -> Bucket {
        assert!(
            bytes_per_sec > 0,
            "a rate of 0 bytes per second never writes"
        );
        Bucket {
            bytes_per_sec,
            burst_bytes: (bytes_per_sec / 10).max(MIN_BURST_BYTES),
            credit_nanobytes: 0,
            updated: now,
        }
    }

    /// Adds the credit earned since the last update, up to the burst.
    fn refill(&mut self, now: Instant) {
        let elapsed_nanos = now.saturating_duration_since(self.updated).as_nanos();
        let earned = elapsed_nanos.saturating_mul(u128::from(self.bytes_per_sec));
        let cap = u128::from(self.burst_bytes) * NANOS_PER_SEC;
        self.credit_nanobytes = self.credit_nanobytes.saturating_add(earned).min(cap);
        self.updated = self.updated.max(now);
    }

    /// How long to sleep before `len` bytes (at most the burst) may go: zero when they may go
    /// now, else the time their credit takes, at least [`MIN_SLEEP`].
    fn wait(&mut self, len: u64, now: Instant) -> Duration {
        self.refill(now);
        let needed = u128::from(len) * NANOS_PER_SEC;
        let Some(missing) = needed.checked_sub(self.credit_nanobytes).filter(|&m| m > 0) else {
            return Duration::ZERO;
        };
        let nanos = missing.div_ceil(u128::from(self.bytes_per_sec));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)).max(MIN_SLEEP)
    }

    /// Spends the credit of `len` bytes written.
    fn spend(&mut self, len: u64) {
        let spent = u128::from(len) * NANOS_PER_SEC;
        self.credit_nanobytes = self.credit_nanobytes.saturating_sub(spent);
    }
}

/// Reads a rate in bytes per second: digits with an optional suffix `k`/`K`, `m`/`M` or `g`/`G`
/// (binary multiples, as rsync's `--bwlimit`: `2M` is 2 × 1024² bytes per second). Refuses 0,
/// anything else, and rates that do not fit in a `u64`, with a message naming the value.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let all_digits = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    let rate = all_digits
        .then(|| digits.parse::<u64>().ok())
        .flatten()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| {
            format!("'{s}' is not a rate: bytes per second, with an optional K, M or G suffix")
        })?;
    if rate == 0 {
        return Err(format!(
            "'{s}': a rate of 0 bytes per second would never send"
        ));
    }
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn rates_read_with_binary_suffixes() {
        for (s, rate) in [
            ("1", 1),
            ("2048", 2048),
            ("3k", 3 << 10),
            ("3K", 3 << 10),
            ("2m", 2 << 20),
            ("2M", 2 << 20),
            ("1g", 1 << 30),
            ("10G", 10 << 30),
            ("007", 7),
        ] {
            assert_eq!(parse_rate(s), Ok(rate), "{s}");
        }
    }

    #[test]
    fn zero_and_garbage_are_refused_by_value() {
        for s in [
            "",
            "0",
            "0M",
            "M",
            "k",
            "-1",
            "+1",
            " 1",
            "1 ",
            "1.5M",
            "2MB",
            "2KiB",
            "2T",
            "1e6",
            "0x10",
            "２",
            "18446744073709551616",
            "17179869184G",
        ] {
            let err = parse_rate(s).expect_err(s);
            assert!(err.contains(&format!("'{s}'")), "{s}: {err}");
        }
    }

    #[test]
    fn the_burst_is_a_tenth_of_a_second_but_at_least_64k() {
        let t0 = Instant::now();
        assert_eq!(Bucket::new(1, t0).burst_bytes, 64 << 10);
        assert_eq!(Bucket::new(100 * MIB, t0).burst_bytes, 10 * MIB);
    }

    #[test]
    fn the_bucket_starts_empty_and_fills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(MIB, t0);
        assert_eq!(
            b.wait(MIB / 16, t0),
            Duration::from_millis(62) + Duration::from_micros(500)
        );
        let t1 = t0 + Duration::from_millis(62) + Duration::from_micros(500);
        assert_eq!(b.wait(MIB / 16, t1), Duration::ZERO);
        b.spend(MIB / 16);
        assert_eq!(b.wait(MIB / 16, t1), Duration::from_micros(62_500));
    }

    #[test]
    fn credit_stops_at_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(MIB, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.wait(b.burst_bytes, later), Duration::ZERO);
        b.spend(b.burst_bytes);
        assert!(
            b.wait(1, later) > Duration::ZERO,
            "a minute idle banks one burst"
        );
    }

    #[test]
    fn an_overrun_sleep_is_credited_not_lost() {
        let t0 = Instant::now();
        let mut b = Bucket::new(MIB, t0);
        // Asked to sleep 62.5 ms for 64 KiB, the writer slept 80 ms: the rest is credit.
        let woke = t0 + Duration::from_millis(80);
        assert_eq!(b.wait(MIB / 16, woke), Duration::ZERO);
        b.spend(MIB / 16);
        assert_eq!(b.wait(MIB / 16, woke), Duration::from_millis(45));
    }

    #[test]
    fn short_waits_sleep_at_least_a_millisecond() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1 << 30, t0);
        assert_eq!(b.wait(4096, t0), MIN_SLEEP);
    }

    /// Records the length of every write.
    struct Lengths(Vec<usize>);

    impl Write for Lengths {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_large_write_goes_on_in_pieces_of_at_most_the_burst() {
        // 64 KiB of burst at 640 KiB/s: 200 KiB takes about 0.3 s.
        let mut out = Paced::new(Lengths(Vec::new()), 640 << 10);
        out.write_all(&[7u8; 200 << 10]).unwrap();
        let lengths = out.into_inner().0;
        assert_eq!(lengths.iter().sum::<usize>(), 200 << 10);
        assert!(lengths.iter().all(|&n| n <= 64 << 10), "{lengths:?}");
    }

    /// Writes `total` bytes in writes of `piece` bytes through a [`Paced`] at `rate`, and checks
    /// that the rate achieved is within 5% of it.
    fn assert_rate_holds(rate: u64, total: u64, piece: usize) {
        let mut out = Paced::new(io::sink(), rate);
        let buf = vec![0u8; piece];
        let started = Instant::now();
        let mut left = total;
        while left > 0 {
            let n = left.min(piece as u64);
            out.write_all(&buf[..n as usize]).unwrap();
            left -= n;
        }
        let achieved = total as f64 / started.elapsed().as_secs_f64();
        let error = (achieved / rate as f64 - 1.0).abs();
        assert!(
            error < 0.05,
            "{piece}-byte writes: {achieved:.0} B/s for {rate} B/s"
        );
    }

    #[test]
    fn the_rate_holds_over_1m_writes() {
        assert_rate_holds(4 * MIB, 6 * MIB, 1 << 20);
    }

    #[test]
    fn the_rate_holds_over_4k_writes() {
        assert_rate_holds(4 * MIB, 6 * MIB, 4 << 10);
    }
}
