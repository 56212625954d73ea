//! Fault injection, end to end. The receiver is SIGKILLed at many points of a multi-snapshot
//! stream; the stream is truncated and altered byte by byte; the target's filesystem fills up
//! or turns read-only. After each fault the exit is non-zero with a one-line error, `status`
//! tells the truth (a snapshot it says the replica holds is byte for byte qemu's export of that
//! snapshot; otherwise it says "in progress" and names no held snapshot), and re-applying the
//! stream, or resuming it from the token `status` prints, gives exactly the last snapshot.
//!
//! The receiver holds every record back until a later checkpoint or snapshot-end record (a
//! verified point) vouches for the stream before it: after a failure, the replica is the last
//! snapshot reached plus exactly the records up to the last verified point the receiver read
//! completely, and nothing read after that point (a record cut short, damaged, or inserted)
//! reaches it.
//!
//! Tests that mount filesystems need root; they skip loudly (`SKIPPED: ...`) when mounting is
//! impossible. Mounts and child processes are undone by guards, even when a test fails.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SNAPS: [&str; 4] = ["s0", "s1", "s2", "s3"];
const MIB: u64 = 1 << 20;
/// Bytes of the preamble (magic, version): the header's frame starts here.
const PREAMBLE: u64 = 12;
/// Bytes of a frame header (docs/STREAM.md): `u8 type | u8 flags | u16 reserved |
/// u32 LE body_len | check[8]`; a record's body starts `FRAME` bytes after its `at`.
const FRAME: u64 = 16;
/// Bytes of a data record's fixed fields: offset u64, len u32, compression u8, hash[32].
const DATA_FIXED: u64 = 8 + 4 + 1 + 32;
/// `--checkpoint-bytes` for frequent checkpoints of the durable offset.
const CKPT: [&str; 2] = ["--checkpoint-bytes", "1048576"];

// ---------------------------------------------------------------------------------------------
// The fixture: an image with four snapshots, its streams, qemu's exports, the record positions.
// ---------------------------------------------------------------------------------------------

/// One record of `blkdelta dump --json`: its type, where its frame starts and ends.
struct Rec {
    kind: String,
    at: u64,
    end: u64,
    json: serde_json::Value,
}

/// Where the header's fields lie in the stream.
#[derive(Default)]
struct HeaderPos {
    stream_id: usize,
    from_guid: Vec<Option<usize>>,
    to_name: Vec<usize>,
    to_guid: Vec<usize>,
}

struct Fixture {
    s: Scratch,
    img: PathBuf,
    /// Full stream of `s0` (the seed).
    seed: PathBuf,
    /// `IMG@s0..s3`: three transitions.
    stream: PathBuf,
    bytes: Vec<u8>,
    /// qemu's raw exports of s0..s3.
    exports: Vec<PathBuf>,
    /// Every record after the header, in order.
    recs: Vec<Rec>,
    header: HeaderPos,
}

impl Fixture {
    /// A 32 MiB qcow2 image (`compat` 1.1: zero records; 0.10: discard records) with snapshots
    /// s0..s3, each step writing a few MiB of random data, zeros, discards and a pattern; with
    /// `extra_mib`, a 64 MiB image with that many more random MiB per step in an area of its
    /// own.
    fn new(compat: &str, extra_mib: u64) -> Fixture {
        let s = Scratch::new();
        let size = if extra_mib > 0 { "64M" } else { "32M" };
        let img = s.qcow2("vm.qcow2", size, &format!("compat={compat}"));
        let rnd = |name: &str, mib: u64, seed: u64| {
            s.random_file(name, (mib * MIB) as usize, seed)
                .display()
                .to_string()
        };
        let steps: [Vec<String>; 4] = [
            vec![
                format!("write -s {} 0 6M", rnd("r0", 6, 11)),
                "write -P 0x11 24M 1M".into(),
            ],
            vec![
                format!("write -s {} 4M 3M", rnd("r1", 3, 12)),
                "write -z 0 1M".into(),
                "discard 24M 1M".into(),
                "write -P 0x22 10M 512k".into(),
            ],
            vec![
                format!("write -s {} 8M 3M", rnd("r2", 3, 13)),
                "discard 1M 1M".into(),
                "write -z 5M 512k".into(),
                "write -P 0x33 0 64k".into(),
            ],
            vec![
                format!("write -s {} 16M 3M", rnd("r3", 3, 14)),
                "write -z 8M 1M".into(),
                "discard 4M 1M".into(),
                "write -P 0x44 28M 1M".into(),
            ],
        ];
        for (k, step) in steps.iter().enumerate() {
            let mut cmds = step.clone();
            if k > 0 && extra_mib > 0 {
                let e = rnd(&format!("e{k}"), extra_mib, 20 + k as u64);
                cmds.push(format!(
                    "write -s {e} {}M {extra_mib}M",
                    32 + (k as u64 - 1) * 10
                ));
            }
            qemu_io(&img, &cmds);
            snapshot(&img, SNAPS[k]);
        }
        let exports = SNAPS
            .iter()
            .map(|n| {
                let e = s.path(&format!("{n}.export"));
                export(&img, Some(n), &e);
                e
            })
            .collect();
        let seed = s.path("s0.bd");
        send_to_file(&format!("{}@s0", img.display()), &seed);
        let stream = s.path("s0s3.bd");
        send_to_file(&format!("{}@s0..s3", img.display()), &stream);
        let bytes = std::fs::read(&stream).unwrap();
        let recs = records(&stream, bytes.len() as u64);
        let header = header_positions(&bytes, &recs);
        let f = Fixture {
            s,
            img,
            seed,
            stream,
            bytes,
            exports,
            recs,
            header,
        };
        assert_eq!(f.ends().len(), 3, "three snapshot-end records");
        assert_eq!(f.recs.last().unwrap().kind, "end");
        for r in &f.recs {
            assert!(
                [
                    "data",
                    "zero",
                    "discard",
                    "checkpoint",
                    "snapshot-end",
                    "end"
                ]
                .contains(&r.kind.as_str()),
                "unexpected record {} at {}",
                r.kind,
                r.at
            );
        }
        // Every transition carries a few MiB: the sender checkpoints inside each of them.
        for t in 0..3 {
            assert!(
                f.records_of(t).iter().any(|r| r.kind == "checkpoint"),
                "no checkpoint record in transition {t}"
            );
        }
        f
    }

    fn spec(&self, snaps: &str) -> String {
        format!("{}@{snaps}", self.img.display())
    }

    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The snapshot-end records, one per transition.
    fn ends(&self) -> Vec<&Rec> {
        self.recs
            .iter()
            .filter(|r| r.kind == "snapshot-end")
            .collect()
    }

    fn end_record(&self) -> &Rec {
        self.recs.last().unwrap()
    }

    /// Where the header frame ends (the first record starts).
    fn header_end(&self) -> u64 {
        self.recs[0].at
    }

    /// The records of transition `t` before its snapshot-end: changes and checkpoints.
    fn records_of(&self, t: usize) -> Vec<&Rec> {
        let start = if t == 0 {
            self.header_end()
        } else {
            self.ends()[t - 1].end
        };
        let stop = self.ends()[t].at;
        self.recs
            .iter()
            .filter(|r| r.at >= start && r.at < stop)
            .collect()
    }

    /// The data, zero and discard records of transition `t` (no checkpoints).
    fn changes(&self, t: usize) -> Vec<&Rec> {
        self.records_of(t)
            .into_iter()
            .filter(|r| is_change(r))
            .collect()
    }

    /// The `n`th record of type `kind` (a change or a checkpoint) in transition `t`.
    fn rec(&self, t: usize, kind: &str, n: usize) -> &Rec {
        self.records_of(t)
            .into_iter()
            .filter(|r| r.kind == kind)
            .nth(n)
            .unwrap_or_else(|| panic!("no {kind} record #{n} in transition {t}"))
    }

    /// Where the last verified point (a checkpoint or snapshot-end record) within the first
    /// `fed` bytes of the stream ends: a receiver that read them applied nothing after it.
    fn last_verified(&self, fed: u64) -> u64 {
        self.recs
            .iter()
            .filter(|r| matches!(r.kind.as_str(), "checkpoint" | "snapshot-end") && r.end <= fed)
            .map(|r| r.end)
            .max()
            .unwrap_or(0)
    }

    /// Whether a receiver that saw only the first `fed` bytes (from a replica holding s0) may
    /// have started transition `t`: a verified point inside it vouched for some of its change
    /// records, which were then applied (the fixture's transitions never grow the disk).
    fn started_by(&self, t: usize, fed: u64) -> bool {
        let verified = self.last_verified(fed);
        self.changes(t).iter().any(|r| r.end <= verified)
    }

    /// The most a receiver that saw only the first `fed` bytes may call durable in transition
    /// `t`: the disk end of the last change record before the last checkpoint record it saw
    /// complete (0 before the first). A resume token may never point past a record that was
    /// not verified.
    fn verified_end(&self, t: usize, fed: u64) -> u64 {
        let (mut verified, mut applied) = (0, 0);
        for r in self.records_of(t).into_iter().filter(|r| r.end <= fed) {
            if r.kind == "checkpoint" {
                verified = applied;
            } else {
                let (off, len) = data_range(r);
                applied = off + len;
            }
        }
        verified
    }

    /// The frame holding stream byte `pos`: where it starts and ends (`(0, 12)`: the preamble).
    fn frame_at(&self, pos: u64) -> (u64, u64) {
        if pos < PREAMBLE {
            (0, PREAMBLE)
        } else if pos < self.header_end() {
            (PREAMBLE, self.header_end())
        } else {
            let r = self
                .recs
                .iter()
                .find(|r| r.at <= pos && pos < r.end)
                .unwrap_or_else(|| panic!("no record holds byte {pos}"));
            (r.at, r.end)
        }
    }

    /// What the replica holds, byte for byte, after a receiver starting from s0 read the
    /// records ending by stream byte `at` and then failed (at the record whose frame starts at
    /// `at`, or cut short there): every transition closed before it is complete, and of the
    /// one it belongs to, exactly the change records up to the last verified point before `at`
    /// are applied; those read after that point were held back. Nothing else differs from the
    /// last snapshot reached.
    fn image_before(&self, at: u64) -> Vec<u8> {
        let ends = self.ends();
        let t = ends.iter().filter(|e| e.end <= at).count();
        let verified = self.last_verified(at);
        let mut img = std::fs::read(&self.exports[t]).unwrap();
        if t < ends.len() {
            for r in self.changes(t).into_iter().filter(|r| r.end <= verified) {
                let (off, len) = data_range(r);
                let range = off as usize..(off + len) as usize;
                img[range].copy_from_slice(&read_range(&self.exports[t + 1], off, len));
            }
        }
        img
    }

    /// Checks that the replica is exactly [`Fixture::image_before`] `at`: a record that was
    /// not verified (or not used) changed nothing, and neither did anything else.
    fn assert_image_before(&self, replica: &Path, at: u64, what: &str) {
        let want = self.image_before(at);
        let got = std::fs::read(replica).unwrap();
        assert_eq!(got.len(), want.len(), "{what}: replica size");
        if got == want {
            return;
        }
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            let i = i as u64;
            let culprit = self
                .recs
                .iter()
                .filter(|r| is_change(r))
                .find(|r| {
                    let (off, len) = data_range(r);
                    off <= i && i < off + len
                })
                .map_or("no record".to_string(), |r| {
                    format!("the {} record at stream byte {}", r.kind, r.at)
                });
            panic!(
                "{what}: the replica differs at disk byte {i} from what the records verified \
                 before stream byte {at} wrote (the range of {culprit})"
            );
        }
    }

    /// What a receiver that saw the first `prefix` bytes (and failed at the next record)
    /// leaves behind, starting from a replica holding s0: every snapshot-end inside the prefix
    /// is reached, and the transition after the last one is in progress once a checkpoint
    /// record inside the prefix vouched for some of its change records (which are then
    /// applied). Change records after the last verified point start nothing.
    fn expected_after(&self, prefix: u64) -> Truth {
        let ends = self.ends();
        let reached = ends.iter().filter(|e| e.end <= prefix).count();
        if reached == ends.len() {
            return Truth::Holds(reached);
        }
        if self.started_by(reached, prefix) {
            Truth::InProgress(reached + 1)
        } else {
            Truth::Holds(reached)
        }
    }

    /// A replica in the scratch directory holding s0, with its state: a copy of one seeded
    /// once (seeding syncs; copying does not), with nothing of an earlier replica left.
    fn fresh_replica(&self, name: &str) -> PathBuf {
        let seeded = self.s.path("seeded.raw");
        if !seeded.exists() {
            self.seed_into(&seeded, &[]);
        }
        let r = self.s.path(name);
        for suffix in ["", ".blkdelta", ".blkdelta.lock", ".blkdelta.tmp"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", r.display()));
        }
        self.copy_replica(&seeded, name)
    }

    /// Seeds `replica` with s0 and checks that status says so.
    fn seed_into(&self, replica: &Path, state: &[&str]) {
        let out = receive_file(&self.seed, replica, state);
        assert!(
            out.status.success(),
            "seed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(self.truth(replica, state, None), Truth::Holds(0));
    }

    /// Checks that `status` tells the truth about `replica` and returns what it says. A held
    /// snapshot must be byte for byte qemu's export; "in progress" must name no held snapshot.
    /// With `fed`, the receiver saw only that many bytes of the stream (from a replica holding
    /// s0): it cannot have reached or started anything past them.
    fn truth(&self, replica: &Path, state: &[&str], fed: Option<u64>) -> Truth {
        self.truth_full(replica, state, fed).0
    }

    /// As [`Fixture::truth`], also returning the durable offset and the resume token of an
    /// apply in progress.
    fn truth_full(
        &self,
        replica: &Path,
        state: &[&str],
        fed: Option<u64>,
    ) -> (Truth, u64, Option<String>) {
        let st = status_text(replica, state);
        let line = st
            .lines()
            .find(|l| l.starts_with("state:"))
            .unwrap_or_else(|| panic!("no state line in:\n{st}"));
        if line.contains("in progress") {
            assert!(
                !st.contains("holds snapshot"),
                "in progress and holding a snapshot:\n{st}"
            );
            let from = quoted_after(line, "in progress, '");
            let to = quoted_after(line, "-> '")
                .unwrap_or_else(|| panic!("no target snapshot in: {line}"));
            let durable: u64 = line
                .split("durable below offset ")
                .nth(1)
                .and_then(|r| r.trim_end_matches(')').parse().ok())
                .unwrap_or_else(|| panic!("no durable offset in: {line}"));
            let token = st
                .lines()
                .find_map(|l| l.strip_prefix("resume token: "))
                .map(str::to_string);
            let to_index = SNAPS.iter().position(|n| *n == to);
            if let (Some(f), Some(t)) = (from.and_then(|f| snap_index(&f)), to_index) {
                assert_eq!(f + 1, t, "in progress between unrelated snapshots: {line}");
            }
            if let (Some(t), Some(fed)) = (to_index.filter(|&t| t > 0), fed) {
                assert!(
                    self.started_by(t - 1, fed),
                    "in progress towards '{to}' though the receiver saw only {fed} bytes, \
                     whose last verified point (ends at {}) vouches for none of that \
                     transition's records:\n{st}",
                    self.last_verified(fed)
                );
                let verified = self.verified_end(t - 1, fed);
                assert!(
                    durable <= verified,
                    "durable below {durable} though the receiver saw only {fed} bytes, whose \
                     last checkpoint record vouches for records up to disk offset {verified}:\n{st}"
                );
            }
            // Part way through an apply, the kept hashes stand for nothing: checksum reads.
            let (_, note) = checksum_with_note(replica, state);
            assert!(!note.contains("from the kept block hashes"), "{note}\n{st}");
            // An unparseable target name (a damaged header) is in progress all the same.
            (
                Truth::InProgress(to_index.unwrap_or(usize::MAX)),
                durable,
                token,
            )
        } else {
            let name = quoted_after(line, "holds snapshot '")
                .unwrap_or_else(|| panic!("status says neither held nor in progress:\n{st}"));
            let k = snap_index(&name)
                .unwrap_or_else(|| panic!("status claims a snapshot the stream never had:\n{st}"));
            assert_same_file(replica, &self.exports[k]);
            self.assert_kept_hashes_hold(replica, state, k);
            if let (true, Some(fed)) = (k > 0, fed) {
                let end = self.ends()[k - 1].end;
                assert!(
                    end <= fed,
                    "status holds '{name}' though the receiver saw only {fed} bytes, short of \
                     its snapshot-end (ends at {end})"
                );
            }
            (Truth::Holds(k), 0, None)
        }
    }

    /// A replica that holds snapshot `k` answers `checksum` from its kept block hashes with
    /// s`k`'s digest, and `verify` finds every block as they say.
    fn assert_kept_hashes_hold(&self, replica: &Path, state: &[&str], k: usize) {
        let (digest, note) = checksum_with_note(replica, state);
        assert!(note.contains("from the kept block hashes"), "{note}");
        assert_eq!(
            digest,
            checksum(self.exports[k].to_str().unwrap(), &[]),
            "kept hashes of a replica holding {}",
            SNAPS[k]
        );
        let mut args = vec!["verify", replica.to_str().unwrap()];
        args.extend_from_slice(state);
        blkdelta_ok(&args);
    }

    /// Applies the intact stream again: it succeeds and the replica is exactly s3.
    fn reapply_gives_s3(&self, replica: &Path, state: &[&str]) {
        let out = receive_file(&self.stream, replica, state);
        assert!(
            out.status.success(),
            "re-applying the intact stream failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(self.truth(replica, state, None), Truth::Holds(3));
    }

    /// `blkdelta send --resume TOKEN IMG@s0..s3 | blkdelta receive REPLICA`: exactly s3.
    fn resume_gives_s3(&self, replica: &Path, state: &[&str], token: &str) {
        let out = send_pipe_receive(
            &["send", "-q", "--resume", token, &self.spec("s0..s3")],
            replica,
            state,
        );
        assert!(
            out.status.success(),
            "resuming with {token} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(self.truth(replica, state, None), Truth::Holds(3));
    }

    /// Copies a replica and its state file (the state names no path of its own).
    fn copy_replica(&self, replica: &Path, name: &str) -> PathBuf {
        let copy = self.s.path(name);
        std::fs::copy(replica, &copy).unwrap();
        std::fs::copy(state_of(replica), state_of(&copy)).unwrap();
        let hashes = |r: &Path| PathBuf::from(format!("{}.hashes", state_of(r).display()));
        if hashes(replica).exists() {
            std::fs::copy(hashes(replica), hashes(&copy)).unwrap();
        }
        adopt_replica(&copy, &state_of(&copy));
        copy
    }
}

/// What `status` says a replica holds: a snapshot (index into s0..s3), or an apply in progress
/// towards one (`usize::MAX` when the name is not one of the stream's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Truth {
    Holds(usize),
    InProgress(usize),
}

fn snap_index(name: &str) -> Option<usize> {
    SNAPS.iter().position(|n| *n == name)
}

/// The text between `prefix` + and the next `'`.
fn quoted_after(line: &str, prefix: &str) -> Option<String> {
    let rest = line.split_once(prefix)?.1;
    Some(rest.split_once('\'')?.0.to_string())
}

fn state_of(replica: &Path) -> PathBuf {
    PathBuf::from(format!("{}.blkdelta", replica.display()))
}

/// `blkdelta checksum REPLICA`: the digest, and the note on stderr saying how it was found.
fn checksum_with_note(replica: &Path, state: &[&str]) -> (String, String) {
    let mut args = vec!["checksum", replica.to_str().unwrap()];
    args.extend_from_slice(state);
    let out = blkdelta_ok(&args);
    let digest = String::from_utf8(out.stdout).unwrap();
    let digest = digest.split_whitespace().next().unwrap().to_string();
    (digest, String::from_utf8(out.stderr).unwrap())
}

fn status_text(replica: &Path, state: &[&str]) -> String {
    let mut args = vec!["status", replica.to_str().unwrap()];
    args.extend_from_slice(state);
    String::from_utf8(blkdelta_ok(&args).stdout).unwrap()
}

/// The records of `dump --json`, each with where its frame ends.
fn records(stream: &Path, len: u64) -> Vec<Rec> {
    let out = blkdelta_ok(&["dump", "--json", stream.to_str().unwrap()]);
    let values: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(values[0]["record"], "header");
    let mut recs: Vec<Rec> = values[1..]
        .iter()
        .map(|v| Rec {
            kind: v["record"].as_str().unwrap().to_string(),
            at: v["at"].as_u64().unwrap(),
            end: 0,
            json: v.clone(),
        })
        .collect();
    for i in 0..recs.len() {
        recs[i].end = recs.get(i + 1).map_or(len, |n| n.at);
    }
    recs
}

/// Parses the header body (docs/STREAM.md) for the positions of its fields, checking them
/// against what `dump` says.
fn header_positions(b: &[u8], recs: &[Rec]) -> HeaderPos {
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
    // The header's body follows the preamble and its frame header.
    let body = (PREAMBLE + FRAME) as usize;
    let mut h = HeaderPos {
        stream_id: body,
        ..HeaderPos::default()
    };
    let mut p = body + 16 + 8;
    p += 8 + u64_at(p); // source.kind
    p += 8 + u64_at(p); // source.name
    let count = u64_at(p);
    p += 8;
    for _ in 0..count {
        let tag = b[p];
        p += 1;
        if tag == 1 {
            p += 8 + u64_at(p);
            h.from_guid.push(Some(p));
            p += 16;
        } else {
            h.from_guid.push(None);
        }
        h.to_name.push(p + 8);
        p += 8 + u64_at(p);
        h.to_guid.push(p);
        p += 16 + 8;
    }
    // Three totals and the resume offset (a field docs/STREAM.md does not list yet) follow.
    assert_eq!(p + 32, recs[0].at as usize, "header parsed to its end");
    for (t, name) in SNAPS[1..].iter().enumerate() {
        assert_eq!(&b[h.to_name[t]..h.to_name[t] + 2], name.as_bytes());
        let guid = recs
            .iter()
            .filter(|r| r.kind == "snapshot-end")
            .nth(t)
            .unwrap()
            .json["guid"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(hex(&b[h.to_guid[t]..h.to_guid[t] + 16]), guid);
    }
    h
}

fn is_change(r: &Rec) -> bool {
    matches!(r.kind.as_str(), "data" | "zero" | "discard")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks for the failure contract: exit status 1 and one line on stderr starting `blkdelta:`.
fn one_line_error(out: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: exit {:?}, stderr: {err}",
        out.status
    );
    assert!(err.starts_with("blkdelta: "), "{what}: {err}");
    assert!(err.ends_with('\n'), "{what}: {err:?}");
    assert_eq!(err.lines().count(), 1, "{what}: multi-line error:\n{err}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    err
}

/// `blkdelta SEND_ARGS | blkdelta receive -q TARGET RECV_EXTRA` through a real pipe; returns
/// the receiver's output after checking the sender succeeded.
fn send_pipe_receive(send_args: &[&str], target: &Path, recv_extra: &[&str]) -> Output {
    let (sent, recv) = run_pipe(None, send_args, target, recv_extra);
    assert!(
        sent.status.success(),
        "send {send_args:?} failed: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    recv
}

/// The bytes `[off, off+len)` of a file.
fn read_range(p: &Path, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap();
    buf
}

// ---------------------------------------------------------------------------------------------
// 1. SIGKILL at several points.
// ---------------------------------------------------------------------------------------------

/// A receiver reading from a pipe the test feeds; SIGKILLed and reaped when dropped.
struct Receiver {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Receiver {
    fn start(replica: &Path, extra: &[&str]) -> Receiver {
        let mut child = Command::new(bin())
            .args(["receive", "-q"])
            .arg(replica)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        Receiver { child, stdin }
    }

    /// Feeds `bytes` in 64 KiB pieces, pausing after every MiB: the receiver reads at our pace.
    fn feed(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        for (i, piece) in bytes.chunks(64 << 10).enumerate() {
            if let Err(e) = stdin.write_all(piece) {
                let err = self.stderr_after_exit();
                panic!("the receiver stopped reading ({e}): {err}");
            }
            if i % 16 == 15 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// Panics with the receiver's stderr if it has exited.
    fn assert_running(&mut self, what: &str) {
        if self.child.try_wait().unwrap().is_some() {
            let err = self.stderr_after_exit();
            panic!("{what}: the receiver exited before it was killed: {err}");
        }
    }

    fn stderr_after_exit(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = std::io::Read::read_to_string(e, &mut err);
        }
        err
    }

    /// Bytes written to the pipe that the receiver has not read yet.
    fn unread(&self) -> i32 {
        let fd = self.stdin.as_ref().unwrap().as_raw_fd();
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, which is valid for writes.
        let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
        assert_eq!(rc, 0, "FIONREAD on the pipe");
        n
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the test waits for between feeding and killing.
enum Wait {
    /// Kill at once: the receiver is busy with what it was just given.
    Now,
    /// Until the receiver has read everything fed and had time to apply it.
    Settle,
    /// Until `status` satisfies the predicate (the receiver recorded something).
    Status(fn(&str) -> bool),
}

struct KillPoint {
    what: String,
    fed: u64,
    /// Close stdin after feeding (the receiver may finish before the kill).
    close: bool,
    checkpoints: bool,
    wait: Wait,
    /// What status must say after the kill, when the point determines it.
    expect: Option<Truth>,
    /// The point waited for a checkpoint: the durable offset is above 0.
    checkpointed: bool,
}

fn polls(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn holds(name: &'static str) -> fn(&str) -> bool {
    match name {
        "s1" => |st| st.contains("holds snapshot 's1'"),
        "s2" => |st| st.contains("holds snapshot 's2'"),
        "s3" => |st| st.contains("holds snapshot 's3'"),
        _ => unreachable!(),
    }
}

#[test]
fn sigkill_at_many_points_of_a_multi_snapshot_stream() {
    if !have("qemu-img") {
        return;
    }
    let f = Fixture::new("1.1", 0);
    let ends = f.ends();
    let len = f.len();
    // The receiver applies records only once a checkpoint (or snapshot-end) record vouches
    // for them, and makes its durable offset advance only at checkpoint records.
    let first_ckpt = f.rec(0, "checkpoint", 0);
    let last_ckpt = f.rec(2, "checkpoint", 0);
    assert!(
        f.rec(0, "data", 0).at + 300_000 < first_ckpt.at,
        "the first data payload precedes the first checkpoint record"
    );
    let mut points = vec![
        KillPoint {
            // No checkpoint record seen: the records read are held back, nothing is written
            // and nothing started (the replica is exactly s0).
            what: "inside transition 0, in its first data payload, before any checkpoint".into(),
            fed: f.rec(0, "data", 0).at + 300_000,
            close: false,
            checkpoints: true,
            wait: Wait::Settle,
            checkpointed: false,
            expect: Some(Truth::Holds(0)),
        },
        KillPoint {
            // Every record before it is read, but none is applied: the checkpoint that would
            // vouch for them is not verified yet.
            what: "inside transition 0's first checkpoint record".into(),
            fed: first_ckpt.at + FRAME + 5,
            close: false,
            checkpoints: true,
            wait: Wait::Settle,
            checkpointed: false,
            expect: Some(Truth::Holds(0)),
        },
        KillPoint {
            what: "inside transition 0, after a checkpoint".into(),
            fed: first_ckpt.end + 1000,
            close: false,
            checkpoints: true,
            wait: Wait::Status(|st| {
                st.contains("'s0' -> 's1'") && !st.contains("durable below offset 0)")
            }),
            checkpointed: true,
            expect: Some(Truth::InProgress(1)),
        },
        KillPoint {
            what: "just before s1's snapshot-end".into(),
            fed: ends[0].at,
            close: false,
            checkpoints: false,
            wait: Wait::Settle,
            checkpointed: false,
            expect: Some(Truth::InProgress(1)),
        },
        KillPoint {
            what: "inside s1's snapshot-end frame header".into(),
            fed: ends[0].at + FRAME / 2,
            close: false,
            checkpoints: true,
            wait: Wait::Settle,
            checkpointed: false,
            expect: Some(Truth::InProgress(1)),
        },
        KillPoint {
            what: "inside s1's snapshot-end body".into(),
            fed: ends[0].at + FRAME + (ends[0].end - ends[0].at - FRAME) / 2,
            close: false,
            checkpoints: false,
            wait: Wait::Settle,
            checkpointed: false,
            expect: Some(Truth::InProgress(1)),
        },
        KillPoint {
            what: "right after s1's snapshot-end".into(),
            fed: ends[0].end,
            close: false,
            checkpoints: false,
            wait: Wait::Status(holds("s1")),
            checkpointed: false,
            expect: Some(Truth::Holds(1)),
        },
        KillPoint {
            what: "right after s2's snapshot-end".into(),
            fed: ends[1].end,
            close: false,
            checkpoints: true,
            wait: Wait::Status(holds("s2")),
            checkpointed: false,
            expect: Some(Truth::Holds(2)),
        },
        KillPoint {
            what: "inside the last transition, after a checkpoint".into(),
            fed: last_ckpt.end + 300_000,
            close: false,
            checkpoints: true,
            wait: Wait::Status(|st| {
                st.contains("'s2' -> 's3'") && !st.contains("durable below offset 0)")
            }),
            checkpointed: true,
            expect: Some(Truth::InProgress(3)),
        },
        KillPoint {
            what: "everything but the end record".into(),
            fed: f.end_record().at,
            close: false,
            checkpoints: false,
            wait: Wait::Status(holds("s3")),
            checkpointed: false,
            expect: Some(Truth::Holds(3)),
        },
        KillPoint {
            what: "the whole stream, stdin still open".into(),
            fed: len,
            close: false,
            checkpoints: true,
            wait: Wait::Status(holds("s3")),
            checkpointed: false,
            expect: Some(Truth::Holds(3)),
        },
        KillPoint {
            what: "the whole stream, stdin closed, killed at once".into(),
            fed: len,
            close: true,
            checkpoints: false,
            wait: Wait::Now,
            checkpointed: false,
            expect: None,
        },
    ];
    for pct in [20, 45, 70, 95] {
        points.push(KillPoint {
            what: format!("at once after {pct}% of the stream"),
            fed: len * pct / 100,
            close: false,
            checkpoints: pct % 10 == 5,
            wait: Wait::Now,
            checkpointed: false,
            expect: None,
        });
    }

    let mut resumed = 0;
    for p in &points {
        let what = format!("kill {} (byte {} of {len})", p.what, p.fed);
        let replica = f.fresh_replica("r.raw");
        let mut rx = Receiver::start(&replica, if p.checkpoints { &CKPT } else { &[] });
        rx.feed(&f.bytes[..p.fed as usize]);
        if p.close {
            drop(rx.stdin.take());
        }
        match p.wait {
            Wait::Now => {}
            Wait::Settle => {
                polls(
                    || {
                        rx.assert_running(&what);
                        rx.unread() == 0
                    },
                    &what,
                );
                std::thread::sleep(Duration::from_millis(300));
            }
            Wait::Status(pred) => polls(
                || {
                    rx.assert_running(&what);
                    pred(&status_text(&replica, &[]))
                },
                &what,
            ),
        }
        let _ = rx.child.kill();
        let exit = rx.child.wait().unwrap();
        if p.close {
            assert!(
                exit.signal() == Some(9) || exit.success(),
                "{what}: {exit:?}"
            );
        } else {
            assert_eq!(exit.signal(), Some(9), "{what}: not killed mid-stream");
        }
        drop(rx);

        let (truth, durable, token) = f.truth_full(&replica, &[], Some(p.fed));
        if let Some(want) = p.expect {
            assert_eq!(truth, want, "{what}");
        }
        if p.close && exit.success() {
            assert_eq!(truth, Truth::Holds(3), "{what}: exited 0");
        }
        if p.checkpointed {
            assert!(durable > 0, "{what}: no checkpoint recorded");
        }
        if !matches!(p.wait, Wait::Now) {
            // The receiver read everything fed: exactly what its verified points vouch for
            // was written, and nothing it held back.
            f.assert_image_before(&replica, p.fed, &what);
        }
        if let (Truth::InProgress(_), Some(token)) = (truth, &token) {
            // Resume a copy from the token; finish the original by re-applying the stream.
            let copy = f.copy_replica(&replica, "resumed.raw");
            f.resume_gives_s3(&copy, &[], token);
            resumed += 1;
        } else {
            assert!(
                !matches!(truth, Truth::InProgress(_)),
                "{what}: in progress without a resume token"
            );
        }
        f.reapply_gives_s3(&replica, &[]);
    }
    assert!(resumed >= 3, "only {resumed} kills left a resumable apply");
}

// ---------------------------------------------------------------------------------------------
// 2. Truncation.
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_streams_fail_and_leave_a_truthful_recoverable_replica() {
    if !have("qemu-img") {
        return;
    }
    let f = Fixture::new("1.1", 0);
    let len = f.len();
    let h = f.header_end();
    // Inside the preamble, the header's frame header and its body, every 5% of the stream,
    // and at the edges of the snapshot-end, checkpoint and end records: inside the frame
    // header, just past it, one byte short of the end, at the end.
    let mut cuts: Vec<u64> = vec![
        0,
        7,
        PREAMBLE,
        PREAMBLE + FRAME / 2,
        PREAMBLE + FRAME + 8,
        h / 2,
        h - 1,
        h,
    ];
    cuts.extend((1..20).map(|i| len * i / 20));
    let edges = |r: &Rec| [r.at + FRAME / 2, r.at + FRAME + 1, r.end - 1, r.end];
    for e in f.ends() {
        cuts.extend(edges(e));
    }
    for t in 0..3 {
        cuts.extend(edges(f.rec(t, "checkpoint", 0)));
    }
    let end = f.end_record();
    cuts.extend([end.at + FRAME / 2, end.at + FRAME, len - 1]);
    cuts.sort_unstable();
    cuts.dedup();
    let mut resumed = 0;
    for (i, &cut) in cuts.iter().enumerate() {
        let what = format!("cut at byte {cut} of {len}");
        let replica = f.fresh_replica("r.raw");
        let part = f.s.path("part.bd");
        std::fs::write(&part, &f.bytes[..cut as usize]).unwrap();
        // Frequent checkpoints (slow: a sync per MiB) where the resume token is used.
        let extra: &[&str] = if i % 3 == 0 { &CKPT } else { &[] };
        let out = receive_file(&part, &replica, extra);
        let err = one_line_error(&out, &what);
        assert!(
            err.contains(&format!("truncated after {cut} bytes")),
            "{what}: {err}"
        );
        let (truth, _, token) = f.truth_full(&replica, &[], Some(cut));
        assert_eq!(truth, f.expected_after(cut), "{what}");
        // Records after the last verified point before the cut were held back.
        f.assert_image_before(&replica, cut, &what);
        if let (Truth::InProgress(_), Some(token)) = (truth, &token) {
            assert!(err.contains("marked in progress"), "{what}: {err}");
            if i % 3 == 0 {
                let copy = f.copy_replica(&replica, "resumed.raw");
                f.resume_gives_s3(&copy, &[], token);
                resumed += 1;
            }
        }
        f.reapply_gives_s3(&replica, &[]);
    }
    assert!(resumed >= 3, "only {resumed} resumes tried");
}

// ---------------------------------------------------------------------------------------------
// 3. Byte flips.
// ---------------------------------------------------------------------------------------------

/// One altered byte, and the error the receiver must give at the frame holding it.
struct Flip {
    what: &'static str,
    pos: u64,
    xor: u8,
    /// The start of the error, when it is not the record check mismatch of that frame.
    error: Option<String>,
}

fn flip(what: &'static str, pos: u64, xor: u8) -> Flip {
    Flip {
        what,
        pos,
        xor,
        error: None,
    }
}

fn data_range(r: &Rec) -> (u64, u64) {
    (
        r.json["offset"].as_u64().unwrap(),
        r.json["len"].as_u64().unwrap(),
    )
}

/// The error for the frame at `at` of an altered stream whose check does not match, naming
/// the type and body length its (possibly altered) frame header gives.
fn check_mismatch(bytes: &[u8], at: u64) -> String {
    let a = at as usize;
    let body_len = u32::from_le_bytes(bytes[a + 4..a + 8].try_into().unwrap());
    format!(
        "blkdelta: corrupt stream at byte {at}: record check mismatch (type {}, {body_len} \
         bytes): the record was altered",
        bytes[a]
    )
}

impl Fixture {
    /// After a receiver (from a replica holding s0) refused the record whose frame starts at
    /// `at`: status tells the truth and names nothing past `at`, the replica holds exactly
    /// what the records before it wrote, resuming a copy from the token status prints gives
    /// s3, and so does re-applying the intact stream. Returns whether it resumed.
    fn caught_before_use(&self, replica: &Path, at: u64, what: &str) -> bool {
        let (truth, _, token) = self.truth_full(replica, &[], Some(at));
        assert_eq!(truth, self.expected_after(at), "{what}");
        self.assert_image_before(replica, at, what);
        let resumed = match (truth, token) {
            (Truth::InProgress(_), Some(token)) => {
                let copy = self.copy_replica(replica, "resumed.raw");
                self.resume_gives_s3(&copy, &[], &token);
                true
            }
            (Truth::InProgress(_), None) => panic!("{what}: in progress without a resume token"),
            _ => false,
        };
        self.reapply_gives_s3(replica, &[]);
        resumed
    }
}

#[test]
fn flipped_bytes_are_caught_and_never_recorded_as_a_snapshot() {
    if !have("qemu-img") {
        return;
    }
    let f = Fixture::new("1.1", 0);
    let ends = f.ends();
    let end = f.end_record();
    let h = &f.header;
    let plain = f
        .changes(1)
        .into_iter()
        .filter(|r| r.kind == "data" && r.json["compression"] == "none")
        .nth(1)
        .expect("a plain data record in transition 1");
    let zstd = f
        .changes(0)
        .into_iter()
        .find(|r| r.kind == "data" && r.json["compression"] == "zstd")
        .expect("a zstd data record in transition 0");
    let hashed = f.rec(2, "data", 0);
    let zero = f.rec(0, "zero", 0);
    let ckpt = f.rec(1, "checkpoint", 0);
    let flips = vec![
        Flip {
            what: "magic",
            pos: 1,
            xor: 0x20,
            error: Some("blkdelta: not a blkdelta stream".into()),
        },
        Flip {
            what: "version",
            pos: 8,
            xor: 0x01,
            error: Some("blkdelta: unsupported stream version 3".into()),
        },
        flip("the header's type", PREAMBLE, 0x01),
        flip("the header's check", PREAMBLE + 8 + 3, 0x01),
        flip("stream id", h.stream_id as u64 + 5, 0x01),
        flip("transition 0's to name", h.to_name[0] as u64, 0x01),
        flip(
            "the last transition's to name",
            h.to_name[2] as u64 + 1,
            0x01,
        ),
        flip(
            "transition 0's from GUID",
            h.from_guid[0].unwrap() as u64 + 3,
            0x80,
        ),
        flip(
            "the last transition's to GUID",
            h.to_guid[2] as u64 + 15,
            0x01,
        ),
        // Payloads are covered by their record's hash of the plain bytes, not the frame check.
        Flip {
            what: "a plain data payload",
            pos: plain.at + FRAME + DATA_FIXED + 777_777,
            xor: 0x04,
            error: Some(format!(
                "blkdelta: checksum mismatch in data record at stream byte {} (disk offset {})",
                plain.at,
                data_range(plain).0
            )),
        },
        Flip {
            what: "a zstd data payload",
            pos: zstd.at + FRAME + DATA_FIXED + zstd.json["payload_len"].as_u64().unwrap() / 2,
            xor: 0x04,
            // Decompression (bounded to the record's length) fails on this one, before the
            // hash of the plain bytes would.
            error: Some(format!(
                "blkdelta: corrupt stream at byte {}: data record for disk offset {}: \
                 Destination buffer is too small",
                zstd.at,
                data_range(zstd).0
            )),
        },
        // offset u64, len u32, compression u8, then the hash: its last byte.
        flip("a data record's hash", hashed.at + FRAME + 13 + 31, 0x04),
        flip("a data record's body length", plain.at + 5, 0x04),
        flip("a data record's check", hashed.at + 8 + 7, 0x04),
        flip(
            "a zero record's offset (out of range)",
            zero.at + FRAME + 7,
            0x01,
        ),
        flip(
            "a zero record's length (out of range)",
            zero.at + FRAME + 8 + 6,
            0x40,
        ),
        flip(
            "a zero record's type (unknown, not optional)",
            zero.at,
            0x0c,
        ),
        flip("a zero record's check", zero.at + 8, 0x01),
        Flip {
            what: "a zero record's reserved bits",
            pos: zero.at + 2,
            xor: 0x01,
            error: Some(format!(
                "blkdelta: corrupt stream at byte {}: frame with reserved bits set",
                zero.at
            )),
        },
        // transition u32, name (u64 length, "s1"), then the GUID.
        flip(
            "s1's snapshot-end GUID",
            ends[0].at + FRAME + 4 + 8 + 2 + 4,
            0x10,
        ),
        flip("s2's snapshot-end prefix hash", ends[1].end - 7, 0x01),
        flip(
            "s3's snapshot-end transition index",
            ends[2].at + FRAME,
            0x01,
        ),
        flip("a checkpoint's prefix hash", ckpt.end - 1, 0x01),
        flip("a checkpoint's optional flag", ckpt.at + 1, 0x01),
        // records u64, then the stream hash.
        flip(
            "the end record's stream hash",
            end.at + FRAME + 8 + 20,
            0x01,
        ),
        flip("the end record's record count", end.at + FRAME, 0x01),
    ];
    let bad = f.s.path("bad.bd");
    let mut resumed = 0;
    for (i, flip) in flips.iter().enumerate() {
        let what = format!("flip of {} at byte {}", flip.what, flip.pos);
        // Every flip is caught at the frame that holds it, before that record is used.
        let (at, _) = f.frame_at(flip.pos);
        let mut bytes = f.bytes.clone();
        bytes[flip.pos as usize] ^= flip.xor;
        let want = flip
            .error
            .clone()
            .unwrap_or_else(|| check_mismatch(&bytes, at));
        std::fs::write(&bad, &bytes).unwrap();
        let replica = f.fresh_replica("r.raw");
        let extra: &[&str] = if i % 2 == 0 { &CKPT } else { &[] };
        let err = one_line_error(&receive_file(&bad, &replica, extra), &what);
        assert!(err.starts_with(&want), "{what}: want {want:?}, got: {err}");
        resumed += usize::from(f.caught_before_use(&replica, at, &what));
    }
    assert!(resumed >= 5, "only {resumed} flips left a resumable apply");

    // A forged but well-framed record passes its own check; the prefix hash of the record
    // vouching for it catches it. The same snapshots sent again give the same layout (only the
    // stream id and so every hash differ): its checkpoint, snapshot-end and end records are
    // well framed, and vouch for other bytes.
    let again = f.s.path("again.bd");
    send_to_file(&f.spec("s0..s3"), &again);
    let other = std::fs::read(&again).unwrap();
    let other_recs = records(&again, other.len() as u64);
    assert_eq!(other.len(), f.bytes.len(), "the same layout");
    assert!(
        other_recs
            .iter()
            .zip(&f.recs)
            .all(|(a, b)| a.at == b.at && a.kind == b.kind),
        "the same layout"
    );
    for (i, r) in [f.rec(1, "checkpoint", 0), ends[1], end]
        .into_iter()
        .enumerate()
    {
        let what = format!(
            "the well-framed {} record of another stream at {}",
            r.kind, r.at
        );
        let frame = r.at as usize..r.end as usize;
        let mut bytes = f.bytes.clone();
        assert!(bytes[frame.clone()] != other[frame.clone()], "{what}");
        bytes[frame.clone()].copy_from_slice(&other[frame]);
        std::fs::write(&bad, &bytes).unwrap();
        let replica = f.fresh_replica("r.raw");
        let extra: &[&str] = if i % 2 == 0 { &CKPT } else { &[] };
        let err = one_line_error(&receive_file(&bad, &replica, extra), &what);
        assert!(
            err.starts_with("blkdelta: stream hash mismatch"),
            "{what}: {err}"
        );
        f.caught_before_use(&replica, r.at, &what);
    }

    // A well-framed record of this very stream inserted where it does not belong, in bounds
    // and in order: transition 0's last data record, repeated before its second checkpoint.
    // Nothing rejects it on its own; it is held back with the records read since the first
    // checkpoint, and the second checkpoint's prefix hash catches it: none of them is applied.
    let late = f
        .changes(0)
        .into_iter()
        .rfind(|r| r.kind == "data")
        .unwrap();
    let ck = f.rec(0, "checkpoint", 1);
    let (late_off, late_len) = data_range(late);
    assert!(
        late.at > ck.end,
        "the repeated record comes later in the stream"
    );
    let what = format!(
        "the data record at {} repeated before the checkpoint record at {}",
        late.at, ck.at
    );
    let mut bytes = f.bytes[..ck.at as usize].to_vec();
    bytes.extend_from_slice(&f.bytes[late.at as usize..late.end as usize]);
    bytes.extend_from_slice(&f.bytes[ck.at as usize..]);
    std::fs::write(&bad, &bytes).unwrap();
    let replica = f.fresh_replica("r.raw");
    let err = one_line_error(&receive_file(&bad, &replica, &CKPT), &what);
    assert!(
        err.starts_with("blkdelta: stream hash mismatch"),
        "{what}: {err}"
    );
    assert_eq!(
        f.truth(&replica, &[], Some(ck.at)),
        Truth::InProgress(1),
        "{what}: the first checkpoint vouched for records"
    );
    assert!(
        read_range(&replica, late_off, late_len) == read_range(&f.exports[0], late_off, late_len),
        "{what}: the inserted record reached the replica"
    );
    // Every record before `ck.at` lies where it does in the intact stream.
    assert!(
        f.caught_before_use(&replica, ck.at, &what),
        "{what}: resumed"
    );

    // Trailing garbage after the end record is an altered stream too.
    let mut bytes = f.bytes.clone();
    bytes.push(0);
    std::fs::write(&bad, &bytes).unwrap();
    let replica = f.fresh_replica("r.raw");
    one_line_error(&receive_file(&bad, &replica, &[]), "a byte after the end");
    assert_eq!(f.truth(&replica, &[], None), Truth::Holds(3));
}

/// The damage a flipped offset would do: the record lands on [2 MiB, 3 MiB), s0's data that
/// no transition of the stream touches again.
fn offset_flip_cases() -> Vec<(&'static str, &'static str, &'static str, u8)> {
    vec![
        // (fixture compat, record type, what, xor on offset byte 2)
        ("1.1", "zero", "zero record 0 -> 2 MiB", 0x20),
        ("0.10", "discard", "discard record 0 -> 2 MiB", 0x20),
        ("1.1", "data", "data record 4 MiB -> 2 MiB", 0x60),
    ]
}

/// The disk offset in the body of the change record whose frame starts at `at`.
fn offset_field(bytes: &[u8], at: u64) -> u64 {
    let body = (at + FRAME) as usize;
    u64::from_le_bytes(bytes[body..body + 8].try_into().unwrap())
}

#[test]
fn a_flipped_record_offset_never_leaves_a_wrong_snapshot_recorded() {
    if !have("qemu-img") {
        return;
    }
    for (compat, kind, what, xor) in offset_flip_cases() {
        let f = Fixture::new(compat, 0);
        let r = f.rec(0, kind, 0);
        let (off, _) = data_range(r);
        let mut bytes = f.bytes.clone();
        bytes[(r.at + FRAME + 2) as usize] ^= xor;
        assert_eq!(offset_field(&bytes, r.at), 2 * MIB, "{what}: from {off}");
        let bad = f.s.path("bad.bd");
        std::fs::write(&bad, &bytes).unwrap();
        let replica = f.fresh_replica("r.raw");
        let err = one_line_error(&receive_file(&bad, &replica, &[]), what);
        // Caught at the damaged record itself, before any of it reaches the replica.
        let want = check_mismatch(&bytes, r.at);
        assert!(err.starts_with(&want), "{what}: want {want:?}, got: {err}");
        assert_eq!(
            f.truth(&replica, &[], Some(r.at)),
            f.expected_after(r.at),
            "{what}"
        );
        assert!(
            read_range(&replica, 2 * MIB, MIB) == read_range(&f.exports[0], 2 * MIB, MIB),
            "{what}: the damaged record reached [2 MiB, 3 MiB)"
        );
        f.assert_image_before(&replica, r.at, what);
        let out = receive_file(&f.stream, &replica, &[]);
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let st = status_text(&replica, &[]);
        assert!(st.contains("holds snapshot 's3'"), "{what}: {st}");
        assert!(
            read_range(&replica, 2 * MIB, MIB) == read_range(&f.exports[3], 2 * MIB, MIB),
            "{what}: after re-applying the intact stream, status says 'holds snapshot s3' but \
             [2 MiB, 3 MiB) of the replica differs from qemu's export of s3"
        );
        // And all of it is s3.
        assert_eq!(f.truth(&replica, &[], None), Truth::Holds(3), "{what}");
    }
}

#[test]
fn the_resume_token_after_a_flipped_offset_skips_nothing() {
    if !have("qemu-img") {
        return;
    }
    let f = Fixture::new("1.1", 0);
    // A zero record after a checkpoint record: when it comes, the durable offset has advanced.
    let zero = f
        .changes(0)
        .into_iter()
        .filter(|r| r.kind == "zero")
        .find(|r| f.verified_end(0, r.at) > 0)
        .expect("a zero record after a checkpoint record in transition 0");
    let (off, len) = data_range(zero);
    // Its offset moves by 1 MiB, still inside the disk.
    let mut bytes = f.bytes.clone();
    bytes[(zero.at + FRAME + 2) as usize] ^= 0x10;
    let flipped = offset_field(&bytes, zero.at);
    assert_eq!(flipped.abs_diff(off), MIB, "from {off} to {flipped}");
    assert!(flipped + len <= 32 * MIB);
    let bad = f.s.path("bad.bd");
    std::fs::write(&bad, &bytes).unwrap();
    let replica = f.fresh_replica("r.raw");
    let err = one_line_error(&receive_file(&bad, &replica, &CKPT), "zero offset flip");
    let want = check_mismatch(&bytes, zero.at);
    assert!(err.starts_with(&want), "want {want:?}, got: {err}");
    let (truth, durable, token) = f.truth_full(&replica, &[], Some(zero.at));
    assert_eq!(truth, Truth::InProgress(1));
    // Something is durable, but never the damaged record, which was not applied.
    assert!(durable > 0, "no checkpoint recorded");
    assert!(
        durable <= off,
        "durable below {durable}, past the damaged record at disk offset {off}"
    );
    f.assert_image_before(&replica, zero.at, "zero offset flip");
    // Re-applying the whole intact stream repairs everything here...
    let copy = f.copy_replica(&replica, "reapplied.raw");
    f.reapply_gives_s3(&copy, &[]);
    // ...and so must resuming from the token status prints: it may not claim durable the
    // record at `off`, which was never applied.
    f.resume_gives_s3(&replica, &[], &token.expect("a resume token"));
}

#[test]
fn the_in_progress_hints_work_with_a_state_elsewhere() {
    if !have("qemu-img") {
        return;
    }
    let f = Fixture::new("1.1", 0);
    let state_file = f.s.path("elsewhere.state");
    let state = ["--state", state_file.to_str().unwrap()];
    let replica = f.s.path("r.raw");
    f.seed_into(&replica, &state);
    let part = f.s.path("part.bd");
    // Inside transition 1, after a checkpoint record vouched for some of its records.
    let cut = f.rec(1, "checkpoint", 0).end + 1000;
    std::fs::write(&part, &f.bytes[..cut as usize]).unwrap();
    let mut extra = state.to_vec();
    extra.extend_from_slice(&CKPT);
    let err = one_line_error(&receive_file(&part, &replica, &extra), "truncated");
    assert_eq!(f.truth(&replica, &state, Some(cut)), Truth::InProgress(2));
    assert!(!state_of(&replica).exists(), "a state beside the replica");
    // The error tells the user to run `blkdelta status ...`: that command must work as printed.
    let hint = err
        .split("token '")
        .nth(1)
        .and_then(|r| r.split("' prints").next())
        .unwrap_or_else(|| panic!("no status hint in: {err}"));
    let args: Vec<&str> = hint.split_whitespace().skip(1).collect();
    let out = blkdelta(&args);
    assert!(
        out.status.success(),
        "the hinted `{hint}` fails: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = status_text(&replica, &state);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        st,
        "the hinted `{hint}` reads another state"
    );
    // So must status's "or:" line, SOURCE being the image: it resumes to s3.
    let or = st
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("or: "))
        .unwrap_or_else(|| panic!("no 'or:' line in:\n{st}"));
    let (send_cmd, recv_cmd) = or
        .split_once(" | ")
        .unwrap_or_else(|| panic!("no pipe in: {or}"));
    let spec = f.spec("s0..s3");
    let send_args: Vec<&str> = send_cmd
        .split_whitespace()
        .skip(1)
        .map(|a| if a == "SOURCE" { spec.as_str() } else { a })
        .collect();
    assert!(send_args.contains(&spec.as_str()), "no SOURCE in: {or}");
    let recv_args: Vec<&str> = recv_cmd.split_whitespace().skip(1).collect();
    assert_eq!(
        recv_args[..2],
        ["receive", replica.to_str().unwrap()],
        "{or}"
    );
    assert!(recv_args.contains(&"--state"), "{or}");
    let out = send_pipe_receive(&send_args, Path::new(recv_args[1]), &recv_args[2..]);
    assert!(
        out.status.success(),
        "the hinted `{or}` fails: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(f.truth(&replica, &state, None), Truth::Holds(3));
}

// ---------------------------------------------------------------------------------------------
// Mounts for the filesystem faults.
// ---------------------------------------------------------------------------------------------

/// A mount made by the test, unmounted when dropped.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    /// Mounts with `mount ARGS... DIR`; `None` (after a loud skip notice) when impossible.
    fn new(test: &str, args: &[&str], dir: &Path) -> Option<Mounted> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(args).arg(dir).output();
        match out {
            Ok(o) if o.status.success() => Some(Mounted {
                dir: dir.to_path_buf(),
            }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: {test}: cannot `mount {}` because: {} (needs root)",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: {test}: cannot run mount because: {e}");
                None
            }
        }
    }

    fn tmpfs(test: &str, dir: &Path, size: &str) -> Option<Mounted> {
        Mounted::new(
            test,
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            dir,
        )
    }

    fn remount(&self, opts: &str) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.dir));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Free bytes of the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs only writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs {dir:?}");
    st.f_bavail as u64 * st.f_frsize as u64
}

// ---------------------------------------------------------------------------------------------
// 4. A full target filesystem.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_full_target_filesystem_fails_cleanly_and_recovers_once_it_grows() {
    const TEST: &str = "a_full_target_filesystem_fails_cleanly_and_recovers_once_it_grows";
    if !have("qemu-img") || !have("mount") {
        return;
    }
    // About 24 MiB of data by s3 on a 12 or 14 MiB filesystem; the seed (7 MiB) fits.
    let f = Fixture::new("1.1", 6);
    for state_elsewhere in [false, true] {
        let variant = if state_elsewhere {
            "state elsewhere, resumed"
        } else {
            "state beside the replica, re-applied"
        };
        let dir = f.s.path(if state_elsewhere {
            "small-b"
        } else {
            "small-a"
        });
        // 14 MiB: transition 0 fits, transition 1 does not; 12 MiB: transition 0 does not.
        let size = if state_elsewhere { "12m" } else { "14m" };
        let Some(mount) = Mounted::tmpfs(TEST, &dir, size) else {
            return;
        };
        let replica = dir.join("r.raw");
        let state_file = f.s.path("elsewhere.state");
        let state_file = state_file.to_str().unwrap();
        let state: &[&str] = if state_elsewhere {
            &["--state", state_file]
        } else {
            &[]
        };
        f.seed_into(&replica, state);
        let mut extra = state.to_vec();
        extra.extend_from_slice(&CKPT);
        let out = receive_file(&f.stream, &replica, &extra);
        let err = one_line_error(&out, variant);
        assert!(err.contains("No space left on device"), "{variant}: {err}");
        let (truth, _, token) = f.truth_full(&replica, state, None);
        assert_ne!(truth, Truth::Holds(3), "{variant}: the stream cannot fit");
        eprintln!(
            "full filesystem, {variant}: {} -> {truth:?}",
            err.trim_end()
        );

        mount.remount("size=64m");
        match (state_elsewhere, truth, token) {
            (true, Truth::InProgress(_), Some(token)) => f.resume_gives_s3(&replica, state, &token),
            (true, other, _) => panic!("{variant}: expected a resumable apply, got {other:?}"),
            (false, _, _) => f.reapply_gives_s3(&replica, state),
        }
        // The replica is still usable afterwards: applying the stream again changes nothing.
        f.reapply_gives_s3(&replica, state);
    }
}

#[test]
fn a_failure_is_reported_at_once_while_the_input_stays_open() {
    const TEST: &str = "a_failure_is_reported_at_once_while_the_input_stays_open";
    if !have("qemu-img") || !have("mount") {
        return;
    }
    // A seed fed up to a checkpoint and applied; then the filesystem fills up, and the seed is
    // fed up to the next checkpoint and no further, the input staying open as behind a
    // connection that hangs. The receiver has read all it was given when it fails to apply
    // it: it must say so then, not once the input moves or closes.
    let f = Fixture::new("1.1", 0);
    let dir = f.s.path("small");
    let Some(_mount) = Mounted::tmpfs(TEST, &dir, "32m") else {
        return;
    };
    let bytes = std::fs::read(&f.seed).unwrap();
    let recs = records(&f.seed, bytes.len() as u64);
    let mut checkpoints = recs.iter().filter(|r| r.kind == "checkpoint");
    let (first, second) = (checkpoints.next().unwrap(), checkpoints.next().unwrap());
    assert!(
        recs.iter()
            .any(|r| r.kind == "data" && r.at > first.at && r.at < second.at),
        "data between the two checkpoints"
    );
    let mut r = Receiver::start(&dir.join("r.raw"), &[]);
    r.feed(&bytes[..first.end as usize]);
    polls(|| r.unread() == 0, "the receiver to read the first part");
    std::thread::sleep(Duration::from_millis(500));
    r.assert_running("after the first checkpoint");
    let mut filler = std::fs::File::create(dir.join("filler")).unwrap();
    let zeros = vec![0u8; 1 << 20];
    while filler.write_all(&zeros).is_ok() {}
    drop(filler);
    r.feed(&bytes[first.end as usize..second.end as usize]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = r.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the receiver failed but waited for its input to move or close"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = r.stderr_after_exit();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_state_write_failing_at_a_snapshot_end_never_records_the_snapshot() {
    const TEST: &str = "a_state_write_failing_at_a_snapshot_end_never_records_the_snapshot";
    if !have("qemu-img") || !have("mount") {
        return;
    }
    // A transition that only allocates: 3 MiB of new data. With exactly that much space free,
    // every data write fits and the state update at the snapshot-end is what fails.
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "16M", "");
    let r0 = s.random_file("r0", 2 << 20, 31);
    qemu_io(&img, &[format!("write -s {} 0 2M", r0.display())]);
    snapshot(&img, "a");
    let r1 = s.random_file("r1", 3 << 20, 32);
    qemu_io(&img, &[format!("write -s {} 8M 3M", r1.display())]);
    snapshot(&img, "b");
    let seed = s.path("a.bd");
    send_to_file(&format!("{}@a", img.display()), &seed);
    let inc = s.path("ab.bd");
    send_to_file(&format!("{}@a..b", img.display()), &inc);
    let want = s.path("b.export");
    export(&img, Some("b"), &want);

    let dir = s.path("small");
    let Some(_mount) = Mounted::tmpfs(TEST, &dir, "16m") else {
        return;
    };
    let replica = dir.join("r.raw");
    let clear = || {
        for name in [
            "r.raw",
            "r.raw.blkdelta",
            "r.raw.blkdelta.lock",
            "r.raw.blkdelta.tmp",
        ] {
            let _ = std::fs::remove_file(dir.join(name));
        }
    };
    let seeded = || {
        clear();
        let out = receive_file(&seed, &replica, &[]);
        assert!(out.status.success());
        free_bytes(&dir)
    };
    // Measure what the transition takes, then leave exactly that much free.
    let before = seeded();
    assert!(receive_file(&inc, &replica, &[]).status.success());
    let needed = before - free_bytes(&dir);
    assert!(needed >= 3 << 20, "the transition took only {needed} bytes");
    let free = seeded();
    let filler = s.path("small/filler");
    let mut fill = std::fs::File::create(&filler).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = free - needed;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        fill.write_all(&zeros[..n]).unwrap();
        left -= n as u64;
    }
    fill.sync_all().unwrap();
    drop(fill);
    assert_eq!(free_bytes(&dir), needed);

    let out = receive_file(&inc, &replica, &[]);
    let err = one_line_error(&out, "state write at the snapshot-end");
    assert!(
        err.contains("replica state") && err.contains("No space left on device"),
        "the state update should have been what failed: {err}"
    );
    let st = status_text(&replica, &[]);
    assert!(st.contains("in progress, 'a' -> 'b'"), "{st}");
    assert!(!st.contains("holds snapshot"), "{st}");

    std::fs::remove_file(&filler).unwrap();
    let out = receive_file(&inc, &replica, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status_text(&replica, &[]).contains("holds snapshot 'b'"));
    assert_same_file(&replica, &want);
}

// ---------------------------------------------------------------------------------------------
// 5. A read-only target.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_read_only_target_is_refused_and_nothing_changes() {
    const TEST: &str = "a_read_only_target_is_refused_and_nothing_changes";
    if !have("qemu-img") || !have("mount") {
        return;
    }
    let f = Fixture::new("1.1", 0);

    // (a) Replica and state on a tmpfs remounted read-only.
    let dir = f.s.path("ro-a");
    let Some(mount) = Mounted::tmpfs(TEST, &dir, "64m") else {
        return;
    };
    let replica = dir.join("r.raw");
    f.seed_into(&replica, &[]);
    let state_before = std::fs::read(state_of(&replica)).unwrap();
    mount.remount("ro");
    let err = one_line_error(
        &receive_file(&f.stream, &replica, &[]),
        "read-only filesystem",
    );
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(f.truth(&replica, &[], None), Truth::Holds(0));
    assert_eq!(std::fs::read(state_of(&replica)).unwrap(), state_before);
    mount.remount("rw");
    f.reapply_gives_s3(&replica, &[]);
    drop(mount);

    // (b) The replica through a read-only bind mount, its state elsewhere (writable).
    let src = f.s.path("rw-b");
    std::fs::create_dir_all(&src).unwrap();
    let dir = f.s.path("ro-b");
    let state_file = f.s.path("b.state");
    let state = ["--state", state_file.to_str().unwrap()];
    let Some(bind) = Mounted::new(TEST, &["--bind", src.to_str().unwrap()], &dir) else {
        return;
    };
    let replica = dir.join("r.raw");
    f.seed_into(&replica, &state);
    let state_before = std::fs::read(&state_file).unwrap();
    bind.remount("bind,ro");
    let err = one_line_error(
        &receive_file(&f.stream, &replica, &state),
        "read-only bind mount",
    );
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(f.truth(&replica, &state, None), Truth::Holds(0));
    assert_eq!(std::fs::read(&state_file).unwrap(), state_before);
    bind.remount("bind,rw");
    f.reapply_gives_s3(&replica, &state);
    drop(bind);

    // (c) A writable replica whose state lives on a read-only filesystem.
    let dir = f.s.path("ro-c");
    let Some(mount) = Mounted::tmpfs(TEST, &dir, "1m") else {
        return;
    };
    let state_file = dir.join("c.state");
    let state = ["--state", state_file.to_str().unwrap()];
    let replica = f.s.path("c.raw");
    f.seed_into(&replica, &state);
    let state_before = std::fs::read(&state_file).unwrap();
    mount.remount("ro");
    let err = one_line_error(
        &receive_file(&f.stream, &replica, &state),
        "read-only state",
    );
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(f.truth(&replica, &state, None), Truth::Holds(0));
    assert_eq!(std::fs::read(&state_file).unwrap(), state_before);
    mount.remount("rw");
    f.reapply_gives_s3(&replica, &state);
}
