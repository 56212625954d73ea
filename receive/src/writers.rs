//! Writer threads: verified data records are written by a small pool of threads while the
//! applier goes on with the next records, so that copying data into the target (the costliest
//! step of a receive) runs on every core.
//!
//! Records of one transition never overlap, so their writes may land in any order. Everything
//! that needs them on the target first (a sync, a state update, a resize, the end of a
//! transition) calls [`Writers::wait`], which returns once every write handed over so far is
//! done, with the first error any of them met.

use std::fs::File;
use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Condvar, Mutex};

use crate::target::{pwrite_all, WriteBehind};
use crate::ReceiveError;

/// Writes queued ahead of the writer threads (each holds at most 1 MiB).
const QUEUE: usize = 2;

/// One write: `bytes` at `offset`.
pub(crate) struct Job {
    offset: u64,
    bytes: Vec<u8>,
}

/// Writes handed over and not done yet, and the first error met.
#[derive(Default)]
pub(crate) struct Progress {
    state: Mutex<(usize, Option<ReceiveError>)>,
    idle: Condvar,
}

impl Progress {
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
    progress: &'a Progress,
}

impl<'a> Writers<'a> {
    /// A pool whose threads the caller runs with [`run`] on the returned queue.
    pub(crate) fn new(progress: &'a Progress) -> (Self, Receiver<Job>) {
        let (tx, rx) = sync_channel(QUEUE);
        let w = Writers {
            jobs: Some(tx),
            progress,
        };
        (w, rx)
    }

    /// Hands `bytes` at `offset` to a writer thread; fails with an earlier write's error.
    pub(crate) fn write(&self, bytes: Vec<u8>, offset: u64) -> Result<(), ReceiveError> {
        {
            let mut s = self.progress.lock();
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
            self.progress.done(Ok(()));
            return Err(ReceiveError::Refused(
                "the target's writer threads stopped".into(),
            ));
        }
        Ok(())
    }

    /// Waits until every write handed over is done; the first error any met.
    pub(crate) fn wait(&self) -> Result<(), ReceiveError> {
        let mut s = self.progress.lock();
        while s.0 > 0 {
            s = self
                .progress
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

/// A writer thread: writes jobs from `jobs` to `file` until the queue closes, returning each
/// buffer on `spare` and starting write-back as it goes.
pub(crate) fn run(
    file: File,
    jobs: &Mutex<Receiver<Job>>,
    progress: &Progress,
    spare: Sender<Vec<u8>>,
) {
    let mut behind = WriteBehind::default();
    loop {
        let next = jobs.lock().map(|q| q.recv());
        let Ok(Ok(job)) = next else {
            return;
        };
        let len = job.bytes.len() as u64;
        let result = pwrite_all(&file, &job.bytes, job.offset);
        if result.is_ok() {
            behind.wrote(&file, job.offset, len);
        }
        let _ = spare.send(job.bytes);
        progress.done(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    /// Runs `jobs` through a pool of two threads writing to `file`; the pool's result.
    fn write_all(file: &File, jobs: &[(u64, Vec<u8>)]) -> Result<(), ReceiveError> {
        let progress = Progress::default();
        let (spare, returned) = channel();
        let (pool, queue) = Writers::new(&progress);
        let queue = Mutex::new(queue);
        let result = std::thread::scope(|s| {
            for _ in 0..2 {
                let (file, spare) = (file.try_clone().unwrap(), spare.clone());
                let (queue, progress) = (&queue, &progress);
                s.spawn(move || run(file, queue, progress, spare));
            }
            let handed = jobs
                .iter()
                .try_for_each(|(off, bytes)| pool.write(bytes.clone(), *off));
            handed.and(pool.finish())
        });
        drop(spare);
        assert_eq!(
            returned.iter().count(),
            jobs.len(),
            "every buffer comes back"
        );
        result
    }

    #[test]
    fn writes_land_in_any_order_and_errors_surface() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.raw");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
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
}
