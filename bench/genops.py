#!/usr/bin/env python3
"""Print qemu-io commands for ~PCT% scattered changes of a SIZE-byte disk, fixed seed.
usage: genops.py SIZE PATTERN_FILE [PCT] [SEED]
Mix (by count): 55% cluster-aligned writes 64k..512k, 20% unaligned writes 1..128k at odd
offsets, 15% write -z 64k..1M aligned, 10% discard 64k..1M aligned."""
import random, sys
size = int(sys.argv[1]); pat = sys.argv[2]
pct = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
rng = random.Random(int(sys.argv[4]) if len(sys.argv) > 4 else 42)
K = 65536
target = size * pct / 100
total = 0
while total < target:
    r = rng.random()
    if r < 0.55:
        n = rng.randint(1, 8) * K; off = rng.randrange(0, size - n, K)
        print(f"write -q -s {pat} {off} {n}")
    elif r < 0.75:
        n = rng.randint(1, 131072); off = rng.randrange(0, size - n)
        print(f"write -q -s {pat} {off} {n}")
    elif r < 0.90:
        n = rng.randint(1, 16) * K; off = rng.randrange(0, size - n, K)
        print(f"write -q -z {off} {n}")
    else:
        n = rng.randint(1, 16) * K; off = rng.randrange(0, size - n, K)
        print(f"discard -q {off} {n}")
    total += n
print(f"# nominal bytes touched: {total}", file=sys.stderr)
