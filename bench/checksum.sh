#!/bin/sh
# Times `blkdelta checksum` of large sparse qcow2 images (no data, huge virtual sizes): the
# digest must cost the allocation walk and the top-level fold, never a per-block scan.
#
# Usage: bench/checksum.sh [SIZE...]   (qemu-img sizes; default: 16T 133T)
#
# Measured on a 2-core Xeon VM (AVX-512), release build, wall clock:
#
#   image        before (status + thread batch per 256 blocks)   after (runs + zero-run fold)
#   16T qcow2    11.6 s                                           0.16 s
#   133T qcow2   79-109 s                                         0.86 s
#
# After the change the time is the top-level blake3 over 32 bytes per block (133 TiB: 4.4 GB
# of block hashes, about 6 GB/s on one core).
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --manifest-path "$root/Cargo.toml" --bin blkdelta >&2
bin="$root/target/release/blkdelta"
command -v qemu-img >/dev/null || { echo "bench/checksum.sh: qemu-img is missing" >&2; exit 1; }

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
[ $# -gt 0 ] || set -- 16T 133T
for size in "$@"; do
    img="$dir/sparse-$size.qcow2"
    qemu-img create -q -f qcow2 "$img" "$size"
    start=$(date +%s.%N)
    digest=$("$bin" checksum "$img" | cut -d' ' -f1)
    end=$(date +%s.%N)
    printf '%-6s %8.3f s  %s\n' "$size" "$(awk "BEGIN { print $end - $start }")" "$digest"
done
