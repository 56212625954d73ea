//! What went wrong talking to an NBD server, for [`ImageError::Nbd`](super::ImageError).
//!
//! Everything a server sends is untrusted: each refusal names the option or the reply it is
//! about (`NBD_OPT_GO`, the `NBD_REPLY_TYPE_OFFSET_DATA` chunk of `NBD_CMD_READ at offset X`)
//! and carries the offending value, in one line. Text the server sends (error messages,
//! context names) is clipped and stripped of control characters before it is shown.
//!
//! The errors are `Clone` (I/O causes are shared behind an `Arc`): when a connection breaks,
//! every request waiting on it is told the same cause.

use std::fmt;
use std::io;
use std::sync::Arc;

/// Longest text from the server that an error message carries, in characters.
const MAX_SHOWN_CHARS: usize = 200;

/// A request of the transmission phase, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestName {
    /// `NBD_CMD_READ` or `NBD_CMD_BLOCK_STATUS`.
    pub command: &'static str,
    /// Offset of the request in the export.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

impl fmt::Display for RequestName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at offset {} (+{} bytes)",
            self.command, self.offset, self.len
        )
    }
}

/// Errors of the NBD client: the URI, the connection, the handshake and every reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NbdError {
    /// The export is named by something that is not an NBD URI this client takes.
    #[error("'{uri}' is not an NBD URI this client takes: {problem}")]
    Uri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        problem: UriProblem,
    },
    /// Connecting to the server failed.
    #[error("cannot connect to the NBD server at {address}")]
    Connect {
        /// The socket path or `host:port`.
        address: String,
        /// The cause.
        #[source]
        source: Arc<io::Error>,
    },
    /// Reading from or writing to the server failed.
    #[error("NBD I/O failed during {during}")]
    Io {
        /// What was being read or written.
        during: String,
        /// The cause.
        #[source]
        source: Arc<io::Error>,
    },
    /// The server closed the connection before a message was complete.
    #[error("the NBD server closed the connection during {during}")]
    Closed {
        /// What was being read.
        during: String,
    },
    /// The client ended the connection (`NBD_CMD_DISC`) before this request.
    #[error("the NBD connection was ended by this client (NBD_CMD_DISC)")]
    Disconnected,
    /// The server sent nothing for longer than the client waits.
    #[error("the NBD server sent nothing for {secs} s during {during}")]
    TimedOut {
        /// What was being read.
        during: String,
        /// The time waited.
        secs: u64,
    },
    /// A message does not start with the magic its kind has.
    #[error("NBD {what}: magic {found:#x}, expected {expected:#x}")]
    Magic {
        /// Which message.
        what: &'static str,
        /// The magic read.
        found: u64,
        /// The magic it must have.
        expected: u64,
    },
    /// The server does not offer fixed newstyle negotiation.
    #[error(
        "the NBD server does not offer fixed newstyle negotiation (handshake flags {flags:#06x}, \
         bit 0 clear)"
    )]
    NotFixedNewstyle {
        /// The handshake flags.
        flags: u16,
    },
    /// An option reply is malformed.
    #[error("NBD reply to {option}: {problem}")]
    OptionReply {
        /// The option sent (`NBD_OPT_GO`).
        option: &'static str,
        /// What is wrong with the reply.
        problem: OptionProblem,
    },
    /// The server answered an option with an error.
    #[error("the NBD server refused {option}: {}{}", rep_name(*.reply), with_message(.message))]
    Refused {
        /// The option sent.
        option: &'static str,
        /// The error reply type.
        reply: u32,
        /// The server's message, cleaned.
        message: String,
    },
    /// The server has no export of the name asked for.
    #[error("the NBD server has no export named '{name}'{}", with_message(.message))]
    NoSuchExport {
        /// The export name asked for.
        name: String,
        /// The server's message, cleaned.
        message: String,
    },
    /// The server did not grant a metadata context the client needs.
    #[error("the NBD server did not grant metadata context '{context}'{hint}")]
    ContextNotGranted {
        /// The context asked for.
        context: String,
        /// Why it may be missing.
        hint: &'static str,
    },
    /// A reply names a handle no request in flight has.
    #[error("NBD {what} for handle {handle:#x}, which no request in flight has")]
    UnknownHandle {
        /// `simple reply` or `structured reply chunk`.
        what: &'static str,
        /// The handle.
        handle: u64,
    },
    /// A reply (chunk) to a request is malformed or inconsistent with the request.
    #[error("NBD {chunk} reply to {request}: {problem}")]
    Reply {
        /// The request.
        request: RequestName,
        /// The reply's type (`NBD_REPLY_TYPE_OFFSET_DATA`, `simple`).
        chunk: &'static str,
        /// What is wrong.
        problem: ReplyProblem,
    },
    /// The server reports that a request failed.
    #[error(
        "the NBD server failed {request}: {} (error {errno}){}{}",
        errno_name(*.errno),
        .offset.map(|o| format!(" at offset {o}")).unwrap_or_default(),
        with_message(.message)
    )]
    ServerError {
        /// The request.
        request: RequestName,
        /// The NBD error value.
        errno: u32,
        /// The offset the error is at, for `NBD_REPLY_TYPE_ERROR_OFFSET`.
        offset: Option<u64>,
        /// The server's message, cleaned.
        message: String,
    },
    /// A read reply is done before it covered the whole request.
    #[error("the NBD reply to {request} is done after covering {covered} bytes")]
    Incomplete {
        /// The request.
        request: RequestName,
        /// Bytes its content chunks covered.
        covered: u64,
    },
    /// A block status reply is done without extents for a context.
    #[error("the NBD reply to {request} is done without extents for metadata context '{context}'")]
    MissingStatus {
        /// The request.
        request: RequestName,
        /// The context.
        context: &'static str,
    },
}

impl NbdError {
    /// The error of an I/O failure during `during`: a closed connection (an end of file, a
    /// broken pipe, a reset) and a timeout are named as such.
    pub fn io(during: impl Into<String>, timeout_secs: u64, e: io::Error) -> NbdError {
        let during = during.into();
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset => NbdError::Closed { during },
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NbdError::TimedOut {
                during,
                secs: timeout_secs,
            },
            _ => NbdError::Io {
                during,
                source: Arc::new(e),
            },
        }
    }
}

/// What is wrong with an NBD URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriProblem {
    /// The scheme is not one this client speaks.
    #[error("scheme '{0}' is not nbd or nbd+unix (TLS and vsock are not supported)")]
    Scheme(String),
    /// `nbd://` without a host.
    #[error("nbd:// needs a host")]
    NoHost,
    /// The port is not a number from 1 to 65535.
    #[error("port '{0}' is not a number from 1 to 65535")]
    Port(String),
    /// `nbd+unix://` with a host.
    #[error("nbd+unix takes no host ('{0}'): the socket is given as ?socket=PATH")]
    UnixHost(String),
    /// `nbd+unix://` without `?socket=PATH`.
    #[error("nbd+unix needs ?socket=PATH")]
    NoSocket,
    /// A query parameter this form does not take.
    #[error("unexpected query parameter '{0}'")]
    Query(String),
    /// User information, a fragment or a bracketed host that is not closed.
    #[error("unexpected {0}")]
    Unexpected(&'static str),
    /// A `%` not followed by two hex digits, or an escape that is not UTF-8.
    #[error("bad %-escape in '{0}'")]
    Escape(String),
    /// The export name is longer than the protocol allows.
    #[error("the export name is {0} bytes long, more than 4096")]
    ExportTooLong(usize),
}

/// What is wrong with an option reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionProblem {
    /// The reply is for another option.
    #[error("the reply is for option {0}")]
    OtherOption(u32),
    /// The reply is longer than this client accepts for it.
    #[error("{} of {len} bytes, more than {max}", rep_name(*.reply))]
    TooLong {
        /// The reply type.
        reply: u32,
        /// Its length.
        len: u32,
        /// The most this client accepts.
        max: u32,
    },
    /// More replies to one option than this client reads.
    #[error("more than {0} replies")]
    TooManyReplies(usize),
    /// A reply type the option does not have.
    #[error("unexpected reply type {}", rep_name(*.0))]
    UnexpectedType(u32),
    /// A reply or information of the wrong length.
    #[error("{what} of {len} bytes, expected {expected}")]
    Length {
        /// Which reply or information.
        what: &'static str,
        /// Its length.
        len: u32,
        /// The length it must have.
        expected: &'static str,
    },
    /// `NBD_REP_ACK` came before the export's size and flags.
    #[error("NBD_REP_ACK before NBD_INFO_EXPORT (no size)")]
    NoExportInfo,
    /// The export is larger than this client accepts.
    #[error("export size {size} exceeds {max}")]
    ExportSize {
        /// The size.
        size: u64,
        /// The largest accepted.
        max: u64,
    },
    /// Block size constraints that contradict the protocol.
    #[error("block sizes minimum {min}, preferred {preferred}, maximum {max} are invalid")]
    BlockSizes {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum block size.
        max: u32,
    },
    /// A metadata context that was not asked for, or granted twice.
    #[error("metadata context '{name}' (id {id}) was {why}")]
    Context {
        /// Its name, cleaned.
        name: String,
        /// Its id.
        id: u32,
        /// `not asked for`, `granted twice`.
        why: &'static str,
    },
}

/// What is wrong with a reply (chunk) to a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyProblem {
    /// The payload is longer than this client accepts for the chunk.
    #[error("payload of {len} bytes exceeds {max}")]
    TooLong {
        /// The chunk's length field.
        len: u32,
        /// The most this client accepts.
        max: u64,
    },
    /// The payload length is not one the chunk type has.
    #[error("payload of {len} bytes, expected {expected}")]
    Length {
        /// The chunk's length field.
        len: u32,
        /// What the type requires.
        expected: &'static str,
    },
    /// Content outside the requested range.
    #[error("content at offset {offset} (+{len} bytes) lies outside the request")]
    OutsideRequest {
        /// The chunk's offset.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// Content that overlaps earlier content of the same reply.
    #[error("content at offset {offset} (+{len} bytes) overlaps earlier content")]
    Overlap {
        /// The chunk's offset.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// A hole of zero bytes.
    #[error("a hole of 0 bytes at offset {offset}")]
    EmptyHole {
        /// The hole's offset.
        offset: u64,
    },
    /// Extents for a metadata context that was not negotiated.
    #[error("extents for metadata context id {0}, which was not negotiated")]
    UnknownContext(u32),
    /// A second set of extents for one context in one reply.
    #[error("a second list of extents for metadata context id {0} (one that runs backwards)")]
    ContextTwice(u32),
    /// A zero-length extent.
    #[error("extent {index} has length 0")]
    ZeroExtent {
        /// Its index in the chunk.
        index: u32,
    },
    /// Extents that run past the end of the request (and so of what was asked for).
    #[error("extents run to offset {end}, past the request's end {request_end}")]
    PastRequest {
        /// Where the extents end.
        end: u64,
        /// Where the request ends.
        request_end: u64,
    },
    /// Extents that end before the offset the request was made for (its start rounded
    /// down to the minimum block size).
    #[error("extents end at offset {end}, short of offset {offset} the request was for")]
    ShortOf {
        /// Where the extents end.
        end: u64,
        /// The offset asked about.
        offset: u64,
    },
    /// A chunk type that does not answer this command.
    #[error("this chunk type does not answer this command")]
    WrongCommand,
    /// `NBD_REPLY_TYPE_NONE` without the done flag.
    #[error("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")]
    NoneNotDone,
    /// A chunk type without bit 15 that this client does not know.
    #[error("unknown chunk type {0}")]
    UnknownType(u16),
    /// An error chunk whose message does not fit its payload.
    #[error("error message of {len} bytes in a payload of {payload} bytes")]
    MessageLength {
        /// The message length field.
        len: u16,
        /// The chunk's payload length.
        payload: u32,
    },
    /// A simple reply without an error, which carries no data or status.
    #[error("a simple reply without an error carries no data")]
    SimpleWithoutError,
}

/// `: message` when the server sent one.
fn with_message(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// The name of an option reply type (`NBD_REP_ERR_UNKNOWN`), or its number.
pub fn rep_name(reply: u32) -> String {
    let name = match reply {
        1 => "NBD_REP_ACK",
        2 => "NBD_REP_SERVER",
        3 => "NBD_REP_INFO",
        4 => "NBD_REP_META_CONTEXT",
        0x8000_0001 => "NBD_REP_ERR_UNSUP",
        0x8000_0002 => "NBD_REP_ERR_POLICY",
        0x8000_0003 => "NBD_REP_ERR_INVALID",
        0x8000_0004 => "NBD_REP_ERR_PLATFORM",
        0x8000_0005 => "NBD_REP_ERR_TLS_REQD",
        0x8000_0006 => "NBD_REP_ERR_UNKNOWN",
        0x8000_0007 => "NBD_REP_ERR_SHUTDOWN",
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        0x8000_0009 => "NBD_REP_ERR_TOO_BIG",
        0x8000_000a => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => return format!("reply type {reply:#x}"),
    };
    name.to_string()
}

/// The name of an NBD error value (`EIO`).
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// Text from the server made fit for a one-line message: invalid UTF-8 replaced, control
/// characters turned into `?`, clipped to 200 characters.
pub fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text
        .chars()
        .take(MAX_SHOWN_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > MAX_SHOWN_CHARS {
        out.push('…');
    }
    out
}
