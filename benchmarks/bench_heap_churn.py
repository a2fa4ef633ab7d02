"""The audit soak's RSS swings without a node: key churn over 100,000-key dicts, glibc's heap left
alone and with the node's setting (``edge_server.heap.pin_mmap_threshold``), side by side.

Each mode runs in a fresh interpreter (the setting is process-wide): an ``OrderedDict`` and a dict
of 100,000 string keys, as the bucket table and its change-order dict hold them; each step adds a
new key to both and evicts the oldest, and allocates a buffer of 600-60,000 bytes, of which the
most recent ~200 stay alive (the node's requests, batches and messages between two table
rebuilds).  RSS is read every 5,000 steps; the first 300,000 steps are warm-up (the tables'
first rebuilds).  The figure is RSS max - min over the samples after warm-up.

Usage: .venv/bin/python benchmarks/bench_heap_churn.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._procs import PYTHON, REPO, install_signal_handlers, table, write_results

CHURN = r"""
import collections, json, random, sys
from edge_server.heap import pin_mmap_threshold

pinned = pin_mmap_threshold() if sys.argv[1] == "pinned" else False
steps, warmup, keys = int(sys.argv[2]), int(sys.argv[3]), 100_000
random.seed(1)

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

table, recent, alive, samples = collections.OrderedDict(), {}, [], []
for i in range(keys):
    table[f"k{i}"] = recent[f"k{i}"] = i
for i in range(keys, keys + steps):
    key = f"k{i}"
    table[key] = i
    table.popitem(last=False)
    recent[key] = i
    del recent[f"k{i - keys}"]
    alive.append(bytearray(random.randrange(600, 60_000)))
    if len(alive) > 200:
        alive.pop(random.randrange(len(alive)))
    if i % 5000 == 0 and i - keys >= warmup:
        samples.append(round(rss_mb(), 2))
print(json.dumps({"pinned": pinned, "rss_mb": samples}))
"""


def run(mode: str, steps: int, warmup: int) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([PYTHON, "-c", CHURN, mode, str(steps), str(warmup)], capture_output=True, text=True,
                         timeout=600, cwd=REPO, check=True)
    doc = json.loads(out.stdout)
    rss = doc["rss_mb"]
    return {"mode": mode, "pinned": doc["pinned"], "steps": steps, "warmup_steps": warmup, "samples": len(rss),
            "min_mb": min(rss), "max_mb": max(rss), "max_minus_min_mb": round(max(rss) - min(rss), 2),
            "seconds": round(time.perf_counter() - t0, 1), "rss_mb": rss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the same run (~20 s): fewer steps miss the swings, which start only after glibc's "
                             "threshold first rises")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    steps = 1_500_000
    rows = [run(mode, steps, 300_000) for mode in ("default", "pinned")]
    print(table([(r["mode"], r["samples"], r["min_mb"], r["max_mb"], r["max_minus_min_mb"], r["seconds"])
                 for r in rows], ["glibc heap", "samples", "min MB", "max MB", "max - min MB", "s"]))
    path = write_results("bench_heap_churn", {"runs": rows}, quick=args.quick, started=started)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
