//! What the end-to-end tests share: fixture images built with qemu-img and qemu-io (qemu's
//! raw export is the oracle), running blkdelta and reading what it says, file and stream
//! helpers, child processes, loop devices and mounts undone by guards, NBD servers, a real
//! sshd, a qemu-storage-daemon standing in for a running VM, and the tools the tests need.

pub mod child;
pub mod daemon;
pub mod devices;
pub mod files;
pub mod images;
pub mod nbd;
pub mod replica;
pub mod run;
pub mod sshd;
pub mod stream;
pub mod tools;

pub use child::{Reaped, Receiver};
pub use daemon::{have_storage_daemon, Daemon};
pub use devices::{free_bytes, Loop, Mounted};
pub use files::{
    allocated_bytes, assert_same_file, assert_same_prefix, flip_bytes, punch_hole, read_range,
    sparse_file, truncated_copy, write_at, write_random, write_text, KIB, MIB,
};
pub use images::{
    delete_snapshot, drop_cache, export, io, qemu_io, random, snapshot, spec, Scratch, Write,
};
pub use nbd::QemuNbd;
pub use replica::{adopt_replica, lock_held, state_of};
pub use run::{
    arg, assert_ok, assert_refused, bin, blkdelta, blkdelta_env, blkdelta_in, blkdelta_ok,
    checksum, checksum_with_note, holds, one_error_line, one_line_failure, pipe, pipe_args,
    pipe_args_in, pipe_args_ok, receive_file, run, run_pipe, seeded_with_s0_s1, send_file,
    send_pipe_receive, send_to_file, status_env, status_text, stderr,
};
pub use sshd::{have_ssh, Sshd};
pub use stream::{record_at, records, records_of, Rec};
pub use tools::have;
