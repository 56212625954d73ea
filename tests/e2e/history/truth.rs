//! What `status` says of a qcow2 replica after a fault, checked against QEMU: either it
//! holds a snapshot, the last one the replica lists, and its active layer exports as that
//! snapshot of the source; or an apply is in progress from the last snapshot listed to the
//! next, with a resume token. Either way `qemu-img check` finds no error and no leak.

use std::path::Path;

use serde_json::Value;

use super::week::Source;
use crate::common::{arg, assert_ok, blkdelta_ok, receive_file, send_pipe_receive, status_text};

/// What a replica of the source's snapshots holds after a fault (indexes into its snapshots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Truth {
    Holds(usize),
    InProgress { from: usize, token: String },
}

/// The text between `prefix` and the next `'`.
fn quoted_after<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.split_once(prefix)?.1.split_once('\'').map(|(q, _)| q)
}

/// `blkdelta status --json REPLICA`.
fn status_json(r: &Path) -> Value {
    serde_json::from_slice(&blkdelta_ok(&["status", "--json", arg(r)]).stdout).unwrap()
}

/// Checks that `status` tells the truth about `r` (see the module documentation), and that
/// it names no snapshot past the `reached` first ones (those whose snapshot-end the receiver
/// could have read).
pub fn truth(src: &Source, r: &Path, reached: usize, what: &str) -> Truth {
    let st = status_text(r, &[]);
    let line = st
        .lines()
        .find(|l| l.starts_with("state:"))
        .unwrap_or_else(|| panic!("{what}: no state line in:\n{st}"));
    if line.contains("in progress") {
        assert!(!st.contains("holds snapshot"), "{what}:\n{st}");
        let from = quoted_after(line, "in progress, '")
            .unwrap_or_else(|| panic!("{what}: no start snapshot in: {line}"));
        let to = quoted_after(line, "-> '")
            .unwrap_or_else(|| panic!("{what}: no target snapshot in: {line}"));
        let f = src.index(from);
        assert_eq!(src.index(to), f + 1, "{what}: {line}");
        assert!(f < reached, "{what}: past what the receiver read: {line}");
        src.assert_history(r, &src.through(from), what);
        let json = status_json(r);
        let token = json["resume_token"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: in progress without a resume token: {json}"));
        Truth::InProgress {
            from: f,
            token: token.to_string(),
        }
    } else {
        let held = quoted_after(line, "holds snapshot '")
            .unwrap_or_else(|| panic!("{what}: neither held nor in progress:\n{st}"));
        let k = src.index(held);
        assert!(k < reached, "{what}: past what the receiver read: {line}");
        src.assert_history(r, &src.through(held), what);
        src.assert_holds(r, held, what);
        Truth::Holds(k)
    }
}

/// Finishes the apply of `stream` (from the source's first snapshot through its last)
/// after a fault: resumes it from the token when there is one and `resume` asks (a new
/// stream from the source), else applies the same stream again. The replica then has every
/// snapshot of the source.
pub fn finish(src: &Source, r: &Path, stream: &Path, truth: &Truth, resume: bool, what: &str) {
    let all = src.spec(&format!("{}..{}", src.snaps[0], src.snaps.last().unwrap()));
    match truth {
        Truth::InProgress { token, .. } if resume => {
            let out = send_pipe_receive(&["send", "-q", "--resume", token, &all], r, &[]);
            assert!(
                out.status.success(),
                "{what}: resuming with {token} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        _ => assert_ok(
            &receive_file(stream, r, &[]),
            &format!("{what}: re-applying"),
        ),
    }
    let last = src.snaps.last().unwrap();
    src.assert_history(r, &src.snaps, &format!("{what}, then finished"));
    src.assert_holds(r, last, &format!("{what}, then finished"));
}
