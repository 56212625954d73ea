#!/usr/bin/env bash
# Builds blkdelta, makes a small qcow2 image with three snapshots, seeds a replica from the
# first, brings it to the third incrementally, and checks the replica against qemu's export;
# then does the same into a qcow2 replica that keeps every snapshot.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "demo: needs qemu-img (apt-get install qemu-utils)" >&2; exit 1; }
cargo build --release --quiet
bd=$PWD/target/release/blkdelta
work=${DEMO_DIR:-$PWD/example-run}
rm -rf "$work" && mkdir -p "$work" && cd "$work"

echo "== making vm.qcow2 (1 GiB virtual) with snapshots mon, wed, fri"
qemu-img create -q -f qcow2 vm.qcow2 1G
head -c 32M /dev/urandom > data.bin
qemu-io -f qcow2 -c "write -s data.bin 0 32M" -c "write -P 0x5a 512M 4M" vm.qcow2 >/dev/null
qemu-img snapshot -c mon vm.qcow2
qemu-io -f qcow2 -c "write -P 0x11 1M 64k" -c "write -z 16M 1M" -c "discard 512M 1M" vm.qcow2 >/dev/null
qemu-img snapshot -c wed vm.qcow2
qemu-io -f qcow2 -c "write -s data.bin 900M 2M" -c "write -P 0x22 3 5000" vm.qcow2 >/dev/null
qemu-img snapshot -c fri vm.qcow2
"$bd" list vm.qcow2

echo "== full seed: blkdelta send vm.qcow2@mon | blkdelta receive replica.raw"
time ("$bd" send vm.qcow2@mon | "$bd" receive replica.raw)
echo "== incremental: blkdelta send vm.qcow2@mon..fri | blkdelta receive replica.raw"
"$bd" send vm.qcow2@mon..fri -o mon-fri.bd
ls -l mon-fri.bd
time "$bd" receive -i mon-fri.bd replica.raw
"$bd" status replica.raw

echo "== verify"
"$bd" checksum vm.qcow2@fri
"$bd" checksum replica.raw          # from the replica's kept block hashes
"$bd" verify replica.raw            # reads the replica against them
qemu-img convert -l snapshot.name=fri -O raw vm.qcow2 fri-export.raw
cmp replica.raw fri-export.raw && echo "replica.raw is byte-identical to qemu's export of fri"

echo "== a replica that keeps history: blkdelta send vm.qcow2@mon..fri | blkdelta receive history.qcow2"
"$bd" send -q vm.qcow2@mon | "$bd" receive -q history.qcow2
"$bd" send -q vm.qcow2@mon..fri | "$bd" receive -q history.qcow2
qemu-img snapshot -l history.qcow2
qemu-img convert -l snapshot.name=wed -O raw history.qcow2 wed-replica.raw
qemu-img convert -l snapshot.name=wed -O raw vm.qcow2 wed-export.raw
cmp wed-replica.raw wed-export.raw && echo "history.qcow2@wed is byte-identical to qemu's export of wed"

echo "== one command per cycle: blkdelta sync vm.qcow2 synced.qcow2 (snapshot, send, prune)"
"$bd" sync --keep 2 vm.qcow2 synced.qcow2            # first: a seed of a new blkdelta-* snapshot
qemu-io -f qcow2 -c "write -P 0x33 100M 8M" vm.qcow2 >/dev/null
sleep 1                                              # snapshot names carry the second
"$bd" sync --keep 2 vm.qcow2 synced.qcow2            # then: from the snapshot the replica holds
newest=$(qemu-img snapshot -l vm.qcow2 | awk 'END{print $2}')
qemu-img convert -l "snapshot.name=$newest" -O raw vm.qcow2 newest-export.raw
qemu-img convert -O raw synced.qcow2 synced.raw
cmp synced.raw newest-export.raw && echo "synced.qcow2 is byte-identical to qemu's export of $newest"
