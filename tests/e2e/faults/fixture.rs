//! The fixture: an image with four snapshots, its streams, qemu's exports, and where each
//! record and header field lies in the stream.

use std::path::{Path, PathBuf};

use blkdelta_common::stream::StreamHeader;

use super::truth::Truth;
use super::{PREAMBLE, SNAPS};
use crate::common::{
    adopt_replica, io, random, receive_file, records, send_pipe_receive, send_to_file, spec,
    state_of, Rec, Scratch, Write,
};

/// Where the header's fields lie in the stream.
pub struct HeaderPos {
    pub stream_id: usize,
    pub from_guid: Vec<Option<usize>>,
    pub to_name: Vec<usize>,
    pub to_guid: Vec<usize>,
}

pub struct Fixture {
    pub s: Scratch,
    pub img: PathBuf,
    /// Full stream of `s0` (the seed).
    pub seed: PathBuf,
    /// `IMG@s0..s3`: three transitions.
    pub stream: PathBuf,
    pub bytes: Vec<u8>,
    /// qemu's raw exports of s0..s3.
    pub exports: Vec<PathBuf>,
    /// Every record after the header, in order.
    pub recs: Vec<Rec>,
    pub header: HeaderPos,
}

/// The writes of each step of the fixture image: a few MiB of random data, zeros, discards
/// and a pattern; with `extra_mib`, that many more random MiB per step (after the first) in
/// an area of its own.
fn steps(extra_mib: u64) -> Vec<(&'static str, Vec<Write>)> {
    let mut steps = vec![
        vec![random(0, 6, 11), io("write -P 0x11 24M 1M")],
        vec![
            random(4, 3, 12),
            io("write -z 0 1M"),
            io("discard 24M 1M"),
            io("write -P 0x22 10M 512k"),
        ],
        vec![
            random(8, 3, 13),
            io("discard 1M 1M"),
            io("write -z 5M 512k"),
            io("write -P 0x33 0 64k"),
        ],
        vec![
            random(16, 3, 14),
            io("write -z 8M 1M"),
            io("discard 4M 1M"),
            io("write -P 0x44 28M 1M"),
        ],
    ];
    if extra_mib > 0 {
        for (k, step) in steps.iter_mut().enumerate().skip(1) {
            step.push(random(32 + (k as u64 - 1) * 10, extra_mib, 20 + k as u64));
        }
    }
    SNAPS.into_iter().zip(steps).collect()
}

impl Fixture {
    /// A 32 MiB qcow2 image (`compat` 1.1: zero records; 0.10: discard records) with snapshots
    /// s0..s3 (see [`steps`]); with `extra_mib`, a 64 MiB image.
    pub fn new(compat: &str, extra_mib: u64) -> Fixture {
        let s = Scratch::new();
        let size = if extra_mib > 0 { "64M" } else { "32M" };
        let img = s.history(
            "vm.qcow2",
            size,
            &format!("compat={compat}"),
            &steps(extra_mib),
        );
        let exports = SNAPS.iter().map(|n| s.export_of(&img, n)).collect();
        let seed = s.path("s0.bd");
        send_to_file(&spec(&img, "s0"), &seed);
        let stream = s.path("s0s3.bd");
        send_to_file(&spec(&img, "s0..s3"), &stream);
        let bytes = std::fs::read(&stream).unwrap();
        let (h, recs) = records(&stream);
        let header = header_positions(&bytes, &h, &recs);
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
        // Every transition carries a few MiB: the sender checkpoints inside each of them.
        for t in 0..3 {
            assert!(
                f.records_of(t).iter().any(|r| r.kind == "checkpoint"),
                "no checkpoint record in transition {t}"
            );
        }
        f
    }

    pub fn spec(&self, snaps: &str) -> String {
        spec(&self.img, snaps)
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The snapshot-end records, one per transition.
    pub fn ends(&self) -> Vec<&Rec> {
        self.recs
            .iter()
            .filter(|r| r.kind == "snapshot-end")
            .collect()
    }

    pub fn end_record(&self) -> &Rec {
        self.recs.last().unwrap()
    }

    /// Where the header frame ends (the first record starts).
    pub fn header_end(&self) -> u64 {
        self.recs[0].at
    }

    /// The records of transition `t` before its snapshot-end: changes and checkpoints, and the
    /// snapshot-info right before the snapshot-end.
    pub fn records_of(&self, t: usize) -> Vec<&Rec> {
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
    pub fn changes(&self, t: usize) -> Vec<&Rec> {
        self.records_of(t)
            .into_iter()
            .filter(|r| r.is_change())
            .collect()
    }

    /// The `n`th record of type `kind` (a change or a checkpoint) in transition `t`.
    pub fn rec(&self, t: usize, kind: &str, n: usize) -> &Rec {
        self.records_of(t)
            .into_iter()
            .filter(|r| r.kind == kind)
            .nth(n)
            .unwrap_or_else(|| panic!("no {kind} record #{n} in transition {t}"))
    }

    /// Where the last verified point (a checkpoint or snapshot-end record) within the first
    /// `fed` bytes of the stream ends: a receiver that read them applied nothing after it.
    pub fn last_verified(&self, fed: u64) -> u64 {
        self.recs
            .iter()
            .filter(|r| matches!(r.kind, "checkpoint" | "snapshot-end") && r.end <= fed)
            .map(|r| r.end)
            .max()
            .unwrap_or(0)
    }

    /// Whether a receiver that saw only the first `fed` bytes (from a replica holding s0) may
    /// have started transition `t`: a verified point inside it vouched for some of its change
    /// records, which were then applied (the fixture's transitions never grow the disk).
    pub fn started_by(&self, t: usize, fed: u64) -> bool {
        let verified = self.last_verified(fed);
        self.changes(t).iter().any(|r| r.end <= verified)
    }

    /// The most a receiver that saw only the first `fed` bytes may call durable in transition
    /// `t`: the disk end of the last change record before the last checkpoint record it saw
    /// complete (0 before the first). A resume token may never point past a record that was
    /// not verified.
    pub fn verified_end(&self, t: usize, fed: u64) -> u64 {
        let (mut verified, mut applied) = (0, 0);
        for r in self.records_of(t).into_iter().filter(|r| r.end <= fed) {
            if r.kind == "checkpoint" {
                verified = applied;
            } else if r.is_change() {
                let (off, len) = r.disk_range();
                applied = off + len;
            }
        }
        verified
    }

    /// The frame holding stream byte `pos`: where it starts and ends (`(0, 12)`: the preamble).
    pub fn frame_at(&self, pos: u64) -> (u64, u64) {
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
    /// A replica in the scratch directory holding s0, with its state: a copy of one seeded
    /// once (seeding syncs; copying does not), with nothing of an earlier replica left.
    pub fn fresh_replica(&self, name: &str) -> PathBuf {
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
    pub fn seed_into(&self, replica: &Path, state: &[&str]) {
        let out = receive_file(&self.seed, replica, state);
        assert!(
            out.status.success(),
            "seed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(self.truth(replica, state, None), Truth::Holds(0));
    }
    /// Applies the intact stream again: it succeeds and the replica is exactly s3.
    pub fn reapply_gives_s3(&self, replica: &Path, state: &[&str]) {
        let out = receive_file(&self.stream, replica, state);
        assert!(
            out.status.success(),
            "re-applying the intact stream failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(self.truth(replica, state, None), Truth::Holds(3));
    }

    /// `blkdelta send --resume TOKEN IMG@s0..s3 | blkdelta receive REPLICA`: exactly s3.
    pub fn resume_gives_s3(&self, replica: &Path, state: &[&str], token: &str) {
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
    pub fn copy_replica(&self, replica: &Path, name: &str) -> PathBuf {
        let copy = self.s.path(name);
        std::fs::copy(replica, &copy).unwrap();
        std::fs::copy(state_of(replica), state_of(&copy)).unwrap();
        let hashes = |r: &Path| PathBuf::from(format!("{}.hashes", state_of(r).display()));
        let pieces = |r: &Path| PathBuf::from(format!("{}.hashes.pieces", state_of(r).display()));
        if pieces(replica).exists() {
            std::fs::copy(pieces(replica), pieces(&copy)).unwrap();
        }
        if hashes(replica).exists() {
            std::fs::copy(hashes(replica), hashes(&copy)).unwrap();
        }
        adopt_replica(&copy, &state_of(&copy));
        copy
    }
}

/// Where the header's fields lie: found by their values, which the library's reader decoded
/// from the header, searched for in order in the header's frame. Checks them against the
/// snapshot-end records.
fn header_positions(b: &[u8], h: &StreamHeader, recs: &[Rec]) -> HeaderPos {
    let header_end = recs[0].at as usize;
    let mut from = 0;
    let mut find = |needle: &[u8]| {
        let i = b[from..header_end]
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap_or_else(|| panic!("{needle:02x?} not in the header after byte {from}"));
        from += i + needle.len();
        from - needle.len()
    };
    let stream_id = find(&h.stream_id);
    let (mut from_guid, mut to_name, mut to_guid) = (Vec::new(), Vec::new(), Vec::new());
    for t in &h.transitions {
        from_guid.push(t.from.as_ref().map(|f| find(&f.guid)));
        // The name (u64 length, bytes) comes just before its GUID.
        let guid = find(&t.to.guid);
        to_name.push(guid - t.to.name.len());
        to_guid.push(guid);
    }
    let ends = recs.iter().filter(|r| r.kind == "snapshot-end");
    for (t, (name, end)) in SNAPS[1..].iter().zip(ends).enumerate() {
        assert_eq!(&b[to_name[t]..to_guid[t]], name.as_bytes());
        assert_eq!(b[to_guid[t]..to_guid[t] + 16], end.guid.unwrap());
    }
    HeaderPos {
        stream_id,
        from_guid,
        to_name,
        to_guid,
    }
}
