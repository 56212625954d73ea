#!/usr/bin/env bash
# blkdelta history benchmark: a qcow2 replica that keeps every snapshot. Seeds a replica from a
# BENCH_SIZE image (~50% random data), then applies BENCH_DAYS daily incrementals of ~BENCH_PCT%
# scattered changes each (overwrites, zeroed ranges, discards), and reports:
#   - the replica's allocated size against the seed's data plus every delta's data (a replica
#     that keeps history should hold little more than what it was sent);
#   - the time of `blkdelta prune --keep 1` (deleting all but the newest snapshot) per GiB of
#     virtual size, against `qemu-img snapshot -d` of the same snapshots, one by one, on a copy;
#   - qemu-img check of both results (no errors, no leaks).
# Env: BENCH_DIR (/tmp/blkdelta-history) BENCH_SIZE (2G) BENCH_DAYS (30) BENCH_PCT (1)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
W=${BENCH_DIR:-/tmp/blkdelta-history}
SIZE_H=${BENCH_SIZE:-2G}
DAYS=${BENCH_DAYS:-30}
PCT=${BENCH_PCT:-1}
SIZE=$(numfmt --from=iec "$SIZE_H")
log() { echo "== $*" >&2; }
need() { command -v "$1" >/dev/null || { echo "bench: needs $1" >&2; exit 1; }; }
need qemu-img; need qemu-io; need python3

(cd "$root" && cargo build --release --quiet)
BD=$root/target/release/blkdelta

rm -rf "$W"; mkdir -p "$W"; cd "$W"
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }
alloc() { echo $(( $(stat -c %b "$1") * $(stat -c %B "$1") )); }
data_bytes() { "$BD" dump --json "$1" | head -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_data_bytes"])'; }

log "fixture: $SIZE_H qcow2, ~50% random data"
half_random_qcow2 img.qcow2 "$SIZE"
qemu-img snapshot -c d0 img.qcow2
"$BD" send -q img.qcow2@d0 -o s.bd
sent=$(data_bytes s.bd)
t0=$(now); "$BD" receive -q -i s.bd rep.qcow2; seed_s=$(secs "$t0")

day_changes() { # DAY: ~PCT% of the disk in 64 KiB..1 MiB writes, plus a zeroed and a discarded range
  python3 - "$SIZE" "$PCT" "$1" > ops.txt <<'PY'
import random, sys
size, pct, day = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
r = random.Random(day)
left = int(size * pct / 100)
while left > 0:
    n = r.choice([65536, 262144, 1048576])
    off = r.randrange(0, size - n) // 65536 * 65536
    print(f"write -q -s day.bin {off} {n}")
    left -= n
print(f"write -q -z {r.randrange(0, size - (4 << 20)) // 65536 * 65536} {4 << 20}")
print(f"discard -q {r.randrange(0, size - (4 << 20)) // 65536 * 65536} {4 << 20}")
PY
  head -c 1M /dev/urandom > day.bin
  local args=() line
  while IFS= read -r line; do args+=(-c "$line"); done < ops.txt
  qemu-io -f qcow2 "${args[@]}" img.qcow2
}

incr_total=0
for ((d = 1; d <= DAYS; d++)); do
  day_changes "$d"
  qemu-img snapshot -c "d$d" img.qcow2
  "$BD" send -q --force "img.qcow2@d$((d - 1))..d$d" -o s.bd
  sent=$((sent + $(data_bytes s.bd)))
  t0=$(now); "$BD" receive -q -i s.bd rep.qcow2; incr_total=$(awk -v a="$incr_total" -v b="$(secs "$t0")" 'BEGIN{print a+b}')
done
log "applied $DAYS incrementals"
qemu-img check -q rep.qcow2 || { echo "bench: qemu-img check of the replica failed" >&2; exit 1; }
for s in d0 "d$((DAYS / 2))" "d$DAYS"; do
  qemu-img convert -l "snapshot.name=$s" -O raw img.qcow2 a.raw
  qemu-img convert -l "snapshot.name=$s" -O raw rep.qcow2 b.raw
  cmp a.raw b.raw || { echo "bench: snapshot $s of the replica differs from the source's" >&2; exit 1; }
done
rm -f a.raw b.raw
held=$(alloc rep.qcow2)

cp --sparse=always rep.qcow2 qemu.qcow2
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
t0=$(now); "$BD" prune -q --keep 1 rep.qcow2; prune_s=$(secs "$t0")
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
t0=$(now)
for ((d = 0; d < DAYS; d++)); do qemu-img snapshot -d "d$d" qemu.qcow2; done
qemu_s=$(secs "$t0")
qemu-img check -q rep.qcow2 || { echo "bench: qemu-img check after prune failed" >&2; exit 1; }
left=$(qemu-img snapshot -l rep.qcow2 | tail -n +3 | wc -l)
[ "$left" = 1 ] || { echo "bench: $left snapshots left after prune --keep 1" >&2; exit 1; }
after=$(alloc rep.qcow2)
gib=$(awk -v s="$SIZE" 'BEGIN{print s/1073741824}')

mib() { awk -v b="$1" 'BEGIN{printf "%.1f MiB", b/1048576}'; }
echo
echo "blkdelta history bench: size $SIZE_H, $DAYS days of ~$PCT% changes"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r), work dir fs $(stat -f -c %T "$W"), $(qemu-img --version | head -1)"
echo
printf '| %-58s | %14s |\n' "measure" "value"
printf '|%s|%s|\n' "$(printf -- '-%.0s' {1..60})" "$(printf -- '-%.0s' {1..16})"
r() { printf '| %-58s | %14s |\n' "$1" "$2"; }
r "seed into the qcow2 replica (s)" "$seed_s"
r "$DAYS incrementals into it, total (s)" "$incr_total"
r "data sent: seed + $DAYS deltas" "$(mib "$sent")"
r "replica allocated with $((DAYS + 1)) snapshots" "$(mib "$held")"
r "allocated / data sent (goal <= 1.05)" "$(awk -v a="$held" -v b="$sent" 'BEGIN{printf "%.3f", a/b}')"
r "blkdelta prune --keep 1 ($DAYS snapshots) (s)" "$prune_s"
r "  per GiB of virtual size (goal < 1 s)" "$(awk -v a="$prune_s" -v g="$gib" 'BEGIN{printf "%.3f", a/g}')"
r "qemu-img snapshot -d of the same $DAYS, one by one (s)" "$qemu_s"
r "replica allocated after prune" "$(mib "$after")"
