//! Fixed newstyle negotiation, as a client:
//!
//! ```text
//! S: NBDMAGIC u64 | IHAVEOPT u64 | handshake flags u16      (FIXED_NEWSTYLE required)
//! C: client flags u32                                         (C_FIXED_NEWSTYLE, C_NO_ZEROES)
//! C: NBD_OPT_STRUCTURED_REPLY            S: NBD_REP_ACK
//! C: NBD_OPT_SET_META_CONTEXT            S: NBD_REP_META_CONTEXT (id, name)* then NBD_REP_ACK
//!    (export, ["base:allocation", "qemu:dirty-bitmap:NAME"])
//! C: NBD_OPT_GO (export, [BLOCK_SIZE])   S: NBD_REP_INFO (EXPORT: size, flags; BLOCK_SIZE)*
//!                                           then NBD_REP_ACK: the transmission phase begins
//! C: NBD_OPT_ABORT after a refusal        S: NBD_REP_ACK (a soft disconnect)
//! ```
//!
//! Every option reply is checked before its payload is read: magic, the option it answers,
//! and a length bounded by [`MAX_OPTION_REPLY_BYTES`].

use std::io::{Read, Write};

use super::wire::{self, be16, be32, be64, read_exact};
use crate::error::nbd::{shown, OptionProblem};
use crate::error::NbdError;
use crate::limits::MAX_VIRTUAL_BYTES;

/// Longest option reply payload accepted (strings are at most 4 KiB in the protocol).
pub const MAX_OPTION_REPLY_BYTES: u32 = 64 << 10;

/// Most replies read for one option: a server that keeps sending information replies is cut
/// off rather than read forever.
const MAX_REPLIES_PER_OPTION: usize = 1024;

/// The largest read this client asks for when the server states no maximum: the protocol's
/// advice for clients that want to work with any server (32 MiB).
pub const DEFAULT_MAX_BLOCK: u32 = 32 << 20;

/// Block size constraints of an export (`NBD_INFO_BLOCK_SIZE`, or the protocol's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Every offset and length is a multiple of this (a power of two, at most 64 KiB).
    pub min: u32,
    /// The size the server prefers.
    pub preferred: u32,
    /// The largest read.
    pub max: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            min: 1,
            preferred: 4096,
            max: DEFAULT_MAX_BLOCK,
        }
    }
}

/// The metadata contexts the server granted, by the ids its block status replies use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Contexts {
    /// `base:allocation`.
    pub allocation: Option<u32>,
    /// `qemu:dirty-bitmap:NAME`, when a bitmap was asked for.
    pub dirty: Option<u32>,
}

/// What the handshake found out about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Block size constraints.
    pub block: BlockSizes,
    /// Metadata contexts granted.
    pub contexts: Contexts,
}

/// Negotiates export `name` on `s`, with `base:allocation` and, when `bitmap` is given, the
/// context `qemu:dirty-bitmap:BITMAP` (an error naming it when the server does not grant
/// it). `timeout_secs` is only named in errors.
pub fn handshake<S: Read + Write + ?Sized>(
    s: &mut S,
    name: &str,
    bitmap: Option<&str>,
    timeout_secs: u64,
) -> Result<Export, NbdError> {
    let mut h = Handshake { s, timeout_secs };
    let result = h.negotiate(name, bitmap);
    if let Err(e) = &result {
        let still_negotiating = matches!(
            e,
            NbdError::Refused { .. }
                | NbdError::NoSuchExport { .. }
                | NbdError::ContextNotGranted { .. }
        );
        if still_negotiating {
            h.abort();
        }
    }
    result
}

/// One option reply: its type and payload.
struct Reply {
    ty: u32,
    data: Vec<u8>,
}

impl Reply {
    fn is_error(&self) -> bool {
        self.ty & wire::REP_ERR_BIT != 0
    }
}

struct Handshake<'a, S: ?Sized> {
    s: &'a mut S,
    timeout_secs: u64,
}

impl<S: Read + Write + ?Sized> Handshake<'_, S> {
    fn negotiate(&mut self, name: &str, bitmap: Option<&str>) -> Result<Export, NbdError> {
        self.greeting()?;
        self.structured_replies()?;
        let contexts = self.meta_contexts(name, bitmap)?;
        let (size, flags, block) = self.go(name)?;
        Ok(Export {
            size,
            flags,
            block,
            contexts,
        })
    }

    /// Ends the negotiation the way the protocol asks of a client that gives up after a
    /// refusal (a soft disconnect): `NBD_OPT_ABORT`, whose acknowledgement is read if it
    /// comes. Errors do not matter any more.
    fn abort(&mut self) {
        if self.send(wire::OPT_ABORT, &[]).is_ok() {
            let _ = self.reply(wire::OPT_ABORT);
        }
    }

    fn read(&mut self, buf: &mut [u8], during: impl FnOnce() -> String) -> Result<(), NbdError> {
        read_exact(self.s, buf, self.timeout_secs, during)
    }

    fn write(&mut self, bytes: &[u8], during: &str) -> Result<(), NbdError> {
        self.s
            .write_all(bytes)
            .and_then(|()| self.s.flush())
            .map_err(|e| NbdError::io(during, self.timeout_secs, e))
    }

    /// The server's greeting, and the client's flags.
    fn greeting(&mut self) -> Result<(), NbdError> {
        let mut b = [0u8; 18];
        self.read(&mut b, || "the server's greeting".into())?;
        let (magic, opt, flags) = (be64(&b, 0), be64(&b, 8), be16(&b, 16));
        if magic != wire::NBDMAGIC {
            return Err(magic_error("greeting", magic, wire::NBDMAGIC));
        }
        if opt != wire::IHAVEOPT {
            return Err(magic_error("greeting (newstyle)", opt, wire::IHAVEOPT));
        }
        if flags & wire::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::NotFixedNewstyle { flags });
        }
        let mut client = wire::FLAG_C_FIXED_NEWSTYLE;
        if flags & wire::FLAG_NO_ZEROES != 0 {
            client |= wire::FLAG_C_NO_ZEROES;
        }
        self.write(&client.to_be_bytes(), "the client flags")
    }

    /// Sends `option` with `data`.
    fn send(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        self.write(&wire::option(option, data), wire::option_name(option))
    }

    /// Reads one reply to `option`, its length checked before its payload is read.
    fn reply(&mut self, option: u32) -> Result<Reply, NbdError> {
        let name = wire::option_name(option);
        let during = || format!("the reply to {name}");
        let mut b = [0u8; 20];
        self.read(&mut b, during)?;
        let (magic, answers, ty, len) = (be64(&b, 0), be32(&b, 8), be32(&b, 12), be32(&b, 16));
        if magic != wire::OPTION_REPLY_MAGIC {
            return Err(magic_error(name, magic, wire::OPTION_REPLY_MAGIC));
        }
        let problem = if answers != option {
            Some(OptionProblem::OtherOption(answers))
        } else if len > MAX_OPTION_REPLY_BYTES {
            Some(OptionProblem::TooLong {
                reply: ty,
                len,
                max: MAX_OPTION_REPLY_BYTES,
            })
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(NbdError::OptionReply {
                option: name,
                problem,
            });
        }
        let mut data = vec![0u8; len as usize];
        self.read(&mut data, during)?;
        Ok(Reply { ty, data })
    }

    fn structured_replies(&mut self) -> Result<(), NbdError> {
        let option = wire::OPT_STRUCTURED_REPLY;
        self.send(option, &[])?;
        let r = self.reply(option)?;
        match r.ty {
            wire::REP_ACK if r.data.is_empty() => Ok(()),
            wire::REP_ACK => Err(length_error(option, "NBD_REP_ACK", r.data.len(), "0")),
            _ if r.is_error() => Err(refused(option, &r)),
            ty => Err(unexpected(option, ty)),
        }
    }

    /// Selects the contexts; the ids the server gives them.
    fn meta_contexts(&mut self, name: &str, bitmap: Option<&str>) -> Result<Contexts, NbdError> {
        let option = wire::OPT_SET_META_CONTEXT;
        let dirty = bitmap.map(|b| format!("{}{b}", wire::CONTEXT_DIRTY_PREFIX));
        let mut queries = vec![wire::CONTEXT_ALLOCATION];
        queries.extend(dirty.as_deref());
        self.send(option, &meta_context_data(name, &queries))?;
        let mut contexts = Contexts::default();
        for _ in 0..MAX_REPLIES_PER_OPTION {
            let r = self.reply(option)?;
            match r.ty {
                wire::REP_ACK => return granted(contexts, dirty),
                wire::REP_META_CONTEXT => grant(&mut contexts, &r.data, dirty.as_deref())?,
                _ if r.is_error() && dirty.is_none() => return Ok(Contexts::default()),
                _ if r.is_error() => return Err(refused(option, &r)),
                ty => return Err(unexpected(option, ty)),
            }
        }
        Err(too_many_replies(option))
    }

    /// Chooses the export: its size, transmission flags and block sizes.
    fn go(&mut self, name: &str) -> Result<(u64, u16, BlockSizes), NbdError> {
        let option = wire::OPT_GO;
        let mut data = Vec::with_capacity(8 + name.len());
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
        self.send(option, &data)?;
        let mut export = None;
        let mut block = BlockSizes::default();
        for _ in 0..MAX_REPLIES_PER_OPTION {
            let r = self.reply(option)?;
            match r.ty {
                wire::REP_ACK => {
                    let (size, flags) = export.ok_or(NbdError::OptionReply {
                        option: "NBD_OPT_GO",
                        problem: OptionProblem::NoExportInfo,
                    })?;
                    return Ok((size, flags, block));
                }
                wire::REP_INFO => info(&r.data, &mut export, &mut block)?,
                wire::REP_ERR_UNKNOWN => {
                    return Err(NbdError::NoSuchExport {
                        name: name.to_string(),
                        message: shown(&r.data),
                    })
                }
                _ if r.is_error() => return Err(refused(option, &r)),
                ty => return Err(unexpected(option, ty)),
            }
        }
        Err(too_many_replies(option))
    }
}

/// The data of `NBD_OPT_SET_META_CONTEXT`: the export name and the queries.
fn meta_context_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        data.extend_from_slice(&(q.len() as u32).to_be_bytes());
        data.extend_from_slice(q.as_bytes());
    }
    data
}

/// Records one `NBD_REP_META_CONTEXT`: id, then the name, which must be one asked for and
/// not granted before.
fn grant(contexts: &mut Contexts, data: &[u8], dirty: Option<&str>) -> Result<(), NbdError> {
    if data.len() < 4 {
        return Err(length_error(
            wire::OPT_SET_META_CONTEXT,
            "NBD_REP_META_CONTEXT",
            data.len(),
            "at least 4",
        ));
    }
    let id = be32(data, 0);
    let name = &data[4..];
    let slot = if name == wire::CONTEXT_ALLOCATION.as_bytes() {
        Some(&mut contexts.allocation)
    } else if Some(name) == dirty.map(str::as_bytes) {
        Some(&mut contexts.dirty)
    } else {
        None
    };
    let why = match slot {
        Some(slot) if slot.is_none() => {
            *slot = Some(id);
            return Ok(());
        }
        Some(_) => "granted twice",
        None => "not asked for",
    };
    Err(NbdError::OptionReply {
        option: "NBD_OPT_SET_META_CONTEXT",
        problem: OptionProblem::Context {
            name: shown(name),
            id,
            why,
        },
    })
}

/// The contexts once the server acknowledged them: the dirty bitmap's must be among them.
fn granted(contexts: Contexts, dirty: Option<String>) -> Result<Contexts, NbdError> {
    match dirty {
        Some(context) if contexts.dirty.is_none() => Err(NbdError::ContextNotGranted {
            context,
            hint: " (the server exports no dirty bitmap of that name: qemu-nbd -B NAME, or \
                   bitmaps=[NAME] on the export)",
        }),
        _ => Ok(contexts),
    }
}

/// Reads one `NBD_REP_INFO`; unknown information types are skipped.
fn info(
    data: &[u8],
    export: &mut Option<(u64, u16)>,
    block: &mut BlockSizes,
) -> Result<(), NbdError> {
    let len = data.len();
    if len < 2 {
        return Err(length_error(
            wire::OPT_GO,
            "NBD_REP_INFO",
            len,
            "at least 2",
        ));
    }
    match be16(data, 0) {
        wire::INFO_EXPORT if len != 12 => {
            Err(length_error(wire::OPT_GO, "NBD_INFO_EXPORT", len, "12"))
        }
        wire::INFO_EXPORT => {
            let size = be64(data, 2);
            if size > MAX_VIRTUAL_BYTES {
                return Err(NbdError::OptionReply {
                    option: "NBD_OPT_GO",
                    problem: OptionProblem::ExportSize {
                        size,
                        max: MAX_VIRTUAL_BYTES,
                    },
                });
            }
            *export = Some((size, be16(data, 10)));
            Ok(())
        }
        wire::INFO_BLOCK_SIZE if len != 14 => {
            Err(length_error(wire::OPT_GO, "NBD_INFO_BLOCK_SIZE", len, "14"))
        }
        wire::INFO_BLOCK_SIZE => {
            *block = block_sizes(be32(data, 2), be32(data, 6), be32(data, 10))?;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Validated block sizes: minimum a power of two up to 64 KiB, preferred a power of two no
/// smaller, maximum no smaller than the minimum and a multiple of it (or 2^32 - 1); reads
/// are kept to [`DEFAULT_MAX_BLOCK`] at most.
fn block_sizes(min: u32, preferred: u32, max: u32) -> Result<BlockSizes, NbdError> {
    let valid = min.is_power_of_two()
        && min <= 64 << 10
        && preferred.is_power_of_two()
        && preferred >= min
        && max >= min
        && (max == u32::MAX || max % min == 0);
    if !valid {
        return Err(NbdError::OptionReply {
            option: "NBD_OPT_GO",
            problem: OptionProblem::BlockSizes {
                min,
                preferred,
                max,
            },
        });
    }
    // A multiple of `min` still: DEFAULT_MAX_BLOCK is a multiple of every valid minimum.
    Ok(BlockSizes {
        min,
        preferred,
        max: max.min(DEFAULT_MAX_BLOCK),
    })
}

fn magic_error(what: &'static str, found: u64, expected: u64) -> NbdError {
    NbdError::Magic {
        what,
        found,
        expected,
    }
}

fn refused(option: u32, r: &Reply) -> NbdError {
    NbdError::Refused {
        option: wire::option_name(option),
        reply: r.ty,
        message: shown(&r.data),
    }
}

fn unexpected(option: u32, ty: u32) -> NbdError {
    NbdError::OptionReply {
        option: wire::option_name(option),
        problem: OptionProblem::UnexpectedType(ty),
    }
}

fn length_error(option: u32, what: &'static str, len: usize, expected: &'static str) -> NbdError {
    NbdError::OptionReply {
        option: wire::option_name(option),
        problem: OptionProblem::Length {
            what,
            len: len as u32,
            expected,
        },
    }
}

fn too_many_replies(option: u32) -> NbdError {
    NbdError::OptionReply {
        option: wire::option_name(option),
        problem: OptionProblem::TooManyReplies(MAX_REPLIES_PER_OPTION),
    }
}
