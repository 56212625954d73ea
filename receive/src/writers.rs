//! Writer threads: verified data records are written by a small pool of threads while the
//! applier goes on with the next records, so that copying data into the target (the costliest
//! step of a receive) runs on every core.
//!
//! Records of one transition never overlap, so their writes may land in any order. Everything
//! that needs them on the target first (a sync, a state update, a resize, the end of a
//! transition) calls [`Writers::wait`], which returns once every write handed over so far is
//! done, with the first error any of them met.

use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Condvar, Mutex};

use blkdelta_common::buf::{AlignedBuf, ALIGN};

use crate::target::{pwrite_all, WriteBehind};
use crate::ReceiveError;

/// Writes queued ahead of the writer threads (each holds at most 1 MiB).
const QUEUE: usize = 4;

/// One write: `bytes` at `offset`.
pub(crate) struct Job {
    offset: u64,
    bytes: AlignedBuf,
}

/// Writes handed over and not done yet (in flight), and the first error met.
#[derive(Default)]
pub(crate) struct InFlight {
    state: Mutex<(usize, Option<ReceiveError>)>,
    idle: Condvar,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Option<ReceiveError>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn done(&self, result: Result<(), ReceiveError>) {
        let mut s = self.lock();
        s.0 -= 1;
        if let Err(e) = result {
            s.1.get_or_insert(e);
        }
        self.idle.notify_all();
    }
}

/// The applier's end of the pool.
pub(crate) struct Writers<'a> {
    jobs: Option<SyncSender<Job>>,
    in_flight: &'a InFlight,
}

impl<'a> Writers<'a> {
    /// A pool whose threads the caller runs with [`run`] on the returned queue.
    pub(crate) fn new(in_flight: &'a InFlight) -> (Self, Receiver<Job>) {
        let (tx, rx) = sync_channel(QUEUE);
        let w = Writers {
            jobs: Some(tx),
            in_flight,
        };
        (w, rx)
    }

    /// Hands `bytes` at `offset` to a writer thread; fails with an earlier write's error.
    pub(crate) fn write(&self, bytes: AlignedBuf, offset: u64) -> Result<(), ReceiveError> {
        {
            let mut s = self.in_flight.lock();
            if let Some(e) = s.1.take() {
                return Err(e);
            }
            s.0 += 1;
        }
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|tx| tx.send(Job { offset, bytes }).is_ok());
        if !sent {
            self.in_flight.done(Ok(()));
            return Err(ReceiveError::Failed(
                "the target's writer threads stopped".into(),
            ));
        }
        Ok(())
    }

    /// The first error a write has met so far, without waiting for the writes in flight.
    pub(crate) fn check(&self) -> Result<(), ReceiveError> {
        self.in_flight.lock().1.take().map_or(Ok(()), Err)
    }

    /// Waits until every write handed over is done; the first error any met.
    pub(crate) fn wait(&self) -> Result<(), ReceiveError> {
        let mut s = self.in_flight.lock();
        while s.0 > 0 {
            s = self
                .in_flight
                .idle
                .wait(s)
                .unwrap_or_else(|e| e.into_inner());
        }
        s.1.take().map_or(Ok(()), Err)
    }

    /// Stops the pool once its queue is drained (its threads then return), after waiting
    /// for every write.
    pub(crate) fn finish(mut self) -> Result<(), ReceiveError> {
        let waited = self.wait();
        self.jobs = None;
        waited
    }
}

/// The page size (at least 4 KiB): direct writes cover whole pages, so that no page is shared
/// with a write through the page cache.
pub(crate) fn page_size() -> u64 {
    (rustix::param::page_size() as u64).max(ALIGN as u64)
}

/// Writes that bypass the page cache (`O_DIRECT`), for the aligned whole-page writes that
/// make up most of a stream: straight from the record's buffer (aligned, see [`AlignedBuf`])
/// to the disk, no copy into the page cache, no write-back later. Turned off for good the
/// first time the file system refuses one.
pub(crate) struct Direct {
    file: File,
    on: bool,
    /// Offsets and lengths of direct writes are multiples of this.
    page: u64,
}

impl Direct {
    /// Direct writes through `file` (opened with `O_DIRECT`).
    pub(crate) fn new(file: File) -> Self {
        Direct {
            file,
            on: true,
            page: page_size(),
        }
    }

    /// Writes `bytes` at `offset` directly when the memory, the offset and the length are
    /// aligned; `None` when it did not (the caller writes through the page cache).
    fn write(&mut self, bytes: &[u8], offset: u64) -> Option<Result<(), ReceiveError>> {
        let aligned = offset % self.page == 0
            && bytes.len() as u64 % self.page == 0
            && bytes.as_ptr() as usize % ALIGN == 0;
        if !self.on || !aligned || bytes.is_empty() {
            return None;
        }
        match pwrite_all(&self.file, bytes, offset) {
            Err(ReceiveError::Target { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) =>
            {
                // Not supported here after all: the page cache it is, from now on.
                self.on = false;
                None
            }
            other => Some(other),
        }
    }
}

/// A writer thread: writes jobs from `jobs` to `file` (aligned ones through `direct`, when
/// given) until the queue closes, returning each buffer on `spare` and starting the
/// write-back of what went through the page cache as it goes.
pub(crate) fn run(
    file: File,
    mut direct: Option<Direct>,
    jobs: &Mutex<Receiver<Job>>,
    in_flight: &InFlight,
    spare: Sender<AlignedBuf>,
) {
    let mut behind = WriteBehind::default();
    loop {
        let next = jobs.lock().map(|q| q.recv());
        let Ok(Ok(job)) = next else {
            return;
        };
        let len = job.bytes.len() as u64;
        // A panic becomes this write's error: the applier waiting for it must hear of it.
        let result = catch_unwind(AssertUnwindSafe(|| {
            match direct
                .as_mut()
                .and_then(|d| d.write(&job.bytes, job.offset))
            {
                Some(done) => done,
                None => {
                    let written = pwrite_all(&file, &job.bytes, job.offset);
                    if written.is_ok() {
                        behind.wrote(&file, job.offset, len);
                    }
                    written
                }
            }
        }))
        .unwrap_or_else(|_| {
            Err(ReceiveError::Failed(format!(
                "writing {len} bytes at offset {} failed unexpectedly",
                job.offset
            )))
        });
        let _ = spare.send(job.bytes);
        in_flight.done(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    /// Runs `jobs` through a pool of two threads writing to `file`; the pool's result.
    fn write_all(file: &File, jobs: &[(u64, Vec<u8>)]) -> Result<(), ReceiveError> {
        write_all_with(file, None, jobs)
    }

    /// The same, aligned writes going through `direct` (a handle opened with `O_DIRECT`).
    fn write_all_with(
        file: &File,
        direct: Option<&File>,
        jobs: &[(u64, Vec<u8>)],
    ) -> Result<(), ReceiveError> {
        let in_flight = InFlight::default();
        let (spare, returned) = channel();
        let (pool, queue) = Writers::new(&in_flight);
        let queue = Mutex::new(queue);
        let mut taken = 0;
        let result = std::thread::scope(|s| {
            for _ in 0..2 {
                let (file, spare) = (file.try_clone().unwrap(), spare.clone());
                let (queue, in_flight) = (&queue, &in_flight);
                let direct = direct.map(|d| Direct::new(d.try_clone().unwrap()));
                s.spawn(move || run(file, direct, queue, in_flight, spare));
            }
            // A write handed over after an earlier one failed is refused with that error (its
            // buffer is not taken), and the handing over stops there.
            let handed = jobs.iter().try_for_each(|(off, bytes)| {
                pool.write(AlignedBuf::from_slice(bytes), *off)?;
                taken += 1;
                Ok(())
            });
            handed.and(pool.finish())
        });
        drop(spare);
        assert_eq!(
            returned.iter().count(),
            taken,
            "every buffer handed over comes back"
        );
        result
    }

    /// A new empty file at `path`, open for reading and writing.
    fn create(path: &std::path::Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn writes_land_in_any_order_and_errors_surface() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.raw");
        let file = create(&path);
        let jobs: Vec<(u64, Vec<u8>)> = (0..64u64)
            .map(|i| (i * 4096, vec![i as u8 + 1; 4096]))
            .collect();
        write_all(&file, &jobs).unwrap();
        let got = std::fs::read(&path).unwrap();
        for (off, bytes) in &jobs {
            assert_eq!(&got[*off as usize..*off as usize + 4096], &bytes[..]);
        }
        // A handle that cannot write: the error reaches the applier, naming the write.
        let read_only = File::open(&path).unwrap();
        let err = write_all(&read_only, &jobs[..3]).unwrap_err();
        assert!(err.to_string().starts_with("write at offset "), "{err}");
    }

    #[test]
    fn direct_and_buffered_writes_mix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let file = create(&path);
        file.set_len(8 << 20).unwrap();
        // Aligned whole records, unaligned ones, a short tail: each lands where it belongs,
        // whichever way it is written (a file system without O_DIRECT takes them all through
        // the page cache).
        let jobs: Vec<(u64, Vec<u8>)> = vec![
            (0, vec![1; 1 << 20]),
            (1 << 20, vec![2; 4096]),
            ((1 << 20) + 4096 + 512, vec![3; 1000]),
            (2 << 20, vec![4; 1 << 20]),
            ((3 << 20) + 8192, vec![5; 64 << 10]),
            ((8 << 20) - 100, vec![6; 100]),
        ];
        let direct = blkdelta_common::image::raw::reopen_direct(&file, true);
        write_all_with(&file, direct.as_ref(), &jobs).unwrap();
        let got = std::fs::read(&path).unwrap();
        let mut want = vec![0u8; 8 << 20];
        for (off, bytes) in &jobs {
            want[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
        }
        assert!(got == want, "replica differs");
    }
}
