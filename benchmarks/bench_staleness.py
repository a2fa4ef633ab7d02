"""Accuracy vs staleness: over-admission against the gossip interval (10, 25, 50, 100, 250 ms) and
added inter-region latency (0, 20, 80, 150 ms), beside the bound the design predicts.

Each cell is a fresh 3-node cluster (3 regions) launched by the workbench (``Cluster.launch``) with
every node-to-node link behind a fault proxy; the added latency is set on every region pair at t = 0
(``ProxyMesh.latency``; the proxy delays each direction, so one gossip message is ``d`` late and its
ack another ``d``).  Router links carry no latency: the client talks to the nodes straight, as in
bench_accuracy.py.  R = 100 tokens/s, B = 100, one key, 2x load from an open-loop client split evenly.

The bound: a node learns of a peer's grants at most one gossip interval plus the link delay after
them, so the excess the cluster can admit is about ``rate * (gossip interval + delay)`` per node, i.e.
``N * R * (g + d)`` tokens for N nodes (the per-node cap on unacknowledged spending,
``max(B/N, R*4*g)``, bounds it too).  Measured: admitted - (B + R*T) over the run, and the worst
window's excess over B + R*(t - s) (client send times of admitted requests).

Usage: .venv/bin/python benchmarks/bench_staleness.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plotly.graph_objects as go

from benchmarks._plots import fig_json, write_png
from benchmarks._procs import install_signal_handlers, table, workdir, write_results
from benchmarks.bench_redis import LOAD, B, Design, R, drive, figures_of
from workbench.run.cluster import Cluster
from workbench.spec.scenario import Scenario

NODES = 3
REGIONS = ("eu", "us", "ap")


async def cell(folder: Path, gossip_ms: int, delay_ms: int, seconds: float) -> dict[str, Any]:
    scenario = Scenario.build(name=f"stale-{gossip_ms}-{delay_ms}", duration_s=seconds, regions=NODES,
                              gossip_interval_ms=float(gossip_ms), rate=R, burst=B, route="check", tenants=1)
    async with Cluster.launch(scenario, folder / f"g{gossip_ms}-d{delay_ms}") as cluster:
        assert cluster.mesh is not None
        if delay_ms:
            for a, b in itertools.combinations(REGIONS, 2):
                cluster.mesh.latency((a, b), float(delay_ms))
        await asyncio.sleep(max(0.3, 4 * (gossip_ms + 2 * delay_ms) / 1000))  # peers exchange under the delay
        design = Design("ours", f"stale-{gossip_ms}-{delay_ms}",
                        {nid: p.url + "/v1/limits/check" for nid, p in cluster.nodes.items()})
        await drive([design], seconds, [])
    fig = figures_of(design, seconds)
    admitted, envelope = fig["admitted"], fig["envelope_tokens"]
    predicted = NODES * R * (gossip_ms + delay_ms) / 1000
    return {"gossip_ms": gossip_ms, "delay_ms": delay_ms, "admitted": admitted, "envelope_tokens": envelope,
            "excess_tokens": round(admitted - envelope, 1), "over_admission_pct": fig["over_admission_pct"],
            "worst_window_excess_tokens": fig["worst_window_excess_tokens"],
            "predicted_bound_tokens": round(predicted, 1),
            "within_bound": fig["worst_window_excess_tokens"] <= predicted + 1, "errors": fig["errors"],
            "latency_ms": fig.get("latency_ms")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2x2 subset, 2 s runs")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    gossips = [25, 100] if args.quick else [10, 25, 50, 100, 250]
    delays = [0, 80] if args.quick else [0, 20, 80, 150]
    seconds = 2.0 if args.quick else 4.0
    folder = workdir("staleness")
    cells: list[dict[str, Any]] = []
    for g in gossips:
        for d in delays:
            c = asyncio.run(cell(folder, g, d, seconds))
            cells.append(c)
            print(f"  gossip {g:>3} ms + {d:>3} ms: admitted {c['admitted']} vs {c['envelope_tokens']:.0f} "
                  f"({c['over_admission_pct']:+.1f}%), worst window +{c['worst_window_excess_tokens']:.0f} tokens, "
                  f"bound {c['predicted_bound_tokens']:.0f}", flush=True)
    print(f"\nover-admission vs staleness: {NODES} nodes, R {R:g}/s, B {B:g}, 2x load ({LOAD:g} req/s), {seconds:g} s")
    print(table([[c["gossip_ms"], c["delay_ms"], c["admitted"], f"{c['envelope_tokens']:.0f}",
                  f"{c['over_admission_pct']:+.2f}%", c["worst_window_excess_tokens"], c["predicted_bound_tokens"],
                  "yes" if c["within_bound"] else "NO"] for c in cells],
                ["gossip ms", "+delay ms", "admitted", "B+R·T", "over-adm", "worst window excess", "bound N·R·(g+d)",
                 "within"]))
    fig = go.Figure()
    palette = ["#2563eb", "#16a34a", "#d97706", "#dc2626"]
    for d, color in zip(delays, palette, strict=False):
        row = [c for c in cells if c["delay_ms"] == d]
        fig.add_scatter(x=[c["gossip_ms"] for c in row], y=[c["worst_window_excess_tokens"] for c in row],
                        name=f"+{d} ms measured", line={"color": color}, mode="lines+markers")
        fig.add_scatter(x=[c["gossip_ms"] for c in row], y=[c["predicted_bound_tokens"] for c in row],
                        name=f"+{d} ms bound N·R·(g+d)", line={"color": color, "dash": "dash"})
    fig.update_layout(title=f"Over-admission (worst window, tokens above B + R·Δt) vs gossip interval and link delay; "
                            f"{NODES} nodes, R {R:g}/s", xaxis_title="gossip interval (ms)", xaxis_type="log",
                      yaxis_title="tokens", template="plotly_white", height=450)
    png = write_png(fig, "staleness", args.quick, height=450)
    figures = {"cells": cells, "all_within_bound": all(c["within_bound"] for c in cells)}
    params = {"nodes": NODES, "R": R, "B": B, "load_rps": LOAD, "seconds": seconds, "gossip_ms": gossips,
              "delay_ms": delays, "latency_links": "every region pair, both directions (router links clean)"}
    path = write_results("bench_staleness", figures, quick=args.quick, started=started,
                         extra={"parameters": params, "charts": {"staleness": fig_json(fig)},
                                "png": {"staleness": png}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
