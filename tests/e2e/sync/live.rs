//! `blkdelta sync --qmp SOCKET --node NODE TARGET` of a running VM (a qemu-storage-daemon whose
//! writable NBD export stands in for the guest): each cycle's replica is the disk at its
//! moment, and `--keep 1` leaves the replica one blkdelta-* snapshot, the cycle's.

use std::path::Path;

use serde_json::Value;

use super::fixture::{field, names, qemu_check, replica_bytes, sync_json, to_the_next_second};
use crate::common::{arg, assert_same_file, have_storage_daemon, Daemon, Scratch};

/// `sync --json --qmp … --keep 1 REPLICA` of the daemon's disk.
fn live_cycle(d: &Daemon, replica: &Path) -> Value {
    let (qmp, nbd) = (d.path("qmp.sock"), d.path("guest.sock"));
    sync_json(&[
        "--qmp",
        arg(&qmp),
        "--node",
        "drive0",
        "--nbd-socket",
        arg(&nbd),
        "--keep",
        "1",
        arg(replica),
    ])
}

/// The replica's snapshots that sync made.
fn ours(replica: &Path) -> Vec<String> {
    let all = names(replica);
    all.into_iter()
        .filter(|n| n.starts_with("blkdelta-"))
        .collect()
}

#[test]
fn cycles_of_a_running_vm_are_the_disk_at_their_moment() {
    if !have_storage_daemon() {
        return;
    }
    let s = Scratch::new();
    let d = Daemon::start(&s);
    let replica = s.path("r.qcow2");
    let writes = ["write -P 7 4M 1M", "write -z 0 64k", "write -P 9 30M 2M"];
    for (round, write) in writes.iter().enumerate() {
        let moment = s.path(&format!("moment-{round}.raw"));
        d.snapshot_to(&moment);
        // A second apart: two cycles in one second take one name (a defect tested below).
        to_the_next_second();
        let v = live_cycle(&d, &replica);
        let kind = if round == 0 { "seed" } else { "incremental" };
        assert_eq!(field(&v, "kind"), Some(kind), "{v}");
        assert_same_file(&replica_bytes(&s, &replica), &moment);
        assert_eq!(
            ours(&replica),
            vec![field(&v, "to").unwrap()],
            "--keep 1: {v}"
        );
        d.write(write);
    }
    assert_eq!(d.leftovers(), (1, 0), "only the guest's export, no job");
    d.stop();
    qemu_check(&s.path("disk.qcow2"));
}

#[test]
fn live_cycles_in_one_second_name_their_snapshots_apart() {
    if !have_storage_daemon() {
        return;
    }
    let s = Scratch::new();
    let d = Daemon::start(&s);
    let replica = s.path("r.qcow2");
    to_the_next_second();
    let first = live_cycle(&d, &replica);
    d.write("write -P 5 1M 64k");
    let second = live_cycle(&d, &replica);
    assert_ne!(first["to"], second["to"], "{first} {second}");
    assert_eq!(ours(&replica), vec![field(&second, "to").unwrap()]);
    assert!(!second["pruned_replica"]
        .to_string()
        .contains(second["to"].as_str().unwrap()));
}

#[test]
fn a_live_cycle_says_it_starts_from_the_previous_one() {
    if !have_storage_daemon() {
        return;
    }
    let s = Scratch::new();
    let d = Daemon::start(&s);
    let replica = s.path("r.qcow2");
    let first = live_cycle(&d, &replica);
    d.write("write -P 5 1M 64k");
    to_the_next_second();
    let second = live_cycle(&d, &replica);
    assert_eq!(second["from"], first["to"], "{second}");
}
