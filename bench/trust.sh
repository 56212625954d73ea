#!/usr/bin/env bash
# blkdelta benchmark of the replica's kept block hashes, verify and repair. Same fixture as
# bench/run.sh (qcow2, ~50% random data, snapshot s1, ~5% scattered changes, snapshot s2), and:
#  1. cost of keeping the hashes: seed (send img@s1 | receive) and incremental (send img@s1..s2 |
#     receive onto a restored s1 replica) with this tree's binary against a baseline build
#     (BENCH_BASE, a commit before kept hashes existed), interleaved, order alternated per round;
#  2. checksum of a replica from its kept hashes vs --read, on a 1 TiB virtual replica with a few
#     MiB of data (and on the 4G replica);
#  3. verify vs dd (O_DIRECT and buffered) of the s1 replica, sparse as received and a fully
#     allocated copy of it (same content, state and hashes, identity rewritten);
#  4. repair: checksum --blocks of the s1 replica (kept hashes), send --against it img@s2 |
#     receive --repair, against a fresh seed of s2; stream bytes against the 1 MiB blocks that
#     differ between s1 and s2; and a diverged replica (BENCH_DIVERGE% of its blocks written
#     behind blkdelta's back) repaired to its own snapshot: checksum --blocks (reads), repair,
#     verify.
# Every timed operation runs on a cold cache (sync; drop_caches) unless its label says warm.
# Restoring a replica = copying replica, state and hashes, then rewriting the state's identity
# to the copy (as a restored backup of all three would be): blkdelta refuses a replica replaced
# behind its back otherwise.
# Env: BENCH_DIR (/tmp/blkdelta-trust) BENCH_SIZE (4G) BENCH_RUNS (3) BENCH_PCT (5)
#      BENCH_BASE (1f56205) BENCH_BASE_DIR (/tmp/bd-base: a git worktree of BENCH_BASE, made if
#      missing) BENCH_BIG (1T) BENCH_DIVERGE (1, percent of blocks) BENCH_KEEP_FIXTURE (0; 1
#      reuses the fixture left in BENCH_DIR by an earlier run with the same size and changes)
#      BENCH_PROFILE (auto: perf record the receive of an incremental if it is >10% slower;
#      1 always, 0 never)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
W=${BENCH_DIR:-/tmp/blkdelta-trust}
SIZE_H=${BENCH_SIZE:-4G}
RUNS=${BENCH_RUNS:-3}
PCT=${BENCH_PCT:-5}
BASE=${BENCH_BASE:-1f56205}
BASE_DIR=${BENCH_BASE_DIR:-/tmp/bd-base}
BIG_H=${BENCH_BIG:-1T}
DIV=${BENCH_DIVERGE:-1}
KEEP=${BENCH_KEEP_FIXTURE:-0}
PROFILE=${BENCH_PROFILE:-auto}
SIZE=$(numfmt --from=iec "$SIZE_H")
MIB=1048576
log() { echo "== $*" >&2; }
need() { command -v "$1" >/dev/null || { echo "bench: needs $1" >&2; exit 1; }; }
need qemu-img; need qemu-io; need python3; need /usr/bin/time

log "build: this tree"
(cd "$root" && cargo build --release --quiet)
BD=$root/target/release/blkdelta
log "build: baseline $BASE in $BASE_DIR"
if [ ! -e "$BASE_DIR/Cargo.toml" ]; then git -C "$root" worktree add -f "$BASE_DIR" "$BASE" >&2; fi
[ "$(git -C "$BASE_DIR" rev-parse HEAD)" = "$(git -C "$root" rev-parse "$BASE^{commit}")" ] \
  || { echo "bench: $BASE_DIR is not at $BASE" >&2; exit 1; }
(cd "$BASE_DIR" && CARGO_TARGET_DIR="$BASE_DIR/target" cargo build --release --quiet)
BB=$BASE_DIR/target/release/blkdelta

mkdir -p "$W"; cd "$W"
STAMP="$SIZE_H $PCT $(md5sum < "$root/bench/genops.py" | cut -c1-8)"
if [ "$KEEP" = 1 ] && [ -f fixture.ok ] && [ "$(cat fixture.ok)" = "$STAMP" ]; then
  log "fixture: reusing $W"
  rm -rf results
else
  # ------------------------------------------------------------ fixture (as bench/run.sh)
  find "$W" -mindepth 1 -delete
  log "fixture: $SIZE_H qcow2, ~50% random data in pieces of $((SIZE/64)) bytes"
  half_random_qcow2 img.qcow2 "$SIZE"
  qemu-img snapshot -c s1 img.qcow2
  python3 "$root/bench/genops.py" "$SIZE" PAT "$PCT" 42 > ops.txt
  split -l 300 -d ops.txt ops.batch.
  for b in ops.batch.*; do head -c 1M /dev/urandom > "$b.pat"; done
  for b in ops.batch.*[0-9]; do
    args=()
    while IFS= read -r line; do args+=(-c "${line//PAT/$b.pat}"); done < "$b"
    qemu-io -f qcow2 "${args[@]}" img.qcow2
  done
  qemu-img snapshot -c s2 img.qcow2
  qemu-img convert -l snapshot.name=s1 -O raw img.qcow2 s1.raw
  qemu-img convert -l snapshot.name=s2 -O raw img.qcow2 s2.raw
  echo "$STAMP" > fixture.ok
fi
nops=$(wc -l < ops.txt)

# 1 MiB blocks that differ between s1 and s2 (read from the raw exports, not by blkdelta)
read -r DIFF_BLOCKS DIFF_TO_ZERO < <(python3 - s1.raw s2.raw <<'EOF'
import sys
a, b = open(sys.argv[1], "rb"), open(sys.argv[2], "rb")
z = bytes(1 << 20); n = nz = 0
while True:
    x, y = a.read(1 << 20), b.read(1 << 20)
    if not x and not y: break
    if x != y:
        n += 1
        if y == z[:len(y)]: nz += 1
print(n, nz)
EOF
)
log "1 MiB blocks differing between s1 and s2: $DIFF_BLOCKS ($DIFF_TO_ZERO of them all zero in s2)"

# ---------------------------------------------------------------- helpers
DROP=no
drop() { sync; if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then DROP=yes; fi; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }
R=$W/results; rm -rf "$R"; mkdir -p "$R"
rec() { echo "$2" >> "$R/$1"; }   # name seconds
load() { cut -d' ' -f1 /proc/loadavg; }
fixid() { # REPLICA: make the state's identity that of the file (a restored backup of all three)
  python3 - "$1" <<'EOF'
import json, os, sys
rep = sys.argv[1]; st = rep + ".blkdelta"
s = os.stat(rep)
d = json.load(open(st))
d["identity"] = {"kind": "file", "dev": s.st_dev, "ino": s.st_ino, "size": s.st_size,
                 "mtime_ns": s.st_mtime_ns}
with open(st + ".tmp", "w") as f:
    json.dump(d, f, indent=2); f.write("\n")
os.replace(st + ".tmp", st)
EOF
}
restore() { # SAVED NEW [sparse|full]: copy a saved replica with its state (and hashes, if any)
  rm -f "$2" "$2".blkdelta "$2".blkdelta.hashes "$2".blkdelta.hashes.pieces "$2".blkdelta.lock
  cp --sparse="${3:-always}" "$1" "$2"; cp "$1".blkdelta "$2".blkdelta
  if [ -f "$1".blkdelta.hashes ]; then cp "$1".blkdelta.hashes "$2".blkdelta.hashes; fi
  if [ -f "$1".blkdelta.hashes.pieces ]; then cp "$1".blkdelta.hashes.pieces "$2".blkdelta.hashes.pieces; fi
  if grep -q '"identity"' "$2".blkdelta; then fixid "$2"; fi
}
kept_note() { grep -q 'from the kept block hashes' "$1" || { echo "bench: $2 did not answer from the kept hashes:" >&2; cat "$1" >&2; exit 1; }; }

# saved s1 replicas, one per binary; a fully allocated copy of this tree's
log "saved s1 replicas"
for v in new base; do
  b=$BD; [ $v = base ] && b=$BB
  rm -f s1-$v.raw*; "$b" send -q img.qcow2@s1 | "$b" receive -q s1-$v.raw
done
restore s1-new.raw s1-full.raw never
"$BD" send -q img.qcow2@s1..s2 > incr-new.stream; "$BB" send -q img.qcow2@s1..s2 > incr-base.stream
ALLOC_S1=$(du -B1 s1-new.raw | cut -f1)
ALLOC_FULL=$(du -B1 s1-full.raw | cut -f1)

seed() { # new|base
  local b=$BD; [ "$1" = base ] && b=$BB
  rm -f seed-$1.raw*; drop; local t0; t0=$(now)
  "$b" send -q img.qcow2@s1 | "$b" receive -q seed-$1.raw
  rec seed_$1 "$(secs "$t0")"
}
incr() { # new|base
  local b=$BD; [ "$1" = base ] && b=$BB
  restore s1-$1.raw incr-$1.raw; drop; local t0; t0=$(now)
  "$b" send -q img.qcow2@s1..s2 | "$b" receive -q incr-$1.raw
  rec incr_$1 "$(secs "$t0")"
}
timed() { # NAME CMD...: cold, stdout to NAME.out, stderr to NAME.err; CPU seconds to NAME.cpu
  local n=$1; shift; drop; local t0; t0=$(now)
  /usr/bin/time -f '%U %S' -o "$n.time" "$@" > "$n.out" 2> "$n.err"
  rec "$n" "$(secs "$t0")"; rec "$n.cpu" "$(awk '{print $1 + $2}' "$n.time")"
}
recv_only() { # new|base: the incremental's receive alone, stream from a file (read warm)
  local b=$BD; [ "$1" = base ] && b=$BB
  restore s1-$1.raw ro-$1.raw; drop; cat incr-$1.stream > /dev/null; local t0; t0=$(now)
  "$b" receive -q -i incr-$1.stream ro-$1.raw
  rec recv_$1 "$(secs "$t0")"
}
send_only() { # NAME ARGS...: a send alone, to /dev/null
  local n=$1; shift; drop; local t0; t0=$(now)
  "$BD" send -q "$@" > /dev/null
  rec "$n" "$(secs "$t0")"
}
seed2() { rm -f seed2.raw*; drop; local t0; t0=$(now); "$BD" send -q img.qcow2@s2 | "$BD" receive -q seed2.raw; rec seed_s2 "$(secs "$t0")"; }
repair() { # checksum --blocks from kept hashes, then send --against | receive --repair
  restore s1-new.raw rp.raw
  timed rp_blocks "$BD" checksum --blocks rp.raw; kept_note rp_blocks.err "checksum --blocks"
  drop; local t0; t0=$(now)
  "$BD" send -q --against rp_blocks.out img.qcow2@s2 | "$BD" receive -q --repair rp.raw
  rec rp_repair "$(secs "$t0")"
}
diverge() { # FILE: write 4 KiB of random bytes into DIV% of its 1 MiB blocks, behind blkdelta's back
  python3 - "$1" "$DIV" <<'EOF'
import os, random, sys
path, pct = sys.argv[1], float(sys.argv[2])
rng = random.Random(7)
blocks = os.stat(path).st_size >> 20
pick = rng.sample(range(blocks), max(1, round(blocks * pct / 100)))
fd = os.open(path, os.O_WRONLY)
for b in pick:
    os.pwrite(fd, os.urandom(4096), (b << 20) + rng.randrange(0, (1 << 20) - 4096, 512))
os.fsync(fd); os.close(fd)
print(len(pick))
EOF
}
diverged() { # the s1 replica written behind blkdelta's back, repaired to s1
  restore s1-new.raw dv.raw; DV_BLOCKS=$(diverge dv.raw)
  timed dv_blocks "$BD" checksum --blocks dv.raw
  grep -q 'read the replica' dv_blocks.err || { echo "bench: checksum --blocks of a diverged replica did not read it" >&2; cat dv_blocks.err >&2; exit 1; }
  drop; local t0; t0=$(now)
  "$BD" send -q --against dv_blocks.out img.qcow2@s1 | "$BD" receive -q --repair dv.raw
  rec dv_repair "$(secs "$t0")"
  timed dv_verify "$BD" verify dv.raw
}

# ---------------------------------------------------------------- rounds
LOADS=()
for ((i = 1; i <= RUNS; i++)); do
  log "round $i/$RUNS (load $(load))"; LOADS+=("$(load)")
  if ((i % 2)); then seed new; seed base; incr new; incr base
  else seed base; seed new; incr base; incr new; fi
  if ((i % 2)); then recv_only new; recv_only base; else recv_only base; recv_only new; fi
  # verify and dd of the same file, the order alternated per round: a file read just before
  # can come faster from below the guest (the host's cache) even after drop_caches
  vs() { timed verify_sparse "$BD" verify seed-new.raw; }
  ds() { timed dd_direct_sparse dd if=seed-new.raw of=/dev/null bs=1M iflag=direct status=none
         timed dd_buf_sparse dd if=seed-new.raw of=/dev/null bs=1M status=none; }
  vf() { timed verify_full "$BD" verify s1-full.raw; }
  df() { timed dd_direct_full dd if=s1-full.raw of=/dev/null bs=1M iflag=direct status=none
         timed dd_buf_full dd if=s1-full.raw of=/dev/null bs=1M status=none; }
  if ((i % 2)); then vs; ds; vf; df; else ds; vs; df; vf; fi
  timed ck_kept "$BD" checksum seed-new.raw; kept_note ck_kept.err "checksum"
  timed ck_read "$BD" checksum --read seed-new.raw
  repair; seed2
  send_only send_against --against rp_blocks.out img.qcow2@s2; send_only send_full img.qcow2@s2
  diverged
  LOADS+=("$(load)")
done

# ---------------------------------------------------------------- correctness of what was measured
log "checks"
for f in seed-new.raw seed-base.raw s1-full.raw dv.raw; do cmp "$f" s1.raw || { echo "bench: $f differs from s1" >&2; exit 1; }; done
for f in incr-new.raw incr-base.raw ro-new.raw ro-base.raw rp.raw seed2.raw; do cmp "$f" s2.raw || { echo "bench: $f differs from s2" >&2; exit 1; }; done
D1=$("$BD" checksum img.qcow2@s1 | cut -d' ' -f1); D2=$("$BD" checksum img.qcow2@s2 | cut -d' ' -f1)
[ "$(cut -d' ' -f1 ck_kept.out)" = "$D1" ] && [ "$(cut -d' ' -f1 ck_read.out)" = "$D1" ] || { echo "bench: checksum of the replica is not s1's digest" >&2; exit 1; }
for f in rp.raw dv.raw incr-new.raw; do "$BD" verify "$f" > /dev/null; done

# bytes moved
B_incr=$("$BD" send -q img.qcow2@s1..s2 | wc -c)
B_incr_base=$("$BB" send -q img.qcow2@s1..s2 | wc -c)
restore s1-new.raw rp2.raw; "$BD" checksum --blocks rp2.raw > rp2.blocks 2>/dev/null
"$BD" send -q --against rp2.blocks img.qcow2@s2 > repair.stream
B_rep=$(stat -c %s repair.stream)
REP_DATA=$("$BD" dump repair.stream | grep -c '^data ' || true)
REP_ZERO=$("$BD" dump repair.stream | grep -c '^zero ' || true)
"$BD" send -q -l 0 --against rp2.blocks img.qcow2@s2 > repair0.stream
B_rep0=$(stat -c %s repair0.stream)
restore s1-new.raw dv2.raw; diverge dv2.raw > /dev/null; "$BD" checksum --blocks dv2.raw > dv2.blocks 2>/dev/null
B_dv=$("$BD" send -q --against dv2.blocks img.qcow2@s1 | wc -c)
rm -f rp2.raw* dv2.raw* repair0.stream

# ---------------------------------------------------------------- 1 TiB virtual replica
log "1 TiB: $BIG_H qcow2 with 8 MiB of data, seed, checksum"
rm -f big.qcow2 big.raw big.raw.blkdelta*
qemu-img create -q -f qcow2 big.qcow2 "$BIG_H"
BIGSZ=$(numfmt --from=iec "$BIG_H")
head -c 1M /dev/urandom > big.pat
bargs=(); for k in 0 1 2 3 4 5 6 7; do bargs+=(-c "write -q -s big.pat $(( (BIGSZ / 8 * k + 12345 * MIB) / MIB * MIB % BIGSZ )) 1M"); done
qemu-io -f qcow2 "${bargs[@]}" big.qcow2
qemu-img snapshot -c b1 big.qcow2
drop; t0=$(now); "$BD" send -q big.qcow2@b1 | "$BD" receive -q big.raw; rec big_seed "$(secs "$t0")"
HASHES_BIG=$(stat -c %s big.raw.blkdelta.hashes)
for ((i = 1; i <= 5; i++)); do timed big_kept "$BD" checksum big.raw; kept_note big_kept.err "checksum of big.raw"; done
for ((i = 1; i <= 5; i++)); do t0=$(now); "$BD" checksum big.raw > big_warm.out 2>/dev/null; rec big_kept_warm "$(secs "$t0")"; done
for ((i = 1; i <= 3; i++)); do timed big_read "$BD" checksum --read big.raw; done
timed big_verify "$BD" verify big.raw
DB=$("$BD" checksum big.qcow2@b1 | cut -d' ' -f1)
[ "$(cut -d' ' -f1 big_kept.out)" = "$DB" ] && [ "$(cut -d' ' -f1 big_read.out)" = "$DB" ] || { echo "bench: big.raw's checksum is not b1's" >&2; exit 1; }

# ---------------------------------------------------------------- profile
med() { [ -f "$R/$1" ] && sort -g "$R/$1" | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}' || echo n/a; }
ratio() { [ "$1" = n/a ] || [ "$2" = n/a ] && echo n/a || awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
yn() { [ "$1" = n/a ] && echo n/a || awk -v r="$1" -v g="$2" -v d="$3" 'BEGIN{print ((d=="le" ? r<=g : (d=="lt" ? r<g : r>=g)) ? "yes" : "no")}'; }
mbs() { awk -v b="$1" -v s="$2" 'BEGIN{printf "%.0f", b/s/1e6}'; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }

r_seed=$(ratio "$(med seed_new)" "$(med seed_base)")
r_incr=$(ratio "$(med incr_new)" "$(med incr_base)")
if [ "$PROFILE" = 1 ] || { [ "$PROFILE" = auto ] && [ "$(yn "$r_incr" 1.10 le)" = no ]; }; then
  if command -v perf >/dev/null; then
    log "profile: incremental receive (this tree)"
    "$BD" send -q img.qcow2@s1..s2 > incr.stream
    restore s1-new.raw prof.raw; drop
    perf record -q -g -o perf.receive.data -- "$BD" receive -q -i incr.stream prof.raw 2>/dev/null
    perf report -i perf.receive.data --no-children --stdio 2>/dev/null > perf.receive.full || true
    grep -v '^$' perf.receive.full | head -80 > perf.receive.txt || true
    echo "profile of the receive: $W/perf.receive.txt (perf report -i $W/perf.receive.data --no-children)" >&2
    if command -v strace >/dev/null; then
      restore s1-new.raw prof.raw; drop
      strace -f -T -e trace=openat,pread64 -o strace.receive.txt "$BD" receive -q -i incr.stream prof.raw
      # the replica's descriptor: the last open of prof.raw for writing
      fd=$(grep 'openat(AT_FDCWD, "prof.raw", O_RDWR' strace.receive.txt | tail -1 | sed 's/.* = \([0-9]*\) <.*/\1/' || true)
      if [ -n "$fd" ]; then
        { grep "pread64($fd, \"" strace.receive.txt || true; } | sed 's/.*, \([0-9]*\)) = \([0-9]*\) <\([0-9.]*\)>$/\2 \3/' \
          | awk -v fd="$fd" '{n++; b+=$1; t+=$2} END{printf "receive: %d preads of the replica (fd %d), %.1f MiB, %.3f s inside pread64\n", n, fd, b/1048576, t}' > strace.receive.sum
        cat strace.receive.sum >&2
      fi
    fi
  fi
fi

# ---------------------------------------------------------------- table
echo
echo "blkdelta trust bench: size $SIZE_H, $RUNS round(s), changes $PCT% ($nops qemu-io commands), caches dropped before each op: $DROP"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r), work dir fs $(stat -f -c %T "$W"), $(qemu-img --version | head -1)"
echo "this tree $(git -C "$root" rev-parse --short HEAD), baseline $(git -C "$BASE_DIR" rev-parse --short HEAD); load average at round starts/ends: ${LOADS[*]}"
echo "s1 replica: $(mib "$SIZE") MiB, $(mib "$ALLOC_S1") MiB allocated; 1 MiB blocks differing s1 -> s2: $DIFF_BLOCKS ($DIFF_TO_ZERO all zero in s2)"
echo
printf '| %-62s | %9s | %s\n' "operation (cold cache)" "median s" "notes"
printf '|%s|%s|%s\n' "$(printf -- '-%.0s' {1..64})" "-----------" "------"
row() { printf '| %-62s | %9s | %s\n' "$1" "$2" "${3:-}"; }
row "seed send img@s1 | receive, this tree" "$(med seed_new)"
row "seed send img@s1 | receive, baseline" "$(med seed_base)"
row "incremental s1..s2 onto restored s1 replica, this tree" "$(med incr_new)" "stream $(mib "$B_incr") MiB"
row "incremental s1..s2 onto restored s1 replica, baseline" "$(med incr_base)" "stream $(mib "$B_incr_base") MiB"
row "incremental's receive alone (stream from a file), this tree" "$(med recv_new)"
row "incremental's receive alone (stream from a file), baseline" "$(med recv_base)"
row "verify, s1 replica as received (sparse)" "$(med verify_sparse)" "$(mbs "$ALLOC_S1" "$(med verify_sparse)") MB/s of data read, $(mbs "$SIZE" "$(med verify_sparse)") MB/s of disk"
row "dd iflag=direct, same (reads the holes too)" "$(med dd_direct_sparse)" "$(mbs "$SIZE" "$(med dd_direct_sparse)") MB/s"
row "dd buffered, same" "$(med dd_buf_sparse)" "$(mbs "$SIZE" "$(med dd_buf_sparse)") MB/s"
row "verify, fully allocated copy of the s1 replica" "$(med verify_full)" "$(mbs "$ALLOC_FULL" "$(med verify_full)") MB/s, $(med verify_full.cpu) CPU s"
row "dd iflag=direct, same" "$(med dd_direct_full)" "$(mbs "$ALLOC_FULL" "$(med dd_direct_full)") MB/s, $(med dd_direct_full.cpu) CPU s"
row "dd buffered, same" "$(med dd_buf_full)" "$(mbs "$ALLOC_FULL" "$(med dd_buf_full)") MB/s"
row "checksum of the 4G replica (kept hashes)" "$(med ck_kept)"
row "checksum --read of the 4G replica" "$(med ck_read)"
row "repair: checksum --blocks of the s1 replica (kept hashes)" "$(med rp_blocks)"
row "repair: send --against BLOCKS img@s2 | receive --repair" "$(med rp_repair)" "stream $(mib "$B_rep") MiB ($REP_DATA data, $REP_ZERO zero records; -l 0: $(mib "$B_rep0") MiB)"
row "seed of s2 (send img@s2 | receive), this tree" "$(med seed_s2)"
row "send --against BLOCKS img@s2 > /dev/null (sender alone)" "$(med send_against)"
row "send img@s2 > /dev/null (sender alone)" "$(med send_full)"
row "diverged ($DIV% = $DV_BLOCKS blocks): checksum --blocks (reads)" "$(med dv_blocks)"
row "diverged: send --against BLOCKS img@s1 | receive --repair" "$(med dv_repair)" "stream $(mib "$B_dv") MiB"
row "diverged: verify after the repair" "$(med dv_verify)"
row "$BIG_H: seed (8 MiB of data), this tree" "$(med big_seed)" "hashes file $(mib "$HASHES_BIG") MiB"
row "$BIG_H: checksum (kept hashes), cold" "$(med big_kept)"
row "$BIG_H: checksum (kept hashes), warm" "$(med big_kept_warm)"
row "$BIG_H: checksum --read" "$(med big_read)"
row "$BIG_H: verify" "$(med big_verify)"
echo
ddbest=$(awk -v a="$(med dd_direct_full)" -v b="$(med dd_buf_full)" 'BEGIN{print (a<b?a:b)}')
r_ver=$(ratio "$ddbest" "$(med verify_full)")
rp_bytes=$(ratio "$B_rep" "$((DIFF_BLOCKS * MIB))")
rp_nz=$(ratio "$B_rep" "$(( (DIFF_BLOCKS - DIFF_TO_ZERO) * MIB))")
r_rep=$(ratio "$(awk -v a="$(med rp_blocks)" -v b="$(med rp_repair)" 'BEGIN{print a+b}')" "$(med seed_s2)")
printf '| %-66s | %8s | %7s | %8s |\n' "goal" "measured" "target" "goal met"
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..68})" "----------" "---------" "----------"
g() { printf '| %-66s | %8s | %7s | %8s |\n' "$1" "$2" "$3" "$4"; }
g "seed time, this tree / baseline" "$r_seed" "<= 1.10" "$(yn "$r_seed" 1.10 le)"
g "incremental time, this tree / baseline" "$r_incr" "<= 1.10" "$(yn "$r_incr" 1.10 le)"
g "incremental's receive alone, this tree / baseline" "$(ratio "$(med recv_new)" "$(med recv_base)")" "(info)" "-"
g "$BIG_H checksum from kept hashes, cold (s)" "$(med big_kept)" "< 0.1" "$(yn "$(med big_kept)" 0.1 lt)"
g "verify read rate / faster cold dd's, fully allocated replica" "$r_ver" ">= 0.90" "$(yn "$r_ver" 0.90 ge)"
g "repair stream bytes / (differing 1 MiB blocks x 1 MiB)" "$rp_bytes" "<= 1.1" "$(yn "$rp_bytes" 1.1 le)"
g "repair stream bytes / (differing blocks not all zero x 1 MiB)" "$rp_nz" "(info)" "-"
g "repair time (checksum --blocks + repair) / seed of s2" "$r_rep" "< 0.5" "$(yn "$r_rep" 0.5 lt)"
