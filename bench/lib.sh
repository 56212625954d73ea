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
