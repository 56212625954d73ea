//! One connection shared by many threads: any thread sends a request (under the writer's
//! lock) and waits for its outcome; one reader thread reads every reply, applies each chunk
//! to the request its handle names and hands the outcome over when the reply is done.
//!
//! ```text
//! read_at (thread 1) ─┐ request ─► writer lock ─► socket ─► server
//! read_at (thread 2) ─┤                                        │ replies, any order
//!                     └◄─ outcome ◄─ table (handle → pending) ◄─ reader thread
//! ```
//!
//! Replies may come in any order; a handle no request has, or anything else the reply parser
//! refuses, breaks the connection: every request waiting is told why, and so is every later
//! one. The socket's read and write timeouts bound every wait: the reader gives up when a
//! request has waited longer than the timeout without a byte of reply, or a reply stops half
//! way; an idle connection is left alone.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::handshake::{handshake, Export};
use super::reply::{apply, read_header, Outcome, Pending};
use super::uri::{Address, NbdUri};
use super::wire;
use crate::error::NbdError;

/// A connected socket, TCP or unix.
#[derive(Debug)]
pub enum Socket {
    /// TCP.
    Tcp(TcpStream),
    /// A unix socket.
    Unix(UnixStream),
}

impl Socket {
    /// Connects to `address`, waiting at most `timeout` for a TCP connection.
    pub fn connect(address: &Address, timeout: Duration) -> Result<Socket, NbdError> {
        let err = |source: io::Error| NbdError::Connect {
            address: address.to_string(),
            source: Arc::new(source),
        };
        let socket = match address {
            Address::Unix(path) => Socket::Unix(UnixStream::connect(path).map_err(err)?),
            Address::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address found");
                let mut found = None;
                for a in (host.as_str(), *port).to_socket_addrs().map_err(err)? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or_else(|| err(last))?;
                // Requests are small and each waits for its reply: send them at once.
                let _ = s.set_nodelay(true);
                Socket::Tcp(s)
            }
        };
        socket.set_timeout(timeout).map_err(err)?;
        Ok(socket)
    }

    fn set_timeout(&self, t: Duration) -> io::Result<()> {
        let t = Some(t.max(Duration::from_millis(1)));
        match self {
            Socket::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Socket::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.flush(),
            Socket::Unix(s) => s.flush(),
        }
    }
}

/// Where a request's outcome goes.
type Reply = SyncSender<Result<Outcome, NbdError>>;

/// A request waiting for its reply.
struct Waiter {
    /// Its state; `None` while the reader thread applies a chunk to it.
    pending: Option<Pending>,
    reply: Reply,
    sent: Instant,
}

#[derive(Default)]
struct Table {
    next_handle: u64,
    waiting: HashMap<u64, Waiter>,
    /// Why the connection broke: every later request fails with it.
    failed: Option<NbdError>,
    /// The client is disconnecting: the end of the connection is expected.
    closing: bool,
}

struct Shared {
    writer: Mutex<Socket>,
    table: Mutex<Table>,
    export: Export,
    timeout: Duration,
}

/// Locks `m`, whatever a panicking holder left: the table and the writer stay consistent
/// (each update is one statement).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn secs(&self) -> u64 {
        self.timeout.as_secs().max(1)
    }

    /// Breaks the connection with `e`, telling every request waiting.
    fn fail(&self, e: NbdError) {
        let mut t = lock(&self.table);
        if t.closing {
            return;
        }
        for (_, w) in t.waiting.drain() {
            let _ = w.reply.try_send(Err(e.clone()));
        }
        t.failed.get_or_insert(e);
    }
}

/// A connection to an export, shared by every thread that holds it.
pub struct Connection {
    shared: Arc<Shared>,
    /// For the shutdown that ends the reader thread.
    socket: Socket,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("export", &self.shared.export)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `uri` and negotiates its export (with the context of `bitmap` when given);
    /// `timeout` bounds every wait for the server.
    pub fn open(uri: &NbdUri, bitmap: Option<&str>, timeout: Duration) -> Result<Self, NbdError> {
        let mut socket = Socket::connect(&uri.address, timeout)?;
        let secs = timeout.as_secs().max(1);
        let export = handshake(&mut socket, &uri.export, bitmap, secs)?;
        let clone_err = |e| NbdError::io("setting up the connection", secs, e);
        let writer = socket.try_clone().map_err(clone_err)?;
        let mut reader_socket = socket.try_clone().map_err(clone_err)?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            table: Mutex::new(Table::default()),
            export,
            timeout,
        });
        let for_reader = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || read_replies(&mut reader_socket, &for_reader))
            .map_err(|e| NbdError::io("starting the reply reader", secs, e))?;
        Ok(Connection {
            shared,
            socket,
            reader: Some(reader),
        })
    }

    /// What the handshake found out.
    pub fn export(&self) -> &Export {
        &self.shared.export
    }

    /// Sends a request whose state is `pending`; its outcome arrives on the receiver.
    pub fn submit(
        &self,
        command: u16,
        pending: Pending,
    ) -> Result<Receiver<Result<Outcome, NbdError>>, NbdError> {
        let r = pending.request();
        let (tx, rx) = sync_channel(1);
        let handle = {
            let mut t = lock(&self.shared.table);
            if let Some(e) = &t.failed {
                return Err(e.clone());
            }
            t.next_handle = t.next_handle.wrapping_add(1);
            let handle = t.next_handle;
            let waiter = Waiter {
                pending: Some(pending),
                reply: tx,
                sent: Instant::now(),
            };
            t.waiting.insert(handle, waiter);
            handle
        };
        let bytes = wire::request(command, handle, r.offset, r.len as u32);
        let sent = {
            let mut w = lock(&self.shared.writer);
            w.write_all(&bytes).and_then(|()| w.flush())
        };
        if let Err(e) = sent {
            let e = NbdError::io(format!("the request {r}"), self.shared.secs(), e);
            self.shared.fail(e.clone());
            return Err(e);
        }
        Ok(rx)
    }

    /// Waits for the outcome of a request [`submit`](Self::submit) sent.
    pub fn wait(rx: &Receiver<Result<Outcome, NbdError>>) -> Result<Outcome, NbdError> {
        rx.recv().unwrap_or_else(|_| {
            Err(NbdError::Closed {
                during: "a request (the reply reader stopped)".into(),
            })
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let busy = {
            let mut t = lock(&self.shared.table);
            t.closing = true;
            t.failed.is_some() || !t.waiting.is_empty()
        };
        if !busy {
            let disc = wire::request(wire::CMD_DISC, 0, 0, 0);
            let mut w = lock(&self.shared.writer);
            let _ = w.write_all(&disc).and_then(|()| w.flush());
        }
        self.socket.shutdown();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The reader thread: replies until the connection ends or breaks.
fn read_replies(socket: &mut Socket, shared: &Shared) {
    loop {
        let header = match next_header(socket, shared) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => return shared.fail(e),
        };
        if let Err(e) = reply(socket, shared, header) {
            return shared.fail(e);
        }
    }
}

/// Waits for the first byte of a reply, then reads its header. `None` when the connection
/// ends while the client is closing it.
fn next_header(
    socket: &mut Socket,
    shared: &Shared,
) -> Result<Option<super::reply::Header>, NbdError> {
    let mut first = [0u8; 1];
    loop {
        match socket.read(&mut first) {
            Ok(1) => break,
            Ok(_) if lock(&shared.table).closing => return Ok(None),
            Ok(_) => {
                return Err(NbdError::Closed {
                    during: "the wait for a reply".into(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                let t = lock(&shared.table);
                if t.closing {
                    return Ok(None);
                }
                let overdue = t
                    .waiting
                    .values()
                    .any(|w| w.sent.elapsed() >= shared.timeout);
                if overdue {
                    return Err(NbdError::io("the wait for a reply", shared.secs(), e));
                }
            }
            Err(_) if lock(&shared.table).closing => return Ok(None),
            Err(e) => return Err(NbdError::io("the wait for a reply", shared.secs(), e)),
        }
    }
    let mut rest = (&first[..]).chain(&mut *socket);
    read_header(&mut rest, shared.secs()).map(Some)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Applies one reply chunk to its request, handing the outcome over once it is done.
fn reply(
    socket: &mut Socket,
    shared: &Shared,
    header: super::reply::Header,
) -> Result<(), NbdError> {
    let handle = header.handle();
    let taken = lock(&shared.table)
        .waiting
        .get_mut(&handle)
        .and_then(|w| w.pending.take());
    let Some(mut pending) = taken else {
        let what = header.what();
        return Err(NbdError::UnknownHandle { what, handle });
    };
    let contexts = shared.export.contexts;
    let done = apply(socket, header, &mut pending, &contexts, shared.secs())?;
    let mut t = lock(&shared.table);
    if done {
        if let Some(w) = t.waiting.remove(&handle) {
            let _ = w.reply.try_send(pending.finish(&contexts));
        }
    } else if let Some(w) = t.waiting.get_mut(&handle) {
        w.pending = Some(pending);
    }
    Ok(())
}
