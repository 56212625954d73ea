//! Server transcripts as bytes, one builder call per message, and an in-memory duplex that
//! plays them to a client and keeps what the client sends.

use std::io::{Cursor, Read, Write};

use super::super::wire::*;

/// Bytes a server sends, built message by message.
#[derive(Debug, Default, Clone)]
pub struct Script(pub Vec<u8>);

impl Script {
    pub fn new() -> Self {
        Script::default()
    }

    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    /// NBDMAGIC, IHAVEOPT, handshake flags.
    pub fn greeting(self, flags: u16) -> Self {
        self.raw(&NBDMAGIC.to_be_bytes())
            .raw(&IHAVEOPT.to_be_bytes())
            .raw(&flags.to_be_bytes())
    }

    /// An option reply with its length field set to the payload's.
    pub fn opt_reply(self, option: u32, ty: u32, payload: &[u8]) -> Self {
        self.opt_reply_len(option, ty, payload.len() as u32, payload)
    }

    /// An option reply whose length field says `len`, followed by `payload`.
    pub fn opt_reply_len(self, option: u32, ty: u32, len: u32, payload: &[u8]) -> Self {
        self.raw(&OPTION_REPLY_MAGIC.to_be_bytes())
            .raw(&option.to_be_bytes())
            .raw(&ty.to_be_bytes())
            .raw(&len.to_be_bytes())
            .raw(payload)
    }

    pub fn ack(self, option: u32) -> Self {
        self.opt_reply(option, REP_ACK, &[])
    }

    pub fn meta_context(self, id: u32, name: &str) -> Self {
        let mut p = id.to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        self.opt_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &p)
    }

    pub fn info_export(self, size: u64, flags: u16) -> Self {
        let mut p = INFO_EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        self.opt_reply(OPT_GO, REP_INFO, &p)
    }

    pub fn info_block(self, min: u32, preferred: u32, max: u32) -> Self {
        let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [min, preferred, max] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        self.opt_reply(OPT_GO, REP_INFO, &p)
    }

    /// Greeting, structured replies, contexts (id, name) and GO with the export's size.
    pub fn handshake(self, size: u64, contexts: &[(u32, &str)]) -> Self {
        let mut s = self
            .greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
            .ack(OPT_STRUCTURED_REPLY);
        for &(id, name) in contexts {
            s = s.meta_context(id, name);
        }
        s.ack(OPT_SET_META_CONTEXT)
            .info_export(size, 1)
            .info_block(1, 4096, 32 << 20)
            .ack(OPT_GO)
    }

    /// A structured chunk whose length field is the payload's.
    pub fn chunk(self, flags: u16, ty: u16, handle: u64, payload: &[u8]) -> Self {
        self.chunk_len(flags, ty, handle, payload.len() as u32, payload)
    }

    /// A structured chunk whose length field says `len`, followed by `payload`.
    pub fn chunk_len(self, flags: u16, ty: u16, handle: u64, len: u32, payload: &[u8]) -> Self {
        self.raw(&STRUCTURED_REPLY_MAGIC.to_be_bytes())
            .raw(&flags.to_be_bytes())
            .raw(&ty.to_be_bytes())
            .raw(&handle.to_be_bytes())
            .raw(&len.to_be_bytes())
            .raw(payload)
    }

    pub fn data(self, handle: u64, offset: u64, bytes: &[u8], done: bool) -> Self {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(bytes);
        self.chunk(done_flag(done), REPLY_TYPE_OFFSET_DATA, handle, &p)
    }

    pub fn hole(self, handle: u64, offset: u64, len: u32, done: bool) -> Self {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        self.chunk(done_flag(done), REPLY_TYPE_OFFSET_HOLE, handle, &p)
    }

    pub fn status(self, handle: u64, id: u32, extents: &[(u32, u32)], done: bool) -> Self {
        let mut p = id.to_be_bytes().to_vec();
        for &(len, flags) in extents {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        self.chunk(done_flag(done), REPLY_TYPE_BLOCK_STATUS, handle, &p)
    }

    pub fn error(self, handle: u64, errno: u32, message: &str, done: bool) -> Self {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend_from_slice(&(message.len() as u16).to_be_bytes());
        p.extend_from_slice(message.as_bytes());
        self.chunk(done_flag(done), REPLY_TYPE_ERROR, handle, &p)
    }

    pub fn none(self, handle: u64) -> Self {
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, &[])
    }

    pub fn simple(self, handle: u64, error: u32) -> Self {
        self.raw(&SIMPLE_REPLY_MAGIC.to_be_bytes())
            .raw(&error.to_be_bytes())
            .raw(&handle.to_be_bytes())
    }
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Plays a transcript to a client and keeps what the client writes.
#[derive(Debug)]
pub struct Duplex {
    pub input: Cursor<Vec<u8>>,
    pub output: Vec<u8>,
}

impl Duplex {
    pub fn new(script: Script) -> Self {
        Duplex {
            input: Cursor::new(script.0),
            output: Vec::new(),
        }
    }
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
