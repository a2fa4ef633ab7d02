"""The pure limiter core: decisions per second on one core with 100,000 live keys.

The table is built as a node builds it (this node plus 2 peers), pre-populated with every key, then
timed over a random key sequence with a manual clock.  Each allowed grant is committed as the node
does once the audit write is durable.  Three loops are timed:

* ``take``                     -- the decision alone;
* ``take+commit``              -- decision and commit of each allowed grant (the issue's figure);
* ``take+commit+gossip``       -- the same plus the replication bookkeeping the node does every
                                  gossip interval of the manual clock (``delta_for`` + ``on_ack`` for
                                  each of the 2 peers, ``tick``).

Usage: .venv/bin/python benchmarks/bench_core.py [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._procs import install_signal_handlers, table, write_results
from benchmarks._targets import target
from edge_server.token_bucket import BucketTable, Limit

TARGET = 200_000
PEERS = ["n1", "n2", "n3"]


def build(keys: list[str], rate: float, burst: float, gossip_interval: float) -> BucketTable:
    limit = Limit(rate, burst)
    t = BucketTable(
        "n1",
        PEERS,
        lambda _key: limit,
        now=0.0,
        gossip_interval=gossip_interval,
        max_keys=len(keys) + 1,
        idle_ttl=3600.0,
    )
    now = 0.0
    for key in keys:  # one grant per key: every key is live and has an own G-Counter entry
        if t.take(key, 1, now).allowed:
            t.commit(key, 1)
    sync(t, now)
    return t


def sync(t: BucketTable, now: float) -> None:
    for peer in ("n2", "n3"):
        t.on_peer_boot(peer, 1, now)
        upto, _entries = t.delta_for(peer, max_entries=10**9)
        t.on_ack(peer, upto, now)
    t.tick(now)


def run(
    t: BucketTable, seq: list[str], start: float, dt: float, mode: str, gossip_every: int, gc_policy: str = "default"
) -> tuple[float, int]:
    """Time one pass; returns (seconds, allowed).  ``gc_policy`` "off" disables the cyclic GC in the pass."""
    take = t.take
    commit = t.commit
    allowed = 0
    now = start
    gc.collect()
    if gc_policy == "off":
        gc.disable()
    t0 = time.perf_counter()
    if mode == "take":
        for key in seq:
            now += dt
            if take(key, 1, now).allowed:
                allowed += 1
    elif mode == "take+commit":
        for key in seq:
            now += dt
            if take(key, 1, now).allowed:
                commit(key, 1)
                allowed += 1
    else:
        i = 0
        for key in seq:
            now += dt
            if take(key, 1, now).allowed:
                commit(key, 1)
                allowed += 1
            i += 1
            if i == gossip_every:
                i = 0
                for peer in ("n2", "n3"):
                    upto, _entries = t.delta_for(peer)
                    t.on_ack(peer, upto, now)
                t.tick(now)
    elapsed = time.perf_counter() - t0
    gc.enable()
    return elapsed, allowed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (well under a minute)")
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=None, help="decisions per timed pass")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--burst", type=float, default=100.0)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one take+commit pass")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    decisions = args.decisions or (200_000 if args.quick else 1_000_000)
    repeats = args.repeats or 3
    pinned = None
    if hasattr(os, "sched_setaffinity"):
        pinned = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {pinned})

    rng = random.Random(20260101)
    keys = [f"tenant-{i:06d}" for i in range(args.keys)]
    seq = [keys[rng.randrange(args.keys)] for _ in range(decisions)]
    # The manual clock advances as if the node ran at the target rate; with 100k keys each key
    # is then hit about twice per second of manual time.
    dt = 1.0 / TARGET
    gossip_interval = 0.02
    gossip_every = int(gossip_interval / dt)

    results: dict[str, dict] = {}
    for gc_policy, mode in [(g, m) for g in ("default", "off") for m in ("take", "take+commit", "take+commit+gossip")]:
        # A fresh table for each pass: ``take`` alone leaves grants uncommitted, which would count
        # against the unseen-spend cap of the later loops.
        rates, allowed_fr = [], []
        for _ in range(repeats):
            t = build(keys, args.rate, args.burst, gossip_interval)
            assert t.key_count() == args.keys
            now = 1.0
            elapsed, allowed = run(t, seq, now, dt, mode, gossip_every, gc_policy)
            now += decisions * dt + 1.0
            sync(t, now)
            rates.append(decisions / elapsed)
            allowed_fr.append(allowed / decisions)
        med = statistics.median(rates)
        results[f"{mode} (gc {gc_policy})"] = {
            "decisions_per_s_median": round(med),
            "decisions_per_s_runs": [round(r) for r in rates],
            "us_per_decision_median": round(1e6 / med, 3),
            "allowed_fraction": round(statistics.median(allowed_fr), 4),
            "live_keys": t.key_count(),
        }

    profile_text = None
    main_fig = results["take+commit (gc default)"]
    if args.profile or main_fig["decisions_per_s_median"] < TARGET:
        t = build(keys, args.rate, args.burst, gossip_interval)
        now = 1.0
        prof = cProfile.Profile()
        prof.enable()
        run(t, seq[: min(len(seq), 300_000)], now, dt, "take+commit+gossip", gossip_every)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(12)
        profile_text = buf.getvalue()

    rows = [
        [
            mode,
            f"{r['decisions_per_s_median']:,}",
            f"{r['us_per_decision_median']:.3f}",
            f"{r['allowed_fraction']:.1%}",
            f"{r['live_keys']:,}",
        ]
        for mode, r in results.items()
    ]
    print(
        f"pure core, {args.keys:,} live keys, {decisions:,} decisions per pass, median of {repeats} passes, "
        f"pinned to cpu {pinned}"
    )
    print(table(rows, ["loop", "decisions/s", "µs/decision", "allowed", "keys"]))
    ok = main_fig["decisions_per_s_median"] >= TARGET
    if not args.quick:  # targets are reported by full runs only (benchmarks/README.md, "Targets")
        print(
            f"\ntarget take+commit (default GC) >= {TARGET:,}/s: {'PASS' if ok else 'MISS'} "
            f"({main_fig['decisions_per_s_median']:,}/s, {main_fig['us_per_decision_median']:.3f} µs/decision)"
        )
    if profile_text:
        print("\ncProfile of one take+commit+gossip pass (tottime):")
        print(profile_text)

    figures = {
        "target_decisions_per_s": TARGET,
        "pass": ok,
        "decisions_per_s": main_fig["decisions_per_s_median"],
        "us_per_decision": main_fig["us_per_decision_median"],
        "loops": results,
    }
    params = {
        "keys": args.keys,
        "decisions_per_pass": decisions,
        "repeats": repeats,
        "rate": args.rate,
        "burst": args.burst,
        "peers": 2,
        "manual_clock_step_s": dt,
        "gossip_every_decisions": gossip_every,
        "pinned_cpu": pinned,
    }
    path = write_results(
        "bench_core",
        figures,
        quick=args.quick,
        started=started,
        targets=[target("take+commit, default GC", main_fig["decisions_per_s_median"], ">=", TARGET, "decisions/s")],
        extra={"parameters": params, **({"profile": profile_text} if profile_text else {})},
    )
    print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
