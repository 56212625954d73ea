//! What `status` says after a fault, checked against qemu's exports and the records the
//! receiver saw.

use std::path::Path;

use super::fixture::Fixture;
use super::SNAPS;
use crate::common::{
    arg, assert_same_file, blkdelta_ok, checksum, checksum_with_note, read_range, status_text,
};

/// What `status` says a replica holds: a snapshot (index into s0..s3), or an apply in progress
/// towards one (`usize::MAX` when the name is not one of the stream's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    Holds(usize),
    InProgress(usize),
}

pub fn snap_index(name: &str) -> Option<usize> {
    SNAPS.iter().position(|n| *n == name)
}

/// The text between `prefix` + and the next `'`.
pub fn quoted_after(line: &str, prefix: &str) -> Option<String> {
    let rest = line.split_once(prefix)?.1;
    Some(rest.split_once('\'')?.0.to_string())
}

impl Fixture {
    /// What the replica holds, byte for byte, after a receiver starting from s0 read the
    /// records ending by stream byte `at` and then failed (at the record whose frame starts at
    /// `at`, or cut short there): every transition closed before it is complete, and of the
    /// one it belongs to, exactly the change records up to the last verified point before `at`
    /// are applied; those read after that point were held back. Nothing else differs from the
    /// last snapshot reached.
    pub fn image_before(&self, at: u64) -> Vec<u8> {
        let ends = self.ends();
        let t = ends.iter().filter(|e| e.end <= at).count();
        let verified = self.last_verified(at);
        let mut img = std::fs::read(&self.exports[t]).unwrap();
        if t < ends.len() {
            for r in self.changes(t).into_iter().filter(|r| r.end <= verified) {
                let (off, len) = r.disk_range();
                let range = off as usize..(off + len) as usize;
                img[range].copy_from_slice(&read_range(&self.exports[t + 1], off, len));
            }
        }
        img
    }

    /// Checks that the replica is exactly [`Fixture::image_before`] `at`: a record that was
    /// not verified (or not used) changed nothing, and neither did anything else.
    pub fn assert_image_before(&self, replica: &Path, at: u64, what: &str) {
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
                .filter(|r| r.is_change())
                .find(|r| {
                    let (off, len) = r.disk_range();
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
    pub fn expected_after(&self, prefix: u64) -> Truth {
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
    /// Checks that `status` tells the truth about `replica` and returns what it says. A held
    /// snapshot must be byte for byte qemu's export; "in progress" must name no held snapshot.
    /// With `fed`, the receiver saw only that many bytes of the stream (from a replica holding
    /// s0): it cannot have reached or started anything past them.
    pub fn truth(&self, replica: &Path, state: &[&str], fed: Option<u64>) -> Truth {
        self.truth_full(replica, state, fed).0
    }

    /// As [`Fixture::truth`], also returning the durable offset and the resume token of an
    /// apply in progress.
    pub fn truth_full(
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
            let (_, note) = checksum_with_note(arg(replica), state);
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
    pub fn assert_kept_hashes_hold(&self, replica: &Path, state: &[&str], k: usize) {
        let (digest, note) = checksum_with_note(arg(replica), state);
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
}
impl Fixture {
    /// After a receiver (from a replica holding s0) refused the record whose frame starts at
    /// `at`: status tells the truth and names nothing past `at`, the replica holds exactly
    /// what the records before it wrote, resuming a copy from the token status prints gives
    /// s3, and so does re-applying the intact stream. Returns whether it resumed.
    pub fn caught_before_use(&self, replica: &Path, at: u64, what: &str) -> bool {
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
