//! The NBD client against QEMU's servers, qemu being the oracle: `qemu-nbd` (unix socket and
//! TCP on 127.0.0.1, `-B` for a dirty bitmap) and `qemu-storage-daemon` exporting a bitmap.
//! Sizes, reads (equal to `qemu-img convert -O raw`), `base:allocation` extents (equal to
//! `qemu-img map --output=json`), dirty extents (the granules qemu-io wrote), and the
//! refusals of an export, a bitmap or a server that is not there.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkdelta_common::extent::Visit;
use blkdelta_common::image::nbd::{wire, NbdImage, NbdOptions, NbdUri};
use blkdelta_common::image::BlockSource;
use blkdelta_common::ImageError;

const MIB: u64 = 1 << 20;

/// Whether the qemu tools run; a loud skip, or a failure under `BLKDELTA_REQUIRE_TOOLS=1`.
fn have_qemu() -> bool {
    for tool in ["qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon"] {
        if Command::new(tool).arg("--version").output().is_err() {
            assert!(
                std::env::var_os("BLKDELTA_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
                "{tool} is required (BLKDELTA_REQUIRE_TOOLS=1): apt-get install qemu-utils"
            );
            eprintln!("SKIPPED: {tool} is not installed (apt-get install qemu-utils)");
            return false;
        }
    }
    true
}

fn run(prog: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(prog: &str, args: &[&str]) -> Server {
    let child = Command::new(prog)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Server(child)
}

/// `qemu-nbd -r -f qcow2 -x drive0 -t ARGS IMG`.
fn qemu_nbd(img: &Path, args: &[&str]) -> Server {
    let mut all = vec!["-r", "-f", "qcow2", "-x", "drive0", "-t"];
    all.extend_from_slice(args);
    all.push(s(img));
    spawn("qemu-nbd", &all)
}

/// Opens `uri` once its server listens (it may still be starting).
fn open(uri: &str, bitmap: Option<&str>) -> Result<NbdImage, ImageError> {
    let uri = NbdUri::parse(uri).unwrap();
    let opts = NbdOptions {
        dirty_bitmap: bitmap.map(str::to_string),
        timeout: Duration::from_secs(20),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match NbdImage::open(&uri, &opts) {
            Err(ImageError::Nbd(e)) if e.to_string().starts_with("cannot connect") => {
                assert!(Instant::now() < deadline, "{e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///drive0?socket={}", sock.display())
}

/// A 24 MiB qcow2 image (64 KiB clusters) with data, zeroed ranges, discards and an
/// unaligned tail; a bitmap 'daily' added after the first writes, when `bitmap`.
fn image(dir: &Path, bitmap: bool) -> PathBuf {
    let img = dir.join("vm.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&img), "25166336"],
    );
    let io = |cmds: &[&str]| {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend_from_slice(&["-c", c]);
        }
        args.push(s(&img));
        run("qemu-io", &args);
    };
    io(&[
        "write -P 0x11 0 3M",
        "write -P 0x22 5M 100k",
        "write -z 1M 512k",
        "discard 2M 128k",
        "write -P 0x33 20M 4M",
        "write -P 0x44 25165824 512",
    ]);
    if bitmap {
        run(
            "qemu-img",
            &["bitmap", "--add", "-g", "65536", s(&img), "daily"],
        );
        io(&[
            "write -P 0x55 8M 4096",
            "write -P 0x66 10485860 70000",
            "write -z 20M 128k",
            "discard 21M 64k",
        ]);
    }
    img
}

/// Reads the whole export with four threads sharing the connection, in 1 MiB reads at odd
/// offsets, and in one read.
fn whole(img: Arc<NbdImage>) -> Vec<u8> {
    let size = img.size();
    let piece = MIB + 4321;
    let n = size.div_ceil(piece);
    let parts: Vec<(u64, Vec<u8>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let img = Arc::clone(&img);
                sc.spawn(move || {
                    let mut out = Vec::new();
                    for i in (t..n).step_by(4) {
                        let off = i * piece;
                        let mut buf = vec![0u8; (size - off).min(piece) as usize];
                        img.read_at(&mut buf, off).unwrap();
                        out.push((off, buf));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut all = vec![0u8; size as usize];
    for (off, buf) in parts {
        all[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
    }
    let mut once = vec![0u8; size as usize];
    img.read_at(&mut once, 0).unwrap();
    assert!(once == all, "one read and many reads differ");
    all
}

/// `qemu-img convert -O raw`.
fn convert(img: &Path) -> Vec<u8> {
    let out = img.with_extension("raw");
    run(
        "qemu-img",
        &["convert", "-U", "-f", "qcow2", "-O", "raw", s(img), s(&out)],
    );
    std::fs::read(out).unwrap()
}

/// Runs of (start, end, hole, zero), adjacent runs of the same state merged.
type Runs = Vec<(u64, u64, bool, bool)>;

fn push_run(runs: &mut Runs, start: u64, end: u64, hole: bool, zero: bool) {
    match runs.last_mut() {
        Some(last) if last.1 == start && (last.2, last.3) == (hole, zero) => last.1 = end,
        _ => runs.push((start, end, hole, zero)),
    }
}

fn json_field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line.find(&format!("\"{key}\": ")).unwrap() + key.len() + 4;
    line[at..].split([',', '}']).next().unwrap().trim()
}

/// `qemu-img map --output=json`: a hole is what holds no data, zero what reads as zeros.
fn qemu_map(img: &Path) -> Runs {
    let text = String::from_utf8(run(
        "qemu-img",
        &["map", "-U", "--output=json", "-f", "qcow2", s(img)],
    ))
    .unwrap();
    let mut runs = Runs::new();
    for l in text.lines().filter(|l| l.contains("\"start\"")) {
        let start: u64 = json_field(l, "start").parse().unwrap();
        let len: u64 = json_field(l, "length").parse().unwrap();
        let hole = json_field(l, "data") == "false";
        let zero = json_field(l, "zero") == "true";
        push_run(&mut runs, start, start + len, hole, zero);
    }
    runs
}

/// The export's `base:allocation` extents, walked with block status requests.
fn nbd_map(img: &NbdImage) -> Runs {
    let mut runs = Runs::new();
    let mut at = 0;
    while at < img.size() {
        let st = img.block_status(at).unwrap();
        for e in st.allocation.unwrap() {
            let end = e.offset + e.len;
            let hole = e.flags & wire::STATE_HOLE != 0;
            let zero = e.flags & wire::STATE_ZERO != 0;
            push_run(&mut runs, e.offset.max(at), end, hole, zero);
            at = end;
        }
    }
    runs
}

/// The dirty ranges the export's bitmap context gives.
fn dirty(img: &NbdImage) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    img.for_each_dirty(|o, l| {
        out.push((o, l));
        Ok::<_, ImageError>(Visit::Continue)
    })
    .unwrap();
    out
}

/// What qemu-io's writes after the bitmap was added dirtied, in 64 KiB granules.
fn expected_dirty() -> Vec<(u64, u64)> {
    vec![
        (8 * MIB, 64 << 10),
        (10 * MIB, 128 << 10),
        (20 * MIB, 128 << 10),
        (21 * MIB, 64 << 10),
    ]
}

#[test]
fn qemu_nbd_export_reads_and_allocation_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), false);
    let (raw, map) = (convert(&img), qemu_map(&img));
    let sock = dir.path().join("nbd.sock");
    let _server = qemu_nbd(&img, &["-k", s(&sock)]);
    let nbd = Arc::new(open(&unix_uri(&sock), None).unwrap());
    assert_eq!(nbd.size(), 25166336);
    assert!(
        whole(Arc::clone(&nbd)) == raw,
        "the export reads as qemu-img convert"
    );
    let mut odd = vec![0u8; 70001];
    nbd.read_at(&mut odd, 5 * MIB - 12345).unwrap();
    let at = (5 * MIB - 12345) as usize;
    assert!(odd[..] == raw[at..at + 70001]);
    assert_eq!(nbd_map(&nbd), map);
}

/// A server that takes several clients and says they see the same data is read through
/// several connections, and reads the same bytes; one that takes one client, through one.
#[test]
fn reads_go_through_several_connections_when_the_server_allows_it() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), false);
    let raw = convert(&img);
    let sock = dir.path().join("multi.sock");
    let _server = qemu_nbd(&img, &["-k", s(&sock), "-e", "4"]);
    let nbd = Arc::new(open(&unix_uri(&sock), None).unwrap());
    assert_eq!(nbd.connections(), 4);
    assert_eq!(
        nbd.reads_in_flight(),
        16,
        "four reads in flight per connection"
    );
    assert!(whole(Arc::clone(&nbd)) == raw, "the same bytes");
    drop(nbd);
    let one = dir.path().join("one.sock");
    let _single = qemu_nbd(&img, &["-k", s(&one)]);
    let nbd = open(&unix_uri(&one), None).unwrap();
    assert_eq!(nbd.connections(), 1);
}

#[test]
fn qemu_nbd_over_tcp_reads_the_same_bytes() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), false);
    let raw = convert(&img);
    // A free port now; should qemu-nbd lose it to another process, the next try takes another.
    for attempt in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = qemu_nbd(&img, &["-b", "127.0.0.1", "-p", &port.to_string()]);
        let uri = format!("nbd://127.0.0.1:{port}/drive0");
        match open(&uri, None) {
            Ok(nbd) => {
                assert!(whole(Arc::new(nbd)) == raw);
                return;
            }
            Err(e) if attempt < 4 && server.0.try_wait().unwrap().is_some() => {
                eprintln!("qemu-nbd did not start on port {port}: {e}");
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn qemu_nbd_dirty_bitmap_extents_are_the_granules_qemu_io_wrote() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), true);
    let sock = dir.path().join("nbd.sock");
    let _server = qemu_nbd(&img, &["-k", s(&sock), "-B", "daily"]);
    let nbd = open(&unix_uri(&sock), Some("daily")).unwrap();
    assert_eq!(dirty(&nbd), expected_dirty());
}

#[test]
fn qemu_storage_daemon_nbd_export_of_a_bitmap_gives_the_same_extents() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), true);
    let raw = convert(&img);
    let sock = dir.path().join("qsd.sock");
    let file = format!(
        "driver=file,node-name=file0,filename={},read-only=on",
        s(&img)
    );
    let nbd_server = format!("addr.type=unix,addr.path={}", s(&sock));
    let _server = spawn(
        "qemu-storage-daemon",
        &[
            "--blockdev",
            &file,
            "--blockdev",
            "driver=qcow2,node-name=disk0,file=file0,read-only=on",
            "--nbd-server",
            &nbd_server,
            "--export",
            "type=nbd,id=exp0,node-name=disk0,name=drive0,bitmaps.0=daily",
        ],
    );
    let nbd = Arc::new(open(&unix_uri(&sock), Some("daily")).unwrap());
    assert_eq!(dirty(&nbd), expected_dirty());
    assert!(whole(nbd) == raw);
}

#[test]
fn nbd_refusals_name_the_export_the_bitmap_or_the_socket() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), true);
    let sock = dir.path().join("nbd.sock");
    let _server = qemu_nbd(&img, &["-k", s(&sock), "-B", "daily"]);
    let err = |r: Result<NbdImage, ImageError>| r.expect_err("refused").to_string();
    let uri = format!("nbd+unix:///nope?socket={}", sock.display());
    let e = err(open(&uri, None));
    assert!(e.contains("no export named 'nope'"), "{e}");
    let e = err(open(&unix_uri(&sock), Some("weekly")));
    assert!(
        e.contains("did not grant metadata context 'qemu:dirty-bitmap:weekly'"),
        "{e}"
    );
    let gone = NbdUri::parse(&unix_uri(&dir.path().join("none.sock"))).unwrap();
    let e = err(NbdImage::open(&gone, &NbdOptions::default()));
    assert!(
        e.starts_with("cannot connect to the NBD server at unix socket"),
        "{e}"
    );
    // The export still serves after the refusals.
    assert_eq!(open(&unix_uri(&sock), None).unwrap().size(), 25166336);
}
