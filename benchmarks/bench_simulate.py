"""Deterministic simulation: schedules per second, and the share of random fault schedules within the
eventual-mode bound (``workbench simulate``'s engine, the real limiter core and wire format).

Each schedule is 30 virtual seconds of a 2-5 node cluster under open-loop load (1.5-4x each key's limit,
at most a few hundred arrivals per second) with 1-6 random faults; it is simulated, recorded and
judged exactly as ``workbench simulate --schedules N --seed S`` does (same generator, same seed
derivation).  Figures:

* ``schedules_per_s`` (wall) and ``cpu_ms_per_schedule`` (process CPU time, which the other users of
  a shared machine do not inflate), and the time 1,000 schedules take;
* ``within_bound_share`` -- schedules whose worst window excess stays within the derived bound
  (``workbench.run.sim.bound``); ``within_nominal_share`` -- within the issue's nominal formula
  ``R (g + delay) + sum (k - 1) R P``, and which fault kinds the schedules beyond it held;
* ``broken_core_caught_share`` -- the same schedules with a core that never subtracts its peers' spend
  (``tests/workbench/sim/broken_core.py``): the share the simulator flags;
* ``strict_vs_eventual`` -- the same schedules (10 virtual s each) in both modes, each judged against the
  plain envelope ``B + R (t - s)`` with no allowance: the share that stays inside it, the worst excess
  over it, and the share of ``R * T`` admitted (what strict mode's safety costs); and one partition
  (from 3 s to 9 s, load 9 R: three regions cut apart, and eu cut off from a majority us + ap) with
  admitted tokens/s per region in each mode (the chart ``strict_vs_eventual`` in the results file);
* ``findings`` -- hand-made scenarios for behaviour the random runs showed that is not over-admission
  (written as replayable scenario files under ``benchmarks/results/simulate-findings/``; a ``--quick``
  run writes them under ``simulate-findings-quick/``, which git ignores).

Raw per-schedule samples (excess, bound, nominal, nodes, gossip interval, fault kinds, wall and CPU
ms) are kept in the results file.

Usage: .venv/bin/python benchmarks/bench_simulate.py [--quick] [--schedules N] [--seed S] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._plots import fig_json
from benchmarks._procs import RESULTS, write_results
from benchmarks._targets import target
from workbench.run.sim.files import write_schedule
from workbench.run.sim.schedule import SimFault, random_schedule, sim_faults_of
from workbench.run.sim.world import run_world
from workbench.run.simulate import draw_schedule, judge, load_core, schedule_rng, simulate
from workbench.spec.scenario import FaultAction, LimitSpec, LoadSpec, Scenario, Topology

BROKEN = str(Path(__file__).resolve().parents[1] / "tests" / "workbench" / "sim" / "broken_core.py")


def run(count: int, seed: int, factory=None) -> list[dict]:
    samples = []
    for i in range(count):
        scenario, faults = random_schedule(schedule_rng(seed, i), index=i)
        wall, cpu = time.perf_counter(), time.process_time()
        kw = {} if factory is None else {"table_factory": factory}
        res = judge(scenario, faults, run_world(scenario, faults, **kw))
        key = max(res.keys.values(), key=lambda k: k["worst_excess"] - k["bound"])
        samples.append({"i": i, "ok": res.ok, "nominal_ok": res.within_nominal,
                        "excess": key["worst_excess"], "bound": key["bound"], "nominal": key["nominal"],
                        "nodes": len(scenario.topology.node_ids), "g_ms": scenario.topology.gossip_interval_ms,
                        "requests": len(res.recording.requests), "faults": sorted({f.action for f in faults}),
                        "wall_ms": round((time.perf_counter() - wall) * 1000, 2),
                        "cpu_ms": round((time.process_time() - cpu) * 1000, 2)})
    return samples


def _three(*faults: FaultAction, load_rps: float = 120.0, duration_s: float = 20.0) -> Scenario:
    return Scenario(name="finding", topology=Topology({"eu": 1, "us": 1, "ap": 1}, gossip_interval_ms=100.0),
                    limits=(LimitSpec("*", 50.0, 50.0),), load=LoadSpec(rate_rps=load_rps, route="check"),
                    faults=faults, duration_s=duration_s, seed=7)


def findings(out: Path) -> list[dict]:
    """Behaviour the random runs showed that stays within the bound but matters to users."""
    cases = [
        ("cold-restart-share", "eu-1 killed at 4 s and restarted with its data at 5 s, load 2.4x the limit",
         _three(FaultAction(4.0, "kill", "eu-1")), [SimFault(5.0, "restart", "eu-1")]),
        ("no-restart-share", "the same load with no fault (the fair share for comparison)", _three(), []),
        ("restart-clock-behind", "eu-1's clock steps back 10 s at 4 s, then it restarts (with its data) at 5 s",
         _three(), [SimFault(4.0, "skew", "eu-1", ms=-10_000.0), SimFault(5.0, "restart", "eu-1")]),
        ("skew-past-replay-window", "eu-1's clock steps 40 s ahead at 5 s (the replay guard allows 30 s)",
         _three(load_rps=300.0), [SimFault(5.0, "skew", "eu-1", ms=40_000.0)]),
    ]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, what, scenario, extra in cases:
        faults = sim_faults_of(scenario, extra)
        res = judge(scenario, faults, run_world(scenario, faults))
        after = [r for r in res.recording.requests if r.start_s >= 7.0]
        share = {n: round(sum(r.admitted for r in after if r.node == n) / max(1, sum(r.node == n for r in after)), 3)
                 for n in scenario.topology.node_ids}
        key = res.keys["tenant-0000"]
        path = write_schedule(out / f"{name}.toml", scenario, faults,
                              [f"{what}.", "Replay: workbench simulate --scenario <this file>"])
        rows.append({"name": name, "what": what, "admitted_share_after_7s": share,
                     "gossip_refused": res.recording.extra["gossip_refused"], "worst_excess": key["worst_excess"],
                     "bound": key["bound"], "within_bound": res.ok,
                     "file": str(path.relative_to(RESULTS.parent.parent))})
    return rows


SIDE_R = 50.0


PARTITIONS = {"three_way": (("eu",), ("us",), ("ap",)), "eu_cut_off": (("eu",), ("us", "ap"))}


def _partition(mode: str, groups: tuple[tuple[str, ...], ...]) -> Scenario:
    cut = FaultAction(3.0, "partition", groups=groups, duration_s=6.0)
    return Scenario(name=f"partition-{mode}", topology=Topology({"eu": 1, "us": 1, "ap": 1}, gossip_interval_ms=100.0),
                    limits=(LimitSpec("*", SIDE_R, SIDE_R),),
                    load=LoadSpec(rate_rps=9 * SIDE_R, arrival="constant", route="check"),
                    faults=(cut,), duration_s=12.0, seed=7, mode=mode)


def _series(rec, duration: float, bin_s: float = 0.5) -> dict[str, list[float]]:
    """Admitted tokens/s per region (and in total) in bins of ``bin_s``, from the audit trail."""
    out: dict[str, list[float]] = {}
    n = round(duration / bin_s)
    for ev in rec.audit:
        i = min(n - 1, int((ev.ts - rec.started_wall) / bin_s))
        for name in (ev.region, "total"):
            out.setdefault(name, [0.0] * n)[i] += ev.cost / bin_s
    return out


CUT_BINS = slice(round(4.0 / 0.5), round(9.0 / 0.5))  # the cut, after its first second


def _mean(ys: list[float]) -> float:
    return round(sum(ys[CUT_BINS]) / len(ys[CUT_BINS]), 2)


def strict_vs_eventual(count: int, seed: int) -> tuple[dict, dict, object]:
    """Both modes on the same schedules and on one partition; figures, raw series and the chart."""
    from plotly.subplots import make_subplots

    per_mode: dict[str, dict] = {}
    samples: dict[str, list] = {}
    for mode in ("eventual", "strict"):
        rows = []
        cpu = time.process_time()
        for i in range(count):
            scenario, faults = draw_schedule(seed, i, duration_s=10.0, max_faults=6, mode=mode)
            res = judge(scenario, faults, run_world(scenario, faults))
            worst = max(k["worst_excess"] for k in res.keys.values())
            cap = sum(x.burst + x.rate * scenario.duration_s for x in scenario.limits) * scenario.load.tenants
            admitted = res.envelope.figures.get("admitted_tokens") or 0
            rows.append({"i": i, "worst_excess_over_envelope": worst,
                         "admitted_share_of_envelope": round(admitted / cap, 4)})
        cpu = time.process_time() - cpu
        samples[mode] = rows
        per_mode[mode] = {
            "schedules": count, "cpu_ms_per_schedule": round(cpu / count * 1000, 1),
            "within_plain_envelope_share": round(sum(r["worst_excess_over_envelope"] <= 1e-6 for r in rows) / count, 4),
            "max_excess_over_plain_envelope_tokens": round(max(r["worst_excess_over_envelope"] for r in rows), 3),
            "mean_admitted_share_of_envelope": round(sum(r["admitted_share_of_envelope"] for r in rows) / count, 4)}
    series: dict[str, dict] = {}
    partition: dict[str, dict] = {}
    for (cut, groups), mode in itertools.product(PARTITIONS.items(), ("eventual", "strict")):
        res = simulate(_partition(mode, groups))
        ser = _series(res.recording, 12.0)
        series.setdefault(cut, {})[mode] = ser
        worst = max(k["worst_excess"] for k in res.keys.values())
        partition.setdefault(cut, {})[mode] = {
            "worst_excess_over_envelope": worst,
            "admitted_per_s_during_cut": {r: _mean(ys) for r, ys in sorted(ser.items())},
            "total_share_of_R_during_cut": round(_mean(ser["total"]) / SIDE_R, 3)}
    fig = make_subplots(rows=len(PARTITIONS), cols=2, shared_yaxes=True,
                        subplot_titles=[f"{cut}: {mode}" for cut in PARTITIONS for mode in ("eventual", "strict")])
    colors = {"eu": "#2563eb", "us": "#16a34a", "ap": "#d97706", "total": "#111827"}
    for row, cut in enumerate(PARTITIONS, start=1):
        for col, mode in enumerate(("eventual", "strict"), start=1):
            for name, ys in sorted(series[cut][mode].items()):
                fig.add_scatter(x=[round(i * 0.5, 1) for i in range(len(ys))], y=ys, name=name, legendgroup=name,
                                showlegend=row == 1 and col == 1, line={"color": colors.get(name)}, row=row, col=col)
            fig.add_hline(y=SIDE_R, line_dash="dash", row=row, col=col)
            fig.add_vrect(x0=3.0, x1=9.0, fillcolor="#dc2626", opacity=0.08, line_width=0, row=row, col=col)
    fig.update_layout(title="Admitted tokens/s per region through a partition (3-9 s): eventual vs strict, "
                      "limit R dashed", template="plotly_white", height=340 * len(PARTITIONS))
    figures = {"schedules": per_mode, "partition": partition}
    return figures, {"samples": samples, "partition_series": series}, fig


def side_by_side_only(args: argparse.Namespace) -> int:
    started = time.time()
    count = args.schedules or (20 if args.quick else 200)
    side, side_raw, side_fig = strict_vs_eventual(count, args.seed)
    targets = [target("strict: schedules inside the plain envelope",
                      side["schedules"]["strict"]["within_plain_envelope_share"], ">=", 1.0),
               *(target(f"strict: partition {cut}: total share of R",
                        side["partition"][cut]["strict"]["total_share_of_R_during_cut"], "<=", 1.0)
                 for cut in PARTITIONS)]
    path = write_results("simulate_strict_vs_eventual", side | {"seed": args.seed}, quick=args.quick,
                         started=started, targets=targets,
                         extra={"strict_vs_eventual": side_raw, "charts": {"strict_vs_eventual": fig_json(side_fig)}})
    for mode, fig in side["schedules"].items():
        print(f"{mode:9} {fig}")
    for cut, modes in side["partition"].items():
        for mode, fig in modes.items():
            print(f"{cut:11} {mode:9} total {fig['total_share_of_R_during_cut']} R  {fig['admitted_per_s_during_cut']}")
    print(f"results: {path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 schedules, 10 with the broken core")
    ap.add_argument("--schedules", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print the 25 costliest functions of 20 schedules")
    ap.add_argument("--strict-vs-eventual", action="store_true",
                    help="only the side-by-side (200 schedules per mode, 20 with --quick), into "
                    "results/simulate_strict_vs_eventual.json")
    args = ap.parse_args()
    if args.strict_vs_eventual:
        return side_by_side_only(args)
    count = args.schedules or (100 if args.quick else 1000)
    broken_count = 10 if args.quick else 100
    started = time.time()
    if args.profile:
        prof = cProfile.Profile(time.process_time)
        prof.runcall(run, 20, args.seed)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        print(buf.getvalue())
    wall, cpu = time.perf_counter(), time.process_time()
    samples = run(count, args.seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    broken = run(broken_count, args.seed, load_core(BROKEN + ":NeverSubtractsPeers"))
    beyond_nominal = [s for s in samples if not s["nominal_ok"]]
    kinds = Counter(k for s in beyond_nominal for k in s["faults"])
    all_kinds = Counter(k for s in samples for k in s["faults"])
    figures = {
        "schedules": count, "seed": args.seed, "virtual_s_per_schedule": 30.0,
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "schedules_per_s": round(count / wall, 2), "cpu_ms_per_schedule": round(cpu / count * 1000, 2),
        "wall_s_per_1000": round(wall / count * 1000, 1), "cpu_s_per_1000": round(cpu / count * 1000, 1),
        "failed": sum(not s["ok"] for s in samples),
        "within_bound_share": round(sum(s["ok"] for s in samples) / count, 4),
        "within_nominal_share": round(sum(s["nominal_ok"] for s in samples) / count, 4),
        "max_excess_over_bound_tokens": round(max(s["excess"] - s["bound"] for s in samples), 3),
        "max_excess_over_bound_ratio": round(max(s["excess"] / s["bound"] for s in samples), 3),
        "beyond_nominal_by_fault_kind": {k: f"{v}/{all_kinds[k]}" for k, v in kinds.most_common()},
        "beyond_nominal_without_faults": sum(1 for s in beyond_nominal
                                             if not set(s["faults"]) - {"duplicate", "reorder", "heal"}),
        "requests_per_schedule": round(sum(s["requests"] for s in samples) / count, 1),
        "broken_core_schedules": broken_count,
        "broken_core_caught_share": round(sum(not s["ok"] for s in broken) / broken_count, 4),
    }
    side, side_raw, side_fig = strict_vs_eventual(20 if args.quick else 200, args.seed)
    figures["strict_vs_eventual"] = side
    # A quick run writes its scenario files beside the tracked ones (untracked, ignored): the tracked
    # files are the full run's, and a quick run must leave the tree as it found it.
    found = findings(RESULTS / ("simulate-findings-quick" if args.quick else "simulate-findings"))
    targets = [target("1,000 schedules of 30 virtual s (wall, one core)", figures["wall_s_per_1000"], "<", 60.0, "s"),
               target("1,000 schedules of 30 virtual s (CPU)", figures["cpu_s_per_1000"], "<", 60.0, "s"),
               target("schedules within the eventual-mode bound", figures["within_bound_share"], ">=", 1.0),
               target("broken core caught", figures["broken_core_caught_share"], ">=", 0.9),
               target("strict: schedules inside the plain envelope",
                      side["schedules"]["strict"]["within_plain_envelope_share"], ">=", 1.0),
               *(target(f"strict: partition {cut}: total share of R",
                        side["partition"][cut]["strict"]["total_share_of_R_during_cut"], "<=", 1.0)
                 for cut in PARTITIONS)]
    path = write_results("simulate", figures, quick=args.quick, started=started, targets=targets,
                         extra={"findings": found, "samples": samples, "broken_core_samples": broken,
                                "strict_vs_eventual": side_raw, "charts": {"strict_vs_eventual": fig_json(side_fig)}})
    for name, value in figures.items():
        print(f"{name:32} {value}")
    for row in found:
        print(f"{row['name']:26} share after 7 s {row['admitted_share_after_7s']}  refused {row['gossip_refused']}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
