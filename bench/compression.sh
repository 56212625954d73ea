#!/usr/bin/env bash
# blkdelta compression study: a disk with a real filesystem and real files. An ext4 image is
# built from BENCH_TREE (mkfs.ext4 -d), then "upgraded" the way a package upgrade changes a
# disk: BENCH_PCT% of its files rewritten (a new file written beside the old, renamed over it),
# some files added, some deleted. Measures the stream's size and the time of `send | receive`
# (into a file, synced) for the seed and for the upgrade at levels 0, 1 and 3, and how much
# smaller zstd's long-distance matching (`zstd --long=27`) makes each level-0 stream.
# Needs root (a loop mount). Env: BENCH_DIR (/tmp/blkdelta-compression)
# BENCH_TREE (/usr/lib/x86_64-linux-gnu) BENCH_PCT (10)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
W=${BENCH_DIR:-/tmp/blkdelta-compression}
TREE=${BENCH_TREE:-/usr/lib/x86_64-linux-gnu}
PCT=${BENCH_PCT:-10}
log() { echo "== $*" >&2; }
for t in mkfs.ext4 zstd python3 mount; do
  command -v "$t" >/dev/null || { echo "bench: needs $t" >&2; exit 1; }
done
(cd "$root" && cargo build --release --quiet)
BD=$root/target/release/blkdelta
rm -rf "$W"; mkdir -p "$W/m"; cd "$W"
trap 'umount "$W/m" 2>/dev/null || true' EXIT
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }

tree_bytes=$(du -sb "$TREE" | cut -f1)
size=$(( (tree_bytes * 3 / 2 / 1048576 + 256) * 1048576 ))
log "disk: ext4 of $(mib "$size") MiB from $TREE ($(mib "$tree_bytes") MiB of files)"
truncate -s "$size" s1.raw
mkfs.ext4 -q -F -d "$TREE" s1.raw
cp --sparse=always s1.raw s2.raw
mount -o loop s2.raw m
python3 - "$W/m" "$PCT" <<'PY'
import os, random, sys
top, pct = sys.argv[1], float(sys.argv[2])
r = random.Random(7)
files = []
for d, _, names in os.walk(top):
    for n in names:
        p = os.path.join(d, n)
        if os.path.isfile(p) and not os.path.islink(p):
            files.append(p)
files.sort()
for p in r.sample(files, int(len(files) * pct / 100)):
    data = bytearray(open(p, "rb").read())
    # A new version: most bytes the same, some changed, some appended (a rebuilt binary).
    for _ in range(max(1, len(data) // 4096)):
        if data:
            data[r.randrange(len(data))] = r.randrange(256)
    data += os.urandom(r.randrange(0, 4096))
    tmp = p + ".dpkg-new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, p)
for p in r.sample(files, len(files) // 100):
    if os.path.exists(p):
        os.remove(p)
for i in range(len(files) // 100):
    with open(os.path.join(top, f"new-{i}.bin"), "wb") as f:
        f.write(os.urandom(r.randrange(1, 1 << 16)))
PY
umount m

rows=()
for lvl in 0 1 3; do
  for kind in seed upgrade; do
    if [ $kind = seed ]; then args=(s1.raw); else args=(--compare s1.raw s2.raw); fi
    "$BD" send -q -l "$lvl" "${args[@]}" -o "$kind.$lvl.bd" --force
    bytes=$(stat -c %s "$kind.$lvl.bd")
    rm -f rep.raw rep.raw.blkdelta*
    [ $kind = upgrade ] && { "$BD" send -q s1.raw | "$BD" receive -q rep.raw; }
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    t0=$(now)
    "$BD" send -q -l "$lvl" "${args[@]}" | "$BD" receive -q rep.raw
    rows+=("$kind|$lvl|$(mib "$bytes")|$(secs "$t0")")
  done
done
long() { zstd -q -c --long=27 -3 "$1" | wc -c; }
echo
echo "blkdelta compression study: ext4 from $TREE ($(mib "$tree_bytes") MiB of files), upgrade rewrites $PCT% of the files"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r)"
echo
printf '| %-8s | %5s | %12s | %18s |\n' "stream" "level" "stream MiB" "send+receive s"
printf '|%s|%s|%s|%s|\n' "----------" "-------" "--------------" "--------------------"
for row in "${rows[@]}"; do
  IFS='|' read -r k l b t <<< "$row"
  printf '| %-8s | %5s | %12s | %18s |\n' "$k" "$l" "$b" "$t"
done
echo
echo "zstd --long=27 -3 of the level-0 streams: seed $(mib "$(long seed.0.bd)") MiB, upgrade $(mib "$(long upgrade.0.bd)") MiB"
