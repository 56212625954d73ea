#!/usr/bin/env python3
"""Print the qemu-io writes of the metadata benchmark's 1 TiB fixture, one command a line.
usage: metaops.py base|changed [CHANGED_RANGES] [SEED]
The same generator as send/tests/metadata_reads.rs (xorshift64*, seed 42): `base` is one
64 KiB cluster in each of the 2048 L2 ranges (written before s1); `changed` is 10,000
distinct clusters (written before s2) in CHANGED_RANGES of those ranges (512 by default,
the test's fixture; 2048 spreads them over the whole disk), the first 100 overwriting a
cluster s1 holds. Pattern byte of the i-th write: i % 255 + 1."""
import sys

CLUSTER = 64 << 10
L2_ENTRIES = CLUSTER // 8
RANGES = (1 << 40) // (CLUSTER * L2_ENTRIES)
CHANGED, OVERWRITES = 10_000, 100
M = (1 << 64) - 1

which = sys.argv[1]
changed_ranges = int(sys.argv[2]) if len(sys.argv) > 2 else 512
state = int(sys.argv[3]) if len(sys.argv) > 3 else 42
if which not in ("base", "changed") or not OVERWRITES <= changed_ranges <= RANGES:
    sys.exit(__doc__)


def below(n):
    global state
    state ^= state >> 12
    state ^= (state << 25) & M
    state ^= state >> 27
    return ((state * 0x2545F4914F6CDD1D) & M) % n


base = [r * L2_ENTRIES + below(L2_ENTRIES) for r in range(RANGES)]
perm = list(range(RANGES))
for i in range(RANGES - 1, 0, -1):
    j = below(i + 1)
    perm[i], perm[j] = perm[j], perm[i]
chosen = perm[:changed_ranges]
changed = [base[r] for r in chosen[:OVERWRITES]]
seen = set(changed)
while len(changed) < CHANGED:
    r = chosen[below(len(chosen))]
    c = r * L2_ENTRIES + below(L2_ENTRIES)
    if c not in seen:
        seen.add(c)
        changed.append(c)
for i, c in enumerate(base if which == "base" else changed):
    print(f"write -q -P {i % 255 + 1} {c * CLUSTER} 64k")
