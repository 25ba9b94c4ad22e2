#!/usr/bin/env python3
"""Writes the equivalent map for edgepop, gdnsd and tinydns, and the dnsperf query file.

usage: gen.py OUTDIR NETWORKS

The map: 4 PoPs, 8 regions with two PoPs each, NETWORKS IPv4 /24 networks spread over the
regions (tinydns locations are octet-aligned, so /24s are what all three can express), plus
198.51.100.0/24 in region r0 which the ECS queries use. Default: pop0.
"""

import os
import random
import sys

out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
rng = random.Random(4)

POPS = [f"pop{i}" for i in range(4)]
ADDR = {p: f"192.0.2.{i + 1}" for i, p in enumerate(POPS)}
REGIONS = {f"r{i}": [POPS[i % 4], POPS[(i + 1) % 4]] for i in range(8)}

nets = {"198.51.100.0/24": "r0"}
seen = {"198.51.100"}
while len(nets) < n + 1:
    a, b, c = rng.randrange(1, 224), rng.randrange(256), rng.randrange(256)
    if a in (10, 127, 198) or f"{a}.{b}.{c}" in seen:
        continue
    seen.add(f"{a}.{b}.{c}")
    nets[f"{a}.{b}.{c}.0/24"] = f"r{rng.randrange(8)}"

by_region = {r: [] for r in REGIONS}
for net, r in nets.items():
    by_region[r].append(net)

# edgepop
with open(os.path.join(out, "regions.toml"), "w") as f:
    for p in POPS:
        f.write(f'[[pops]]\nname = "{p}"\nipv4 = ["{ADDR[p]}"]\n\n')
    for r, pops in REGIONS.items():
        f.write(f'[[regions]]\nname = "{r}"\npops = {pops!r}\nnetworks = [\n'.replace("'", '"'))
        for net in by_region[r]:
            f.write(f'  "{net}",\n')
        f.write("]\n\n")
    f.write('[default]\npops = ["pop0"]\n')

# gdnsd: nets file + config + zone
os.makedirs(os.path.join(out, "gdnsd", "zones"), exist_ok=True)
os.makedirs(os.path.join(out, "gdnsd", "geoip"), exist_ok=True)
with open(os.path.join(out, "gdnsd", "geoip", "nets"), "w") as f:
    for net, r in nets.items():
        f.write(f"{net} => [{', '.join(REGIONS[r])}]\n")

# tinydns: one location per /24 (location codes are at most two characters).
codes = [a + b for a in "abcdefghijklmnopqrstuvwxyz0123456789" for b in "abcdefghijklmnopqrstuvwxyz0123456789"]
loc_of_region = {r: codes[i] for i, r in enumerate(REGIONS)}
with open(os.path.join(out, "tinydns-data"), "w") as f:
    f.write(".edgepop.test::ns1.edgepop.test:60\n")
    for net, r in nets.items():
        prefix = net.split("/")[0].rsplit(".", 1)[0]
        f.write(f"%{loc_of_region[r]}:{prefix}\n")
    for r, pops in REGIONS.items():
        f.write(f"+www.edgepop.test:{ADDR[pops[0]]}:60::{loc_of_region[r]}\n")
    # Clients outside every location: the default PoP (no location = everyone else).
    f.write(f"%zz\n+www.edgepop.test:{ADDR['pop0']}:60::zz\n")

# dnsperf: 90% A for the geo name, 10% NXDOMAIN.
with open(os.path.join(out, "queries.txt"), "w") as f:
    for i in range(10000):
        if i % 10 == 9:
            f.write(f"nx{i}.edgepop.test A\n")
        else:
            f.write("www.edgepop.test A\n")
