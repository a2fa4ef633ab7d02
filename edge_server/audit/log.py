"""The audit trail of one node: every granted token is an append-only, hash-chained JSON line.

Group commit: requests append their event and await the batch's future; one flush per event-loop
turn writes the whole batch with a single ``os.write`` (and, if asked, ``fsync`` in a thread) before
any of those requests is answered.  A process killed with ``kill -9`` after ``os.write`` returned
loses nothing: the bytes are in the kernel.  ``fsync`` additionally survives a power loss.  A write
that fails (a full disk) fails the whole batch: its requests get 503, their tokens are given back,
the sequence numbers and the chain roll back, and a partly written batch is cut off the file.

The open segment is sealed once it reaches ``segment_bytes``: renamed into the node's folder,
compressed with a signed head and a checkpoint in a worker thread, old segments removed by
retention (see :mod:`edge_server.audit.seal`).  Memory holds one offset per event of the open
segment only, and one integer per segment on disk -- nothing that grows with the trail's events.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from array import array
from collections.abc import Callable
from pathlib import Path

import orjson

from edge_server.audit.chain import GENESIS, ChainKeys
from edge_server.audit.recovery import Recovered, load_head, recover_trail
from edge_server.audit.seal import Own, Retention, SealSpec, apply_retention, seal_segment
from edge_server.audit.segments import iter_lines, iter_lines_from, read_lines_at, segment_path
from edge_server.config import AuditConfig
from edge_server.heap import release_memory

__all__ = ["AuditLog", "AuditUnavailable"]

log = logging.getLogger("edge_server.audit")


class AuditUnavailable(OSError):
    """The audit file could not be written; the request must not be answered with success."""


Grant = tuple[str, int, int]  # key, cost, generation
BatchCallback = Callable[[list[Grant]], None]
OwnSource = Callable[[], tuple[Own, int]]  # -> (own counts, as a checkpoint takes them; max gen)


class AuditLog:
    """One node's audit trail.  Owned by a single event loop."""

    def __init__(self, audit_dir: Path, node: str, region: str, secret: bytes,
                 settings: AuditConfig | None = None, *, fsync: bool = False) -> None:
        self.audit_dir = audit_dir
        self.path = audit_dir / f"{node}.jsonl"  # the open segment
        self.folder = audit_dir / node
        self.node = node
        self.region = region
        self.settings = settings = settings if settings is not None else AuditConfig()
        self.retention = Retention(settings.retention_s, settings.retention_bytes)
        self.fsync = fsync
        self.keys = ChainKeys(secret)
        self._hash = self.keys.hasher()
        self._fd = -1
        self._next_seq = 1
        self._written_seq = 0
        self._prev = GENESIS.encode()  # hash of the last event appended (written or not)
        self._mark: tuple[int, bytes] | None = None  # (seq, prev) before the batch being collected
        self._active_first = 1
        self._active_prev = GENESIS  # prev of the open segment's first event
        self._active_first_ts = 0.0
        self._active_events = 0
        self._active_cost = 0
        self._last_ts = 0.0
        self._offsets = array("q")  # byte offset of each event of the open segment
        self._size = 0
        self._segments = array("q")  # first seq of every segment on disk, oldest first
        # Offsets and size of each segment closed by this process and not sealed yet (its first seq
        # as key): a replica's next lines are read from there by seek, not by a scan from its start.
        self._closed: dict[int, tuple[array, int]] = {}
        self._sealing: list[SealSpec] = []  # renamed, not yet sealed, oldest first
        self._seal_task: asyncio.Future | None = None
        self._seal_retry_at = 0.0
        self._heads: dict[int, dict] = {}  # a few heads, for reads
        self._inflight = 0  # batches written, fsync not done
        self._buffer: list[bytes] = []
        self._batch: list[Grant] = []
        self._future: asyncio.Future[None] | None = None
        self.on_durable: BatchCallback | None = None  # the grants of a batch now on disk
        self.on_lost: BatchCallback | None = None  # the grants of a batch that could not be written
        self.own_source: OwnSource | None = None  # the node's own counts, for checkpoints
        self._own: dict[str, tuple[int, int]] = {}  # kept only while ``own_source`` is None
        self.own_cap = 100_000
        ident = orjson.dumps(node).replace(b"%", b"%%")
        self._line = (b'{"seq":%d,"id":' + ident[:-1] + b':%d","key":%b,"cost":%d,"node":' + ident
                      + b',"region":' + orjson.dumps(region).replace(b"%", b"%%")
                      + b',"ts":%.6f,"request_id":%b,"gen":%d,"prev":"%b"}\n')
        self.total_cost = 0
        self.events_written = 0
        self.batches_written = 0
        self.segments_sealed = 0
        self.segments_removed = 0
        self.seal_errors = 0
        self.recovered: Recovered | None = None

    # ----------------------------------------------------------------- start

    def open(self) -> Recovered:
        """Read back what earlier runs wrote (checkpoint + tail) and open the segment for appending.

        Raises :class:`~edge_server.audit.recovery.AuditCorrupt` for a trail that does not fit.
        """
        self.audit_dir.mkdir(parents=True, exist_ok=True)
        rec = recover_trail(self.audit_dir, self.node, self.keys)
        self.recovered = rec
        self._next_seq = rec.next_seq
        self._written_seq = rec.next_seq - 1
        self._prev = rec.last_hash
        self.total_cost = rec.total_cost
        self._last_ts = rec.last_ts
        self._active_first = rec.active_first
        self._active_first_ts = rec.active_first_ts
        self._offsets = rec.active_offsets
        self._size = rec.active_size
        self._active_events = len(rec.active_offsets)
        self._segments = array("q", rec.segments)
        self._active_prev = rec.active_prev
        self._active_cost = rec.active_cost
        self._own = rec.own  # the counts to carry on from, unless a table takes over (own_source)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if rec.pending:
            self._sealing = list(rec.pending)
            self._start_seal()
        return rec

    def release_recovered(self) -> None:
        """Forget what :meth:`open` read back once a table holds it (``own_source`` set): up to a
        key table's worth of counts that would otherwise stay in memory for nothing."""
        if self.own_source is not None:
            self._own = {}
            if self.recovered is not None:
                self.recovered.own = {}

    # ----------------------------------------------------------------- the hot path

    def append(self, key: str, cost: int, gen: int, request_id: str, ts: float) -> asyncio.Future[None]:
        """Queue one event; the returned future resolves once it is written (the whole batch's)."""
        seq = self._next_seq
        if self._future is None:
            self._mark = (seq, self._prev)
        self._next_seq = seq + 1
        dumps = orjson.dumps
        line = self._line % (seq, seq, dumps(key), cost, ts, dumps(request_id), gen, self._prev)
        self._prev = self._hash(line)
        self._last_ts = ts
        self._buffer.append(line)
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
        mark, self._mark = self._mark, None
        if future is None:
            return
        data = b"".join(buffer)
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            self._rollback(mark, written)
            self._lost(future, batch, AuditUnavailable(exc.errno, f"audit write failed: {exc.strerror}"))
            return
        offset = self._size
        offsets = self._offsets
        for chunk in buffer:
            offsets.append(offset)
            offset += len(chunk)
        if not self._active_events:
            self._active_first_ts = orjson.loads(buffer[0])["ts"]
        self._size = offset
        self._active_events += len(buffer)
        self._written_seq += len(buffer)
        if self.fsync:
            self._inflight += 1
            task = asyncio.get_running_loop().run_in_executor(None, os.fsync, self._fd)
            task.add_done_callback(lambda t: self._durable(future, batch, t.exception(), fsynced=True))
        else:
            self._durable(future, batch, None)

    def _rollback(self, mark: tuple[int, bytes] | None, written: int) -> None:
        """A batch that could not be written: nothing of it stays, in the file or in the numbering."""
        if mark is not None:
            self._next_seq, self._prev = mark
        if written:  # half a batch reached the file: cut it off, or the next batch would follow garbage
            try:
                os.ftruncate(self._fd, self._size)
            except OSError as exc:
                log.error("audit file could not be cut back after a failed write",
                          extra={"path": str(self.path), "error": exc.strerror})

    def _durable(self, future: asyncio.Future[None], batch: list[Grant], error: BaseException | None,
                 fsynced: bool = False) -> None:
        if fsynced:
            self._inflight -= 1
        if error is not None:
            self._lost(future, batch, AuditUnavailable(5, f"audit fsync failed: {error}"))
            return
        cost = sum(cost for _key, cost, _gen in batch)
        self.total_cost += cost
        self._active_cost += cost
        if self.on_durable is not None:
            self.on_durable(batch)
        if self.own_source is None:
            self._track_own(batch)
        self.events_written += len(batch)
        self.batches_written += 1
        if not future.done():
            future.set_result(None)
        if self._size >= self.settings.segment_bytes and self._inflight == 0 and self._future is None:
            self._rotate()

    def _lost(self, future: asyncio.Future[None], batch: list[Grant], error: AuditUnavailable) -> None:
        if self.on_lost is not None:
            self.on_lost(batch)
        future.set_exception(error)
        future.exception()  # mark retrieved: every waiter handles it

    def _track_own(self, batch: list[Grant]) -> None:
        """Own counts when no table provides them (a replica, a tool): the ``own_cap`` keys written
        most recently, as a node's table would hold them -- never a dict of every key ever seen."""
        own = self._own
        for key, cost, gen in batch:
            old = own.pop(key, None)
            own[key] = (gen, cost) if old is None or gen > old[0] else (gen, old[1] + cost) if gen == old[0] else old
        while len(own) > self.own_cap:
            del own[next(iter(own))]

    # ----------------------------------------------------------------- segments

    def _rotate(self) -> None:
        """Close the open segment (rename it into the node's folder) and start a new one."""
        if self._sealing and time.monotonic() < self._seal_retry_at:
            return  # sealing is failing (a full disk?): keep appending, try again later
        self.folder.mkdir(exist_ok=True)
        first = self._active_first
        target = segment_path(self.folder, first, "jsonl")
        try:
            os.rename(self.path, target)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError:
                os.rename(target, self.path)
                raise
        except OSError as exc:
            self.seal_errors += 1
            self._seal_retry_at = time.monotonic() + 5.0
            log.error("audit segment could not be rotated", extra={"error": exc.strerror})
            return
        os.close(self._fd)
        self._fd = fd
        if self.own_source is not None:
            own, max_gen = self.own_source()
        else:
            own, max_gen = (list(self._own), list(self._own.values())), 0
        running = self._sealing[0] if self._seal_task is not None and self._sealing else None
        for older in self._sealing:
            if older is not running:
                older.checkpoint = None  # queued behind a seal: only the newest one's is worth writing
        spec = SealSpec(first, self._written_seq, self._active_prev, self._prev.decode(), self._active_first_ts,
                        self._last_ts, self._active_events, self._active_cost,
                        {"own": own, "events": self._written_seq, "total_cost": self.total_cost,
                         "max_gen": max_gen})
        self._sealing.append(spec)
        self._segments.append(first)
        self._closed[first] = (self._offsets, self._size)
        self._active_first = self._written_seq + 1
        self._active_prev = self._prev.decode()
        self._active_events = self._active_cost = 0
        self._offsets = array("q")
        self._size = 0
        self._start_seal()

    def _start_seal(self) -> None:
        if self._seal_task is not None or not self._sealing:
            return
        spec = self._sealing[0]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # opened outside a loop (tools, tests): seal right here
            self._sealed(spec, self._seal_job(spec), None)
            return
        self._seal_task = loop.run_in_executor(None, self._seal_job, spec)
        self._seal_task.add_done_callback(lambda t: self._sealed(spec, None if t.exception() else t.result(),
                                                                 t.exception()))

    def _seal_job(self, spec: SealSpec) -> list[int]:
        try:
            seal_segment(self.folder, self.node, self.region, self.keys, spec, self.settings.compress_level)
            if spec.checkpoint is None:
                return []
            return apply_retention(self.folder, self.node, self.keys, self.retention, spec.first, time.time())
        finally:
            release_memory()

    def _sealed(self, spec: SealSpec, removed: list[int] | None, error: BaseException | None) -> None:
        self._seal_task = None
        if error is not None:
            self.seal_errors += 1
            self._seal_retry_at = time.monotonic() + 5.0
            log.error("audit segment could not be sealed; it stays plain and is retried",
                      extra={"segment": spec.first, "error": str(error)})
            return
        self._sealing.remove(spec)
        self._closed.pop(spec.first, None)  # read from its gzip blocks from now on
        self.segments_sealed += 1
        for first in removed or ():
            i = bisect.bisect_left(self._segments, first)
            if i < len(self._segments) and self._segments[i] == first:
                del self._segments[i]
            self._heads.pop(first, None)
            self.segments_removed += 1
        if self._sealing:
            self._start_seal()

    async def wait_sealed(self, within_s: float = 30.0) -> None:
        """Until every closed segment is sealed (tests, benchmarks, a clean stop), at most ``within_s``."""
        deadline = time.monotonic() + within_s
        while (self._sealing or self._seal_task is not None) and time.monotonic() < deadline:
            if self._seal_task is None:
                self._seal_retry_at = 0.0
                self._start_seal()
            await asyncio.sleep(0.01)

    # ----------------------------------------------------------------- reading

    def read(self, after: int, limit: int) -> list[dict]:
        """Events with ``seq > after``, oldest first, at most ``limit`` (from sealed segments too)."""
        loads = orjson.loads
        return [loads(line) for line in self.read_raw(after, limit)]

    def read_raw(self, after: int, limit: int) -> list[bytes]:
        """The lines of :meth:`read`, as written (newline included): what a replica receives."""
        out: list[bytes] = []
        start = max(0, after) + 1
        if limit <= 0 or start > self._written_seq:
            return out
        if start < self._active_first:
            i = max(0, bisect.bisect_right(self._segments, start) - 1)
            for first in self._segments[i:]:
                out += self._read_segment(first, max(start, first), limit - len(out))
                if len(out) >= limit:
                    return out
            start = self._active_first
        return out + self._read_active(start - self._active_first, limit - len(out))

    def _read_active(self, index: int, limit: int) -> list[bytes]:
        count = len(self._offsets)
        if index >= count or limit <= 0:
            return []
        stop = min(count, index + limit)
        begin = self._offsets[index]
        end = self._offsets[stop] if stop < count else self._size
        with open(self.path, "rb") as fh:
            fh.seek(begin)
            data = fh.read(end - begin)
        return data.splitlines(keepends=True)

    def _read_segment(self, first: int, start: int, limit: int) -> list[bytes]:
        """Up to ``limit`` event lines from ``start`` of the segment beginning at ``first``."""
        out: list[bytes] = []
        plain = segment_path(self.folder, first, "jsonl")
        closed = self._closed.get(first)
        if closed is not None:
            try:
                return read_lines_at(plain, *closed, start - first, limit)
            except FileNotFoundError:  # sealed meanwhile (the plain copy is gone): read the blocks
                pass
        try:
            if plain.exists():
                lines = iter_lines(plain)
            else:
                head = self._heads.get(first)
                if head is None:
                    head = load_head(segment_path(self.folder, first, "head.json"), self.keys, self.node)
                    if len(self._heads) > 8:
                        self._heads.clear()
                    self._heads[first] = head
                blocks = head["blocks"]
                j = max(0, bisect.bisect_right([b[0] for b in blocks], start) - 1)
                lines = iter_lines_from(segment_path(self.folder, first, "jsonl.gz"), blocks[j][1])
            for line in lines:
                if orjson.loads(line)["seq"] >= start:
                    out.append(line)
                    if len(out) >= limit:
                        break
        except FileNotFoundError:  # removed by retention meanwhile
            return out
        return out

    # ----------------------------------------------------------------- replicas

    def append_raw(self, lines: list[bytes], ts: float) -> int:
        """Write lines of another node's trail verbatim (this log is that node's replica).

        Each line must continue the trail: the next ``seq``, ``prev`` the hash of the line before,
        the replica's node.  Lines this replica already holds (a resend after a lost ack) are skipped.
        Returns how many were appended; ``ValueError`` names the first line that does not fit, and
        nothing of the message is written then.  Written before the caller acknowledges them.
        """
        loads, hash_line = orjson.loads, self._hash
        seq, prev = self._next_seq, self._prev
        fresh: list[bytes] = []
        grants: list[Grant] = []
        for number, line in enumerate(lines, 1):
            try:
                ev = loads(line)
                got, key, cost, gen = ev["seq"], ev["key"], ev["cost"], ev["gen"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"line {number}: not an audit event") from None
            if not line.endswith(b"\n"):
                raise ValueError(f"line {number}: no newline")
            if got < seq and not fresh:
                continue  # already held
            if got != seq:
                raise ValueError(f"line {number}: seq {got} where {seq} was expected (out of order or a gap)")
            if ev.get("prev", "").encode() != prev or ev.get("node") != self.node:
                raise ValueError(f"line {number}: seq {got} does not continue {self.node}'s chain (forged, "
                                 "edited, or another trail)")
            prev = hash_line(line)
            seq += 1
            fresh.append(line)
            grants.append((key, cost, gen))
            self._last_ts = ev.get("ts", ts)
        if not fresh:
            return 0
        data = b"".join(fresh)
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            self._rollback(None, written)
            raise AuditUnavailable(exc.errno, f"replica write failed: {exc.strerror}") from None
        if not self._active_events:
            self._active_first_ts = loads(fresh[0])["ts"]
        offset = self._size
        for line in fresh:
            self._offsets.append(offset)
            offset += len(line)
        self._size = offset
        self._next_seq, self._prev = seq, prev
        self._written_seq = seq - 1
        self._active_events += len(fresh)
        cost = sum(c for _k, c, _g in grants)
        self._active_cost += cost
        self.total_cost += cost
        self.events_written += len(fresh)
        self._track_own(grants)
        if self._size >= self.settings.segment_bytes:
            self._rotate()
        return len(fresh)

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest event written."""
        return self._written_seq

    @property
    def segment_count(self) -> int:
        """Segments on disk besides the open one (sealed or being sealed)."""
        return len(self._segments)

    @property
    def unsealed(self) -> int:
        """Closed segments not sealed yet (queued, being sealed, or failing to)."""
        return len(self._sealing)

    def close(self) -> None:
        if self._future is not None:
            self._flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
