//! `blkdelta sync`: one replication cycle (snapshot the source, send from the newest snapshot
//! the replica shares with it into a `blkdelta receive`, prune both sides), here, over a real
//! sshd on loopback in both directions, and from a running VM.
//!
//! QEMU is the oracle: after every cycle the replica (a raw file, or qemu's raw export of a
//! qcow2 replica's active layer) equals `qemu-img convert -l snapshot.name=NEWEST -O raw` of
//! the source, and `qemu-img check` finds no error and no leak in a qcow2 replica. A cycle
//! killed at any step leaves both images clean, `status` truthful and the next cycle right.
//!
//! `fixture` runs sync, writes between cycles and checks a replica against the source; one
//! module per area after it. A test marked `#[ignore = "defect: …"]` fails on a defect of
//! sync that it names.

mod fixture;

mod bases;
mod cli;
mod cycles;
mod kills;
mod live;
mod locking;
mod remote;
