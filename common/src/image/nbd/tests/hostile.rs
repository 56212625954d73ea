//! A hostile server on a unix socket: a thread that answers [`NbdImage`] (the shared
//! connection and its reader thread) with scripted bytes. Every broken promise gives one line
//! and no panic, and nothing hangs: each call runs under a deadline.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::super::wire::*;
use super::super::{NbdImage, NbdOptions, NbdUri};
use super::script::Script;
use crate::image::{Allocation, BlockSource};
use crate::ImageError;

const SIZE: u64 = 1 << 20;

/// The client's side of a connection, as the fake server sees it.
struct Peer(UnixStream);

/// A request the client sent.
#[derive(Debug, Clone, Copy)]
struct Req {
    ty: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

impl Peer {
    fn send(&mut self, s: Script) {
        let _ = self.0.write_all(&s.0);
    }

    /// The greeting, and the client's flags.
    fn greet(&mut self) {
        self.send(Script::new().greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        let mut flags = [0u8; 4];
        let _ = self.0.read_exact(&mut flags);
    }

    /// Reads one option: its number and data.
    fn option(&mut self) -> Option<(u32, Vec<u8>)> {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).ok()?;
        let (opt, len) = (be32(&h, 8), be32(&h, 12));
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).ok()?;
        Some((opt, data))
    }

    /// The handshake of a 1 MiB export whose reads are at most `max` bytes, with
    /// `base:allocation` as context 1.
    fn handshake(&mut self, max: u32) {
        self.greet();
        let _ = self.option();
        self.send(Script::new().ack(OPT_STRUCTURED_REPLY));
        let _ = self.option();
        self.send(
            Script::new()
                .meta_context(1, "base:allocation")
                .ack(OPT_SET_META_CONTEXT),
        );
        let _ = self.option();
        self.send(
            Script::new()
                .info_export(SIZE, 1)
                .info_block(512, 4096, max)
                .ack(OPT_GO),
        );
    }

    fn request(&mut self) -> Option<Req> {
        let mut b = [0u8; 28];
        self.0.read_exact(&mut b).ok()?;
        Some(Req {
            ty: be16(&b, 6),
            handle: be64(&b, 8),
            offset: be64(&b, 16),
            len: be32(&b, 24),
        })
    }
}

/// Starts a fake server running `script` for one client; the URI of its socket.
fn serve(script: impl FnOnce(&mut Peer) + Send + 'static) -> (tempfile::TempDir, NbdUri) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            script(&mut Peer(s));
        }
    });
    let uri = NbdUri::parse(&format!("nbd+unix:///x?socket={}", path.display())).unwrap();
    (dir, uri)
}

fn options() -> NbdOptions {
    NbdOptions {
        dirty_bitmap: None,
        timeout: Duration::from_secs(1),
    }
}

/// Runs `f` on its own thread; panics if it takes more than 10 s.
fn in_time<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("no hang")
}

/// The one-line error of `f` on an image opened from a server running `script`.
fn error_of(
    script: impl FnOnce(&mut Peer) + Send + 'static,
    f: impl FnOnce(&NbdImage) -> Result<(), ImageError> + Send + 'static,
) -> String {
    let (_dir, uri) = serve(script);
    let err = in_time(move || {
        let img = NbdImage::open(&uri, &options())?;
        f(&img)
    })
    .expect_err("refused")
    .to_string();
    assert!(!err.contains('\n'), "{err}");
    err
}

fn assert_has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "no {p:?} in: {err}");
    }
}

fn read(img: &NbdImage, offset: u64, len: usize) -> Result<(), ImageError> {
    img.read_at(&mut vec![0u8; len], offset)
}

#[test]
fn a_hostile_nbd_server_with_a_wrong_greeting_or_option_reply_is_refused() {
    let err = error_of(|p| p.send(Script::new().raw(&[0x55; 18])), |_| Ok(()));
    assert_has(&err, &["NBD greeting: magic 0x5555555555555555"]);
    let huge = |p: &mut Peer| {
        p.greet();
        let _ = p.option();
        p.send(Script::new().opt_reply_len(OPT_STRUCTURED_REPLY, REP_ACK, 1 << 31, &[]));
    };
    assert_has(
        &error_of(huge, |_| Ok(())),
        &["NBD_OPT_STRUCTURED_REPLY", "2147483648 bytes"],
    );
}

#[test]
fn nbd_replies_out_of_order_over_a_socket_are_put_in_place() {
    let (_dir, uri) = serve(|p| {
        p.handshake(4096);
        let (a, b) = (p.request().unwrap(), p.request().unwrap());
        // The second request's reply first, the first's in two chunks around it.
        p.send(Script::new().data(a.handle, 0, &[1; 2048], false));
        p.send(Script::new().data(b.handle, 4096, &[2; 4096], true));
        p.send(Script::new().hole(a.handle, 2048, 2048, true));
        let _ = p.request(); // NBD_CMD_DISC
    });
    let buf = in_time(move || {
        let img = NbdImage::open(&uri, &options()).unwrap();
        let mut buf = vec![9u8; 8192 - 100];
        img.read_at(&mut buf, 100).unwrap();
        buf
    });
    assert!(buf[..1948].iter().all(|&b| b == 1));
    assert!(buf[1948..3996].iter().all(|&b| b == 0));
    assert!(buf[3996..].iter().all(|&b| b == 2));
}

#[test]
fn a_hostile_nbd_server_breaks_the_connection_with_one_line() {
    type Reply = fn(Req) -> Script;
    let cases: [(Reply, &[&str]); 6] = [
        (
            |r| {
                Script::new().chunk_len(
                    1,
                    REPLY_TYPE_OFFSET_DATA,
                    r.handle,
                    u32::MAX,
                    &r.offset.to_be_bytes(),
                )
            },
            &[
                "NBD_REPLY_TYPE_OFFSET_DATA reply to NBD_CMD_READ at offset 0 (+4096 bytes)",
                "lies outside",
            ],
        ),
        (
            |r| Script::new().data(r.handle + 1, 0, b"x", true),
            &["for handle 0x2, which no request in flight has"],
        ),
        (
            |r| Script::new().chunk_len(1, REPLY_TYPE_OFFSET_DATA, r.handle, 4104, &[0; 100]),
            &["closed the connection during the NBD_REPLY_TYPE_OFFSET_DATA reply"],
        ),
        (
            |r| Script::new().data(r.handle, 4096, b"x", true),
            &["offset 4096 (+1 bytes) lies outside the request"],
        ),
        (
            |r| Script::new().status(r.handle, 1, &[(512, 0)], true),
            &["NBD_REPLY_TYPE_BLOCK_STATUS reply to NBD_CMD_READ"],
        ),
        (
            |_| Script::new().raw(b"garbage!"),
            &["reply header: magic 0x67617262"],
        ),
    ];
    for (reply, expect) in cases {
        let err = error_of(
            move |p| {
                p.handshake(1 << 20);
                if let Some(r) = p.request() {
                    p.send(reply(r));
                }
            },
            |img| read(img, 0, 4096),
        );
        assert_has(&err, expect);
    }
}

#[test]
fn hostile_nbd_extent_lists_are_refused_over_a_socket() {
    type Reply = fn(Req) -> Script;
    let cases: [(Reply, &str); 4] = [
        (
            |r| Script::new().status(r.handle, 1, &[(512, 0), (0, 0)], true),
            "extent 1 has length 0",
        ),
        (
            |r| Script::new().status(r.handle, 1, &[(r.len, 0), (512, 0)], true),
            "past the request's end 1048576",
        ),
        (
            |r| {
                Script::new()
                    .status(r.handle, 1, &[(4096, 0)], false)
                    .status(r.handle, 1, &[(512, 3)], true)
            },
            "second list of extents",
        ),
        (
            |r| Script::new().status(r.handle, 9, &[(512, 0)], true),
            "context id 9",
        ),
    ];
    for (reply, expect) in cases {
        let err = error_of(
            move |p| {
                p.handshake(1 << 20);
                if let Some(r) = p.request() {
                    assert_eq!(r.ty, CMD_BLOCK_STATUS);
                    p.send(reply(r));
                }
            },
            |img| img.status(0, SIZE).map(drop),
        );
        assert_has(&err, &[expect]);
    }
}

#[test]
fn an_nbd_server_that_goes_silent_or_away_does_not_hang_the_client() {
    let silent = |p: &mut Peer| {
        p.handshake(1 << 20);
        let _ = p.request();
        thread::sleep(Duration::from_secs(5));
    };
    let err = error_of(silent, |img| read(img, 0, 512));
    assert_has(&err, &["sent nothing for 1 s", "the wait for a reply"]);
    let half = |p: &mut Peer| {
        p.handshake(1 << 20);
        let _ = p.request();
        p.send(Script::new().raw(&STRUCTURED_REPLY_MAGIC.to_be_bytes()));
        thread::sleep(Duration::from_secs(5));
    };
    assert_has(
        &error_of(half, |img| read(img, 0, 512)),
        &["sent nothing for 1 s during a reply header"],
    );
    let gone = |p: &mut Peer| p.handshake(1 << 20);
    assert_has(
        &error_of(gone, |img| read(img, 0, 512)),
        &["closed the connection"],
    );
    let mute = |p: &mut Peer| {
        p.send(Script::new().greeting(1));
        thread::sleep(Duration::from_secs(5));
    };
    assert_has(
        &error_of(mute, |_| Ok(())),
        &["sent nothing for 1 s during the reply to NBD_OPT_STRUCTURED_REPLY"],
    );
}

#[test]
fn a_broken_nbd_connection_fails_every_later_read_the_same_way() {
    let err = error_of(
        |p| {
            p.handshake(1 << 20);
            if let Some(r) = p.request() {
                p.send(Script::new().data(r.handle + 5, 0, b"x", true));
            }
        },
        |img| {
            let first = read(img, 0, 512).expect_err("unknown handle").to_string();
            let again = read(img, 0, 512).expect_err("still broken").to_string();
            assert_eq!(first, again);
            Err(read(img, 4096, 512).expect_err("still broken"))
        },
    );
    assert_has(&err, &["handle 0x6"]);
}

#[test]
fn an_nbd_image_reads_status_and_says_goodbye() {
    let (tx, rx) = mpsc::channel();
    let (_dir, uri) = serve(move |p| {
        p.handshake(1 << 20);
        let r = p.request().unwrap();
        let hz = STATE_HOLE | STATE_ZERO;
        p.send(Script::new().status(
            r.handle,
            1,
            &[(4096, 0), (4096, hz), (8192, STATE_ZERO)],
            true,
        ));
        let r = p.request().unwrap();
        let _ = tx.send(r);
        p.send(Script::new().status(r.handle, 1, &[(r.len, hz)], true));
        let _ = tx.send(p.request().unwrap());
    });
    let got = in_time(move || {
        let img = NbdImage::open(&uri, &options()).unwrap();
        let mut walk = Vec::new();
        let mut at = 0;
        while at < 16384 {
            let (a, n) = img.status(at, 16384 - at).unwrap();
            walk.push((at, n, a));
            at += n;
        }
        // Past the cached extents: asked again, from the minimum block size down.
        walk.push((20000, 0, img.status(20000, 100).unwrap().0));
        walk
    });
    assert_eq!(
        got,
        vec![
            (0, 4096, Allocation::Data),
            (4096, 4096, Allocation::Hole),
            (8192, 8192, Allocation::Zero),
            (20000, 0, Allocation::Hole)
        ]
    );
    let second = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((second.ty, second.offset), (CMD_BLOCK_STATUS, 19968));
    let disc = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(disc.ty, CMD_DISC);
}
