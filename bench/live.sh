#!/usr/bin/env bash
# blkdelta live benchmark: a qemu-storage-daemon serves a BENCH_SIZE qcow2 (~50% random data)
# with a QMP socket and a writable NBD export (the guest). Measures, over BENCH_RUNS rounds
# (medians, caches dropped before each):
#   - send of the image's snapshot from the file (`send img.qcow2@s1`) against the same content
#     through NBD (`send nbd+unix:///...` of a qemu-nbd export of that snapshot), qemu-img
#     reading both the same way (`convert` into null-co: the peer's own NBD cost), and the
#     incremental s1..s2 from the file against `send --bitmap b1` of the export (qemu-nbd -B);
#   - `send --qmp --node` with no guest write since the last one: the checkpoint's setup and
#     teardown (transaction, scratch overlay, export; then their removal) plus an empty stream;
#   - how long guest writes take while a point-in-time view exists (copy-before-write) against
#     without one: qemu-io writes of 64 KiB through the guest's export.
# Env: BENCH_DIR (/tmp/blkdelta-live) BENCH_SIZE (2G) BENCH_RUNS (3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
W=${BENCH_DIR:-/tmp/blkdelta-live}
SIZE_H=${BENCH_SIZE:-2G}
RUNS=${BENCH_RUNS:-3}
SIZE=$(numfmt --from=iec "$SIZE_H")
log() { echo "== $*" >&2; }
for t in qemu-img qemu-io qemu-nbd qemu-storage-daemon python3; do
  command -v "$t" >/dev/null || { echo "bench: needs $t" >&2; exit 1; }
done
(cd "$root" && cargo build --release --quiet)
BD=$root/target/release/blkdelta
rm -rf "$W"; mkdir -p "$W"; cd "$W"
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
R=$W/results; mkdir -p "$R"
rec() { echo "$2" >> "$R/$1"; }
med() { sort -g "$R/$1" | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

log "fixture: $SIZE_H qcow2, ~50% random data"
half_random_qcow2 img.qcow2 "$SIZE"
qemu-img snapshot -c s1 img.qcow2
qemu-img bitmap --add img.qcow2 b1
# ~5% of the disk changed in 1 MiB pieces, then s2: an incremental s1..s2, or what b1 recorded
head -c 1M /dev/urandom > piece.bin
args=()
for ((i = 0; i < SIZE / 1048576 / 20; i++)); do
  args+=(-c "write -q -s piece.bin $(( (RANDOM * 32768 + RANDOM) % (SIZE / 1048576) * 1048576 )) 1048576")
done
qemu-io -f qcow2 "${args[@]}" img.qcow2
rm -f piece.bin
qemu-img snapshot -c s2 img.qcow2

# ---- file against NBD, the same content
qemu-nbd -r -t -f qcow2 -l snapshot.name=s1 -k "$W/nbd.sock" -x s1 -e 4 img.qcow2 &
NBD_PID=$!
trap 'kill $NBD_PID 2>/dev/null || true; [ -n "${QSD_PID:-}" ] && kill $QSD_PID 2>/dev/null || true' EXIT
while [ ! -S "$W/nbd.sock" ]; do sleep 0.05; done
for ((i = 1; i <= RUNS; i++)); do
  log "round $i/$RUNS: file and NBD"
  drop; t0=$(now); "$BD" send -q img.qcow2@s1 > /dev/null; rec file "$(secs "$t0")"
  drop; t0=$(now); "$BD" send -q "nbd+unix:///s1?socket=$W/nbd.sock" > /dev/null; rec nbd "$(secs "$t0")"
  # The peer: qemu-img reading the same snapshot from the file and through the same export
  drop; t0=$(now); qemu-img convert -f qcow2 -l snapshot.name=s1 -n img.qcow2 \
    --target-image-opts "driver=null-co,size=$SIZE"; rec qi_file "$(secs "$t0")"
  drop; t0=$(now); qemu-img convert -f raw -n "nbd+unix:///s1?socket=$W/nbd.sock" \
    --target-image-opts "driver=null-co,size=$SIZE"; rec qi_nbd "$(secs "$t0")"
done
kill $NBD_PID; wait $NBD_PID 2>/dev/null || true
qemu-nbd -r -t -f qcow2 -B b1 -k "$W/nbd.sock" -x cur -e 4 img.qcow2 &
NBD_PID=$!
while [ ! -S "$W/nbd.sock" ]; do sleep 0.05; done
for ((i = 1; i <= RUNS; i++)); do
  log "round $i/$RUNS: incremental from the file and through NBD"
  drop; t0=$(now); "$BD" send -q img.qcow2@s1..s2 > /dev/null; rec file_incr "$(secs "$t0")"
  drop; t0=$(now); "$BD" send -q --bitmap b1 "nbd+unix:///cur?socket=$W/nbd.sock" > /dev/null
  rec nbd_incr "$(secs "$t0")"
done
kill $NBD_PID; wait $NBD_PID 2>/dev/null || true

# ---- a running disk
qemu-storage-daemon --blockdev "driver=file,node-name=file0,filename=$W/img.qcow2" \
  --blockdev driver=qcow2,node-name=drive0,file=file0 \
  --nbd-server "addr.type=unix,addr.path=$W/guest.sock" \
  --export type=nbd,id=guest,node-name=drive0,name=drive0,writable=on \
  --chardev "socket,id=qmp,path=$W/qmp.sock,server=on,wait=off" --monitor chardev=qmp &
QSD_PID=$!
while [ ! -S "$W/qmp.sock" ] || [ ! -S "$W/guest.sock" ]; do sleep 0.05; done
G="nbd+unix:///drive0?socket=$W/guest.sock"
LIVE=(--qmp "$W/qmp.sock" --node drive0 --nbd-socket "$W/guest.sock")
"$BD" send -q "${LIVE[@]}" -o seed.bd                    # the first: full, starts the bitmap
for ((i = 1; i <= RUNS; i++)); do
  log "round $i/$RUNS: checkpoint setup and teardown"
  t0=$(now); "$BD" send -q "${LIVE[@]}" -o empty.bd --force; rec checkpoint "$(secs "$t0")"
done
writes() { # 256 writes of 64 KiB at scattered offsets, through the guest's export
  python3 - "$SIZE" "$1" > w.txt <<'PY'
import random, sys
size, seed = int(sys.argv[1]), int(sys.argv[2])
r = random.Random(seed)
for _ in range(256):
    print(f"write -q -P {r.randrange(1, 255)} {r.randrange(0, size - 65536) // 65536 * 65536} 65536")
PY
  local args=() line
  while IFS= read -r line; do args+=(-c "$line"); done < w.txt
  local t0; t0=$(now); qemu-io -f raw "${args[@]}" "$G"; secs "$t0"
}
for ((i = 1; i <= RUNS; i++)); do
  log "round $i/$RUNS: guest writes without and with a view"
  rec writes_plain "$(writes $((i * 2)))"
  # A view held open: the sender blocked on a pipe nobody reads.
  mkfifo hold.fifo
  "$BD" send -q "${LIVE[@]}" > hold.fifo &
  SENDER=$!
  exec 3< hold.fifo; head -c 8 <&3 > /dev/null
  rec writes_view "$(writes $((i * 2 + 1)))"
  cat <&3 > /dev/null; exec 3<&-; wait $SENDER; rm -f hold.fifo
done

echo
echo "blkdelta live bench: size $SIZE_H, $RUNS round(s)"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r), $(qemu-img --version | head -1)"
echo
printf '| %-62s | %9s |\n' "measure" "median s"
printf '|%s|%s|\n' "$(printf -- '-%.0s' {1..64})" "$(printf -- '-%.0s' {1..11})"
r() { printf '| %-62s | %9s |\n' "$1" "$2"; }
r "send img.qcow2@s1 (file)" "$(med file)"
r "send nbd+unix:///s1 (qemu-nbd -e 4 of the same snapshot)" "$(med nbd)"
r "  NBD / file (goal <= 1.3)" "$(awk -v a="$(med nbd)" -v b="$(med file)" 'BEGIN{printf "%.2f", a/b}')"
r "qemu-img convert -l snapshot.name=s1 img.qcow2 -> null-co" "$(med qi_file)"
r "qemu-img convert nbd+unix:///s1 (same export) -> null-co" "$(med qi_nbd)"
r "  qemu-img: NBD / file" "$(awk -v a="$(med qi_nbd)" -v b="$(med qi_file)" 'BEGIN{printf "%.2f", a/b}')"
r "send img.qcow2@s1..s2 (file, ~5% changed)" "$(med file_incr)"
r "send --bitmap b1 nbd+unix:///cur (qemu-nbd -B b1 of the same)" "$(med nbd_incr)"
r "  NBD / file (goal <= 1.3)" "$(awk -v a="$(med nbd_incr)" -v b="$(med file_incr)" 'BEGIN{printf "%.2f", a/b}')"
r "send --qmp, no change: checkpoint setup + teardown (goal < 0.5)" "$(med checkpoint)"
r "256 guest writes of 64 KiB, no view" "$(med writes_plain)"
r "256 guest writes of 64 KiB while a view exists" "$(med writes_view)"
