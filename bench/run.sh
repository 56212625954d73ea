#!/usr/bin/env bash
# blkdelta benchmark: builds a qcow2 fixture (~50% random data, snapshot s1, ~5% scattered
# changes, snapshot s2) and measures, interleaved over BENCH_RUNS rounds (medians):
# blkdelta incremental (-l 0 and default) and seed (-l 0 and default) into a raw replica, and
# into a qcow2 replica that keeps history; qemu-img convert (as is; -t writeback, which is
# durable: buffered writes and one fdatasync; -t none, O_DIRECT; and with its output synced
# after), qemu-img convert -B of an equivalent overlay (as is, and -t writeback: durable), rsync --inplace, btrfs send/receive (if
# a loop-mounted btrfs can be set up), and dd reading and dd writing the seed's data at once.
# The incremental also runs into a replica on tmpfs (another device than the source, as a
# backup host's disk is), against convert -B writing its overlay there, and against dd reading
# and writing its bytes at once on the one disk.
# Env: BENCH_DIR (/tmp/blkdelta-bench) BENCH_SIZE (4G) BENCH_RUNS (3) BENCH_PCT (5)
#      BENCH_INCR_REPEAT (3): the incrementals and their peers run that many times a round
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
W=${BENCH_DIR:-/tmp/blkdelta-bench}
SIZE_H=${BENCH_SIZE:-4G}
RUNS=${BENCH_RUNS:-3}
PCT=${BENCH_PCT:-5}
INCR_REPEAT=${BENCH_INCR_REPEAT:-3}
SIZE=$(numfmt --from=iec "$SIZE_H")
K=65536
log() { echo "== $*" >&2; }
need() { command -v "$1" >/dev/null || { echo "bench: needs $1" >&2; exit 1; }; }
need qemu-img; need qemu-io; need python3; need /usr/bin/time

(cd "$root" && cargo build --release --quiet)
BD=$root/target/release/blkdelta

if ! command -v rsync >/dev/null; then
  apt-get install -y -q rsync >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q rsync >/dev/null 2>&1; } || true
fi
HAVE_RSYNC=yes; command -v rsync >/dev/null || { HAVE_RSYNC="skipped: rsync not installed and apt-get install failed"; echo "!! $HAVE_RSYNC" >&2; }

rm -rf "$W"; mkdir -p "$W"; cd "$W"

# ---------------------------------------------------------------- fixture
log "fixture: $SIZE_H qcow2, ~50% random data in pieces of $((SIZE/64)) bytes"
half_random_qcow2 img.qcow2 "$SIZE"
qemu-img snapshot -c s1 img.qcow2

# the equivalent overlay: s1 exported to a qcow2 base, empty overlay on top
qemu-img convert -l snapshot.name=s1 -O qcow2 img.qcow2 s1-base.qcow2
qemu-img create -q -f qcow2 -b s1-base.qcow2 -F qcow2 overlay.qcow2

python3 "$root/bench/genops.py" "$SIZE" PAT "$PCT" 42 > ops.txt
split -l 300 -d ops.txt ops.batch.
nops=$(wc -l < ops.txt)
log "changes: $nops qemu-io commands ($(grep -c '^write -q -s' ops.txt) data writes, $(grep -c 'write -q -z' ops.txt) write -z, $(grep -c '^discard' ops.txt) discard)"
for b in ops.batch.*; do head -c 1M /dev/urandom > "$b.pat"; done
apply_ops() { # FMT FILE: apply every batch, one qemu-io call per batch
  local b args line
  for b in ops.batch.*[0-9]; do
    args=()
    while IFS= read -r line; do args+=(-c "${line//PAT/$b.pat}"); done < "$b"
    qemu-io -f "$1" "${args[@]}" "$2"
  done
}
apply_ops qcow2 img.qcow2
qemu-img snapshot -c s2 img.qcow2
apply_ops qcow2 overlay.qcow2

# raw exports (for rsync, btrfs and checks)
qemu-img convert -l snapshot.name=s1 -O raw img.qcow2 s1.raw
qemu-img convert -l snapshot.name=s2 -O raw img.qcow2 s2.raw
qemu-img convert -O raw overlay.qcow2 ov.raw
cmp s2.raw ov.raw || { echo "bench: overlay does not match s2" >&2; exit 1; }
rm -f ov.raw
changed=$(cmp -l s1.raw s2.raw | wc -l || true)
log "bytes that differ between s1 and s2: $changed"

# s1 replicas (raw, and qcow2 keeping history) kept aside, restored before every incremental
"$BD" send -q img.qcow2@s1 | "$BD" receive -q s1-replica.raw
"$BD" send -q img.qcow2@s1 | "$BD" receive -q s1-replica.qcow2

# ---------------------------------------------------------------- btrfs (optional)
BTRFS="skipped"
btrfs_setup() {
  command -v mkfs.btrfs >/dev/null || apt-get install -y -q btrfs-progs >/dev/null 2>&1 || { BTRFS="skipped: mkfs.btrfs not available"; return 1; }
  truncate -s $((3 * SIZE + 2 * 1024 * 1024 * 1024)) btrfs.img
  mkfs.btrfs -q -f btrfs.img >/dev/null 2>&1 || { BTRFS="skipped: mkfs.btrfs failed"; return 1; }
  LOOP=$(losetup -f --show btrfs.img 2>/dev/null) || { BTRFS="skipped: no loop device (losetup failed)"; return 1; }
  mkdir -p mnt
  mount "$LOOP" mnt 2>/dev/null || { losetup -d "$LOOP"; BTRFS="skipped: mount of loop btrfs failed"; return 1; }
  btrfs subvolume create mnt/src >/dev/null
  cp --sparse=always s1.raw mnt/src/disk.raw
  btrfs subvolume snapshot -r mnt/src mnt/snap1 >/dev/null
  apply_ops raw mnt/src/disk.raw
  sync
  btrfs subvolume snapshot -r mnt/src mnt/snap2 >/dev/null
  cmp mnt/snap2/disk.raw s2.raw || { BTRFS="skipped: btrfs copy differs from s2"; return 1; }
  mkdir -p mnt/dst
  btrfs send -q mnt/snap1 | btrfs receive -q mnt/dst
  BTRFS=yes
}
btrfs_cleanup() { if [ -n "${LOOP:-}" ]; then umount "$W/mnt" 2>/dev/null || true; losetup -d "$LOOP" 2>/dev/null || true; fi; }
trap btrfs_cleanup EXIT
btrfs_setup || true
[ "$BTRFS" = yes ] || echo "!! btrfs: $BTRFS" >&2

# ---------------------------------------------------------------- measurements
DROP=no
drop() { sync; if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then DROP=yes; fi; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }
R=$W/results; mkdir -p "$R"
rec() { echo "$2" >> "$R/$1.$3"; }   # name value kind
T() { /usr/bin/time -f '%e %M' -o "$1" "${@:2}"; }
rss() { awk '{print $2}' "$1"; }

restore_s1() { # copy the saved s1 replica with its state and kept hashes, then make the state's
  # identity that of the copy (as a restored backup of all three would be): blkdelta refuses a
  # replica replaced behind its back
  # DIR (default .): where the replica goes
  local r=${1:-.}/rep.raw
  rm -f "$r" "$r.blkdelta" "$r.blkdelta.hashes" "$r.blkdelta.hashes.pieces" "$r.blkdelta.lock"
  cp --sparse=always s1-replica.raw "$r"; cp s1-replica.raw.blkdelta "$r.blkdelta"
  [ ! -f s1-replica.raw.blkdelta.hashes ] || cp s1-replica.raw.blkdelta.hashes "$r.blkdelta.hashes"
  [ ! -f s1-replica.raw.blkdelta.hashes.pieces ] || cp s1-replica.raw.blkdelta.hashes.pieces "$r.blkdelta.hashes.pieces"
  python3 - "$r" <<'PY'
import json, os, sys
rep = sys.argv[1]; st = rep + ".blkdelta"
s = os.stat(rep)
d = json.load(open(st))
if "identity" in d:
    d["identity"] = {"kind": "file", "dev": s.st_dev, "ino": s.st_ino, "size": s.st_size,
                     "mtime_ns": s.st_mtime_ns}
    with open(st + ".tmp", "w") as f:
        json.dump(d, f, indent=2); f.write("\n")
    os.replace(st + ".tmp", st)
PY
}
restore_s1_qcow2() { # the same for the qcow2 replica: its identity is the file (dev, inode)
  rm -f rep.qcow2 rep.qcow2.blkdelta rep.qcow2.blkdelta.hashes rep.qcow2.blkdelta.hashes.pieces rep.qcow2.blkdelta.lock
  cp --sparse=always s1-replica.qcow2 rep.qcow2; cp s1-replica.qcow2.blkdelta rep.qcow2.blkdelta
  [ ! -f s1-replica.qcow2.blkdelta.hashes ] || cp s1-replica.qcow2.blkdelta.hashes rep.qcow2.blkdelta.hashes
  [ ! -f s1-replica.qcow2.blkdelta.hashes.pieces ] || cp s1-replica.qcow2.blkdelta.hashes.pieces rep.qcow2.blkdelta.hashes.pieces
  python3 - rep.qcow2 <<'PY'
import json, os, sys
rep = sys.argv[1]; st = rep + ".blkdelta"
s = os.stat(rep)
d = json.load(open(st))
d["identity"] = {"kind": "image", "dev": s.st_dev, "ino": s.st_ino}
with open(st + ".tmp", "w") as f:
    json.dump(d, f, indent=2); f.write("\n")
os.replace(st + ".tmp", st)
PY
}
bd_incr_qcow2() {
  restore_s1_qcow2
  drop; local t0; t0=$(now)
  T t.s "$BD" send -q img.qcow2@s1..s2 | T t.r "$BD" receive -q rep.qcow2
  rec incrq "$(secs "$t0")" sec; rec incrq "$(rss t.s)" rss_send; rec incrq "$(rss t.r)" rss_recv
}
bd_seed_qcow2() {
  rm -f new.qcow2 new.qcow2.blkdelta new.qcow2.blkdelta.hashes new.qcow2.blkdelta.hashes.pieces new.qcow2.blkdelta.lock; drop; local t0; t0=$(now)
  T t.s "$BD" send -q img.qcow2@s2 | T t.r "$BD" receive -q new.qcow2
  rec seedq "$(secs "$t0")" sec; rec seedq "$(rss t.s)" rss_send; rec seedq "$(rss t.r)" rss_recv
}
bd_incr() { # NAME LEVEL
  restore_s1
  drop; local t0; t0=$(now)
  T t.s "$BD" send -q -l "$2" img.qcow2@s1..s2 | T t.r "$BD" receive -q rep.raw
  rec "$1" "$(secs "$t0")" sec; rec "$1" "$(rss t.s)" rss_send; rec "$1" "$(rss t.r)" rss_recv
}
# The incremental with the replica on another device than the source, as when it is sent to a
# backup host: tmpfs stands in for that host's disk (the source's reads and the replica's writes
# no longer share one disk); convert -B writes its overlay there too.
bd_incr_other() {
  restore_s1 "$OTHER"
  drop; local t0; t0=$(now)
  T t.s "$BD" send -q -l 0 img.qcow2@s1..s2 | T t.r "$BD" receive -q "$OTHER/rep.raw"
  rec incrO "$(secs "$t0")" sec; rec incrO "$(rss t.s)" rss_send; rec incrO "$(rss t.r)" rss_recv
}
qi_convert_B_other() {
  rm -f "$OTHER/delta.qcow2"; drop; local t0; t0=$(now)
  T t.s qemu-img convert -f qcow2 -O qcow2 -B "$W/s1-base.qcow2" -F qcow2 overlay.qcow2 "$OTHER/delta.qcow2"
  rec convertBO "$(secs "$t0")" sec; rec convertBO "$(rss t.s)" rss_send
}
incr_floor() { # the incremental's bytes read and written at once on this one disk, O_DIRECT
  rm -f floor.out; drop; local t0; t0=$(now)
  dd if=img.qcow2 of=/dev/null bs=64K count="$((INCR_MIB * 16))" iflag=direct status=none &
  dd if=/dev/zero of=floor.out bs=64K count="$((INCR_MIB * 16))" oflag=direct conv=fdatasync status=none
  wait
  rec floorI "$(secs "$t0")" sec; rm -f floor.out
}
bd_seed() { # NAME LEVEL
  rm -f new.raw new.raw.blkdelta new.raw.blkdelta.hashes new.raw.blkdelta.hashes.pieces new.raw.blkdelta.lock; drop; local t0; t0=$(now)
  T t.s "$BD" send -q -l "$2" img.qcow2@s2 | T t.r "$BD" receive -q new.raw
  rec "$1" "$(secs "$t0")" sec; rec "$1" "$(rss t.s)" rss_send; rec "$1" "$(rss t.r)" rss_recv
}
qi_convert() {
  rm -f conv.raw; drop; local t0; t0=$(now)
  T t.s qemu-img convert -l snapshot.name=s2 -O raw img.qcow2 conv.raw
  rec convert "$(secs "$t0")" sec; rec convert "$(rss t.s)" rss_send
}
qi_convert_cache() { # NAME MODE: qemu-img's own durable copies (-t writeback: buffered writes,
  # then one fdatasync before it exits; -t none: O_DIRECT)
  rm -f conv.raw; drop; local t0; t0=$(now)
  T t.s qemu-img convert -t "$2" -l snapshot.name=s2 -O raw img.qcow2 conv.raw
  rec "$1" "$(secs "$t0")" sec; rec "$1" "$(rss t.s)" rss_send
}
qi_convert_sync() { # the same, its output then made durable, as a receive makes the replica
  rm -f conv.raw; drop; local t0; t0=$(now)
  T t.s qemu-img convert -l snapshot.name=s2 -O raw img.qcow2 conv.raw
  sync conv.raw
  rec convsync "$(secs "$t0")" sec; rec convsync "$(rss t.s)" rss_send
}
disk_floor() { # what no durable seed beats here: as many bytes read and written at once, O_DIRECT
  rm -f floor.out; drop; local t0; t0=$(now)
  dd if=img.qcow2 of=/dev/null bs=1M count="$SEED_MIB" iflag=direct status=none &
  dd if=/dev/zero of=floor.out bs=1M count="$SEED_MIB" oflag=direct conv=fdatasync status=none
  wait
  rec floor "$(secs "$t0")" sec; rm -f floor.out
}
qi_convert_B() {
  rm -f delta.qcow2; drop; local t0; t0=$(now)
  T t.s qemu-img convert -f qcow2 -O qcow2 -B s1-base.qcow2 -F qcow2 overlay.qcow2 delta.qcow2
  rec convertB "$(secs "$t0")" sec; rec convertB "$(rss t.s)" rss_send
}
qi_convert_B_wb() { # the same, durable: -t writeback ends with fdatasync, as a receive does
  rm -f delta.qcow2; drop; local t0; t0=$(now)
  T t.s qemu-img convert -t writeback -f qcow2 -O qcow2 -B s1-base.qcow2 -F qcow2 overlay.qcow2 delta.qcow2
  rec convertBwb "$(secs "$t0")" sec; rec convertBwb "$(rss t.s)" rss_send
}
do_rsync() {
  rm -f rs.raw; cp --sparse=always s1.raw rs.raw; drop; local t0; t0=$(now)
  T t.s rsync --inplace --no-whole-file --stats s2.raw rs.raw > rsync.stats
  rec rsync "$(secs "$t0")" sec; rec rsync "$(rss t.s)" rss_send
}
do_btrfs() {
  btrfs subvolume delete -c mnt/dst/snap2 >/dev/null 2>&1 || true; sync; drop; local t0; t0=$(now)
  T t.s btrfs send -q -p mnt/snap1 mnt/snap2 | T t.r btrfs receive -q mnt/dst
  rec btrfs "$(secs "$t0")" sec; rec btrfs "$(rss t.s)" rss_send; rec btrfs "$(rss t.r)" rss_recv
}

SEED_MIB=$(( $(du -B1 s2.raw | cut -f1) / 1048576 ))   # the data a seed reads and writes
INCR_MIB=$(( $("$BD" send -q -l 0 img.qcow2@s1..s2 | wc -c) / 1048576 ))   # and an incremental
OTHER=${BENCH_OTHER_DIR:-/dev/shm/blkdelta-bench-other}
if mkdir -p "$OTHER" 2>/dev/null && [ "$(stat -f -c %T "$OTHER")" != "$(stat -f -c %T "$W")" ]; then
  HAVE_OTHER=yes; trap 'btrfs_cleanup; rm -rf "$OTHER"' EXIT
else
  HAVE_OTHER="skipped: no tmpfs at $OTHER"; echo "!! other device: $HAVE_OTHER" >&2
fi
for ((i = 1; i <= RUNS; i++)); do
  log "round $i/$RUNS"
  for ((j = 0; j < INCR_REPEAT; j++)); do  # the short ones, more samples against the noise
    bd_incr incr0 0; qi_convert_B; bd_incr incr3 3; qi_convert_B_wb; bd_incr_qcow2; incr_floor
    [ "$HAVE_OTHER" = yes ] && { bd_incr_other; qi_convert_B_other; }
  done
  bd_seed seed 3; qi_convert_cache convwb writeback
  bd_seed seed0 0; bd_seed_qcow2; qi_convert_cache convnone none; qi_convert; qi_convert_sync; disk_floor
  [ "$HAVE_RSYNC" = yes ] && do_rsync
  [ "$BTRFS" = yes ] && do_btrfs
done

# correctness of what was measured
cmp rep.raw s2.raw && cmp new.raw s2.raw && cmp conv.raw s2.raw || { echo "bench: a replica differs from s2" >&2; exit 1; }
[ "$HAVE_OTHER" != yes ] || cmp "$OTHER/rep.raw" s2.raw || { echo "bench: $OTHER/rep.raw differs from s2" >&2; exit 1; }
for q in rep.qcow2 new.qcow2; do
  qemu-img convert -O raw "$q" q.raw && cmp q.raw s2.raw || { echo "bench: $q differs from s2" >&2; exit 1; }
  qemu-img check -q "$q" || { echo "bench: qemu-img check $q failed" >&2; exit 1; }
done
rm -f q.raw
qemu-img convert -O raw -f qcow2 delta.qcow2 d.raw 2>/dev/null && { cmp d.raw s2.raw || echo "!! convert -B output does not read back as s2" >&2; rm -f d.raw; }

# bytes moved
B_incr0=$("$BD" send -q -l 0 img.qcow2@s1..s2 | wc -c)
B_incr3=$("$BD" send -q img.qcow2@s1..s2 | wc -c)
B_seed=$("$BD" send -q img.qcow2@s2 | wc -c)
B_conv=$(du -B1 conv.raw | cut -f1)        # allocated bytes written
B_convB=$(stat -c %s delta.qcow2)
B_rsync=n/a; [ "$HAVE_RSYNC" = yes ] && B_rsync=$(awk -F': ' '/Literal data/{gsub(/[ ,a-z]/,"",$2); print $2}' rsync.stats)
B_btrfs=n/a; [ "$BTRFS" = yes ] && B_btrfs=$(btrfs send -q -p mnt/snap1 mnt/snap2 | wc -c)

med() { [ -f "$R/$1.$2" ] && sort -g "$R/$1.$2" | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}' || echo n/a; }
mib() { [[ $1 =~ ^[0-9]+$ ]] && awk -v b="$1" 'BEGIN{printf "%.1f MiB", b/1048576}' || echo "$1"; }
peak() { local s r; s=$(med "$1" rss_send); r=$(med "$1" rss_recv); [ "$r" = n/a ] && echo "$((s/1024))" || echo "$((s/1024)) / $((r/1024))"; }
ratio() { [ "$1" = n/a ] || [ "$2" = n/a ] && echo n/a || awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
yn() { [ "$1" = n/a ] && echo n/a || awk -v r="$1" -v g="$2" -v d="$3" 'BEGIN{print ((d=="le" ? r<=g : r>=g) ? "yes" : "no")}'; }

s0=$(med incr0 sec); s3=$(med incr3 sec); ss=$(med seed sec); sc=$(med convert sec); sB=$(med convertB sec); sBw=$(med convertBwb sec)
scs=$(med convsync sec); sf=$(med floor sec); ss0=$(med seed0 sec); swb=$(med convwb sec); snone=$(med convnone sec)
r_wb0=$(ratio "$ss0" "$swb"); r_wb3=$(ratio "$ss" "$swb")
# the seed's peer: the faster of qemu-img's two durable copies in this run (-t writeback's
# buffered writes pay for every page the kernel hands it; -t none's O_DIRECT does not)
sdur=$(awk -v a="$swb" -v b="$snone" 'BEGIN{if (a == "n/a") print b; else if (b == "n/a" || a <= b) print a; else print b}')
r_dur0=$(ratio "$ss0" "$sdur"); r_dur3=$(ratio "$ss" "$sdur")
sr=$(med rsync sec); sb=$(med btrfs sec); sq=$(med seedq sec); s3q=$(med incrq sec)
r_seedq=$(ratio "$sq" "$ss"); r_incrq=$(ratio "$s3q" "$s3")
r_rs=$(ratio "$sr" "$s3"); r_B0=$(ratio "$s0" "$sB"); r_B0w=$(ratio "$s0" "$sBw"); r_B3=$(ratio "$s3" "$sB"); r_seed=$(ratio "$ss" "$sc"); r_seeds=$(ratio "$ss" "$scs"); r_floor=$(ratio "$ss" "$sf")
sO=$(med incrO sec); sBO=$(med convertBO sec); sfI=$(med floorI sec)
r_BO=$(ratio "$sO" "$sBO"); r_fI=$(ratio "$s0" "$sfI")
maxrss=$(sort -n "$R"/incr*.rss_* "$R"/seed*.rss_* | tail -1)

echo
echo "blkdelta bench: size $SIZE_H, $RUNS round(s) (incrementals x$INCR_REPEAT), changes $PCT% ($nops qemu-io commands, $changed bytes differ), caches dropped before each op: $DROP"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r), work dir fs $(stat -f -c %T "$W"), $(qemu-img --version | head -1)"
echo "btrfs: $BTRFS; rsync: $HAVE_RSYNC"
echo
printf '| %-52s | %9s | %14s | %18s |\n' "operation" "median s" "bytes moved" "peak RSS MiB (s/r)"
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..54})" "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..16})" "$(printf -- '-%.0s' {1..20})"
row() { printf '| %-52s | %9s | %14s | %18s |\n' "$1" "$2" "$3" "$4"; }
row "blkdelta send -l 0 img@s1..s2 | receive" "$s0" "$(mib "$B_incr0")" "$(peak incr0)"
row "blkdelta send img@s1..s2 | receive (level 3)" "$s3" "$(mib "$B_incr3")" "$(peak incr3)"
row "blkdelta send img@s2 | receive (seed)" "$ss" "$(mib "$B_seed")" "$(peak seed)"
row "blkdelta send -l 0 img@s2 | receive (seed)" "$ss0" "-" "$(peak seed0)"
row "blkdelta send img@s1..s2 | receive rep.qcow2 (history)" "$s3q" "$(mib "$B_incr3")" "$(peak incrq)"
row "blkdelta send img@s2 | receive new.qcow2 (history seed)" "$sq" "$(mib "$B_seed")" "$(peak seedq)"
row "qemu-img convert -l snapshot.name=s2 -O raw" "$sc" "$(mib "$B_conv") alloc" "$(peak convert)"
row "qemu-img convert ... -O raw, then sync conv.raw" "$scs" "$(mib "$B_conv") alloc" "$(peak convsync)"
row "qemu-img convert -t writeback (durable) ... -O raw" "$swb" "$(mib "$B_conv") alloc" "$(peak convwb)"
row "qemu-img convert -t none (O_DIRECT) ... -O raw" "$snone" "$(mib "$B_conv") alloc" "$(peak convnone)"
row "disk floor: dd read + dd write of the seed's data" "$sf" "2 x $SEED_MIB MiB" "-"
row "disk floor: dd read + dd write of the incremental's" "$sfI" "2 x $INCR_MIB MiB" "-"
if [ "$HAVE_OTHER" = yes ]; then
  row "blkdelta send -l 0 img@s1..s2 | receive (on tmpfs)" "$sO" "$(mib "$B_incr0")" "$(peak incrO)"
  row "qemu-img convert -O qcow2 -B (overlay on tmpfs)" "$sBO" "$(mib "$B_convB")" "$(peak convertBO)"
fi
row "qemu-img convert -O qcow2 -B s1-base overlay" "$sB" "$(mib "$B_convB")" "$(peak convertB)"
row "qemu-img convert -t writeback -B ... (durable)" "$sBw" "$(mib "$B_convB")" "$(peak convertBwb)"
[ "$HAVE_RSYNC" = yes ] && row "rsync --inplace --no-whole-file s2.raw s1-copy" "$sr" "$(mib "$B_rsync") lit" "$(peak rsync)"
[ "$BTRFS" = yes ] && row "btrfs send -p snap1 snap2 | btrfs receive" "$sb" "$(mib "$B_btrfs")" "$(peak btrfs)"
echo
printf '| %-58s | %8s | %6s | %9s |\n' "goal" "measured" "target" "goal met"
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..60})" "----------" "--------" "-----------"
g() { printf '| %-58s | %8s | %6s | %9s |\n' "$1" "$2" "$3" "$4"; }
g "rsync time / incremental (level 3) time" "$r_rs" ">= 20" "$(yn "$r_rs" 20 ge)"
g "incremental -l 0 time / convert -B time" "$r_B0" "<= 1.2" "$(yn "$r_B0" 1.2 le)"
g "incremental -l 0 / convert -t writeback -B (durable)" "$r_B0w" "(info)" "-"
g "incremental -l 0 / its disk floor (dd read+write at once)" "$r_fI" "(info)" "-"
[ "$HAVE_OTHER" = yes ] && g "incremental -l 0 / convert -B, replica on another device" "$r_BO" "<= 1.2" "$(yn "$r_BO" 1.2 le)"
g "incremental level 3 time / convert -B time" "$r_B3" "<= 3" "$(yn "$r_B3" 3 le)"
g "seed -l 0 time / fastest durable convert (-t wb or none)" "$r_dur0" "<= 1.1" "$(yn "$r_dur0" 1.1 le)"
g "seed (level 3) time / fastest durable convert" "$r_dur3" "<= 1.25" "$(yn "$r_dur3" 1.25 le)"
g "seed -l 0 time / convert -t writeback time" "$r_wb0" "(info)" "-"
g "seed (level 3) time / convert -t writeback time" "$r_wb3" "(info)" "-"
g "seed time / qemu-img convert -O raw time (not durable)" "$r_seed" "(info)" "-"
g "qcow2 replica seed time / raw replica seed time" "$r_seedq" "<= 1.25" "$(yn "$r_seedq" 1.25 le)"
g "qcow2 replica incremental time / raw incremental time" "$r_incrq" "<= 1.25" "$(yn "$r_incrq" 1.25 le)"
g "seed time / (convert -O raw, then sync) time" "$r_seeds" "(info)" "-"
g "seed time / disk floor time" "$r_floor" "(info)" "-"
g "max peak RSS of blkdelta send/receive (MiB)" "$((maxrss/1024))" "< 256" "$([ $((maxrss/1024)) -lt 256 ] && echo yes || echo no)"
