#!/usr/bin/env bash
# blkdelta metadata benchmark: times `blkdelta send --dry-run img.qcow2@s1..s2` on a 1 TiB
# qcow2 with 10,000 scattered changed clusters (the fixture of send/tests/metadata_reads.rs,
# written by bench/metaops.py), with caches dropped before each run (root only) and warm;
# medians of BENCH_RUNS, peak RSS from /usr/bin/time. With strace installed, also counts the
# L2 tables one cold dry run reads (64 KiB preads past cluster 0).
# Env: BENCH_DIR (/tmp/blkdelta-bench-meta) BENCH_RUNS (5)
#      BENCH_SPREADS ("512 2048"): the number of the disk's 2048 L2 ranges the changes fall in;
#      512 is the test's fixture, 2048 spreads the changes over the whole disk.
# Fixtures are kept in BENCH_DIR and reused while bench/metaops.py is unchanged.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
W=${BENCH_DIR:-/tmp/blkdelta-bench-meta}
RUNS=${BENCH_RUNS:-5}
SPREADS=${BENCH_SPREADS:-512 2048}
log() { echo "== $*" >&2; }
need() { command -v "$1" >/dev/null || { echo "bench: needs $1" >&2; exit 1; }; }
need qemu-img; need qemu-io; need python3; need /usr/bin/time

(cd "$root" && cargo build --release --quiet)
BD=$root/target/release/blkdelta
mkdir -p "$W"; cd "$W"

DROP=no
if [ "$(id -u)" = 0 ] && [ -w /proc/sys/vm/drop_caches ]; then DROP=yes; fi
drop() { if [ "$DROP" = yes ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi; }

# How qemu opens the fixture: no flushes, and L2/refcount caches covering the whole disk
# (several times faster writes and snapshots).
opts() { echo "driver=qcow2,file.filename=$1,cache.no-flush=on,l2-cache-size=128M,refcount-cache-size=8M"; }

apply() { # IMG base|changed SPREAD: the generator's writes, 1000 qemu-io commands per call
  local b line args
  python3 "$root/bench/metaops.py" "$2" "$3" > ops.txt
  rm -f ops.batch.*; split -l 1000 -d ops.txt ops.batch.
  for b in ops.batch.*; do
    args=()
    while IFS= read -r line; do args+=(-c "$line"); done < "$b"
    qemu-io --image-opts "${args[@]}" "$(opts "$1")"
  done
  rm -f ops.txt ops.batch.*
}

build() { # SPREAD: img-SPREAD.qcow2, unless one from the same generator is there
  local img=img-$1.qcow2 stamp
  stamp="$(sha1sum < "$root/bench/metaops.py" | cut -d' ' -f1) $1"
  if [ -f "$img" ] && [ "$(cat "$img.stamp" 2>/dev/null)" = "$stamp" ]; then
    log "fixture $img: reused"; return
  fi
  log "fixture $img: 1 TiB, one cluster in each L2 range, s1, 10,000 clusters in $1 ranges, s2"
  rm -f "$img" "$img.stamp"
  qemu-img create -q -f qcow2 "$img" 1T
  apply "$img" base "$1"
  qemu-img snapshot -c s1 --image-opts "$(opts "$img")"
  apply "$img" changed "$1"
  qemu-img snapshot -c s2 --image-opts "$(opts "$img")"
  sync "$img"
  echo "$stamp" > "$img.stamp"
}

once() { # IMG: one dry run; prints "seconds peak_rss_kib"
  local t0 t1
  t0=$(date +%s%N)
  /usr/bin/time -f '%e %M' -o time.txt "$BD" send --dry-run "$1@s1..s2" > plan.txt
  t1=$(date +%s%N)
  awk -v ns=$((t1 - t0)) '{ printf "%.3f %d\n", ns / 1e9, $2 }' time.txt
}

stats() { # FILE of "seconds rss" lines: "median min max max_rss_mib"
  sort -n "$1" | awk '{ t[NR] = $1; if ($2 > r) r = $2 }
    END { m = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2;
          printf "%.3f %.3f %.3f %.1f\n", m, t[1], t[NR], r / 1024 }'
}

for n in $SPREADS; do build "$n"; done

echo "blkdelta metadata bench: 1 TiB qcow2 (64 KiB clusters, 2048 L2 ranges), 10,000 changed 64 KiB clusters, $RUNS run(s), caches dropped for cold runs: $DROP"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r), work dir fs $(stat -f -c %T "$W"), $(qemu-img --version | head -1)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '| %-8s | %-12s | %-26s | %-26s | %-8s | %-10s |\n' "ranges" "file" "cold s: median (min-max)" "warm s: median (min-max)" "RSS MiB" "L2 preads"
printf '|%s|%s|%s|%s|%s|%s|\n' ---------- -------------- ---------------------------- ---------------------------- ---------- ------------
plans=(); rm -f raw.txt
for n in $SPREADS; do
  img=img-$n.qcow2
  : > cold.txt; : > warm.txt
  for ((i = 0; i < RUNS; i++)); do drop; once "$img" >> cold.txt; done
  once "$img" > /dev/null
  for ((i = 0; i < RUNS; i++)); do once "$img" >> warm.txt; done
  read -r cm cmin cmax crss < <(stats cold.txt)
  read -r wm wmin wmax wrss < <(stats warm.txt)
  l2=n/a
  if command -v strace >/dev/null; then
    drop
    strace -f -e trace=pread64 -o strace.txt "$BD" send --dry-run "$img@s1..s2" > /dev/null
    l2=$(grep -cE ', 65536, [1-9][0-9]*\) += 65536' strace.txt || true)
  fi
  file=$(du -h --apparent-size "$img" | cut -f1)
  rss=$(awk -v a="$crss" -v b="$wrss" 'BEGIN { print (a > b) ? a : b }')
  printf '| %-8s | %-12s | %-26s | %-26s | %-8s | %-10s |\n' "$n" "$file" \
    "$cm ($cmin-$cmax)" "$wm ($wmin-$wmax)" "$rss" "$l2"
  plans+=("$n ranges: $(grep -- '->' plan.txt)")
  echo "raw $n cold: $(cut -d' ' -f1 cold.txt | tr '\n' ' ')" >> raw.txt
  echo "raw $n warm: $(cut -d' ' -f1 warm.txt | tr '\n' ' ')" >> raw.txt
done
echo
printf '%s\n' "${plans[@]}"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "Raw seconds:"
cat raw.txt; rm -f raw.txt time.txt plan.txt cold.txt warm.txt strace.txt
