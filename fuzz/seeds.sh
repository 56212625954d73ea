#!/usr/bin/env bash
# Rebuilds the seed corpora of the fuzz targets (nothing binary is kept in git):
#   corpus/qcow2_image/   small qcow2 images made with qemu-img / qemu-io: v2 and v3, 512 B to
#                         64 KiB clusters, extended L2, deflate and zstd compressed clusters,
#                         internal snapshots, a persistent bitmap, a backing file
#   corpus/stream_decode/ streams written by `blkdelta send` from such images: full and
#                         incremental, several transitions, zstd and plain data, zero and
#                         discard records
# Needs qemu-img and qemu-io (Debian: qemu-utils) and builds the blkdelta binary.
# Usage: fuzz/seeds.sh          (from anywhere; writes under fuzz/corpus/)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
q="$here/corpus/qcow2_image"
s="$here/corpus/stream_decode"
mkdir -p "$q" "$s"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "seeds.sh: $tool is missing (apt-get install qemu-utils)" >&2; exit 1; }
done

# make NAME SIZE CREATE-OPTIONS -- QEMU-IO COMMANDS...
make() {
    local name=$1 size=$2 opts=$3
    shift 4
    qemu-img create -q -f qcow2 $opts "$work/$name" "$size"
    for cmd in "$@"; do
        qemu-io -f qcow2 -c "$cmd" "$work/$name" >/dev/null
    done
}

make v2-4k.qcow2 1M "-o compat=0.10,cluster_size=4096" -- \
    "write -P 0x11 0 8k" "write -z 64k 4k" "write -P 0x22 900k 3k"
# Incompressible bytes, so that streams carry plain (not zstd) data records too.
head -c 4096 /dev/urandom >"$work/random"
make v3-512.qcow2 256k "-o cluster_size=512" -- \
    "write -P 0x33 0 1k" "write -z 4k 2k" "write -P 0x44 100k 1536" "discard 512 512" \
    "write -s $work/random 8k 4k"
make v3-64k.qcow2 2M "" -- "write -P 0x55 0 4k" "write -z 1M 64k"
make extl2-16k.qcow2 1M "-o cluster_size=16384,extended_l2=on" -- \
    "write -P 0x66 0 1k" "write -z 2k 1k" "write -P 0x77 40k 600" "discard 64k 16k"
# Compressed clusters: deflate (default) and zstd.
make comp-deflate.qcow2 256k "-o cluster_size=4096" -- \
    "write -c -P 0x12 0 4k" "write -c -P 0x13 8k 4k" "write -P 0x14 16k 4k"
make comp-zstd.qcow2 256k "-o cluster_size=4096,compression_type=zstd" -- \
    "write -c -P 0x21 0 4k" "write -c -P 0x22 4k 4k"
# Internal snapshots: two of them, data changed between them.
make snaps.qcow2 512k "-o cluster_size=4096" -- "write -P 0x01 0 8k"
qemu-img snapshot -c mon "$work/snaps.qcow2"
qemu-io -f qcow2 -c "write -P 0x02 4k 8k" -c "write -z 64k 4k" "$work/snaps.qcow2" >/dev/null
qemu-img snapshot -c fri "$work/snaps.qcow2"
qemu-io -f qcow2 -c "discard 0 4k" "$work/snaps.qcow2" >/dev/null
# A persistent dirty bitmap.
make bitmap.qcow2 1M "-o cluster_size=4096" -- "write -P 0x09 0 4k"
qemu-img bitmap --add "$work/bitmap.qcow2" b0
qemu-io -f qcow2 -c "write -P 0x0a 64k 4k" "$work/bitmap.qcow2" >/dev/null
# A backing file: the fuzz target's directory holds only its image, called "img".
qemu-img create -q -f qcow2 -u -b img -F qcow2 -o cluster_size=4096 "$work/backing.qcow2" 1M
qemu-img create -q -f qcow2 -u -b img -F raw -o cluster_size=512 "$work/backing-raw.qcow2" 64k
for f in "$work"/*.qcow2; do cp "$f" "$q/"; done

# Streams, written by the binary.
(cd "$root" && cargo build -q --bin blkdelta)
bd="$root/target/debug/blkdelta"
"$bd" send "$work/snaps.qcow2@mon" -o "$s/full-mon.bd"
"$bd" send "$work/snaps.qcow2@mon..fri" -o "$s/incr-mon-fri.bd"
"$bd" send "$work/snaps.qcow2" -o "$s/full-active.bd"
qemu-img snapshot -c sun "$work/snaps.qcow2"
"$bd" send "$work/snaps.qcow2@mon..sun" -o "$s/incr-mon-sun.bd"
"$bd" send "$work/v3-512.qcow2" -o "$s/full-512.bd"
qemu-img snapshot -c a "$work/comp-deflate.qcow2"
"$bd" send "$work/comp-deflate.qcow2@a" -o "$s/full-compressed.bd"
# The streams above are too short for the writer's own checkpoints (every 1 MiB): add a
# checkpoint record after each record of one of them. Its prefix hash and frame checks are
# left zero; the target's `fix_checks` pass makes them right.
python3 - "$s/full-512.bd" "$s/checkpoints.bd" <<'PY'
import struct, sys
src = open(sys.argv[1], "rb").read()
out, at = bytearray(src[:12]), 12
while at + 16 <= len(src):
    kind, body_len = src[at], struct.unpack_from("<I", src, at + 4)[0]
    out += src[at:at + 16 + body_len]
    at += 16 + body_len
    if kind not in (1, 6):
        out += bytes([7, 0, 0, 0]) + struct.pack("<I", 32) + bytes(8) + bytes(32)
open(sys.argv[2], "wb").write(out)
PY
ls -l "$q" "$s"
