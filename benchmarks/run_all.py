"""Run every benchmark in turn (one at a time: they would disturb each other's figures).

Usage: .venv/bin/python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_core.py", "bench_node.py", "bench_accuracy.py", "bench_memory.py"]


def main() -> int:
    extra = sys.argv[1:]
    failed = []
    for name in BENCHMARKS:
        print(f"\n=== {name} {' '.join(extra)}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / name), *extra], cwd=HERE.parent, timeout=1800, check=False)
        if proc.returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
