"""Memory of a node holding 100,000 keys (RSS via psutil).

A 3-node cluster (3 regions) on loopback.  One node is filled through the API: POST
/v1/limits/check once for each of 100,000 distinct keys, many requests in flight at once (an asyncio
client in this process).  Every grant is audited and gossiped, so the two peers come to hold the
same 100,000 keys through the gossip path; their RSS is reported too.

Usage: .venv/bin/python benchmarks/bench_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import psutil

from benchmarks._procs import (
    Cluster,
    Procs,
    http_json,
    http_text,
    install_signal_handlers,
    metric_value,
    table,
    workdir,
    write_cluster,
    write_results,
)
from benchmarks._targets import target

TARGET_MB = 200.0


async def fill(url: str, keys: int, concurrency: int) -> tuple[float, dict[int, int]]:
    statuses: dict[int, int] = {}
    next_key = iter(range(keys))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def worker() -> None:
            for i in next_key:
                async with session.post(url + "/v1/limits/check", json={"key": f"tenant-{i:06d}"}) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, statuses


def rss_mb(pid: int) -> dict[str, float]:
    p = psutil.Process(pid)
    info = p.memory_full_info()
    return {"rss_mb": round(info.rss / 2**20, 1), "uss_mb": round(info.uss / 2**20, 1)}


def live_keys(url: str) -> int:
    return int(metric_value(http_text(url + "/metrics"), "edge_live_keys"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 keys")
    parser.add_argument("--keys", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=128)
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    keys = args.keys or (20_000 if args.quick else 100_000)

    folder = workdir("memory")
    path, nodes = write_cluster(folder, ["eu", "us", "ap"], limits=[("*", 100.0, 100.0)], max_keys=max(keys, 100_000))
    node = nodes[0]
    with Procs(folder) as procs:
        cluster = Cluster(path, nodes, procs)
        cluster.start_all()
        time.sleep(1.0)
        pids = {n.id: cluster.children[n.id].pid for n in nodes}
        before = {n: rss_mb(pid) for n, pid in pids.items()}
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            elapsed, statuses = runner.run(fill(node.url, keys, args.concurrency))
        print(
            f"filled {keys:,} keys through POST /v1/limits/check in {elapsed:.1f} s "
            f"({keys / elapsed:,.0f} req/s, {args.concurrency} in flight); statuses {statuses}",
            flush=True,
        )
        # Let gossip deliver everything to the peers, then let the heap settle.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(live_keys(n.url) < keys for n in nodes):
            time.sleep(0.5)
        time.sleep(2.0)
        after = {n: rss_mb(pid) for n, pid in pids.items()}
        counts = {n.id: live_keys(n.url) for n in nodes}
        _, state = http_json(node.url + "/v1/state?keys=tenant-000000")
        peak = {}
        for n, pid in pids.items():
            with open(f"/proc/{pid}/status") as fh:
                hwm = next((line.split()[1] for line in fh if line.startswith("VmHWM")), "0")
            peak[n] = round(int(hwm) / 1024, 1)

    rows = []
    for n in pids:
        role = "filled via API" if n == node.id else "filled via gossip"
        rows.append(
            [
                n,
                role,
                f"{counts[n]:,}",
                before[n]["rss_mb"],
                after[n]["rss_mb"],
                after[n]["uss_mb"],
                peak[n],
                round(after[n]["rss_mb"] - before[n]["rss_mb"], 1),
            ]
        )
    print(
        table(
            rows,
            ["node", "how", "live keys", "RSS before MB", "RSS after MB", "USS after MB", "peak RSS MB", "growth MB"],
        )
    )
    ok = after[node.id]["rss_mb"] < TARGET_MB and counts[node.id] >= keys
    if not args.quick:  # targets are reported by full runs only (benchmarks/README.md, "Targets")
        print(
            f"\ntarget RSS < {TARGET_MB:.0f} MB with {keys:,} keys: {'PASS' if ok else 'MISS'} "
            f"({after[node.id]['rss_mb']} MB; peers via gossip "
            f"{', '.join(str(after[n]['rss_mb']) for n in pids if n != node.id)} MB)"
        )
    per_key = {n: round((after[n]["rss_mb"] - before[n]["rss_mb"]) * 2**20 / max(1, counts[n])) for n in pids}
    figures = {
        "target_rss_mb": TARGET_MB,
        "pass": ok,
        "keys": keys,
        "rss_mb": after[node.id]["rss_mb"],
        "fill_seconds": round(elapsed, 2),
        "fill_req_per_s": round(keys / elapsed),
        "fill_statuses": {str(k): v for k, v in statuses.items()},
        "nodes": {
            n: {
                "role": "api" if n == node.id else "gossip",
                "live_keys": counts[n],
                "before": before[n],
                "after": after[n],
                "peak_rss_mb": peak[n],
                "bytes_per_key": per_key[n],
            }
            for n in pids
        },
        "sample_state": state.get("keys") if isinstance(state, dict) else None,
    }
    out = write_results(
        "bench_memory",
        figures,
        quick=args.quick,
        started=started,
        targets=[target(f"node RSS with {keys:,} keys", after[node.id]["rss_mb"], "<", TARGET_MB, "MB"),
                 target("live keys held by the node", counts[node.id], ">=", keys, "keys")],
        extra={"parameters": {"keys": keys, "concurrency": args.concurrency}},
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
