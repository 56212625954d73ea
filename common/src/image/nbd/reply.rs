//! Replies of the transmission phase: a header read and checked, then the chunk applied to
//! the request it answers, whose state ([`Pending`]) collects the data or extents until the
//! chunk flagged done.
//!
//! ```text
//! simple : 0x67446698 | error u32 | handle u64
//! chunk  : 0x668e33ef | flags u16 | type u16 | handle u64 | length u32 | payload
//!   OFFSET_DATA  (1)     offset u64 | data (length - 8 bytes, within the request)
//!   OFFSET_HOLE  (2)     offset u64 | size u32 (within the request)
//!   BLOCK_STATUS (5)     context id u32 | (length u32, flags u32)+ (lengths sum ≤ request)
//!   ERROR        (32769) error u32 | message length u16 | message
//!   ERROR_OFFSET (32770) error u32 | message length u16 | message | offset u64
//!   NONE         (0)     nothing; flag DONE
//! ```
//!
//! An error returned by [`apply`] means the connection can no longer be trusted (the client
//! stops using it); an error the server reports for one request ends only that request.

use std::collections::BTreeMap;
use std::io::Read;

use super::handshake::Contexts;
use super::wire::{self, be16, be32, be64, read_exact};
use crate::error::nbd::{shown, ReplyProblem, RequestName};
use crate::error::NbdError;

/// Longest block status chunk accepted: QEMU sends at most 2^17 extents per chunk (1 MiB).
pub const MAX_STATUS_CHUNK_BYTES: u32 = 4 + (2 << 20);

/// Longest error chunk accepted (its message is at most 4 KiB in the protocol).
pub const MAX_ERROR_CHUNK_BYTES: u32 = 64 << 10;

/// A reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A simple reply: an error value and no payload (structured replies are negotiated).
    Simple {
        /// The error value.
        error: u32,
        /// The request's handle.
        handle: u64,
    },
    /// A structured reply chunk.
    Chunk {
        /// Chunk flags.
        flags: u16,
        /// Chunk type.
        ty: u16,
        /// The request's handle.
        handle: u64,
        /// Payload length.
        len: u32,
    },
}

impl Header {
    /// The handle of the request answered.
    pub fn handle(&self) -> u64 {
        match *self {
            Header::Simple { handle, .. } | Header::Chunk { handle, .. } => handle,
        }
    }

    /// What the header is, for an error about its handle.
    pub fn what(&self) -> &'static str {
        match self {
            Header::Simple { .. } => "simple reply",
            Header::Chunk { .. } => "structured reply chunk",
        }
    }
}

/// Reads a reply header; its magic must be a simple reply's or a chunk's.
pub fn read_header<R: Read + ?Sized>(r: &mut R, timeout_secs: u64) -> Result<Header, NbdError> {
    let during = || "a reply header".to_string();
    let mut magic = [0u8; 4];
    read_exact(r, &mut magic, timeout_secs, during)?;
    match u32::from_be_bytes(magic) {
        wire::SIMPLE_REPLY_MAGIC => {
            let mut b = [0u8; 12];
            read_exact(r, &mut b, timeout_secs, during)?;
            Ok(Header::Simple {
                error: be32(&b, 0),
                handle: be64(&b, 4),
            })
        }
        wire::STRUCTURED_REPLY_MAGIC => {
            let mut b = [0u8; 16];
            read_exact(r, &mut b, timeout_secs, during)?;
            Ok(Header::Chunk {
                flags: be16(&b, 0),
                ty: be16(&b, 2),
                handle: be64(&b, 4),
                len: be32(&b, 12),
            })
        }
        found => Err(NbdError::Magic {
            what: "reply header",
            found: u64::from(found),
            expected: u64::from(wire::STRUCTURED_REPLY_MAGIC),
        }),
    }
}

/// One extent of a block status reply: `len` bytes at `offset` whose state is `flags` (their
/// meaning is the context's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// First byte.
    pub offset: u64,
    /// Length, never zero.
    pub len: u64,
    /// The context's flags.
    pub flags: u32,
}

/// The extents of one block status request, per context: consecutive from the request's
/// offset, covering at least one byte and at most the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockStatus {
    /// `base:allocation`, when granted.
    pub allocation: Option<Vec<StatusExtent>>,
    /// The dirty bitmap's, when granted.
    pub dirty: Option<Vec<StatusExtent>>,
}

/// What a completed request returns.
#[derive(Debug)]
pub enum Outcome {
    /// The bytes read.
    Read(Vec<u8>),
    /// The extents.
    Status(BlockStatus),
}

/// A request in flight and what its reply has brought so far.
#[derive(Debug)]
pub struct Pending {
    request: RequestName,
    kind: Kind,
    /// The first error the server reported for it.
    error: Option<NbdError>,
}

#[derive(Debug)]
enum Kind {
    Read {
        data: Vec<u8>,
        /// Content chunks received: start → end.
        seen: BTreeMap<u64, u64>,
        covered: u64,
    },
    Status(BlockStatus),
}

impl Pending {
    /// A read of `len` bytes at `offset`.
    pub fn read(offset: u64, len: u32) -> Pending {
        Pending::read_into(offset, len, Vec::new())
    }

    /// A read of `len` bytes at `offset` into `buf` (a spare buffer, resized to `len`): what
    /// it held before is never seen, since a read succeeds only when its reply covered every
    /// byte.
    pub fn read_into(offset: u64, len: u32, mut buf: Vec<u8>) -> Pending {
        buf.resize(len as usize, 0);
        Pending {
            request: request_name(wire::CMD_READ, offset, len),
            kind: Kind::Read {
                data: buf,
                seen: BTreeMap::new(),
                covered: 0,
            },
            error: None,
        }
    }

    /// A block status request of `len` bytes at `offset`.
    pub fn status(offset: u64, len: u32) -> Pending {
        Pending {
            request: request_name(wire::CMD_BLOCK_STATUS, offset, len),
            kind: Kind::Status(BlockStatus::default()),
            error: None,
        }
    }

    /// The request, as errors name it.
    pub fn request(&self) -> RequestName {
        self.request
    }

    /// The request's end (within the export: the client checked it).
    fn end(&self) -> u64 {
        self.request.offset + self.request.len
    }

    fn problem(&self, chunk: &'static str, problem: ReplyProblem) -> NbdError {
        NbdError::Reply {
            request: self.request,
            chunk,
            problem,
        }
    }

    /// The result of the request once its reply is done.
    pub fn finish(self, contexts: &Contexts) -> Result<Outcome, NbdError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        match self.kind {
            Kind::Read { data, covered, .. } if covered == self.request.len => {
                Ok(Outcome::Read(data))
            }
            Kind::Read { covered, .. } => Err(NbdError::Incomplete {
                request: self.request,
                covered,
            }),
            Kind::Status(st) => {
                let missing = if contexts.allocation.is_some() && st.allocation.is_none() {
                    Some(wire::CONTEXT_ALLOCATION)
                } else if contexts.dirty.is_some() && st.dirty.is_none() {
                    Some("qemu:dirty-bitmap")
                } else {
                    None
                };
                match missing {
                    Some(context) => Err(NbdError::MissingStatus {
                        request: self.request,
                        context,
                    }),
                    None => Ok(Outcome::Status(st)),
                }
            }
        }
    }
}

fn request_name(command: u16, offset: u64, len: u32) -> RequestName {
    RequestName {
        command: wire::command_name(command),
        offset,
        len: u64::from(len),
    }
}

/// Applies the reply whose `header` was just read to `pending` (the request of its handle),
/// reading the chunk's payload from `r`; whether the reply is done.
pub fn apply<R: Read + ?Sized>(
    r: &mut R,
    header: Header,
    pending: &mut Pending,
    contexts: &Contexts,
    timeout_secs: u64,
) -> Result<bool, NbdError> {
    let (flags, ty, len) = match header {
        Header::Simple { error, .. } => return simple(pending, error),
        Header::Chunk { flags, ty, len, .. } => (flags, ty, len),
    };
    let chunk = wire::chunk_name(ty);
    let mut c = Chunk {
        r,
        pending,
        chunk,
        len,
        timeout_secs,
    };
    let is_read = matches!(c.pending.kind, Kind::Read { .. });
    match ty {
        wire::REPLY_TYPE_NONE if len != 0 => return Err(c.problem(c.length("0"))),
        wire::REPLY_TYPE_NONE if flags & wire::REPLY_FLAG_DONE == 0 => {
            return Err(c.problem(ReplyProblem::NoneNotDone))
        }
        wire::REPLY_TYPE_NONE => {}
        wire::REPLY_TYPE_OFFSET_DATA if is_read => c.data()?,
        wire::REPLY_TYPE_OFFSET_HOLE if is_read => c.hole()?,
        wire::REPLY_TYPE_BLOCK_STATUS if !is_read => c.status(contexts)?,
        wire::REPLY_TYPE_OFFSET_DATA
        | wire::REPLY_TYPE_OFFSET_HOLE
        | wire::REPLY_TYPE_BLOCK_STATUS => return Err(c.problem(ReplyProblem::WrongCommand)),
        t if t & wire::REPLY_TYPE_ERROR_BIT != 0 => c.error(t)?,
        t => return Err(c.problem(ReplyProblem::UnknownType(t))),
    }
    Ok(flags & wire::REPLY_FLAG_DONE != 0)
}

/// A simple reply: only an error ends a request that way (reads and status carry data).
fn simple(pending: &mut Pending, error: u32) -> Result<bool, NbdError> {
    let problem = match pending.kind {
        Kind::Read { .. } => Some(ReplyProblem::WrongCommand),
        Kind::Status(_) if error == 0 => Some(ReplyProblem::SimpleWithoutError),
        Kind::Status(_) => None,
    };
    if let Some(problem) = problem {
        return Err(pending.problem("simple", problem));
    }
    pending.error.get_or_insert(NbdError::ServerError {
        request: pending.request,
        errno: error,
        offset: None,
        message: String::new(),
    });
    Ok(true)
}

/// One structured chunk being read.
struct Chunk<'a, R: ?Sized> {
    r: &'a mut R,
    pending: &'a mut Pending,
    chunk: &'static str,
    len: u32,
    timeout_secs: u64,
}

impl<R: Read + ?Sized> Chunk<'_, R> {
    fn problem(&self, problem: ReplyProblem) -> NbdError {
        self.pending.problem(self.chunk, problem)
    }

    fn length(&self, expected: &'static str) -> ReplyProblem {
        ReplyProblem::Length {
            len: self.len,
            expected,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), NbdError> {
        let (chunk, request) = (self.chunk, self.pending.request);
        read_exact(self.r, buf, self.timeout_secs, || {
            format!("the {chunk} reply to {request}")
        })
    }

    /// Reads the whole payload, whose length was checked against `max`.
    fn payload(&mut self, max: u32) -> Result<Vec<u8>, NbdError> {
        if self.len > max {
            return Err(self.problem(ReplyProblem::TooLong {
                len: self.len,
                max: u64::from(max),
            }));
        }
        let mut b = vec![0u8; self.len as usize];
        self.read(&mut b)?;
        Ok(b)
    }

    /// Checks that content at `offset` (+`len`) lies in the request and overlaps nothing
    /// received before; records it. Returns its index in the read buffer.
    fn claim(&mut self, offset: u64, len: u64) -> Result<usize, NbdError> {
        let (start, end) = (self.pending.request.offset, self.pending.end());
        let inside = offset >= start && offset.checked_add(len).is_some_and(|e| e <= end);
        if !inside {
            return Err(self.problem(ReplyProblem::OutsideRequest { offset, len }));
        }
        let Kind::Read { seen, covered, .. } = &mut self.pending.kind else {
            return Err(self.problem(ReplyProblem::WrongCommand));
        };
        let before = seen
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &e)| e > offset);
        let after = seen.range(offset..offset + len).next().is_some();
        if before || after {
            return Err(self.problem(ReplyProblem::Overlap { offset, len }));
        }
        seen.insert(offset, offset + len);
        *covered += len;
        Ok((offset - start) as usize)
    }

    fn data(&mut self) -> Result<(), NbdError> {
        if self.len < 9 {
            return Err(self.problem(self.length("at least 9")));
        }
        let mut b = [0u8; 8];
        self.read(&mut b)?;
        let offset = u64::from_be_bytes(b);
        let n = u64::from(self.len - 8);
        let at = self.claim(offset, n)?;
        let (chunk, request, secs) = (self.chunk, self.pending.request, self.timeout_secs);
        let Kind::Read { data, .. } = &mut self.pending.kind else {
            return Err(self.problem(ReplyProblem::WrongCommand));
        };
        // `claim` put [at, at + n) inside the request, whose buffer this is.
        read_exact(self.r, &mut data[at..at + n as usize], secs, || {
            format!("the {chunk} reply to {request}")
        })
    }

    fn hole(&mut self) -> Result<(), NbdError> {
        if self.len != 12 {
            return Err(self.problem(self.length("12")));
        }
        let mut b = [0u8; 12];
        self.read(&mut b)?;
        let (offset, n) = (be64(&b, 0), u64::from(be32(&b, 8)));
        if n == 0 {
            return Err(self.problem(ReplyProblem::EmptyHole { offset }));
        }
        let at = self.claim(offset, n)?;
        if let Kind::Read { data, .. } = &mut self.pending.kind {
            data[at..at + n as usize].fill(0);
        }
        Ok(())
    }

    fn status(&mut self, contexts: &Contexts) -> Result<(), NbdError> {
        if self.len < 12 || (self.len - 4) % 8 != 0 {
            return Err(self.problem(self.length("4 + a positive multiple of 8")));
        }
        let b = self.payload(MAX_STATUS_CHUNK_BYTES)?;
        let id = be32(&b, 0);
        let extents = self.extents(&b[4..])?;
        let Kind::Status(st) = &mut self.pending.kind else {
            return Err(self.problem(ReplyProblem::WrongCommand));
        };
        let slot = if Some(id) == contexts.allocation {
            &mut st.allocation
        } else if Some(id) == contexts.dirty {
            &mut st.dirty
        } else {
            return Err(self.problem(ReplyProblem::UnknownContext(id)));
        };
        if slot.is_some() {
            return Err(self.problem(ReplyProblem::ContextTwice(id)));
        }
        *slot = Some(extents);
        Ok(())
    }

    /// The descriptors of a status chunk as extents from the request's offset: none empty,
    /// none past the request's end.
    fn extents(&self, descriptors: &[u8]) -> Result<Vec<StatusExtent>, NbdError> {
        let end = self.pending.end();
        let mut offset = self.pending.request.offset;
        let mut out = Vec::with_capacity(descriptors.len() / 8);
        for (i, d) in descriptors.chunks_exact(8).enumerate() {
            let len = u64::from(be32(d, 0));
            if len == 0 {
                let index = i as u32;
                return Err(self.problem(ReplyProblem::ZeroExtent { index }));
            }
            let next = offset + len;
            if next > end {
                let problem = ReplyProblem::PastRequest {
                    end: next,
                    request_end: end,
                };
                return Err(self.problem(problem));
            }
            out.push(StatusExtent {
                offset,
                len,
                flags: be32(d, 4),
            });
            offset = next;
        }
        Ok(out)
    }

    /// An error chunk: the request fails with the first error the server reports.
    fn error(&mut self, ty: u16) -> Result<(), NbdError> {
        let fixed = if ty == wire::REPLY_TYPE_ERROR_OFFSET {
            14
        } else {
            6
        };
        if self.len < fixed {
            let expected = if fixed == 14 {
                "at least 14"
            } else {
                "at least 6"
            };
            return Err(self.problem(self.length(expected)));
        }
        let b = self.payload(MAX_ERROR_CHUNK_BYTES)?;
        let (errno, msg_len) = (be32(&b, 0), be16(&b, 4));
        if u32::from(msg_len) > self.len - fixed {
            let problem = ReplyProblem::MessageLength {
                len: msg_len,
                payload: self.len,
            };
            return Err(self.problem(problem));
        }
        let message = &b[6..6 + usize::from(msg_len)];
        let offset =
            (ty == wire::REPLY_TYPE_ERROR_OFFSET).then(|| be64(&b, 6 + usize::from(msg_len)));
        self.pending.error.get_or_insert(NbdError::ServerError {
            request: self.pending.request,
            errno,
            offset,
            message: shown(message),
        });
        Ok(())
    }
}
