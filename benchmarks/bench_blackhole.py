"""A blackholed region, through each fault backend: what its clients see, and how fast it rejoins.

Every repetition is a whole workbench drill (:func:`workbench.run.drill.run_drill`): three regions,
one node each, the ``check`` route under open-loop load from clients in every region, the busiest
region blackholed at 3 s (every link to and from its node, the router's included, drops traffic with
no RST) and healed at 6 s. It runs with ``faults_backend = "proxy"`` and, where the host allows
(root, ``ip netns``), ``"netns"`` (kernel blackhole rules between network namespaces).

Figures per backend, from the drill's own verdict (``summary.json``): failover p50 / p99 / max over
the blackholed region's clients (fault time to each client's first success elsewhere), the requests
that failed, timed out or stalled meanwhile, client errors, and convergence after the heal (time to
agreement of every node's view, p50 / max, against the checker's bound). The backends can differ
after the heal: the proxy delivers held bytes at once, the kernel only at TCP's next retransmission,
whose timer backed off during the outage, unless the sender reconnected meanwhile (docs/faults.md).

Reported, never asserted: nothing here fails on a figure.

    .venv/bin/python benchmarks/bench_blackhole.py [--quick] [--reps 3] [--backend proxy|netns]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._procs import write_results  # noqa: E402
from workbench.run.drill import run_drill  # noqa: E402
from workbench.run.faults.netns import unavailable_reason  # noqa: E402
from workbench.spec.scenario import Scenario  # noqa: E402


def scenario(backend: str, seed: int, duration_s: float) -> Scenario:
    return Scenario.build(name=f"blackhole-{backend}", duration_s=duration_s, route="check", load_rps=150.0,
                          rate=300.0, burst=300.0, region_weights="eu=1,us=3,ap=1", blackhole_at_s=3.0,
                          heal_at_s=6.0, faults_backend=backend, seed=seed)


def one(summary: dict[str, Any]) -> dict[str, Any]:
    failover = summary.get("failover") or {}
    kind = (failover.get("by_kind") or {}).get("blackhole") or {}
    conv = summary.get("convergence") or {}
    return {"failover_p50_ms": kind.get("p50"), "failover_p99_ms": kind.get("p99"), "failover_max_ms": kind.get("max"),
            "clients": kind.get("clients"), "failed_requests": kind.get("failed_requests"),
            "timed_out_requests": kind.get("timed_out_requests"), "stalled_requests": kind.get("stalled_requests"),
            "client_errors": summary.get("client_errors"), "convergence_p50_ms": conv.get("convergence_p50_ms"),
            "convergence_max_ms": conv.get("convergence_max_ms"), "convergence_allowed_ms": conv.get("allowed_ms"),
            "generator_valid": summary.get("generator_valid"), "invariants_ok": summary.get("invariants_ok")}


def _median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, int | float)]
    return round(statistics.median(nums), 1) if nums else None


async def run(backends: list[str], reps: int, duration_s: float) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-blackhole-") as tmp:
        for backend in backends:
            runs = []
            for rep in range(reps):
                result = await run_drill(scenario(backend, 100 + rep, duration_s), Path(tmp) / f"{backend}-{rep}")
                runs.append(one(result.summary))
                print(f"{backend} #{rep + 1}: {json.dumps(runs[-1])}", file=sys.stderr)
            figures[backend] = {"runs": runs, **{f"median_{k}": _median([r[k] for r in runs])
                                                 for k in ("failover_p99_ms", "failover_max_ms",
                                                           "convergence_max_ms", "client_errors")}}
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one 8 s drill per backend")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", choices=("proxy", "netns"), action="append",
                    help="only this backend (repeatable; default: proxy, and netns where it can run)")
    args = ap.parse_args()
    why = unavailable_reason()
    backends = args.backend or ["proxy", *([] if why else ["netns"])]
    extra: dict[str, Any] = {"netns_unavailable": why}
    if "netns" in backends and why:
        print(f"bench_blackhole: faults_backend 'netns' {why}", file=sys.stderr)
        return 2
    started = time.time()
    figures = asyncio.run(run(backends, 1 if args.quick else args.reps, 8.0 if args.quick else 10.0))
    path = write_results("blackhole", figures, quick=args.quick, extra=extra, started=started)
    for backend, fig in figures.items():
        print(f"{backend:6s} failover p99 (median of runs) {fig['median_failover_p99_ms']} ms, "
              f"max {fig['median_failover_max_ms']} ms; convergence after heal max {fig['median_convergence_max_ms']} "
              f"ms; client errors {fig['median_client_errors']}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
