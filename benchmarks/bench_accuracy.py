"""Accuracy of the global limit: 3 nodes in 3 regions on loopback, R = 100/s, B = 100, one key.

An open-loop asyncio client in this process (one aiohttp session, straight to the nodes, no router)
sends POST /v1/limits/check at 2x the limit, each request at its intended time, and counts the
``200 allowed`` answers.  Scenarios, each on a fresh cluster:

* ``even``   -- load split evenly across the 3 nodes;
* ``80/15/5`` -- load split 80 / 15 / 5 %;
* ``crash``  -- even split; at 1/3 of the run one node is killed with SIGKILL and its share moves to
               the two survivors at once (as a client or router would); at 2/3 it is restarted with
               the same id and gets its share back once its /readyz answers 200.

Admitted tokens are compared to the envelope ``B + R*t`` where t is the time from the first request
to the last.  Every node's audit trail (GET /v1/audit) is read back to cross-check the client's
count, and the audit timestamps give the admitted rate per second and the worst interval of the run
(the largest ``admitted(s, t) - R*(t - s)`` over all intervals, which the envelope bounds by B).

Usage: .venv/bin/python benchmarks/bench_accuracy.py [--quick] [--only even,80/15/5,crash]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from benchmarks._procs import (
    Cluster,
    Procs,
    http_json,
    install_signal_handlers,
    table,
    wait_ready,
    workdir,
    write_cluster,
    write_results,
)
from benchmarks._targets import target

R = 100.0
B = 100
TARGET_DEV = 3.0  # percent
TARGET_CRASH_RATE = 95.0  # percent of R in the first second after the kill


@dataclass
class Sent:
    i: int
    node: str
    intended: float
    sent: float = 0.0
    done: float = 0.0
    status: int = 0
    allowed: bool = False
    error: str = ""


@dataclass
class Rotation:
    """Smooth weighted round-robin over the nodes that are up."""

    weights: dict[str, float]
    up: set[str] = field(default_factory=set)
    current: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.up = set(self.weights)
        self.current = dict.fromkeys(self.weights, 0.0)

    def pick(self) -> str:
        total = sum(self.weights[n] for n in self.up)
        best = None
        for n in sorted(self.up):
            self.current[n] += self.weights[n]
            if best is None or self.current[n] > self.current[best]:
                best = n
        assert best is not None
        self.current[best] -= total
        return best


def fetch_audit(url: str, key: str) -> list[dict]:
    events: list[dict] = []
    after = 0
    while True:
        status, doc = http_json(f"{url}/v1/audit?after={after}&limit=10000", timeout=10)
        if status != 200 or not isinstance(doc, dict):
            raise RuntimeError(f"GET {url}/v1/audit -> {status}: {doc}")
        batch = doc["events"]
        if not batch:
            return [e for e in events if e["key"] == key]
        events += batch
        after = doc["next"]


def worst_interval(ts: list[float], rate: float) -> float:
    """max over s <= t of (events in [s, t]) - rate*(t - s); the envelope says <= B."""
    best = -math.inf
    low = math.inf
    for j, t in enumerate(sorted(ts)):
        low = min(low, j - rate * t)
        best = max(best, (j + 1) - rate * t - low)
    return best if ts else 0.0


def per_second(ts: list[float], start: float, seconds: int) -> list[int]:
    counts = [0] * seconds
    for t in ts:
        k = int(t - start)
        if 0 <= k < seconds:
            counts[k] += 1
    return counts


async def drive(
    cluster: Cluster,
    key: str,
    weights: dict[str, float],
    duration: float,
    load: float,
    crash: tuple[str, float, float] | None,
    log: list[str],
) -> tuple[list[Sent], dict]:
    rot = Rotation(weights)
    urls = {n.id: n.url + "/v1/limits/check" for n in cluster.nodes}
    records: list[Sent] = []
    tasks: set[asyncio.Task] = set()
    marks: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=3.0)
    body = {"key": key}

    async def one(rec: Sent, session: aiohttp.ClientSession) -> None:
        rec.sent = time.time()
        try:
            async with session.post(urls[rec.node], json=body) as resp:
                doc = await resp.json()
                rec.status = resp.status
                rec.allowed = resp.status == 200 and bool(doc.get("allowed"))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            rec.error = type(exc).__name__
        rec.done = time.time()

    async def bring_back(node_id: str) -> None:
        loop = asyncio.get_running_loop()
        child = await loop.run_in_executor(None, lambda: cluster.start(node_id, wait=False))
        marks["restart"] = time.time()
        log.append(f"restarted {node_id} (pid {child.pid})")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as s:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with s.get(cluster.node(node_id).url + "/readyz") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.02)
        marks["back_in_rotation"] = time.time()
        rot.up.add(node_id)
        rot.current[node_id] = 0.0
        log.append(f"{node_id} ready again after {marks['back_in_rotation'] - marks['restart']:.2f} s")

    n_total = int(duration * load) + 1
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        t0_loop = loop.time() + 0.05
        t0 = time.time() + 0.05
        killed = restarted = False
        back: asyncio.Task | None = None
        for i in range(n_total):
            offset = i / load
            if crash is not None:
                victim, kill_at, restart_at = crash
                if not killed and offset >= kill_at:
                    rot.up.discard(victim)  # its share moves to the survivors from this request on
                    cluster.kill9(victim)
                    marks["kill"] = time.time()
                    killed = True
                    log.append(f"killed {victim} with SIGKILL at {marks['kill'] - t0:.3f} s")
                if not restarted and offset >= restart_at:
                    restarted = True
                    back = asyncio.create_task(bring_back(victim))
            delay = t0_loop + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = Sent(i, rot.pick(), t0 + offset)
            records.append(rec)
            task = asyncio.create_task(one(rec, session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if back is not None:
            await asyncio.wait_for(back, timeout=30)
    return records, marks


def run_scenario(
    name: str, weights: dict[str, float], duration: float, load: float, crash_at: tuple | None, quick: bool
) -> dict:
    folder = workdir("accuracy")
    path, nodes = write_cluster(folder, ["eu", "us", "ap"], limits=[("*", R, B)])
    ids = [n.id for n in nodes]
    w = {ids[i]: weights[i] for i in range(3)}
    key = f"acc-{name.replace('/', '-')}"
    log: list[str] = []
    with Procs(folder) as procs:
        cluster = Cluster(path, nodes, procs)
        cluster.start_all()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            views = [http_json(n.url + "/v1/state?keys=none")[1] for n in nodes]
            if all(len(v.get("live_peers", [])) == 2 for v in views):
                break
            time.sleep(0.05)
        crash = (ids[2], crash_at[0], crash_at[1]) if crash_at else None
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            records, marks = runner.run(drive(cluster, key, w, duration, load, crash, log))
        for n in nodes:  # every node, the restarted one included, answers for its audit trail
            if not cluster.children[n.id].alive():
                cluster.start(n.id)
            wait_ready(n.url, cluster.children[n.id])
        audit = {n.id: fetch_audit(n.url, key) for n in nodes}

    first, last = records[0].sent, records[-1].sent
    t = last - first
    envelope = B + R * t
    allowed = [r for r in records if r.allowed]
    admitted = len(allowed)
    audited_ts = sorted(e["ts"] for evs in audit.values() for e in evs)
    audited = sum(e["cost"] for evs in audit.values() for e in evs)
    lags = sorted((r.sent - r.intended) * 1000 for r in records)
    lat = sorted((r.done - r.sent) * 1000 for r in records if r.status)
    res = {
        "key": key,
        "weights": w,
        "load_req_per_s": load,
        "requests": len(records),
        "duration_s": round(t, 3),
        "envelope_tokens": round(envelope, 1),
        "admitted_client": admitted,
        "admitted_audit": audited,
        "deviation_pct": round(100 * (admitted - envelope) / envelope, 2),
        "deviation_audit_pct": round(100 * (audited - envelope) / envelope, 2),
        "per_node": {
            n: {
                "sent": sum(1 for r in records if r.node == n),
                "allowed_client": sum(1 for r in allowed if r.node == n),
                "audited": sum(e["cost"] for e in audit[n]),
            }
            for n in ids
        },
        "errors": sum(1 for r in records if r.error),
        "non_200": sum(1 for r in records if r.status and r.status != 200),
        "worst_interval_excess_over_rate_tokens": round(worst_interval(audited_ts, R), 1),
        "admitted_per_second_audit": per_second(audited_ts, first, math.ceil(t)),
        "client_schedule_lag_ms": {
            "p50": round(lags[len(lags) // 2], 3),
            "p99": round(lags[int(len(lags) * 0.99)], 3),
            "max": round(lags[-1], 3),
        },
        "latency_ms": {"p50": round(lat[len(lat) // 2], 3), "p99": round(lat[int(len(lat) * 0.99)], 3)},
        "log": log,
    }
    res["pass"] = abs(res["deviation_pct"]) <= TARGET_DEV
    if crash:
        victim = crash[0]
        survivors = [n for n in ids if n != victim]
        kill, restart = marks["kill"], marks["restart"]
        surv_ts = sorted(e["ts"] for n in survivors for e in audit[n])
        first_s = sum(1 for x in surv_ts if kill <= x < kill + 1)
        surv_client = sum(1 for r in allowed if r.node in survivors and kill <= r.sent < kill + 1)
        pre = sum(1 for x in audited_ts if x < restart)
        env_pre = B + R * (restart - first)
        post = sum(1 for x in audited_ts if x >= restart)
        span_post = audited_ts[-1] - restart if audited_ts else 0
        res |= {
            "victim": victim,
            "kill_at_s": round(kill - first, 3),
            "restart_at_s": round(restart - first, 3),
            "back_in_rotation_at_s": round(marks.get("back_in_rotation", math.nan) - first, 3),
            "survivors_first_second_admitted_audit": first_s,
            "survivors_first_second_admitted_client": surv_client,
            "survivors_first_second_pct_of_R": round(100 * first_s / R, 1),
            "survivors_per_100ms_after_kill": [
                sum(1 for x in surv_ts if kill + k / 10 <= x < kill + (k + 1) / 10) for k in range(20)
            ],
            "before_restart_admitted": pre,
            "before_restart_envelope": round(env_pre, 1),
            "before_restart_deviation_pct": round(100 * (pre - env_pre) / env_pre, 2),
            "after_restart_admitted": post,
            "after_restart_rate_pct_of_R": round(100 * post / (R * (last - restart)), 1) if last > restart else None,
            "after_restart_interval_s": round(span_post, 3),
            "in_flight_to_victim_lost": sum(1 for r in records if r.node == victim and r.error),
            "audited_not_answered": res["admitted_audit"] - admitted,
        }
        res["pass_first_second"] = res["survivors_first_second_pct_of_R"] >= TARGET_CRASH_RATE
        res["pass"] = (
            res["deviation_audit_pct"] <= TARGET_DEV
            and res["deviation_pct"] <= TARGET_DEV
            and res["before_restart_deviation_pct"] <= TARGET_DEV
        )
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 s runs instead of 30 s")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--only", default="even,80/15/5,crash")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    duration = args.duration or (8.0 if args.quick else 30.0)
    load = 2 * R
    scenarios = {
        "even": ([1, 1, 1], None),
        "80/15/5": ([80, 15, 5], None),
        "crash": ([1, 1, 1], (duration / 3, 2 * duration / 3)),
    }
    wanted = args.only.split(",")
    results = {}
    for name, (weights, crash) in scenarios.items():
        if name not in wanted:
            continue
        print(f"scenario {name}: {duration:.0f} s at {load:.0f} req/s ...", flush=True)
        results[name] = run_scenario(name, weights, duration, load, crash, args.quick)
        for line in results[name]["log"]:
            print("   ", line)

    rows = []
    for name, r in results.items():
        rows.append(
            [
                name,
                f"{r['duration_s']:.2f}",
                f"{r['envelope_tokens']:.0f}",
                r["admitted_client"],
                r["admitted_audit"],
                f"{r['deviation_pct']:+.2f}%",
                f"{r['deviation_audit_pct']:+.2f}%",
                f"{r['worst_interval_excess_over_rate_tokens']:.0f}",
                r["errors"],
                f"{r['client_schedule_lag_ms']['p99']:.2f}",
                "-" if args.quick else ("PASS" if r["pass"] else "MISS"),  # targets: full runs only
            ]
        )
    print(f"\nR = {R:g}/s, B = {B}, load {load:g} req/s open loop, one key, 3 nodes / 3 regions on loopback")
    print(
        table(
            rows,
            [
                "scenario",
                "t s",
                "B+R·t",
                "admitted",
                "audited",
                "dev",
                "dev audit",
                "worst interval (≤B)",
                "errors",
                "sched lag p99 ms",
                f"±{TARGET_DEV:g}%",
            ],
        )
    )
    if "crash" in results:
        c = results["crash"]
        print(
            f"\ncrash: killed {c['victim']} at {c['kill_at_s']:.2f} s, restarted at {c['restart_at_s']:.2f} s, "
            f"back in rotation at {c['back_in_rotation_at_s']:.2f} s"
        )
        print(
            f"  survivors admitted {c['survivors_first_second_admitted_audit']} tokens in the first second after "
            f"the kill = {c['survivors_first_second_pct_of_R']:.1f}% of R "
            f"({'-' if args.quick else ('PASS' if c['pass_first_second'] else 'MISS')} >= {TARGET_CRASH_RATE:g}%);"
            " per 100 ms: "
            f"{c['survivors_per_100ms_after_kill'][:10]}"
        )
        print(
            f"  before restart: {c['before_restart_admitted']} vs envelope {c['before_restart_envelope']:.0f} "
            f"({c['before_restart_deviation_pct']:+.2f}%); whole run (after restart): "
            f"{c['deviation_audit_pct']:+.2f}% (audit) / {c['deviation_pct']:+.2f}% (client); after restart "
            f"the cluster admitted {c['after_restart_rate_pct_of_R']}% of R"
        )
        print(
            f"  in-flight requests to the victim lost: {c['in_flight_to_victim_lost']}; "
            f"audited but never answered: {c['audited_not_answered']}"
        )
    figures = {
        "R": R,
        "B": B,
        "target_deviation_pct": TARGET_DEV,
        "target_crash_first_second_pct": TARGET_CRASH_RATE,
        "scenarios": results,
        "median_abs_deviation_pct": statistics.median(abs(r["deviation_pct"]) for r in results.values()),
    }
    targets = [target(f"{name}: admitted vs B+R·t (client), absolute", abs(r["deviation_pct"]), "<=", TARGET_DEV, "%")
               for name, r in results.items()]
    if "crash" in results:
        c = results["crash"]
        targets += [
            target("crash: survivors' first second after the kill", c["survivors_first_second_pct_of_R"], ">=",
                   TARGET_CRASH_RATE, "% of R"),
            target("crash: admitted over B+R·t (audit)", c["deviation_audit_pct"], "<=", TARGET_DEV, "%"),
            target("crash: admitted over B+R·t before the restart", c["before_restart_deviation_pct"], "<=",
                   TARGET_DEV, "%"),
        ]
    path = write_results(
        "bench_accuracy",
        figures,
        quick=args.quick,
        started=started,
        targets=targets,
        extra={"parameters": {"duration_s": duration, "load_req_per_s": load, "gossip_interval_ms": 20}},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
