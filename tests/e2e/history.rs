//! qcow2 replicas that keep history: `blkdelta receive R.qcow2` keeps every snapshot a stream
//! reaches as an internal snapshot of the replica, with the source snapshot's id, name, dates
//! and vm clock, so that the replica can be restored from, sent on, and rolled back by QEMU's
//! own tools.
//!
//! QEMU is the oracle: after every receive `qemu-img check` finds no error and no leak, and
//! `qemu-img convert -l snapshot.name=X -O raw` of the replica equals that of the source for
//! every snapshot `qemu-img snapshot -l` lists.
//!
//! `week` builds the source (snapshots mon..fri) and checks a replica against it; `qemu`
//! reads what QEMU's tools say of an image; `layout` finds and patches qcow2 structures in
//! the file; `truth` checks what `status` says after a fault. One module per area after
//! them.

mod layout;
mod qemu;
mod truth;
mod week;

mod behind_its_back;
mod clusters;
mod crash;
mod end_to_end;
mod formats;
mod full_disk;
mod hostile;
mod rollback;
