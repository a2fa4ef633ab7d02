"""Run one scenario end to end: cluster, load, faults, recording, verdict, results folder.

``await run_drill(scenario)`` is what the CLI and the notebooks call.  A progress callback receives a
:class:`~workbench.check.live.LiveStats` snapshot every ``progress_interval_s``; a stop event ends the run
early and cleanly (the results are then marked incomplete).  Whatever happens, every process is reaped
and what was recorded is saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from workbench.check import DEFAULT_ERROR_BUDGET_PCT, summarize
from workbench.check.live import LiveStats
from workbench.history import (
    AuditEvent,
    FaultRecord,
    MetricSample,
    Recording,
    RequestRecord,
    RouterSample,
    StateSample,
    parse_metrics,
)
from workbench.run.cluster import Cluster
from workbench.run.load.generator import LoadGenerator, LoadPlan
from workbench.run.nemesis import Nemesis
from workbench.spec.scenario import SKILL_NAME, Scenario

__all__ = ["OVERLOAD_METRICS", "DrillResult", "keep_overload_sample", "load_plan_for", "run_drill",
           "state_sampling_windows"]

log = logging.getLogger("workbench.run.drill")

WARM_CONNECTIONS_MAX = 4096  # at most this many warm connections per drill (the router's accept queue)

ProgressCallback = Callable[[dict[str, Any], LiveStats], None]


@dataclass
class DrillResult:
    scenario: Scenario
    recording: Recording
    summary: dict[str, Any]
    results_dir: Path
    live: LiveStats
    cluster_info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.summary.get("invariants_ok")) and self.recording.complete


def load_plan_for(scenario: Scenario, url: str, *, keep_records: bool = True) -> LoadPlan:
    """The load generator's plan for a scenario aimed at ``url`` (the router): the scenario's own
    LoadSpec plus the run-time values (API keys, timeouts, the connection pool)."""
    load = scenario.load
    api_keys = {tenant: key for key, tenant in scenario.api_keys().items()}
    timeout_s = max(5.0, scenario.skill.p99_ms / 1000 * 4)
    connector_limit = 0  # the generator's default pool
    warm = 0  # connections opened before the clock starts (lean client)
    if load.mode == "open" and any(f.action in ("pause", "blackhole") for f in scenario.faults):
        # A paused or blackholed node holds every request sent to it until the timeout: with the
        # default pool those would take every connection and stall the other regions' clients too
        # (a client artefact).
        connector_limit = min(4096, max(256, int(load.rate_rps * timeout_s)))
    elif load.mode == "open" and load.route == "invoke":
        # The generator's default pool (100 ms of arrivals) suits a target answering in tens of ms; a
        # skill of seconds would queue most requests in the client's own pool, so the edge never saw
        # the offered load (measured: 268 req/s offered, 64 connections, the router never shed).
        # Room for the skill's p99 worth of arrivals, capped well below the edge's connection limits.
        connector_limit = min(8192, max(64, int(load.rate_rps * scenario.skill.p99_ms / 1000)))
        if load.client == "lean":
            # Clients that already hold keep-alive connections: without them the first seconds are a
            # connection storm (every arrival opens one while the skill holds the others), the router's
            # accept queue overflows (4,096) and the kernel's SYN retries add 1-7 s before the router
            # sees a request, where no admission limit can act (measured with bench_overload).
            warm = min(connector_limit, WARM_CONNECTIONS_MAX)
    # No drain_s: after the sending window the generator waits for every request in flight up to its
    # own timeout (a fixed 2 s drain cut off every request slower than that, and the cut-off requests
    # failed the error budget of runs that had served them all).
    return LoadPlan(
        url=url, load=load, duration_s=scenario.duration_s, regions=scenario.topology.regions,
        api_keys=api_keys, skill=SKILL_NAME, timeout_s=timeout_s, seed=scenario.seed,
        connector_limit=connector_limit, keep_records=keep_records, warm_connections=warm,
    )


# Node states are sampled densely (every gossip interval, so <= 2 intervals apart, never below
# _MIN_DENSE_S) from shortly before to a while after every heal and restart the scenario plans,
# and every _SPARSE_S otherwise.  The cost is bounded: a window lasts _WINDOW_S, at most
# _MAX_DENSE_TICKS dense samples per node per run, and none with more keys than _MAX_DENSE_KEYS.
_WINDOW_S = (-0.5, 2.0)
_MIN_DENSE_S = 0.01
_SPARSE_S = 1.0
_MAX_DENSE_TICKS = 1500
_MAX_DENSE_KEYS = 1000


def state_sampling_windows(scenario: Scenario) -> list[tuple[float, float]]:
    """Run-clock windows around every planned heal, timed end of a network fault, restart and resume."""
    times = []
    for f in scenario.faults:
        if f.action in ("heal", "restart", "resume"):
            times.append(f.at_s)
        elif f.duration_s > 0 and f.action in ("partition", "blackhole"):
            times.append(f.at_s + f.duration_s)
    return [(max(0.0, t + _WINDOW_S[0]), t + _WINDOW_S[1]) for t in sorted(times)]


def _default_results_dir(scenario: Scenario) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(scenario.results_dir) if scenario.results_dir else Path("results")
    return base / f"{scenario.name}-{stamp}"


async def run_drill(scenario: Scenario, results_dir: str | Path | None = None, *,
                    on_progress: ProgressCallback | None = None, progress_interval_s: float = 0.5,
                    stop: asyncio.Event | None = None, proxies: bool = True,
                    max_failover_ms: float | None = None, max_client_errors: int | None = None,
                    max_convergence_ms: float | None = None,
                    error_budget_pct: float = DEFAULT_ERROR_BUDGET_PCT) -> DrillResult:
    """Run ``scenario`` and return its recording, summary and results folder.

    ``max_failover_ms`` / ``max_client_errors`` add those thresholds to the verdict;
    ``max_convergence_ms`` replaces the convergence bound (default: 2 gossip intervals + one delivery);
    ``error_budget_pct`` is the share of requests that may fail (default 0.1 %).
    """
    thresholds = {"max_failover_ms": max_failover_ms, "max_client_errors": max_client_errors,
                  "max_convergence_ms": max_convergence_ms, "error_budget_pct": error_budget_pct}
    # absolute: the nodes run elsewhere and resolve their audit folder against their cluster file
    out = (Path(results_dir) if results_dir is not None else _default_results_dir(scenario)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    limit = scenario.limits[0]
    live = LiveStats(list(scenario.topology.regions), scenario.duration_s, limit.rate, limit.burst,
                     topology=scenario.topology, error_budget_pct=error_budget_pct)
    recording = Recording(scenario=scenario.to_dict())
    recording.extra["results_dir"] = str(out)
    info: dict[str, Any] = {}
    reason = ""
    try:
        async with Cluster.launch(scenario, out / "cluster", proxies=proxies) as cluster:
            info = {"router": cluster.router_url,
                    "nodes": {n: p.url for n, p in cluster.nodes.items()},
                    "run_dir": str(cluster.run_dir)}
            t0 = time.monotonic() + 0.2
            recording.started_wall = time.time() + (t0 - time.monotonic())
            def on_record(rec: RequestRecord) -> None:
                recording.requests.append(rec)
                live.add(rec)

            def on_fault(rec: FaultRecord) -> None:
                recording.faults.append(rec)
                live.fault(rec)

            plan = load_plan_for(scenario, cluster.router_url, keep_records=False)
            generator = LoadGenerator(plan, on_record=on_record, start_at=t0)
            stop_event = stop or asyncio.Event()
            load_task = asyncio.create_task(generator.run(stop_event), name="load")
            nemesis = Nemesis(cluster, t0, on_fault)
            nemesis_task = asyncio.create_task(nemesis.run(scenario.faults), name="nemesis")
            watch_task = asyncio.create_task(
                _watch(cluster, t0, recording, live, on_progress, progress_interval_s,
                       lambda: generator.result.sent + generator.result.overflow), name="watch")
            states_task = asyncio.create_task(_sample_states(cluster, t0, recording, scenario), name="states")
            metrics_task = asyncio.create_task(
                _sample_metrics(cluster, t0, recording, live.metrics, live.router_state), name="metrics")
            side_tasks = (nemesis_task, watch_task, states_task, metrics_task)
            try:
                result = await load_task
            finally:
                for task in side_tasks:
                    task.cancel()
                for task in side_tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if not load_task.done():
                    load_task.cancel()
            recording.extra["generator"] = result.summary()
            if not result.complete:
                reason = "stopped before the end (stop requested)"
            # wait until no request is still being served, then let the last grants travel to every peer
            # before the final views are taken
            recording.extra["quiesce"] = await _quiesce(cluster)
            await asyncio.sleep(max(0.3, 10 * scenario.topology.gossip_interval_ms / 1000))
            await _final_scrape(cluster, t0, recording)
            recording.ended_s = time.monotonic() - t0
            _read_audits(cluster, recording)
    except (asyncio.CancelledError, KeyboardInterrupt) as exc:
        recording.mark_incomplete(f"interrupted ({exc.__class__.__name__})")
        _finish(recording, out, info, **thresholds)
        raise
    except Exception as exc:
        recording.mark_incomplete(f"failed: {exc}")
        _finish(recording, out, info, **thresholds)
        raise
    recording.complete = not reason
    recording.incomplete_reason = reason
    summary = _finish(recording, out, info, **thresholds)
    return DrillResult(scenario, recording, summary, out, live, info)


def _finish(recording: Recording, out: Path, info: dict[str, Any], **thresholds: Any) -> dict[str, Any]:
    """Save the recording and its summary, whatever state the run ended in."""
    recording.extra.setdefault("cluster", info)
    recording.save(out)
    summary = summarize(recording, **thresholds)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return summary


async def _watch(cluster: Cluster, t0: float, recording: Recording, live: LiveStats,
                 on_progress: ProgressCallback | None, interval_s: float, offered: Callable[[], int]) -> None:
    """Sample processes while the run goes; tell the live view what was offered; report progress."""
    while True:
        await asyncio.sleep(interval_s)
        t_s = time.monotonic() - t0
        recording.processes.extend(cluster.sample_processes(t_s))
        live.node_states = cluster.states()
        live.sent(t_s, offered())
        if on_progress is not None:
            try:
                on_progress(live.snapshot(t_s), live)
            except Exception:  # a display must never break the run
                log.exception("progress callback failed")


async def _sample_states(cluster: Cluster, t0: float, recording: Recording, scenario: Scenario) -> None:
    """Sample every node's /v1/state: densely around heals and restarts (for the convergence check),
    sparsely otherwise.  One loop per node, so a slow or stopped node does not thin out the others."""
    windows = state_sampling_windows(scenario)
    dense_s = max(_MIN_DENSE_S, scenario.topology.gossip_interval_ms / 1000.0)
    dense_ok = scenario.load.tenants <= _MAX_DENSE_KEYS
    recording.extra["state_sampling"] = {
        "dense_interval_s": dense_s if dense_ok else None, "sparse_interval_s": _SPARSE_S,
        "windows_s": [[round(a, 3), round(b, 3)] for a, b in windows] if dense_ok else [],
        "note": "" if dense_ok else f"more than {_MAX_DENSE_KEYS} keys: sampled every {_SPARSE_S:g} s only"}

    async def one(session: aiohttp.ClientSession, node_id: str) -> None:
        dense_ticks = 0
        while True:
            t_s = time.monotonic() - t0
            await _scrape_one(session, cluster, node_id, t_s, recording)
            now = time.monotonic() - t0
            in_window = dense_ok and dense_ticks < _MAX_DENSE_TICKS and any(a <= now <= b for a, b in windows)
            if in_window:
                dense_ticks += 1
                await asyncio.sleep(max(0.0, t_s + dense_s - now))
                continue
            upcoming = [a for a, _b in windows if a > now] if dense_ok else []
            await asyncio.sleep(max(0.0, min([t_s + _SPARSE_S, *upcoming]) - now))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as session:
        await asyncio.gather(*(one(session, n) for n in cluster.nodes))


async def _scrape_one(session: aiohttp.ClientSession, cluster: Cluster, node_id: str, t_s: float,
                      recording: Recording) -> None:
    proc = cluster.nodes[node_id]
    if proc.state != "running" or not proc.alive():
        return
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError):
        async with session.get(proc.url + "/v1/state") as resp:
            if resp.status == 200:
                recording.states.append(StateSample.from_state(t_s, await resp.json()))


async def _scrape_states(session: aiohttp.ClientSession, cluster: Cluster, t_s: float,
                         recording: Recording) -> None:
    await asyncio.gather(*(_scrape_one(session, cluster, n, t_s, recording) for n in cluster.nodes))


# While a run goes, the router's routing table (/v1/router/state) and the router's and every node's
# /metrics are scraped every _METRICS_S; of the metrics only the overload figures are kept (gauges,
# counters, and histograms' _sum / _count, never their buckets): a 60 s run of 3 nodes and the router
# keeps a few thousand samples.  The final scrape keeps everything.
_METRICS_S = 1.0
OVERLOAD_METRICS = (
    "router_inflight", "router_queue_depth", "router_overload_shed", "router_health_check_seconds",
    "router_health_checks", "router_ejections", "router_panic", "router_nodes_in_rotation",
    "router_loop_lag_seconds", "router_try_failures", "router_requests_total",
    "edge_inflight", "edge_queue_depth", "edge_overload_shed",
)
ROUTER_SOURCE = "router"  # MetricSample.node of the router's samples


def keep_overload_sample(name: str) -> bool:
    """True for the samples the periodic scrape keeps: overload figures, no histogram buckets and no
    ``_created`` timestamps."""
    return name.startswith(OVERLOAD_METRICS) and not name.endswith(("_bucket", "_created"))


QUIESCE_MAX_S = 5.0  # after the load, wait at most this long for the router and the nodes to finish what they hold


def _gauge(text: str, name: str) -> float:
    """The value of an unlabelled gauge in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def _quiesce(cluster: Cluster) -> dict[str, Any]:
    """Wait until neither the router nor any node holds an admitted request (``router_inflight``,
    ``edge_inflight``), at most :data:`QUIESCE_MAX_S`; a process that does not answer (paused) is skipped.

    Why: the final views are compared with the audit trails read after them.  After an overloaded run
    the router and the nodes still serve requests the generator gave up on; a grant made after the
    views were taken is in the audit but in no peer's view, and read as a peer that "never learnt of
    audited grants" (the 5x step of bench_overload reported 180 such views)."""
    start = time.monotonic()
    busy: dict[str, float] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as session:
        while True:
            busy = {}
            for source, url in _metric_targets(cluster):
                try:
                    async with session.get(url + "/metrics") as resp:
                        text = await resp.text()
                except (aiohttp.ClientError, TimeoutError):
                    continue
                held = _gauge(text, "router_inflight" if source == ROUTER_SOURCE else "edge_inflight")
                if held:
                    busy[source] = held
            waited = time.monotonic() - start
            if not busy or waited >= QUIESCE_MAX_S:
                return {"waited_s": round(waited, 3), "still_busy": busy}
            await asyncio.sleep(0.1)


def _metric_targets(cluster: Cluster) -> list[tuple[str, str]]:
    """``(source, url)`` of every live process with a /metrics: the nodes and the router."""
    procs = [(n, p) for n, p in cluster.nodes.items()]
    if cluster.router is not None:
        procs.append((ROUTER_SOURCE, cluster.router))
    return [(n, p.url) for n, p in procs if p.state == "running" and p.alive()]


async def _scrape_metrics(session: aiohttp.ClientSession, source: str, url: str, t_s: float,
                          recording: Recording, *, overload_only: bool,
                          on_samples: Callable[[list[MetricSample]], None] | None = None) -> None:
    """One scrape into the recording (and to ``on_samples``: the live view); a failed scrape adds nothing."""
    samples: list[MetricSample] = []
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
        async with session.get(url + "/metrics") as resp:
            if resp.status == 200:
                samples = parse_metrics(await resp.text(), t_s, source, keep_overload_sample if overload_only else None)
    recording.metrics.extend(samples)
    if on_samples is not None and samples:
        on_samples(samples)


async def _scrape_router_state(session: aiohttp.ClientSession, cluster: Cluster, t_s: float, recording: Recording,
                               on_sample: Callable[[RouterSample], None] | None = None) -> None:
    """The router's routing table (GET /v1/router/state) as a :class:`RouterSample`; a failed scrape
    (refused, shed, timed out, an answer of another shape) adds nothing."""
    router = cluster.router
    if router is None or router.state != "running" or not router.alive():
        return
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError):
        async with session.get(router.url + "/v1/router/state") as resp:
            if resp.status == 200:
                sample = RouterSample.from_state(t_s, await resp.json())
                recording.routers.append(sample)
                if on_sample is not None:
                    on_sample(sample)


async def _sample_metrics(cluster: Cluster, t0: float, recording: Recording,
                          on_samples: Callable[[list[MetricSample]], None] | None = None,
                          on_router: Callable[[RouterSample], None] | None = None) -> None:
    """Scrape the router's and the nodes' overload figures and the router's routing table every
    ``_METRICS_S`` (one timeout per round, so a paused node delays nobody else's sample); each scrape
    also goes to ``on_samples`` / ``on_router`` (the live view)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as session:
        while True:
            t_s = time.monotonic() - t0
            await asyncio.gather(_scrape_router_state(session, cluster, t_s, recording, on_router),
                                 *(_scrape_metrics(session, src, url, t_s, recording, overload_only=True,
                                                   on_samples=on_samples)
                                   for src, url in _metric_targets(cluster)))
            await asyncio.sleep(max(0.0, t_s + _METRICS_S - (time.monotonic() - t0)))


async def _final_scrape(cluster: Cluster, t0: float, recording: Recording) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        t_s = time.monotonic() - t0
        await _scrape_states(session, cluster, t_s, recording)
        await _scrape_router_state(session, cluster, t_s, recording)  # the router's last double grants
        for source, url in _metric_targets(cluster):
            await _scrape_metrics(session, source, url, t_s, recording, overload_only=False)


def _read_audits(cluster: Cluster, recording: Recording) -> None:
    """Read every node's audit trail from disk: complete even for nodes that were killed, and every
    segment of it (sealed, compressed segments included), not only the open ``NODE.jsonl``."""
    from edge_server.audit.export import iter_events

    folder = cluster.run_dir / "audit"
    if folder.is_dir():
        with contextlib.suppress(ValueError, KeyError):
            for _line, event in iter_events([folder]):
                recording.audit.append(AuditEvent.from_json(event))
