//! Which undo stream an apply writes, continues or starts again, or why it refuses one.

use std::path::Path;

use super::*;
use crate::state::absolute_display;
use crate::undo::{undo_header, UndoWriter};

fn with_undo(path: &Path, overrides: Overrides) -> ReceiveOptions {
    ReceiveOptions {
        overrides,
        undo: Some(path.to_path_buf()),
        ..ReceiveOptions::default()
    }
}

fn undo_of(
    h: &StreamHeader,
    prior: Option<ReplicaState>,
    o: &ReceiveOptions,
) -> Result<Option<UndoMode>, Option<&'static str>> {
    match plan(h, prior, &unchanged(), o) {
        Ok(p) => {
            if let (Some((path, _)), Some(want)) = (&p.undo, &o.undo) {
                assert_eq!(path, want);
            }
            Ok(p.undo.map(|(_, m)| m))
        }
        Err(ReceiveError::Refused { switch, .. }) => Err(switch),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[test]
#[rustfmt::skip]
fn undo_rules() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (snap("a", 1), snap("b", 2), snap("c", 3));
    let a_b = header(vec![inc(&a, &b)]);
    let new = dir.path().join("new.undo");
    let none = Overrides::default();
    let holds_a = || Some(holding(&a, &[]));

    // A new file for a new apply.
    assert_eq!(undo_of(&a_b, holds_a(), &with_undo(&new, none)), Ok(Some(UndoMode::Create)));
    // An existing file that is not an unused undo stream of this transition.
    let other = dir.path().join("other");
    std::fs::write(&other, b"keep me").unwrap();
    assert_eq!(undo_of(&a_b, holds_a(), &with_undo(&other, none)), Err(None));
    assert_eq!(undo_of(&a_b, holds_a(), &with_undo(&other, Overrides::all())), Err(None));
    // An undo stream created and never used (the apply was killed before it recorded
    // anything) is started again; one of another transition is not.
    let unused = dir.path().join("unused.undo");
    drop(UndoWriter::create(&unused, undo_header(&a_b.transitions[0], &a_b.source, SIZE)).unwrap());
    assert_eq!(undo_of(&a_b, holds_a(), &with_undo(&unused, none)), Ok(Some(UndoMode::Restart)));
    let b_c = header(vec![inc(&b, &c)]);
    let holds_b = Some(holding(&b, &[&a]));
    assert_eq!(undo_of(&b_c, holds_b.clone(), &with_undo(&unused, none)), Err(None));
    // A complete undo stream is never started again.
    let done = dir.path().join("done.undo");
    let w = UndoWriter::create(&done, undo_header(&a_b.transitions[0], &a_b.source, SIZE)).unwrap();
    w.finish().unwrap();
    assert_eq!(undo_of(&a_b, holds_a(), &with_undo(&done, none)), Err(None));

    // Finishing an interrupted apply that wrote `u`: the same file continues it.
    let u = dir.path().join("u.undo");
    let mut st = applying(Some(&a), &b, 4096);
    st.in_progress.as_mut().unwrap().undo = Some(absolute_display(&u));
    assert_eq!(undo_of(&a_b, Some(st.clone()), &with_undo(&u, none)), Ok(Some(UndoMode::Continue)));
    assert_eq!(undo_of(&a_b, Some(st.clone()), &with_undo(&new, none)), Err(None));
    assert_eq!(undo_of(&a_b, Some(st.clone()), &ReceiveOptions::default()), Err(Some("--overwrite")));
    assert_eq!(undo_of(&a_b, Some(st.clone()), &with(Overrides { overwrite: true, ..none })), Ok(None));
    // An interrupted apply without an undo stream cannot start one part way.
    let plain = applying(Some(&a), &b, 4096);
    assert_eq!(undo_of(&a_b, Some(plain), &with_undo(&new, none)), Err(None));

    // Only one incremental transition has an undo stream.
    let seed = header(vec![full(&b)]);
    assert_eq!(undo_of(&seed, None, &with_undo(&new, Overrides::all())), Err(None));
    let two = header(vec![inc(&a, &b), inc(&b, &c)]);
    assert_eq!(undo_of(&two, holds_a(), &with_undo(&new, none)), Err(None));
    // ... counted from where the stream applies: the second transition alone is fine.
    assert_eq!(undo_of(&two, holds_b.clone(), &with_undo(&new, none)), Ok(Some(UndoMode::Create)));
    // Nothing applied, nothing saved.
    assert_eq!(undo_of(&a_b, holds_b, &with_undo(&new, none)), Ok(None));
    assert!(!new.exists());
}
