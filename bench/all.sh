#!/usr/bin/env bash
# Every benchmark in one run, and one table of what each measured against its peer and goal:
# bench/run.sh (incremental and seed into raw and qcow2 replicas, against qemu-img convert,
# rsync, btrfs), bench/live.sh (NBD source and the QMP checkpoint, against the file and
# qemu-img), bench/sync.sh (a sync cycle against the bare pipe, --bwlimit) and bench/trust.sh
# (kept hashes, verify and repair). Each writes its full report to BENCH_OUT/NAME.txt; this
# prints the machine once, then every table of them.
# Env: BENCH_OUT (/tmp/blkdelta-bench-all) BENCH_ONLY (run live sync trust: the ones to run),
#      and what each script reads (BENCH_SIZE, BENCH_RUNS, ...).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${BENCH_OUT:-/tmp/blkdelta-bench-all}
ONLY=${BENCH_ONLY:-run live sync trust}
mkdir -p "$OUT"
for b in $ONLY; do
  echo "== bench/$b.sh" >&2
  bash "$root/bench/$b.sh" > "$OUT/$b.txt" 2> "$OUT/$b.log" || { echo "bench/$b.sh failed: see $OUT/$b.log" >&2; exit 1; }
done
echo "blkdelta benchmarks: $(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
echo "$(qemu-img --version | head -1); work dirs on $(df -T /tmp | awk 'NR==2{print $2}')"
for b in $ONLY; do
  echo
  echo "### bench/$b.sh ($(grep -m1 -E '^blkdelta .*bench' "$OUT/$b.txt" || echo "see $OUT/$b.txt"))"
  # The tables, as the script printed them, a blank line between two
  awk '/^\|/ { if (!t) print ""; t = 1; print; next } { t = 0 }' "$OUT/$b.txt"
done
