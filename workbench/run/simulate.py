"""Deterministic simulation: the real limiter core on a simulated network in virtual time.

``workbench simulate`` runs N nodes of ``edge_server.token_bucket.BucketTable`` -- take, commit,
delta_for, on_ack, merge, tick, on_peer_boot, recover -- exchanging every gossip message in the real
signed wire format (``edge_server.wire``), on the network and clocks of ``workbench.run.sim``.  No
sockets, no sleeps, no wall clock: a run is a pure function of its scenario (seed included), so a
failure replays exactly.  It is driven by the same :class:`~workbench.spec.scenario.Scenario` as a
drill, writes the same history (:class:`~workbench.history.Recording`) and is judged by the same
checker (``workbench.check.check_envelope``).

``--schedules N --seed S`` draws N random schedules (``workbench.run.sim.schedule.random_schedule``):
partitions into any grouping, heals, kills, restarts with and without the data directory, pauses,
latency, loss, reordering and duplication of gossip, and clock skew.  Each one is judged against its
own **eventual-mode bound** (derived in ``workbench.run.sim.bound``; in short, per key with rate R and
burst B, N nodes, gossip interval g, unseen-spend share s = max(B/N, 4Rg), staleness d = max(g, round
trip) + delay)::

    bound = (N-1) max(s, R d)                                  steady staleness
          + sum over partitions (k-1) (B + R (P + 1 s + d))    k sides for P seconds (lossy links = cut)
          + s per kill or pause                                unseen spend frozen
          + (N-1) max(s, R d) + s per restart                  a new boot restarts the argument
          + B + s more per restart without the data directory  it starts full; generation may go back
          + min(B, R J) + s per forward clock step J           refill from the jump
    (two clocks more than 30 s apart refuse each other's gossip as stale: that pair counts as cut)

A schedule fails when a key's worst window excess ``admitted[s, t] - (B + R (t - s))`` over the whole
run (every window, exactly: ``max_window_excess``) exceeds that bound.  The first failure is shrunk
(``workbench.run.sim.shrink``) and written as a scenario file that replays the failure with
``workbench simulate --scenario FILE`` and runs as a real drill with ``workbench drill --scenario
FILE`` (simulator-only faults are comment lines there, which a drill ignores).  The issue's nominal
formula, ``R (g + delay) + sum (k-1) R P``, is reported beside it (``within_nominal_share``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_server.config import MODES
from edge_server.strict.settings import StrictSettings
from edge_server.strict.table import StrictTable
from edge_server.token_bucket import BucketTable
from workbench.check import Verdict, check_envelope, check_token_loss
from workbench.history import Recording
from workbench.run.sim.bound import Bound, StrictBound, eventual_bound
from workbench.run.sim.files import read_schedule, write_schedule
from workbench.run.sim.node import TableFactory
from workbench.run.sim.schedule import SimFault, random_schedule, sim_faults_of
from workbench.run.sim.shrink import shrink
from workbench.run.sim.world import run_world
from workbench.spec.scenario import Scenario, ScenarioError

__all__ = ["SimResult", "SimulateError", "add_arguments", "draw_schedule", "judge", "load_core", "main",
           "run_schedules", "schedule_rng", "simulate"]


class SimulateError(ValueError):
    """A bad ``workbench simulate`` flag: names the flag, what it expects and what it got."""

    def __init__(self, flag: str, expected: str, got: Any) -> None:
        super().__init__(f"{flag}: expected {expected}, got {got!r}")


@dataclass
class SimResult:
    """One simulated schedule and its verdict against the eventual-mode bound."""

    scenario: Scenario
    faults: list[SimFault]
    recording: Recording
    bound: Bound
    keys: dict[str, dict[str, Any]]  # key -> worst_excess, bound, nominal, window, terms
    envelope: Verdict

    @property
    def ok(self) -> bool:
        return all(k["worst_excess"] <= k["bound"] + 1e-6 for k in self.keys.values())

    @property
    def excess_over_bound(self) -> float:
        """The worst key's excess minus its bound (negative: that much room left)."""
        return max((k["worst_excess"] - k["bound"] for k in self.keys.values()), default=0.0)

    @property
    def within_nominal(self) -> bool:
        return all(k["worst_excess"] <= k["nominal"] + 1e-6 for k in self.keys.values())

    def summary(self) -> dict[str, Any]:
        return {"ok": self.ok, "excess_over_bound_tokens": round(self.excess_over_bound, 3),
                "within_nominal": self.within_nominal, "keys": self.keys,
                "admitted_tokens": self.envelope.figures.get("admitted_tokens"),
                "requests": len(self.recording.requests), "faults": [f.to_dict() for f in self.faults],
                "gossip_refused": self.recording.extra.get("gossip_refused"),
                "network": self.recording.extra.get("network")}


def judge(scenario: Scenario, faults: Sequence[SimFault], rec: Recording) -> SimResult:
    """Check the history with the drill's checker, each key against its own bound (strict mode: the
    plain envelope, no allowance at all)."""
    if scenario.mode == "strict":
        return _judge_strict(scenario, faults, rec)
    bound = eventual_bound(scenario, faults)
    limits = {(x.rate, x.burst) for x in scenario.limits}
    tolerance = min(bound.tokens(r, b) for r, b in limits)
    verdict = check_envelope(rec, tolerance_tokens=tolerance, slack_s=0.0, source="audit")
    keys: dict[str, dict[str, Any]] = {}
    for key, fig in verdict.figures.get("keys", {}).items():
        limit = scenario.limit_for(key)
        assert limit is not None
        keys[key] = {"worst_excess": fig["worst_excess"], "window_s": fig["worst_window_s"],
                     "bound": round(bound.tokens(limit.rate, limit.burst), 3),
                     "nominal": round(bound.nominal(limit.rate, limit.burst), 3),
                     "terms": {k: round(v, 3) for k, v in bound.terms(limit.rate, limit.burst).items()}}
    return SimResult(scenario, list(faults), rec, bound, keys, verdict)


def _judge_strict(scenario: Scenario, faults: Sequence[SimFault], rec: Recording) -> SimResult:
    bound = StrictBound()
    verdict = check_envelope(rec, tolerance_tokens=0.0, slack_s=0.0, source="audit")
    keys: dict[str, dict[str, Any]] = {}
    for key, fig in verdict.figures.get("keys", {}).items():
        keys[key] = {"worst_excess": fig["worst_excess"], "window_s": fig["worst_window_s"], "bound": 0.0,
                     "nominal": 0.0, "terms": {"strict": 0.0}}
    return SimResult(scenario, list(faults), rec, bound, keys, verdict)


def simulate(scenario: Scenario, extra_faults: Sequence[SimFault] = (), *,
             table_factory: TableFactory = BucketTable, strict_table: type[StrictTable] = StrictTable,
             strict_settings: StrictSettings | None = None) -> SimResult:
    """Simulate ``scenario`` (plus simulator-only ``extra_faults``) and judge it (``scenario.mode``
    picks the core and the bound; ``strict_settings`` overrides the simulator's strict defaults)."""
    faults = sim_faults_of(scenario, extra_faults)
    return judge(scenario, faults, run_world(scenario, faults, table_factory=table_factory,
                                             strict_table=strict_table, strict_settings=strict_settings))


def draw_schedule(seed: int, index: int, *, duration_s: float, max_faults: int,
                  mode: str = "eventual") -> tuple[Scenario, list[SimFault]]:
    """Schedule ``index`` of ``seed``; the same draw in every mode, so eventual and strict compare."""
    scenario, faults = random_schedule(schedule_rng(seed, index), index=index, duration_s=duration_s,
                                       max_faults=max_faults)
    if mode != scenario.mode:
        scenario = dataclasses.replace(scenario, mode=mode)
    return scenario, faults


def schedule_rng(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


def run_schedules(count: int, seed: int, *, duration_s: float = 30.0, max_faults: int = 6,
                  table_factory: TableFactory = BucketTable, out_dir: Path | None = None,
                  on_progress: Callable[[int, int, int, float], None] | None = None,
                  shrink_runs: int = 200, command: str = "", mode: str = "eventual") -> dict[str, Any]:
    """Draw and judge ``count`` schedules in ``mode``; shrink the first failure into ``out_dir``.

    Returns the summary (the ``--json`` document).
    """
    started = time.perf_counter()
    cpu_started = time.process_time()
    failed: list[dict[str, Any]] = []
    first: SimResult | None = None
    worst = -float("inf")
    nominal_ok = 0
    samples: list[float] = []
    for i in range(count):
        scenario, faults = draw_schedule(seed, i, duration_s=duration_s, max_faults=max_faults, mode=mode)
        res = judge(scenario, faults, run_world(scenario, faults, table_factory=table_factory))
        over = res.excess_over_bound
        samples.append(round(over, 3))
        worst = max(worst, over)
        nominal_ok += res.within_nominal
        if not res.ok:
            failed.append({"index": i, "excess_over_bound_tokens": round(over, 3),
                           "faults": [f.action for f in faults]})
            first = first or res
        if on_progress is not None:
            on_progress(i + 1, count, len(failed), time.perf_counter() - started)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    counterexample = None
    shrunk_info = None
    if first is not None and out_dir is not None:
        counterexample, shrunk_info = _write_counterexample(first, failed[0]["index"], seed, out_dir,
                                                            table_factory, shrink_runs, command)
    return {
        "schedules": count, "failed": len(failed), "seconds": round(seconds, 3),
        "max_excess_over_bound_tokens": round(worst, 3) if count else None,
        "counterexample": counterexample, "invariants_ok": not failed,
        "seed": seed, "duration_s": duration_s, "mode": mode,
        "core": ("edge_server.strict.table.StrictTable" if mode == "strict"
                 else f"{table_factory.__module__}.{table_factory.__qualname__}"),
        "cpu_seconds": round(cpu_seconds, 3),
        "schedules_per_s": round(count / seconds, 2) if seconds > 0 else None,
        "within_bound_share": round(1 - len(failed) / count, 4) if count else None,
        "within_nominal_share": round(nominal_ok / count, 4) if count else None,
        "failures": failed[:20], "shrunk": shrunk_info, "excess_over_bound_samples": samples,
    }


def _write_counterexample(res: SimResult, index: int, seed: int, out_dir: Path, factory: TableFactory,
                          max_runs: int, command: str) -> tuple[str, dict[str, Any]]:
    def fails(scenario: Scenario, faults: list[SimFault]) -> bool:
        return not judge(scenario, faults, run_world(scenario, faults, table_factory=factory)).ok

    small = shrink(res.scenario, res.faults, fails, max_runs=max_runs)
    final = judge(small.scenario, small.faults, run_world(small.scenario, small.faults, table_factory=factory))
    core = ("edge_server.strict.table.StrictTable" if res.scenario.mode == "strict"
            else f"{factory.__module__}.{factory.__qualname__}")
    notes = [f"Counterexample from `{command or 'workbench simulate'}` (seed {seed}, schedule {index}), core {core}.",
             f"Shrunk from {small.original_faults} to {len(small.faults)} faults in {small.runs} simulations.",
             "Replay: workbench simulate --scenario <this file>",
             "Real processes: workbench drill --scenario <this file>",
             ""]
    for key, k in final.keys.items():
        if k["worst_excess"] > k["bound"]:
            notes.append(f"key {key!r}: worst window excess {k['worst_excess']:g} tokens in {k['window_s']} s "
                         f"> bound {k['bound']:g} ({', '.join(f'{n} {v:g}' for n, v in k['terms'].items())})")
    dropped = [f for f in small.faults if f.sim_only]
    if dropped:
        notes.append(f"A drill drops {len(dropped)} simulator-only fault(s): "
                     + ", ".join(f"{f.action} at {f.at_s:g} s" for f in dropped))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_schedule(out_dir / f"original-{index}.toml", res.scenario, res.faults,
                   [f"Unshrunk failing schedule {index} of seed {seed} (core {core})."])
    path = write_schedule(out_dir / "counterexample.toml", small.scenario, small.faults, notes)
    return str(path), {"faults_before": small.original_faults, "faults_after": len(small.faults),
                       "runs": small.runs, "still_fails": not final.ok,
                       "excess_over_bound_tokens": round(final.excess_over_bound, 3)}


# ----------------------------------------------------------------------------- command line
def load_core(spec: str) -> TableFactory:
    """``module:Class`` or ``path/to/file.py:Class`` naming a BucketTable (sub)class."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise SimulateError("--core", "module:Class or file.py:Class", spec)
    try:
        if where.endswith(".py"):
            mod_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            if mod_spec is None or mod_spec.loader is None:
                raise ImportError(where)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        cls = getattr(module, name)
    except (ImportError, AttributeError, OSError) as exc:
        raise SimulateError("--core", "an importable BucketTable class", f"{spec} ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, BucketTable)):
        raise SimulateError("--core", "a subclass of edge_server.token_bucket.BucketTable", spec)
    return cls


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedules", type=int, help="random fault schedules to run (default 1000)")
    p.add_argument("--seed", type=int, default=1, help="seed of the schedule generator (default 1)")
    p.add_argument("--mode", default="eventual",
                   help="limiter mode: 'eventual' (judged against its derived bound) or 'strict' (judged against "
                   "the plain envelope B + R (t - s) with no allowance)")
    p.add_argument("--duration-s", type=float, default=30.0, help="virtual seconds per schedule (default 30)")
    p.add_argument("--max-faults", type=int, default=6, help="most fault steps drawn per schedule (default 6)")
    p.add_argument("--scenario", help="replay one scenario file (TOML/YAML/JSON) instead of random schedules")
    p.add_argument("--json", dest="json_path", help="write the summary as JSON to this path")
    p.add_argument("--out", help="folder for the counterexample (default results/simulate-seed<S>); "
                   "with --scenario, the history is saved here")
    p.add_argument("--core", default="edge_server.token_bucket:BucketTable",
                   help="the limiter table class, module:Class or file.py:Class (default the real core)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


class _Progress:
    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = -10.0

    def __call__(self, done: int, total: int, failed: int, elapsed: float) -> None:
        if done != total and elapsed - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = elapsed
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate else 0.0
        line = f"simulate: {done}/{total} schedules, {failed} failed, {rate:.1f}/s, {elapsed:.1f} s (eta {eta:.0f} s)"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if done == total else ""))
            self.stream.flush()
        else:
            print(line, file=self.stream, flush=True)


def _validate(args: argparse.Namespace) -> None:
    if args.mode not in MODES:
        raise SimulateError("--mode", "one of " + ", ".join(repr(m) for m in MODES), args.mode)
    if args.scenario and args.schedules is not None:
        raise SimulateError("--schedules", "no value with --scenario (it replays one schedule)", args.schedules)
    if args.schedules is None:
        args.schedules = 1000
    if args.schedules < 1:
        raise SimulateError("--schedules", "an integer >= 1", args.schedules)
    if not 2.0 <= args.duration_s <= 3600:
        raise SimulateError("--duration-s", "a number of seconds between 2 and 3600", args.duration_s)
    if args.max_faults < 1:
        raise SimulateError("--max-faults", "an integer >= 1", args.max_faults)


def main(args: argparse.Namespace) -> int:
    """``workbench simulate``: 0 when every schedule stayed within its bound, 1 when one did not, 2 for
    bad input (one line naming the parameter)."""
    try:
        _validate(args)
        factory = load_core(args.core)
        replay = read_schedule(args.scenario) if args.scenario else None
    except (ScenarioError, SimulateError) as exc:
        print(f"workbench simulate: {exc}", file=sys.stderr)
        return 2
    if replay is not None:
        scenario, faults = replay
        started = time.perf_counter()
        res = judge(scenario, faults, run_world(scenario, faults, table_factory=factory))
        summary = {"schedules": 1, "failed": int(not res.ok), "seconds": round(time.perf_counter() - started, 3),
                   "max_excess_over_bound_tokens": round(res.excess_over_bound, 3), "counterexample": None,
                   "invariants_ok": res.ok, "scenario": args.scenario, **res.summary()}
        loss = check_token_loss(res.recording)
        summary["token_loss"] = loss.figures.get("token_loss")
        if args.out:
            res.recording.save(args.out)
        for key, k in res.keys.items():
            verdict = "within" if k["worst_excess"] <= k["bound"] + 1e-6 else "OVER"
            print(f"{key}: worst window excess {k['worst_excess']:g} tokens in {k['window_s']} s, "
                  f"bound {k['bound']:g}, nominal {k['nominal']:g} -> {verdict}")
    else:
        out = Path(args.out) if args.out else Path("results") / f"simulate-seed{args.seed}"
        command = (f"workbench simulate --mode {args.mode} --schedules {args.schedules} --seed {args.seed} "
                   f"--duration-s {args.duration_s:g}")
        summary = run_schedules(args.schedules, args.seed, duration_s=args.duration_s, max_faults=args.max_faults,
                                table_factory=factory, out_dir=out, mode=args.mode,
                                on_progress=None if args.quiet else _Progress(), command=command)
        print(f"{summary['schedules']} schedules in {summary['seconds']:g} s ({summary['schedules_per_s']}/s): "
              f"{summary['failed']} over the bound, worst excess over bound "
              f"{summary['max_excess_over_bound_tokens']} tokens, within the nominal formula "
              f"{summary['within_nominal_share']:.1%}")
        if summary["counterexample"]:
            print(f"counterexample: {summary['counterexample']}")
    if args.json_path:
        doc = {k: v for k, v in summary.items() if k != "excess_over_bound_samples"}
        Path(args.json_path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0 if summary["invariants_ok"] else 1
