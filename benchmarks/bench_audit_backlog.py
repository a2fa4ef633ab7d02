"""A replica holder that falls behind: the origin's memory while the backlog grows, and the catch-up.

Two regions on loopback: eu-1 (the origin) on cpu 0, us-1 (the holder of its replica) and
``wrk -t1 -c64`` on cpu 1, POST /v1/limits/check over a 10,000-key space (the key table is full
within the first second, so what the origin's RSS does after that is not the table filling).  wrk
runs ``--warm`` + ``--stall`` + ``--after`` seconds at full speed; us-1 is stopped (SIGSTOP) for
the ``--stall`` seconds in the middle and resumed (SIGCONT).  Every 0.5 s: eu-1's and us-1's RSS
(psutil) and eu-1's ``/metrics`` replication figures (``edge_audit_replication_lag_events``,
``..._lag_seconds``, ``..._acked_seq``).  After wrk stops, sampling goes on until the holder has
acknowledged everything (at most 120 s).

Figures: the backlog at its peak (events not acknowledged) and what it would weigh held in memory
as lines; eu-1's RSS before the stall (median of the last 5 s of warm-up), at the stall's end (the
largest backlog) and its maximum during the stall.  The same run with replication off (us-1 then
only a peer that stops answering gossip) is the control: the growth over the stall with replication
minus without is what the backlog costs (target <= 10 MB: it is read back from segments on disk,
not kept in memory); the catch-up: seconds from the resume to lag 0, and the holder's
acknowledged events per second meanwhile (while load goes on, then after it).

Usage: flock LOCK .venv/bin/python benchmarks/bench_audit_backlog.py [--warm 10] [--stall 20] [--after 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._procs import (
    PYTHON,
    Procs,
    http_text,
    install_signal_handlers,
    metric_value,
    random_keys_lua,
    run_wrk,
    table,
    wait_ready,
    workdir,
    write_cluster,
    write_results,
)
from benchmarks._targets import target

KEYS_LUA = random_keys_lua(10_000)
LINE_BYTES = 210  # a plain event line (docs/audit.md): what a backlog held in memory as lines would weigh
CATCH_UP_LIMIT_S = 120.0


def _replication(url: str) -> dict[str, float]:
    """The sender's figures from ``/metrics`` (all 0 with replication off)."""
    text = http_text(url + "/metrics")
    labels = {"holder": "us-1"}
    return {name: metric_value(text, f"edge_audit_replication_{name}", labels)
            for name in ("lag_events", "lag_seconds", "acked_seq")}


def bench_backlog(procs: Procs, folder: Path, warm_s: int, stall_s: int, after_s: int, replicate: bool) -> dict:
    """One run; with ``replicate`` false the same stall of us-1 (a peer that stops answering gossip)
    is the control: what the origin's RSS does without any replica backlog."""
    import psutil

    folder.mkdir(parents=True)
    path, nodes = write_cluster(folder, ["eu", "us"], limits=[("*", 1e9, 1e9)])
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"\n[audit]\nsegment_bytes = 4194304\nreplicate = {'true' if replicate else 'false'}\n")
    children = [procs.start(f"{n.id}-backlog", [PYTHON, "-m", "edge_server", "--cluster", str(path), "--node", n.id,
                                               "--log-level", "WARNING", "--drain-ms", "0"],
                            cpus={0} if n.id == "eu-1" else {1}) for n in nodes]
    for n, c in zip(nodes, children, strict=True):
        wait_ready(n.url, c)
    origin, holder = nodes[0], children[1]
    rss = {n.id: psutil.Process(c.pid) for n, c in zip(nodes, children, strict=True)}
    script = folder / "keys.lua"
    script.write_text(KEYS_LUA)
    result: dict = {}
    duration = warm_s + stall_s + after_s
    wrk = threading.Thread(target=lambda: result.update(wrk=run_wrk(
        origin.url + "/v1/limits/check", threads=1, connections=64, duration_s=duration, script=script, cpus={1})))
    samples: list[dict] = []
    t0 = time.monotonic()
    wrk.start()
    phase = "warm"
    stopped_at = resumed_at = caught_up_at = None
    try:
        while True:
            t = time.monotonic() - t0
            if phase == "warm" and t >= warm_s:
                holder.pause()
                phase, stopped_at = "stall", t
            elif phase == "stall" and t >= warm_s + stall_s:
                holder.resume()
                phase, resumed_at = "after", t
            rep = _replication(origin.url)
            samples.append({"t_s": round(t, 2), "phase": phase if wrk.is_alive() else "drain",
                            "rss_mb": {nid: round(p.memory_info().rss / 2**20, 1) for nid, p in rss.items()}, **rep})
            if phase == "after" and rep["lag_events"] == 0 and caught_up_at is None and replicate:
                caught_up_at = t
            if not wrk.is_alive() and (rep["lag_events"] == 0 or t > duration + CATCH_UP_LIMIT_S):
                break
            time.sleep(0.5)
    finally:
        if phase == "stall":
            holder.resume()
        wrk.join()
        for c in children:
            procs.stop(c)
    return summarize(samples, result["wrk"], stopped_at, resumed_at, caught_up_at, duration)


def summarize(samples: list[dict], wrk: Any, stopped_at: float | None, resumed_at: float | None,
              caught_up_at: float | None, duration: int) -> dict:
    """The figures of the module docstring from the samples."""
    warm = [s for s in samples if s["phase"] == "warm" and s["t_s"] >= (stopped_at or 0) - 5]
    stall = [s for s in samples if s["phase"] == "stall"]
    base = round(statistics.median(s["rss_mb"]["eu-1"] for s in warm), 1) if warm else None
    peak = max(samples, key=lambda s: s["lag_events"])
    end_rss = stall[-1]["rss_mb"]["eu-1"] if stall else None  # the backlog is largest there
    after = [s for s in samples if resumed_at is not None and s["t_s"] >= resumed_at]
    final = samples[-1]
    acked_at_resume = after[0]["acked_seq"] if after else 0
    under_load = [s for s in after if s["phase"] == "after"]
    rate_under_load = ((under_load[-1]["acked_seq"] - acked_at_resume) / (under_load[-1]["t_s"] - resumed_at)
                       if len(under_load) > 1 and under_load[-1]["t_s"] > resumed_at else None)
    lags = sorted(s["lag_seconds"] for s in samples if s["phase"] == "warm")
    return {
        "wrk": {"requests_per_s": wrk.requests_per_s, "p99_ms": wrk.p99_ms, "command": wrk.command},
        "duration_s": duration, "stopped_at_s": stopped_at, "resumed_at_s": resumed_at,
        "caught_up_at_s": caught_up_at,
        "catch_up_s": round(caught_up_at - resumed_at, 2) if caught_up_at and resumed_at else None,
        "backlog_peak_events": int(peak["lag_events"]), "backlog_peak_lag_s": peak["lag_seconds"],
        "backlog_as_lines_in_memory_mb": round(peak["lag_events"] * LINE_BYTES / 2**20, 1),
        "origin_rss_before_stall_mb": base, "origin_rss_at_stall_end_mb": end_rss,
        "origin_rss_max_during_stall_mb": max((s["rss_mb"]["eu-1"] for s in stall), default=None),
        "origin_rss_growth_over_stall_mb": round(end_rss - base, 1) if base is not None and end_rss else None,
        "origin_rss_end_mb": final["rss_mb"]["eu-1"],
        "holder_acked_events_per_s_after_resume_under_load": round(rate_under_load, 1) if rate_under_load else None,
        "events_total": int(final["acked_seq"]),
        "recovery_point_warm_p99_s": lags[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else None,
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm", type=int, default=10, help="seconds of load before the holder stops")
    parser.add_argument("--stall", type=int, default=20, help="seconds the holder is stopped")
    parser.add_argument("--after", type=int, default=15, help="seconds of load after it resumes")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    folder = workdir("audit-backlog")
    runs: dict[str, dict] = {}
    with Procs(folder) as procs:
        for mode in ("on", "off"):
            load_before = round(os.getloadavg()[0], 2)
            runs[mode] = bench_backlog(procs, folder / mode, args.warm, args.stall, args.after, mode == "on")
            runs[mode]["load_average_1m_before"] = load_before
    on = runs["on"]
    print(table([(s["t_s"], s["phase"], s["rss_mb"]["eu-1"], s["rss_mb"]["us-1"], int(s["lag_events"]),
                  round(s["lag_seconds"], 3)) for s in on["samples"][::4]],
                ["t s", "phase", "eu-1 RSS MB", "us-1 RSS MB", "backlog events", "recovery point s"]))
    for mode, out in runs.items():
        print(f"replication {mode}: backlog peak {out['backlog_peak_events']} events "
              f"({out['backlog_as_lines_in_memory_mb']} MB as lines); eu-1 RSS {out['origin_rss_before_stall_mb']} MB "
              f"before the stall, {out['origin_rss_at_stall_end_mb']} MB at its end (max "
              f"{out['origin_rss_max_during_stall_mb']}); caught up {out['catch_up_s']} s after the resume "
              f"({out['holder_acked_events_per_s_after_resume_under_load']} events/s acknowledged under load); "
              f"wrk {out['wrk']['requests_per_s']:.0f} req/s")
    growth = {m: r["origin_rss_growth_over_stall_mb"] for m, r in runs.items()}
    extra = round(growth["on"] - growth["off"], 1) if None not in growth.values() else None
    runs["origin_rss_growth_on_minus_off_mb"] = extra
    print(f"eu-1 RSS growth over the stall: {growth['on']} MB with replication, {growth['off']} MB without "
          f"(difference {extra} MB)")
    quick = args.stall < 20
    path = write_results("bench_audit_backlog", runs, quick=quick, started=started, targets=[
        target("origin RSS growth over the stall, replication on minus off", extra, "<=", 10.0, "MB"),
        target("holder caught up after the resume", on["catch_up_s"], "<=", CATCH_UP_LIMIT_S, "s")])
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
