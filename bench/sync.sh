#!/usr/bin/env bash
# blkdelta sync against the bare pipe it runs: a throwaway sshd on 127.0.0.1, two identical
# qcow2 images (BENCH_SIZE, ~50% random data) each seeded into its own qcow2 replica through
# ssh, then BENCH_RUNS rounds of the same writes (~BENCH_DELTA of 1 MiB pieces) into both and:
#   bare: `blkdelta send img@prev..new | ssh blkdelta receive` (the snapshot made beforehand)
#   sync: `blkdelta sync --keep 3 img 127.0.0.1:replica` (snapshot, status round trip, send,
#         source and replica pruning)
# interleaved, cold cache; prints the medians and the cycle's overhead (goal < 0.5 s); then one
# cycle of 100 MiB paced with --bwlimit 10M (about 10 s), and the rate it kept.
# Env: BENCH_DIR (/tmp/blkdelta-bench-sync) BENCH_SIZE (1G) BENCH_DELTA (64M) BENCH_RUNS (5)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
W=${BENCH_DIR:-/tmp/blkdelta-bench-sync}
SIZE_H=${BENCH_SIZE:-1G}
DELTA_H=${BENCH_DELTA:-64M}
RUNS=${BENCH_RUNS:-5}
SIZE=$(numfmt --from=iec "$SIZE_H")
DELTA=$(numfmt --from=iec "$DELTA_H")
for t in qemu-img qemu-io python3 ssh ssh-keygen /usr/sbin/sshd; do
  command -v "$t" >/dev/null || { echo "bench: needs $t" >&2; exit 1; }
done
(cd "$root" && cargo build --release --quiet)
BD=$root/target/release/blkdelta
rm -rf "$W"; mkdir -p "$W"; cd "$W"
log() { echo "== $*" >&2; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
mkdir -p results
rec() { echo "$2" >> "results/$1"; }
med() { sort -g "results/$1" | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

start_sshd "$W"
SSHC="ssh -p $PORT -i $W/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
# The bare pipe with the options sync uses by default
SSH=($SSHC -c aes128-gcm@openssh.com -o Compression=no -o BatchMode=yes)
"${SSH[@]}" 127.0.0.1 true

log "fixture: $SIZE_H qcow2, ~50% random data, twice"
half_random_qcow2 bare.qcow2 "$SIZE"
cp bare.qcow2 sync.qcow2
qemu-img snapshot -c r0 bare.qcow2
"$BD" send -q bare.qcow2@r0 | "${SSH[@]}" 127.0.0.1 "$BD" receive -q "$W/bare-replica.qcow2"
"$BD" sync -q --ssh-command "$SSHC" --remote-blkdelta "$BD" sync.qcow2 "127.0.0.1:$W/sync-replica.qcow2"

head -c "$DELTA" /dev/urandom > delta.bin
for ((i = 1; i <= RUNS; i++)); do
  log "round $i/$RUNS"
  off=$(( (i * 7919 % 61) * SIZE / 64 ))
  for img in bare.qcow2 sync.qcow2; do
    qemu-io -f qcow2 -c "write -q -s delta.bin $off $DELTA" "$img"
  done
  qemu-img snapshot -c "r$i" bare.qcow2
  drop; t0=$(now)
  "$BD" send -q "bare.qcow2@r$((i - 1))..r$i" | "${SSH[@]}" 127.0.0.1 "$BD" receive -q "$W/bare-replica.qcow2"
  rec bare "$(secs "$t0")"
  drop; t0=$(now)
  "$BD" sync -q --keep 3 --ssh-command "$SSHC" --remote-blkdelta "$BD" sync.qcow2 "127.0.0.1:$W/sync-replica.qcow2"
  rec sync "$(secs "$t0")"
done
# --bwlimit over ~10 s: 100 MiB of random data at -l 0, paced to 10 MiB/s
head -c 100M /dev/urandom > paced.bin
qemu-io -f qcow2 -c "write -q -s paced.bin 0 100M" sync.qcow2
t0=$(now)
"$BD" sync --json -l 0 --bwlimit 10M --ssh-command "$SSHC" --remote-blkdelta "$BD" sync.qcow2 \
  "127.0.0.1:$W/sync-replica.qcow2" > paced.json
paced_s=$(secs "$t0")
paced_bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bytes"])' paced.json)
rm -f paced.bin
[ "$("$BD" checksum "sync.qcow2@$(qemu-img snapshot -l sync.qcow2 | awk 'END{print $2}')" | cut -d' ' -f1)" = \
  "$("$BD" checksum "$W/sync-replica.qcow2" | cut -d' ' -f1)" ] || { echo "bench: sync replica differs" >&2; exit 1; }

echo
echo "blkdelta sync bench: size $SIZE_H, $DELTA_H changed per round, $RUNS round(s), ssh on loopback"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r), $(ssh -V 2>&1)"
echo
printf '| %-66s | %9s |\n' "measure" "median s"
printf '|%s|%s|\n' "$(printf -- '-%.0s' {1..68})" "$(printf -- '-%.0s' {1..11})"
r() { printf '| %-66s | %9s |\n' "$1" "$2"; }
r "bare: send prev..new | ssh receive" "$(med bare)"
r "sync --keep 3 (snapshot, status, send, prune both sides)" "$(med sync)"
r "  overhead of the cycle (goal < 0.5)" "$(awk -v a="$(med sync)" -v b="$(med bare)" 'BEGIN{printf "%.3f", a-b}')"
r "sync -l 0 --bwlimit 10M of 100 MiB: the whole cycle" "$paced_s"
r "  stream MiB/s over the cycle (goal: 10 within 5%)" "$(awk -v b="$paced_bytes" -v t="$paced_s" 'BEGIN{printf "%.2f", b/t/1048576}')"
