#!/usr/bin/env bash
# blkdelta over ssh on loopback: starts a throwaway sshd on 127.0.0.1 (throwaway ed25519 keys in
# BENCH_DIR) and measures, medians of BENCH_RUNS, caches dropped before each operation:
# - the raw ssh pipe per cipher: a saved `send -l 0` stream through `ssh -c CIPHER 'cat > /dev/null'`;
# - the full seed `blkdelta send -l L img@s1 | ssh -c aes128-gcm blkdelta receive` for L in
#   0 1 3 9, and at level 3 with chacha20-poly1305;
# - for reference: the same seed without ssh (level 3), each end alone (`send -l L > /dev/null`,
#   `receive -i` a saved level-L stream), and the cold read of the saved stream file.
# CPU seconds per process come from /usr/bin/time; the sshd side is the growth of the sshd's
# cumulative child CPU time (per-connection sshd and the remote command) minus the remote command.
# Fixture: 1 GiB qcow2, 1/2 random data, 1/4 log-like text, 1/4 unallocated, snapshot s1.
# Env: BENCH_DIR (/tmp/blkdelta-bench-ssh) BENCH_RUNS (3) BENCH_SIZE (1G, for the built fixture)
#      BENCH_IMG (a qcow2 image to use instead of building one) BENCH_SNAP (s1, its snapshot)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
W=${BENCH_DIR:-/tmp/blkdelta-bench-ssh}
RUNS=${BENCH_RUNS:-3}
SIZE_H=${BENCH_SIZE:-1G}
SNAP=${BENCH_SNAP:-s1}
LEVELS=(0 1 3 9)
CIPHERS=(aes128-gcm@openssh.com aes256-gcm@openssh.com chacha20-poly1305@openssh.com aes128-ctr)
GCM=aes128-gcm@openssh.com
CHACHA=chacha20-poly1305@openssh.com
log() { echo "== $*" >&2; }
need() { command -v "$1" >/dev/null || { echo "bench: needs $1" >&2; exit 1; }; }
need qemu-img; need qemu-io; need python3; need /usr/bin/time

(cd "$root" && cargo build --release --quiet)
BD=$root/target/release/blkdelta

if ! command -v ssh >/dev/null || [ ! -x /usr/sbin/sshd ]; then
  apt-get install -y -q openssh-server openssh-client >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q openssh-server openssh-client >/dev/null 2>&1; } || true
fi
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null && [ -x /usr/sbin/sshd ] || { echo "bench: needs openssh-server and openssh-client (apt-get install failed)" >&2; exit 1; }

mkdir -p "$W"; cd "$W"
rm -f ./*.bd rep.raw rep.raw.blkdelta s1.raw t.* results/*

# ---------------------------------------------------------------- fixture
if [ -n "${BENCH_IMG:-}" ]; then
  IMG=$(realpath "$BENCH_IMG")
  FIXTURE="$IMG@$SNAP (BENCH_IMG)"
  log "fixture: $FIXTURE"
else
  SIZE=$(numfmt --from=iec "$SIZE_H")
  piece=$((SIZE / 64))
  IMG=$W/img.qcow2
  FIXTURE="$SIZE_H qcow2 built by bench/ssh.sh: 64 pieces of $piece bytes; pieces 4k and 4k+2 random, 4k+1 log-like text, 4k+3 unallocated; snapshot $SNAP"
  log "fixture: $SIZE_H qcow2, 1/2 random, 1/4 text, 1/4 unallocated, pieces of $piece bytes"
  rm -f "$IMG"
  qemu-img create -q -f qcow2 "$IMG" "$SIZE"
  # text that compresses like logs do: repeated words, varying numbers
  awk -v n="$piece" 'BEGIN { srand(7); split("GET POST PUT DELETE", m, " ");
      split("/api/v1/items /api/v1/users /static/app.js /index.html /api/v1/orders/search", p, " ");
      while (b < n) {
        l = sprintf("2024-05-%02d %02d:%02d:%02d.%03d host%02d %s %s?id=%d 200 %d %.3fms \"Mozilla/5.0 (X11; Linux x86_64)\"\n",
          1 + int(rand() * 28), int(rand() * 24), int(rand() * 60), int(rand() * 60), int(rand() * 1000),
          int(rand() * 16), m[1 + int(rand() * 4)], p[1 + int(rand() * 5)], int(rand() * 1e6),
          int(rand() * 65536), rand() * 100);
        printf "%s", l; b += length(l) } }' > text.bin
  truncate -s "$piece" text.bin
  for ((i = 0; i < 64; i++)); do
    off=$((i * piece))
    case $((i % 4)) in
      0|2) head -c "$piece" /dev/urandom > piece.bin
           qemu-io -f qcow2 -c "write -q -s piece.bin $off $piece" "$IMG" ;;
      1)   qemu-io -f qcow2 -c "write -q -s text.bin $off $piece" "$IMG" ;;
    esac
  done
  rm -f piece.bin text.bin
  qemu-img snapshot -c "$SNAP" "$IMG"
fi
SRC=$IMG@$SNAP

# ---------------------------------------------------------------- sshd on 127.0.0.1
start_sshd "$W"
USER_AT=$(id -un)@127.0.0.1
SSH=(ssh -i "$W/client_key" -p "$PORT" -o BatchMode=yes -o StrictHostKeyChecking=no
     -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o Compression=no)
HAVE=()
for c in "${CIPHERS[@]}"; do
  if ssh -Q cipher | grep -qx "$c"; then HAVE+=("$c"); else log "cipher $c: not offered by this ssh, skipped"; fi
done
"${SSH[@]}" -c "${HAVE[0]}" "$USER_AT" true || { echo "bench: ssh to 127.0.0.1:$PORT failed:" >&2; cat sshd.log >&2; exit 1; }

# ---------------------------------------------------------------- streams (sizes, and input for receive alone)
declare -A BYTES
for l in "${LEVELS[@]}"; do
  "$BD" send -q -l "$l" "$SRC" > "stream$l.bd"
  BYTES[$l]=$(wc -c < "stream$l.bd")
done
log "stream bytes per level: $(for l in "${LEVELS[@]}"; do printf '%s:%s ' "$l" "${BYTES[$l]}"; done)"

# ---------------------------------------------------------------- measurements
DROP=no
if [ "$(id -u)" = 0 ] && [ -w /proc/sys/vm/drop_caches ]; then DROP=yes; fi
drop() { sync; if [ "$DROP" = yes ]; then echo 3 > /proc/sys/vm/drop_caches; fi; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }
R=$W/results; mkdir -p "$R"
rec() { echo "$3" >> "$R/$1.$2"; }                      # NAME KIND VALUE
TF='%e %U %S'
T() { /usr/bin/time -f "$TF" -o "$1" "${@:2}"; }
RT="/usr/bin/time -f '$TF' -o $W/t.r"                  # the remote command's own time
cpu() { awk '{printf "%.2f", $2 + $3}' "$1"; }
TCK=$(getconf CLK_TCK)
sshd_cpu() { awk -v t="$TCK" '{ sub(/^.*\) /, ""); printf "%.2f", ($14 + $15) / t }' "/proc/$SSHD_PID/stat"; }
sshd_rec() { # NAME CPU_BEFORE: the sshd side, once the per-connection sshd has been reaped
  local c1; sleep 0.5; c1=$(sshd_cpu)
  rec "$1" sshd "$(awk -v a="$2" -v b="$c1" -v r="$(cpu t.r)" 'BEGIN{printf "%.2f", b - a - r}')"
  rec "$1" sink "$(cpu t.r)"
}

raw_ssh() { # CIPHER
  local name=raw-$1 t0 c0
  drop; c0=$(sshd_cpu); t0=$(now)
  T t.f cat stream0.bd | T t.c "${SSH[@]}" -c "$1" "$USER_AT" "$RT cat > /dev/null"
  rec "$name" sec "$(secs "$t0")"; rec "$name" feed "$(cpu t.f)"; rec "$name" ssh "$(cpu t.c)"
  sshd_rec "$name" "$c0"
}
ssh_setup() { # connection setup alone
  local t0 c0
  drop; c0=$(sshd_cpu); t0=$(now)
  T t.c "${SSH[@]}" -c "$GCM" "$USER_AT" "$RT true"
  rec setup sec "$(secs "$t0")"; rec setup ssh "$(cpu t.c)"
  sshd_rec setup "$c0"
}
disk_read() {
  local t0; drop; t0=$(now)
  T t.f cat stream0.bd > /dev/null
  rec disk sec "$(secs "$t0")"; rec disk feed "$(cpu t.f)"
}
seed_ssh() { # LEVEL CIPHER
  local name=seed-$1-$2 t0 c0
  rm -f rep.raw rep.raw.blkdelta; drop; c0=$(sshd_cpu); t0=$(now)
  T t.f "$BD" send -q -l "$1" "$SRC" | T t.c "${SSH[@]}" -c "$2" "$USER_AT" "$RT $BD receive -q $W/rep.raw"
  rec "$name" sec "$(secs "$t0")"; rec "$name" feed "$(cpu t.f)"; rec "$name" ssh "$(cpu t.c)"
  sshd_rec "$name" "$c0"
}
seed_local() { # LEVEL
  local name=local-$1 t0
  rm -f rep.raw rep.raw.blkdelta; drop; t0=$(now)
  T t.f "$BD" send -q -l "$1" "$SRC" | T t.r "$BD" receive -q rep.raw
  rec "$name" sec "$(secs "$t0")"; rec "$name" feed "$(cpu t.f)"; rec "$name" sink "$(cpu t.r)"
}
send_only() { # LEVEL
  local name=send-$1 t0
  drop; t0=$(now)
  T t.f "$BD" send -q -l "$1" "$SRC" > /dev/null
  rec "$name" sec "$(secs "$t0")"; rec "$name" feed "$(cpu t.f)"
}
recv_only() { # LEVEL
  local name=recv-$1 t0
  rm -f rep.raw rep.raw.blkdelta; drop; t0=$(now)
  T t.r "$BD" receive -q -i "stream$1.bd" rep.raw
  rec "$name" sec "$(secs "$t0")"; rec "$name" sink "$(cpu t.r)"
}

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
for ((i = 1; i <= RUNS; i++)); do
  log "round $i/$RUNS (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  for l in "${LEVELS[@]}"; do recv_only "$l"; done
  for l in "${LEVELS[@]}"; do send_only "$l"; done
  disk_read
  ssh_setup
  seed_local 3
  for c in "${HAVE[@]}"; do raw_ssh "$c"; done
  for l in "${LEVELS[@]}"; do seed_ssh "$l" "$GCM"; done
  if [[ " ${HAVE[*]} " == *" $CHACHA "* ]]; then seed_ssh 3 "$CHACHA"; fi
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

# correctness of what was measured: the last replica (received over ssh) against qemu's export
VIRT=$(stat -c %s rep.raw)
qemu-img convert -U -l snapshot.name="$SNAP" -O raw "$IMG" s1.raw
cmp rep.raw s1.raw || { echo "bench: the replica received over ssh differs from $SNAP" >&2; exit 1; }
VERIFIED="replica received over ssh equals qemu-img convert -l snapshot.name=$SNAP -O raw (cmp)"
rm -f s1.raw

# ---------------------------------------------------------------- table
med() { [ -f "$R/$1.$2" ] && sort -g "$R/$1.$2" | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}' || echo -; }
mb() { awk -v b="$1" 'BEGIN{printf "%.1f", b / 1e6}'; }
rate() { [ "$2" = - ] && echo - || awk -v b="$1" -v s="$2" 'BEGIN{printf "%.0f", b / s / 1e6}'; }
cpus() { echo "$(med "$1" feed) / $(med "$1" ssh) / $(med "$1" sshd) / $(med "$1" sink)"; }
short() { echo "${1%@openssh.com}"; }

echo
echo "blkdelta ssh bench: $RUNS round(s), caches dropped before each op: $DROP; MB = 10^6 bytes"
echo "fixture: $FIXTURE; virtual size $VIRT bytes"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), AES-NI: $(grep -qw aes /proc/cpuinfo && echo yes || echo no), $(uname -r), work dir fs $(stat -f -c %T "$W"), $(ssh -V 2>&1)"
echo "load average before: $LOAD0; after: $LOAD1"
echo "$VERIFIED"
echo
printf '| %-58s | %8s | %9s | %11s | %12s | %-31s |\n' "operation" "median s" "stream MB" "stream MB/s" "virtual MB/s" "CPU s: feed / ssh / sshd / sink"
printf '|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..60})" "----------" "-----------" "-------------" "--------------" "$(printf -- '-%.0s' {1..33})"
row() { # LABEL NAME BYTES [virtual]
  local s; s=$(med "$2" sec)
  printf '| %-58s | %8s | %9s | %11s | %12s | %-31s |\n' "$1" "$s" "$(mb "$3")" "$(rate "$3" "$s")" \
    "$([ "${4:-}" = virtual ] && rate "$VIRT" "$s" || echo -)" "$(cpus "$2")"
}
row "cat stream-l0 > /dev/null (cold disk read)" disk "${BYTES[0]}"
printf '| %-58s | %8s | %9s | %11s | %12s | %-31s |\n' "ssh -c $(short "$GCM") true (connection setup only)" "$(med setup sec)" - - - "$(cpus setup)"
for c in "${HAVE[@]}"; do row "cat stream-l0 | ssh -c $(short "$c") 'cat >/dev/null'" "raw-$c" "${BYTES[0]}"; done
for l in "${LEVELS[@]}"; do row "send -l $l > /dev/null (sender alone)" "send-$l" "${BYTES[$l]}" virtual; done
for l in "${LEVELS[@]}"; do row "receive -i stream-l$l (receiver alone)" "recv-$l" "${BYTES[$l]}" virtual; done
row "send -l 3 | receive (no ssh)" local-3 "${BYTES[3]}" virtual
for l in "${LEVELS[@]}"; do row "send -l $l | ssh -c $(short "$GCM") receive" "seed-$l-$GCM" "${BYTES[$l]}" virtual; done
[[ " ${HAVE[*]} " == *" $CHACHA "* ]] && row "send -l 3 | ssh -c $(short "$CHACHA") receive" "seed-3-$CHACHA" "${BYTES[3]}" virtual
echo
echo "Raw seconds per round:"
for f in "$R"/*.sec; do n=$(basename "$f" .sec); printf '%-44s %s\n' "$n" "$(tr '\n' ' ' < "$f")"; done
