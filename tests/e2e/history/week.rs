//! The source of these tests, a qcow2 image with one internal snapshot per step (a working
//! week, mon..fri, for most), and the checks of a replica against it: the snapshots QEMU
//! lists, their table entries and their exports.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::layout::Layout;
use super::qemu::{assert_clean, export_reverted, snapshot_names, snapshots};
use crate::common::{
    arg, assert_same_file, checksum, export, io, pipe_args_ok, qemu_io, random, snapshot, spec,
    status_text, Scratch, Write,
};

/// The snapshots of the week.
pub const DAYS: [&str; 5] = ["mon", "tue", "wed", "thu", "fri"];

/// The vm clock (ns) patched into the table entries of wed and fri.
pub const VM_CLOCKS: [(usize, u64); 2] = [(2, 3_000_000_042), (4, 86_400_000_000_007)];

/// The fields of a snapshot's table entry that a replica keeps as the source has them.
const KEPT_FIELDS: [&str; 6] = [
    "id",
    "date-sec",
    "date-nsec",
    "vm-clock-sec",
    "vm-clock-nsec",
    "vm-state-size",
];

/// The writes of each day of a 32 MiB disk: `mib` MiB of random data (one more on mon), and
/// patterns covering parts of clusters, zeroed and discarded ranges.
pub fn week_steps(mib: u64) -> Vec<(&'static str, Vec<Write>)> {
    let days = vec![
        vec![
            random(0, mib + 1, 1),
            io("write -P 0x11 12M 100k"),
            io("write -P 0x12 20M 4097"),
        ],
        vec![
            random(2, mib, 2),
            io("write -z 12M 512k"),
            io("discard 20M 64k"),
            io("write -P 0x21 30000 7000"),
        ],
        vec![
            random(16, mib, 3),
            io("discard 0 1M"),
            io("write -P 0x31 5M 4097"),
        ],
        vec![
            random(24, mib, 4),
            io("write -z 16M 1M"),
            io("write -P 0x41 30M 512k"),
        ],
        vec![
            random(6, mib, 5),
            io("discard 24M 1M"),
            io("write -P 0x51 1M 300k"),
            io("write -z 28M 100k"),
        ],
    ];
    DAYS.into_iter().zip(days).collect()
}

/// A source image with its snapshots, and qemu's exports of them (made once).
pub struct Source {
    pub s: Scratch,
    pub img: PathBuf,
    pub snaps: Vec<&'static str>,
    /// Export each snapshot at its own size (the disk was resized between snapshots).
    pub resized: bool,
    digests: RefCell<HashMap<String, String>>,
}

impl Source {
    /// The week on a 32 MiB disk with 64 KiB clusters, `mib` MiB of random data a day; wed
    /// and fri carry a vm clock, as a snapshot of a running VM does (qemu-img records none:
    /// their table entries are patched).
    pub fn week(mib: u64) -> Source {
        let src = Source::build("32M", "", week_steps(mib));
        let layout = Layout::open(&src.img);
        for (index, nsec) in VM_CLOCKS {
            layout.set_vm_clock(index, nsec);
        }
        src
    }

    /// An image of `size` (`-o opts`) with one snapshot per step.
    pub fn build(size: &str, opts: &str, steps: Vec<(&'static str, Vec<Write>)>) -> Source {
        let s = Scratch::new();
        let img = s.history("vm.qcow2", size, opts, &steps);
        Source::of(s, img, steps.iter().map(|(n, _)| *n).collect())
    }

    /// An image already made in `s`, whose snapshots are `snaps`.
    pub fn of(s: Scratch, img: PathBuf, snaps: Vec<&'static str>) -> Source {
        Source {
            s,
            img,
            snaps,
            resized: false,
            digests: RefCell::new(HashMap::new()),
        }
    }

    /// Writes into the source with qemu-io and snapshots it as `name`: one more step.
    pub fn add(&mut self, name: &'static str, writes: &[&str]) {
        let writes: Vec<String> = writes.iter().map(|w| w.to_string()).collect();
        qemu_io(&self.img, &writes);
        snapshot(&self.img, name);
        self.snaps.push(name);
    }

    /// `IMG@SNAPS`.
    pub fn spec(&self, snaps: &str) -> String {
        spec(&self.img, snaps)
    }

    /// The snapshots from the first through `last`.
    pub fn through(&self, last: &str) -> Vec<&'static str> {
        let k = self.index(last);
        self.snaps[..=k].to_vec()
    }

    pub fn index(&self, snap: &str) -> usize {
        self.snaps
            .iter()
            .position(|s| *s == snap)
            .unwrap_or_else(|| panic!("no snapshot {snap} in {:?}", self.snaps))
    }

    /// qemu's raw export of a snapshot of the source, made once.
    pub fn export(&self, snap: &str) -> PathBuf {
        let e = self.s.path(&format!("source-{snap}.raw"));
        if !e.exists() {
            self.export_into(&self.img, snap, &e);
        }
        e
    }

    fn export_into(&self, img: &Path, snap: &str, out: &Path) {
        if self.resized {
            export_reverted(img, snap, out);
        } else {
            export(img, Some(snap), out);
        }
    }

    /// `blkdelta checksum IMG@SNAP`, found once.
    pub fn digest(&self, snap: &str) -> String {
        let mut d = self.digests.borrow_mut();
        d.entry(snap.to_string())
            .or_insert_with(|| checksum(&self.spec(snap), &[]))
            .clone()
    }

    /// `send IMG@FIRST | receive REPLICA EXTRA`, then `send IMG@FIRST..UPTO | receive` unless
    /// `upto` is the first; each leaves the replica clean.
    pub fn replicate(&self, replica: &Path, upto: &str, extra: &[&str]) {
        let first = self.snaps[0];
        pipe_args_ok(&[&self.spec(first)], replica, extra);
        assert_clean(replica, "after the seed");
        if upto != first {
            pipe_args_ok(&[&self.spec(&format!("{first}..{upto}"))], replica, extra);
            assert_clean(replica, "after the incremental");
        }
    }

    /// A new replica `name` in the scratch directory, replicated through `upto`.
    pub fn replica(&self, name: &str, upto: &str) -> PathBuf {
        let r = self.s.path(name);
        self.replicate(&r, upto, &[]);
        r
    }

    /// The replica lists exactly `snaps` (each once, in order), each with the source
    /// snapshot's table entry, each exporting as the source's; `qemu-img check` is clean.
    pub fn assert_history(&self, replica: &Path, snaps: &[&str], what: &str) {
        self.assert_exports(replica, snaps, what);
        let source = snapshots(&self.img);
        for snap in snapshots(replica) {
            let name = snap["name"].as_str().unwrap();
            let theirs = source
                .iter()
                .find(|s| s["name"] == name)
                .unwrap_or_else(|| panic!("{what}: no {name} in the source"));
            for field in KEPT_FIELDS {
                assert_eq!(
                    snap[field], theirs[field],
                    "{what}: {field} of {name}: replica {snap}, source {theirs}"
                );
            }
        }
    }

    /// The replica lists exactly `snaps` (each once, in order) and each of them that the
    /// source has exports as the source's; `qemu-img check` is clean.
    pub fn assert_exports(&self, replica: &Path, snaps: &[&str], what: &str) {
        assert_clean(replica, what);
        let names = snapshot_names(replica);
        assert_eq!(names, snaps, "{what}: the replica's snapshots");
        for name in names.iter().filter(|n| self.snaps.contains(&n.as_str())) {
            let out = self.s.path(&format!("replica-{name}.raw"));
            self.export_into(replica, name, &out);
            assert_same_file(&out, &self.export(name));
        }
    }

    /// `status` says the replica holds `snap`, its active layer exports as that snapshot of
    /// the source, and `checksum` of the replica gives that snapshot's digest.
    pub fn assert_holds(&self, replica: &Path, snap: &str, what: &str) {
        let st = status_text(replica, &[]);
        assert!(
            st.contains(&format!("holds snapshot '{snap}'")),
            "{what}: status does not say it holds {snap}:\n{st}"
        );
        let out = self.s.path("replica-active.raw");
        export(replica, None, &out);
        assert_same_file(&out, &self.export(snap));
        assert_eq!(
            checksum(arg(replica), &[]),
            self.digest(snap),
            "{what}: checksum of the replica holding {snap}"
        );
    }
}

/// A file's bytes (or its absence), kept to check that something wrote nothing to it.
pub struct Untouched {
    path: PathBuf,
    bytes: Option<Vec<u8>>,
}

impl Untouched {
    pub fn new(path: &Path) -> Untouched {
        Untouched {
            path: path.to_path_buf(),
            bytes: std::fs::read(path).ok(),
        }
    }

    /// The file is as it was (still missing if it was).
    pub fn assert(&self, what: &str) {
        let now = std::fs::read(&self.path).ok();
        match (&self.bytes, &now) {
            (None, None) => {}
            (None, Some(_)) => panic!("{what}: {:?} was created", self.path),
            (Some(_), None) => panic!("{what}: {:?} was removed", self.path),
            (Some(a), Some(b)) => assert!(a == b, "{what}: {:?} was written", self.path),
        }
    }
}
