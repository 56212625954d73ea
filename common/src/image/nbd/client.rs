//! A single-threaded NBD client over any byte stream (a socket, or bytes in memory for tests
//! and fuzzing): the handshake, then pipelined reads and block status, replies taken in
//! whatever order the server sends them.

use std::collections::HashMap;
use std::io::{Read, Write};

use super::handshake::{handshake, Export};
use super::reply::{apply, read_header, BlockStatus, Outcome, Pending};
use super::wire;
use crate::error::NbdError;
use crate::image::check_range;
use crate::ImageError;

/// Most requests one [`NbdClient`] has in flight: more would let the requests and the
/// replies fill both directions of the connection while neither side reads.
pub const MAX_IN_FLIGHT: usize = 16;

/// An NBD client over a stream `S`, after a successful handshake.
#[derive(Debug)]
pub struct NbdClient<S: Read + Write> {
    stream: S,
    export: Export,
    next_handle: u64,
    /// Requests in flight by handle, and where their results go.
    pending: HashMap<u64, (usize, Pending)>,
    /// Set once the connection cannot be trusted: every later call fails with it.
    broken: Option<NbdError>,
}

impl<S: Read + Write> NbdClient<S> {
    /// Negotiates export `name` on `stream` (with the dirty bitmap context of `bitmap` when
    /// given; see [`handshake`]).
    pub fn connect(mut stream: S, name: &str, bitmap: Option<&str>) -> Result<Self, NbdError> {
        let export = handshake(&mut stream, name, bitmap, 0)?;
        Ok(NbdClient {
            stream,
            export,
            next_handle: 1,
            pending: HashMap::new(),
            broken: None,
        })
    }

    /// What the handshake found out.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// Reads each `(offset, len)` range (within the export, at most the maximum block size
    /// each), with up to [`MAX_IN_FLIGHT`] requests in flight.
    pub fn read_many(&mut self, ranges: &[(u64, u32)]) -> Result<Vec<Vec<u8>>, ImageError> {
        for &(offset, len) in ranges {
            self.check(offset, len, self.export.block.max)?;
        }
        let requests: Vec<_> = ranges
            .iter()
            .map(|&(o, l)| (wire::CMD_READ, Pending::read(o, l)))
            .collect();
        let outcomes = self.run(requests)?;
        let mut out = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            match o {
                Some(Outcome::Read(data)) => out.push(data),
                _ => return Err(self.fail(missing_outcome()).into()),
            }
        }
        Ok(out)
    }

    /// The block status of `len` bytes at `offset` (within the export).
    pub fn block_status(&mut self, offset: u64, len: u32) -> Result<BlockStatus, ImageError> {
        self.check(offset, len, u32::MAX)?;
        let pending = Pending::status(offset, len);
        let mut outcomes = self.run(vec![(wire::CMD_BLOCK_STATUS, pending)])?;
        match outcomes.pop().flatten() {
            Some(Outcome::Status(st)) => Ok(st),
            _ => Err(self.fail(missing_outcome()).into()),
        }
    }

    /// Sends `NBD_CMD_DISC` (dropping the client does too); later requests fail.
    pub fn disconnect(&mut self) -> Result<(), NbdError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        self.broken = Some(NbdError::Disconnected);
        let disc = wire::request(wire::CMD_DISC, 0, 0, 0);
        self.stream
            .write_all(&disc)
            .and_then(|()| self.stream.flush())
            .map_err(|e| NbdError::io("the request NBD_CMD_DISC", 0, e))
    }

    /// Refuses a request the server could not serve (past the export, empty, too long).
    fn check(&self, offset: u64, len: u32, max: u32) -> Result<(), ImageError> {
        check_range(offset, u64::from(len), self.export.size)?;
        if len == 0 || len > max {
            return Err(ImageError::OutOfRange {
                offset,
                len: u64::from(len),
                size: u64::from(max),
            });
        }
        Ok(())
    }

    /// Marks the connection broken by `e`; returns `e`.
    fn fail(&mut self, e: NbdError) -> NbdError {
        self.pending.clear();
        self.broken = Some(e.clone());
        e
    }

    /// Sends the requests, [`MAX_IN_FLIGHT`] at most at a time, and collects their outcomes
    /// in request order; the first request that fails fails the call.
    fn run(&mut self, requests: Vec<(u16, Pending)>) -> Result<Vec<Option<Outcome>>, NbdError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let mut outcomes: Vec<Option<Outcome>> = Vec::new();
        outcomes.resize_with(requests.len(), || None);
        let mut first_error = None;
        let mut queue = requests.into_iter().enumerate();
        loop {
            while self.pending.len() < MAX_IN_FLIGHT {
                let Some((index, (command, p))) = queue.next() else {
                    break;
                };
                self.send(index, command, p)?;
            }
            if self.pending.is_empty() {
                break;
            }
            let (index, result) = self.next_reply()?;
            match result {
                Ok(o) => outcomes[index] = Some(o),
                Err(e) => {
                    first_error.get_or_insert((index, e));
                }
            }
        }
        match first_error {
            Some((_, e)) => Err(e),
            None => Ok(outcomes),
        }
    }

    fn send(&mut self, index: usize, command: u16, p: Pending) -> Result<(), NbdError> {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        let r = p.request();
        let bytes = wire::request(command, handle, r.offset, r.len as u32);
        self.pending.insert(handle, (index, p));
        let sent = self
            .stream
            .write_all(&bytes)
            .and_then(|()| self.stream.flush());
        sent.map_err(|e| {
            let e = NbdError::io(format!("the request {r}"), 0, e);
            self.fail(e)
        })
    }

    /// Reads replies until one request is done: its index and result.
    fn next_reply(&mut self) -> Result<(usize, Result<Outcome, NbdError>), NbdError> {
        loop {
            let header = read_header(&mut self.stream, 0).map_err(|e| self.fail(e))?;
            let handle = header.handle();
            let Some((index, mut p)) = self.pending.remove(&handle) else {
                let what = header.what();
                return Err(self.fail(NbdError::UnknownHandle { what, handle }));
            };
            let contexts = self.export.contexts;
            match apply(&mut self.stream, header, &mut p, &contexts, 0) {
                Err(e) => return Err(self.fail(e)),
                Ok(true) => return Ok((index, p.finish(&contexts))),
                Ok(false) => {
                    self.pending.insert(handle, (index, p));
                }
            }
        }
    }
}

impl<S: Read + Write> Drop for NbdClient<S> {
    /// Says goodbye (`NBD_CMD_DISC`) unless the connection broke or already ended.
    fn drop(&mut self) {
        let _ = self.disconnect();
    }
}

/// A request completed without the outcome its command has (not reachable: each command's
/// pending state only completes with its own outcome).
fn missing_outcome() -> NbdError {
    NbdError::Closed {
        during: "a request whose outcome is missing".into(),
    }
}
