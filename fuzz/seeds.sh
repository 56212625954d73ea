#!/usr/bin/env bash
# Rebuilds the seed corpora of the fuzz targets (nothing binary is kept in git):
#   corpus/qcow2_image/   small qcow2 images made with qemu-img / qemu-io: v2 and v3, 512 B to
#                         64 KiB clusters, extended L2, deflate and zstd compressed clusters,
#                         internal snapshots, a persistent bitmap, a backing file
#   corpus/qcow2_bitmaps/ small qcow2 images with persistent dirty bitmaps that have bits set:
#                         16 MiB with 64 KiB clusters (one bitmap), 4 MiB with 512 B clusters
#                         (a fine bitmap of two table entries, a coarse disabled one), 1 MiB
#                         with 4 KiB clusters (an empty bitmap and a full one), 256 KiB with
#                         512 B clusters (a few KiB of file)
#   corpus/change_map/    change maps, each after a byte that picks the device and era block
#                         sizes (see fuzz_targets/change_map.rs): thin_delta plain and verbose,
#                         era_invalidate, OFFSET LENGTH lines
#   corpus/stream_decode/ streams written by `blkdelta send` from such images: full and
#                         incremental, several transitions, zstd and plain data, zero and
#                         discard records
#   corpus/nbd_client/    NBD server transcripts (after the target's first byte): handshakes
#                         with and without a dirty bitmap context and block size information,
#                         block status, read replies in data, hole and error chunks, out of
#                         order
# Needs qemu-img and qemu-io (Debian: qemu-utils) and builds the blkdelta binary.
# Usage: fuzz/seeds.sh          (from anywhere; writes under fuzz/corpus/)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
q="$here/corpus/qcow2_image"
s="$here/corpus/stream_decode"
b="$here/corpus/qcow2_bitmaps"
m="$here/corpus/change_map"
n="$here/corpus/nbd_client"
mkdir -p "$q" "$s" "$b" "$m" "$n"
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

# Persistent dirty bitmaps with bits set: qemu-io loads the image's bitmaps, records its
# writes in the enabled ones and stores them when it closes the image.
mkdir "$work/bitmaps"
bm() {
    qemu-img create -q -f qcow2 -o cluster_size="$3" "$work/bitmaps/$1" "$2"
}
bm 16m-64k.qcow2 16M 65536
qemu-img bitmap --add --enable "$work/bitmaps/16m-64k.qcow2" b0
qemu-io -f qcow2 -c "write -P 0x5a 0 64k" -c "write -z 1M 192k" -c "write -z 8M 64k" \
    -c "write -P 0x5c 15M 4k" "$work/bitmaps/16m-64k.qcow2" >/dev/null
# 4 MiB of 512 B granules is 1 KiB of bitmap: two data clusters of 512 B.
bm 4m-512.qcow2 4M 512
qemu-img bitmap --add -g 512 "$work/bitmaps/4m-512.qcow2" fine
qemu-img bitmap --add -g 65536 "$work/bitmaps/4m-512.qcow2" coarse
qemu-io -f qcow2 -c "write -P 1 0 1k" -c "write -P 2 2049k 3k" -c "write -P 3 3M 512" \
    "$work/bitmaps/4m-512.qcow2" >/dev/null
qemu-img bitmap --disable "$work/bitmaps/4m-512.qcow2" coarse
qemu-io -f qcow2 -c "write -P 4 1M 512" "$work/bitmaps/4m-512.qcow2" >/dev/null
bm 1m-4k.qcow2 1M 4096
qemu-img bitmap --add -g 4096 "$work/bitmaps/1m-4k.qcow2" none
qemu-img bitmap --add -g 4096 "$work/bitmaps/1m-4k.qcow2" all
# Zero writes are writes: they set bits without allocating a megabyte of data.
qemu-io -f qcow2 -c "write -z 0 1M" "$work/bitmaps/1m-4k.qcow2" >/dev/null
qemu-img bitmap --clear "$work/bitmaps/1m-4k.qcow2" none
# A few KiB, so that mutations often hit the directory and the table.
bm 256k-512.qcow2 256k 512
qemu-img bitmap --add -g 512 "$work/bitmaps/256k-512.qcow2" tiny
qemu-io -f qcow2 -c "write -z 0 512" -c "write -z 3k 2k" -c "write -z 255k 1k" \
    "$work/bitmaps/256k-512.qcow2" >/dev/null
cp "$work"/bitmaps/*.qcow2 "$b/"

# Change maps. The first byte picks the sizes: 0x08 a 64 MiB device without an era block
# size, 0x98 the same device with 64 KiB era blocks, 0x07 a device of 1 MiB + 512 bytes.
seed_map() {
    { printf "$2"; cat; } >"$m/$1"
}
seed_map thin.xml '\x08' <<'MAP'
<superblock uuid="" time="0" transaction="1" version="2" data_block_size="128" nr_data_blocks="1024">
  <diff left="1" right="2">
    <different begin="0" length="4"/>
    <same begin="4" length="2"/>
    <right_only begin="6" length="1"/>
    <left_only begin="9" length="3"/>
    <left_only begin="2" length="8"/>
  </diff>
</superblock>
MAP
seed_map thin-verbose.xml '\x08' <<'MAP'
<?xml version="1.0"?>
<!-- thin_delta --verbose -->
<superblock uuid="abc" time="3" transaction="7" flags="0" version="2" data_block_size="256" nr_data_blocks="100" metadata_snap="5">
  <diff left="1" right="2">
    <different>
      <range begin="2" left_data_begin="10" right_data_begin="20" length="1"/>
      <range begin="5" left_data_begin="11" right_data_begin="21" length="2"/>
    </different>
    <same>
      <range begin="0" data_begin="7" length="2"/>
    </same>
    <left_only>
      <range begin="8" data_begin="30" length="1"/>
    </left_only>
    <right_only>
      <range begin='60' data_begin='31' length='4'/>
    </right_only>
  </diff>
</superblock>
MAP
era='<blocks>
  <range begin="5" end="9"/>
  <block block="3"/>
  <block block="1023"/>
  <range begin="0" end="2"/>
</blocks>'
seed_map era.xml '\x98' <<<"$era"
seed_map era-without-size.xml '\x08' <<<"$era"
seed_map lines.txt '\x07' <<'MAP'
# changed ranges, in bytes
4096 512
0x10000 0x1000   # hex
	100 1
1048000 1088
900 100
0 10
5 10
MAP

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
# NBD server transcripts: byte 0 of each asks for the dirty bitmap context (bit 0) and for
# reads after the status walk (bits 1-3); the rest is what the server sends.
python3 - "$n" <<'PY'
import struct, sys
out = sys.argv[1]
be16 = lambda v: struct.pack(">H", v)
be32 = lambda v: struct.pack(">I", v)
be64 = lambda v: struct.pack(">Q", v)
def opt(option, ty, payload=b""):
    return be64(0x3e889045565a9) + be32(option) + be32(ty) + be32(len(payload)) + payload
def chunk(flags, ty, handle, payload=b""):
    return be32(0x668e33ef) + be16(flags) + be16(ty) + be64(handle) + be32(len(payload)) + payload
def handshake(size, contexts, block=True):
    b = b"NBDMAGIC" + b"IHAVEOPT" + be16(3) + opt(8, 1)
    for cid, name in contexts:
        b += opt(10, 4, be32(cid) + name)
    b += opt(10, 1) + opt(7, 3, be16(0) + be64(size) + be16(1))
    if block:
        b += opt(7, 3, be16(3) + be32(512) + be32(4096) + be32(1 << 20))
    return b + opt(7, 1)
def status(handle, cid, extents, done):
    return chunk(int(done), 5, handle, be32(cid) + b"".join(be32(l) + be32(f) for l, f in extents))
size = 64 << 10
both = [(1, b"base:allocation"), (2, b"qemu:dirty-bitmap:b")]
seeds = {
    # Status of the whole export, then two reads: data and a hole, data.
    "bitmap-status-reads": bytes([0x05]) + handshake(size, both)
        + status(1, 1, [(4096, 0), (4096, 3), (57344, 0)], False)
        + status(1, 2, [(8192, 1), (57344, 0)], True)
        + chunk(0, 1, 2, be64(0) + bytes([1]) * 256) + chunk(1, 2, 2, be64(256) + be32(256))
        + chunk(1, 1, 3, be64(4096) + bytes([2]) * 4096),
    # No bitmap, no block size information; replies to reads out of order, an error chunk.
    "plain-out-of-order": bytes([0x04]) + handshake(size, both[:1], block=False)
        + status(1, 1, [(size, 0)], True)
        + chunk(1, 1, 3, be64(4096) + bytes([3]) * 4096)
        + chunk(0, 0x8001, 2, be32(5) + be16(3) + b"EIO")
        + chunk(1, 2, 2, be64(0) + be32(512)),
    # A server without metadata contexts, and simple replies.
    "no-contexts": bytes([0x02]) + b"NBDMAGIC" + b"IHAVEOPT" + be16(1) + opt(8, 1)
        + opt(10, 0x80000001) + opt(7, 3, be16(0) + be64(size) + be16(1)) + opt(7, 1)
        + be32(0x67446698) + be32(22) + be64(1),
    # Refusals: no such export, structured replies not supported.
    "no-export": bytes([0x00]) + b"NBDMAGIC" + b"IHAVEOPT" + be16(3) + opt(8, 1) + opt(10, 1)
        + opt(7, 0x80000006, b"export not present"),
    "no-structured": bytes([0x00]) + b"NBDMAGIC" + b"IHAVEOPT" + be16(1) + opt(8, 0x80000001),
}
for name, data in seeds.items():
    open(f"{out}/{name}", "wb").write(data)
PY
ls -l "$q" "$s" "$n"
