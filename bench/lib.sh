# Shared by the bench scripts (sourced): the fixture every one of them starts from.

# half_random_qcow2 FILE SIZE: a qcow2 of SIZE bytes whose even 64ths are random data.
half_random_qcow2() {
  local img=$1 size=$2 piece off
  qemu-img create -q -f qcow2 "$img" "$size"
  piece=$((size / 64))
  for ((off = 0; off < size; off += 2 * piece)); do
    head -c "$piece" /dev/urandom > piece.bin
    qemu-io -f qcow2 -c "write -q -s piece.bin $off $piece" "$img"
  done
  rm -f piece.bin
}

# start_sshd DIR: a throwaway sshd on 127.0.0.1 (throwaway ed25519 keys in DIR), stopped on exit.
# Sets PORT and SSHD_PID; the client key is DIR/client_key.
start_sshd() {
  local W=$1 i
  rm -f "$W"/host_key "$W"/host_key.pub "$W"/client_key "$W"/client_key.pub
  ssh-keygen -q -t ed25519 -N '' -f "$W/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$W/client_key"
  cp "$W/client_key.pub" "$W/authorized_keys"
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  printf '%s\n' "Port $PORT" "ListenAddress 127.0.0.1" "HostKey $W/host_key" \
    "AuthorizedKeysFile $W/authorized_keys" "PidFile $W/sshd.pid" "StrictModes no" "UsePAM no" \
    "PermitRootLogin yes" "PasswordAuthentication no" "KbdInteractiveAuthentication no" \
    > "$W/sshd_config"
  mkdir -p /run/sshd
  /usr/sbin/sshd -D -e -f "$W/sshd_config" 2> "$W/sshd.log" &
  SSHD_PID=$!
  trap 'kill "$SSHD_PID" 2>/dev/null || true' EXIT
  for ((i = 0; i < 100; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    kill -0 "$SSHD_PID" 2>/dev/null || { echo "bench: sshd exited:" >&2; cat "$W/sshd.log" >&2; exit 1; }
    sleep 0.1
  done
}
