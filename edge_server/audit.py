"""The audit trail: every granted token is an append-only JSON line, written by group commit.

Requests append their event and await the batch's future; one flush per event-loop turn writes the
whole batch with a single ``os.write`` (and, if asked, ``fsync`` in a thread) before any of those
requests is answered.  A process killed with ``kill -9`` after ``os.write`` returned loses nothing:
the bytes are in the kernel.  ``fsync`` additionally survives a power loss.

On start the file is read back: the next sequence number and, per key, this node's own G-Counter
entry (generation, count), so a restarted node never lowers the count its peers see for it.
"""

from __future__ import annotations

import asyncio
import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from edge_server.gcounter import Entry

__all__ = ["AuditLog", "AuditUnavailable", "Recovered"]


class AuditUnavailable(OSError):
    """The audit file could not be written; the request must not be answered with success."""


@dataclass(slots=True)
class Recovered:
    events: int
    next_seq: int
    own: dict[str, Entry]  # key -> (generation, count) of this node
    truncated_bytes: int  # a torn last line removed


Grant = tuple[str, int, int]  # key, cost, generation
BatchCallback = Callable[[list[Grant]], None]


class AuditLog:
    """One node's audit file.  Owned by a single event loop."""

    def __init__(self, path: Path, node: str, region: str, *, fsync: bool = False) -> None:
        self.path = path
        self.node = node
        self.region = region
        self.fsync = fsync
        self._fd = -1
        self._next_seq = 1
        self._offsets = array("q")  # byte offset of event seq (index = seq - 1)
        self._size = 0
        self._buffer: list[bytes] = []
        self._batch: list[Grant] = []
        self._future: asyncio.Future[None] | None = None
        self.on_durable: BatchCallback | None = None  # the grants of a batch now on disk
        self.on_lost: BatchCallback | None = None  # the grants of a batch that could not be written
        # One event line, formatted by hand: a third of the cost of building and dumping a dict.
        # Only the key and the request id need JSON escaping per event.
        ident = orjson.dumps(node).replace(b"%", b"%%")
        self._line = (b'{"seq":%d,"id":' + ident[:-1] + b':%d","key":%b,"cost":%d,"node":' + ident
                      + b',"region":' + orjson.dumps(region).replace(b"%", b"%%")
                      + b',"ts":%.6f,"request_id":%b,"gen":%d}\n')
        self.total_cost = 0
        self.events_written = 0
        self.batches_written = 0

    def open(self) -> Recovered:
        """Open (creating the folder) and read back what an earlier run wrote."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        own: dict[str, Entry] = {}
        events = 0
        truncated = 0
        if self.path.exists():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            truncated = len(data) - end
            if truncated:
                with open(self.path, "r+b") as fh:
                    fh.truncate(end)
            offset = 0
            for line in data[:end].splitlines(keepends=True):
                event = orjson.loads(line)
                seq, key, cost, gen = event["seq"], event["key"], event["cost"], event["gen"]
                old = own.get(key)
                if old is None or gen > old[0]:
                    own[key] = (gen, cost)
                elif gen == old[0]:
                    own[key] = (gen, old[1] + cost)
                self._offsets.append(offset)
                offset += len(line)
                self._next_seq = seq + 1
                self.total_cost += cost
                events += 1
            self._size = offset
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return Recovered(events, self._next_seq, own, truncated)

    def append(self, key: str, cost: int, gen: int, request_id: str, ts: float) -> asyncio.Future[None]:
        """Queue one event; the returned future resolves once it is written (the whole batch's)."""
        seq = self._next_seq
        self._next_seq = seq + 1
        dumps = orjson.dumps
        self._buffer.append(self._line % (seq, seq, dumps(key), cost, ts, dumps(request_id), gen))
        self._batch.append((key, cost, gen))
        future = self._future
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._future = loop.create_future()
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        future, self._future = self._future, None
        buffer, self._buffer = self._buffer, []
        batch, self._batch = self._batch, []
        if future is None:
            return
        data = b"".join(buffer)
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            self._lost(future, batch, AuditUnavailable(exc.errno, f"audit write failed: {exc.strerror}"))
            return
        offset = self._size
        for chunk in buffer:
            self._offsets.append(offset)
            offset += len(chunk)
        self._size = offset
        if self.fsync:
            task = asyncio.get_running_loop().run_in_executor(None, os.fsync, self._fd)
            task.add_done_callback(lambda t: self._durable(future, batch, t.exception()))
        else:
            self._durable(future, batch, None)

    def _durable(self, future: asyncio.Future[None], batch: list[Grant], error: BaseException | None) -> None:
        if error is not None:
            self._lost(future, batch, AuditUnavailable(5, f"audit fsync failed: {error}"))
            return
        self.total_cost += sum(cost for _key, cost, _gen in batch)
        if self.on_durable is not None:
            self.on_durable(batch)
        self.events_written += len(batch)
        self.batches_written += 1
        if not future.done():
            future.set_result(None)

    def _lost(self, future: asyncio.Future[None], batch: list[Grant], error: AuditUnavailable) -> None:
        if self.on_lost is not None:
            self.on_lost(batch)
        future.set_exception(error)
        future.exception()  # mark retrieved: every waiter handles it

    def read(self, after: int, limit: int) -> list[dict]:
        """Events with ``seq > after``, oldest first, at most ``limit``."""
        count = len(self._offsets)
        start = max(0, after)
        if start >= count or limit <= 0:
            return []
        stop = min(count, start + limit)
        begin = self._offsets[start]
        end = self._offsets[stop] if stop < count else self._size
        with open(self.path, "rb") as fh:
            fh.seek(begin)
            data = fh.read(end - begin)
        return [orjson.loads(line) for line in data.splitlines()]

    @property
    def last_seq(self) -> int:
        return len(self._offsets)

    def close(self) -> None:
        if self._future is not None:
            self._flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
