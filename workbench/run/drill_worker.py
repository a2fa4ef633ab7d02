"""Run a drill in a child process and stream its progress back: what notebooks use.

In a Jupyter kernel, redrawing the live charts holds the interpreter for tens of milliseconds at a
time; on the same interpreter (even on another thread, because of the GIL) that stalls the load
generator and the fault proxies and distorts the very figures being drawn.  So the drill gets a
process of its own (spawned, uvloop when available) and sends, every progress tick, a picklable
:class:`LiveView`: the snapshot line, the chart series, the faults, the failovers and the ejections.  The parent
rebuilds the :class:`~workbench.run.drill.DrillResult` from the results folder when the child is done.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.history import FaultRecord, Recording

__all__ = ["DrillProcess", "LiveView"]


@dataclass
class LiveView:
    """What the live charts need, as plain data (stands in for LiveStats in the parent)."""

    bin_s: float
    series_data: dict[str, Any]
    faults: list[FaultRecord] = field(default_factory=list)
    failovers: dict[str, float] = field(default_factory=dict)
    ejections: list[dict[str, Any]] = field(default_factory=list)  # LiveStats.ejections: node, reason, ...

    def series(self, _upto_s: float) -> dict[str, Any]:
        return self.series_data


def _child(scenario_dict: dict[str, Any], results_dir: str | None, thresholds: dict[str, Any],
           progress_interval_s: float, conn: Any, stop_flag: Any) -> None:
    """The child process: run the drill, send progress, then ("done", folder) or ("error", text)."""
    from workbench.run.drill import run_drill
    from workbench.spec.scenario import Scenario

    async def main() -> str:
        stop = asyncio.Event()

        async def watch_stop() -> None:
            while not stop_flag.is_set():
                await asyncio.sleep(0.1)
            stop.set()

        def progress(snapshot: dict[str, Any], live: Any) -> None:
            view = LiveView(live.bin_s, live.series(max(snapshot["t_s"], live.bin_s)), list(live.faults),
                            dict(live.failovers), list(live.ejections))
            conn.send(("progress", snapshot, view))

        watcher = asyncio.create_task(watch_stop())
        try:
            result = await run_drill(Scenario.from_dict(scenario_dict), results_dir, on_progress=progress,
                                     progress_interval_s=progress_interval_s, stop=stop, **thresholds)
        finally:
            watcher.cancel()
        return str(result.results_dir)

    try:
        try:
            import uvloop
        except ImportError:
            folder = asyncio.run(main())
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                folder = runner.run(main())
        conn.send(("done", folder))
    except BaseException as exc:  # the parent shows it; the child must not die silently
        conn.send(("error", f"{exc.__class__.__name__}: {exc}", traceback.format_exc()))
    finally:
        conn.close()


class DrillProcess:
    """One drill in a spawned child; ``await run(on_progress)`` returns its DrillResult."""

    def __init__(self, scenario: Any, results_dir: str | os.PathLike[str] | None, *,
                 progress_interval_s: float = 0.25, **thresholds: Any) -> None:
        self.scenario = scenario
        self.results_dir = None if results_dir is None else str(Path(results_dir).resolve())
        self.progress_interval_s = progress_interval_s
        self.thresholds = thresholds
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._parent, child = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_child, name=f"drill-{scenario.name}", daemon=True,
            args=(scenario.to_dict(), self.results_dir, thresholds, progress_interval_s, child, self._stop))
        self._child_end = child

    def stop(self) -> None:
        """End the run cleanly: the child stops the load, saves its partial results and reaps its cluster."""
        self._stop.set()

    async def run(self, on_progress: Any) -> Any:
        from workbench.run.drill import DrillResult

        self._process.start()
        self._child_end.close()
        try:
            message = await self._pump(on_progress)
        except (asyncio.CancelledError, KeyboardInterrupt):
            self.stop()
            await asyncio.to_thread(self._process.join, 60)
            raise
        finally:
            if self._process.is_alive():
                await asyncio.to_thread(self._process.join, 60)
        if message[0] == "error":
            raise RuntimeError(f"the drill failed: {message[1]}\n{message[2]}")
        folder = Path(message[1])
        recording = Recording.load(folder)
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        return DrillResult(self.scenario, recording, summary, folder, live=None,
                           cluster_info=recording.extra.get("cluster") or {})

    async def _pump(self, on_progress: Any) -> tuple:
        """Hand progress messages to ``on_progress`` until the child says done (or dies)."""
        conn = self._parent
        while True:
            while conn.poll():
                try:
                    message = conn.recv()
                except EOFError:
                    return ("error", "the drill process ended without a result", "")
                if message[0] == "progress":
                    on_progress(message[1], message[2])
                else:
                    return message
            if not self._process.is_alive() and not conn.poll():
                return ("error", f"the drill process exited with status {self._process.exitcode}", "")
            await asyncio.sleep(0.05)
