"""Delta-state gossip between peers over HTTP: one in-flight signed POST per peer per interval.

Each round sends the keys changed since the peer last acknowledged (all of each key's entries, so
state also travels transitively) and the peer answers with a signed ack of the change sequence it
merged.  An empty delta still goes out: it is the heartbeat that keeps the peer "live".

A push unanswered for ``probe_s`` (two intervals, at least 40 ms) gets a probe beside it every
``probe_s``: a ``GET /healthz`` on another connection.  A probe sent after the push and answered
before it means the push was lost -- a healed blackhole drops the bytes of the push in flight on a
connection that still looks open, and its answer would only come at the 0.5 s timeout -- so the push
is abandoned and the next one goes out at once.  The same probes cut short the back-off after ten
failures (up to 1 s) when the last push went unanswered: the first answered probe ends it (a peer that
answers but refuses is left to the back-off).  Before them, a 5 s blackhole's heal left a node
105-140 ms without its peers' counts, against a convergence bound of 90 ms at 20 ms gossip.  A slow
peer (overloaded, its loop lagging) answers a probe after the push it got first, so a slow push is
not abandoned, and the push after an abandoned one never is (a peer that reads a large delta slowly
but answers probes costs one push, not a loop of them); probes only start after ``probe_s``, so a
healthy peer never sees one.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from edge_server.config import NodeSpec
from edge_server.token_bucket import BucketTable
from edge_server.wire import SIGNATURE_HEADER, WireError, decode_ack, encode_delta

__all__ = ["Gossiper", "probe_interval_s"]

log = logging.getLogger("edge_server.gossip")


def probe_interval_s(interval_s: float) -> float:
    """How long a push may wait before a probe goes beside it, and the period and timeout of probes."""
    return max(0.04, 2 * interval_s)


class Gossiper:
    """Pushes deltas from ``table`` to every peer; stops when cancelled."""

    def __init__(self, table: BucketTable, me: NodeSpec, peers: list[NodeSpec], secret: bytes,
                 boot: int, interval_s: float, metrics) -> None:
        self.table = table
        self.me = me
        self.peers = peers
        self.secret = secret
        self.boot = boot
        self.interval_s = interval_s
        self.metrics = metrics
        self._seq = 0
        self.last_ack: dict[str, float] = {}
        self._session: aiohttp.ClientSession | None = None
        self.probe_s = probe_interval_s(interval_s)
        self._probe_timeout = aiohttp.ClientTimeout(total=self.probe_s)

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, force_close=False)
        timeout = aiohttp.ClientTimeout(total=max(0.5, 10 * self.interval_s), connect=0.25)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self._session = session
            await asyncio.gather(*(self._peer_loop(session, peer) for peer in self.peers))

    async def _peer_loop(self, session: aiohttp.ClientSession, peer: NodeSpec) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        url = peer.url + "/v1/gossip"
        lag = self.metrics.gossip_lag.labels(peer.id)
        outcome = "ok"
        while True:
            started = loop.time()
            # The push after an abandoned one is never abandoned: if it is slow too, the peer is slow.
            outcome = await self._watched_push(session, peer, url, may_abandon=outcome != "lost")
            failures = failures + 1 if outcome in ("refused", "unreachable") else 0
            last = self.last_ack.get(peer.id)
            lag.set(time.time() - last if last else float("nan"))
            if outcome == "lost":
                continue  # the peer answers: push again at once
            # A failing peer is retried at the normal pace for a while, then less often (at most 1 s); an
            # unreachable one is probed all along, so that the first sign of life ends the wait.
            pause = self.interval_s if failures < 10 else min(1.0, self.interval_s * failures)
            left = pause - (loop.time() - started)
            if left > self.probe_s and outcome == "unreachable":
                await self._probe_until_answer(session, peer, loop.time() + left)
            elif left > 0:
                await asyncio.sleep(left)

    async def _watched_push(self, session: aiohttp.ClientSession, peer: NodeSpec, url: str,
                            may_abandon: bool = True) -> str:
        """One push, probed beside after ``probe_s`` (the module's docstring): what :meth:`push` returns,
        or ``"lost"`` when a later probe was answered first and the push was abandoned."""
        loop = asyncio.get_running_loop()
        push = asyncio.ensure_future(self.push(session, peer, url))
        try:
            done, _ = await asyncio.wait({push}, timeout=self.probe_s if may_abandon else None)
            while not done:
                probe = asyncio.ensure_future(self.probe(session, peer))
                sent = loop.time()
                done, _ = await asyncio.wait({push, probe}, return_when=asyncio.FIRST_COMPLETED)
                if push in done:
                    probe.cancel()
                    break
                if probe.result():
                    push.cancel()
                    self.metrics.gossip_messages.labels("sent", "lost").inc()
                    return "lost"
                # the probe failed too: the next one a probe period after this one went out
                wait = self.probe_s - (loop.time() - sent)
                done, _ = await asyncio.wait({push}, timeout=max(0.0, wait))
            return push.result()
        finally:
            if not push.done():
                push.cancel()

    async def _probe_until_answer(self, session: aiohttp.ClientSession, peer: NodeSpec, until: float) -> None:
        """Sleep until ``until`` (loop time), probing the peer every ``probe_s``; return at its first answer."""
        loop = asyncio.get_running_loop()
        while (left := until - loop.time()) > 0:
            sent = loop.time()
            if await self.probe(session, peer):
                return
            await asyncio.sleep(max(0.0, min(left, self.probe_s - (loop.time() - sent))))

    async def probe(self, session: aiohttp.ClientSession, peer: NodeSpec) -> bool:
        """Whether ``peer`` answers ``GET /healthz`` within ``probe_s`` (on a connection of its own)."""
        try:
            async with session.get(peer.url + "/healthz", timeout=self._probe_timeout) as resp:
                await resp.read()
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        self.metrics.gossip_messages.labels("probe", "ok" if ok else "unreachable").inc()
        return ok

    async def push(self, session: aiohttp.ClientSession, peer: NodeSpec, url: str) -> str:
        """One signed delta to ``peer``: ``"ok"`` (acknowledged), ``"refused"`` (the peer answered, but not
        with a valid ack) or ``"unreachable"`` (no answer: refused connection, reset, timeout)."""
        now = time.time()
        self.table.tick(now)
        upto, entries = self.table.delta_for(peer.id)
        self._seq += 1
        body, signature = encode_delta(self.secret, self.me.id, self.boot, self._seq, now, upto, entries)
        m = self.metrics
        try:
            async with session.post(url, data=body, headers={
                SIGNATURE_HEADER: signature, "Content-Type": "application/json"}) as resp:
                answer = await resp.read()
                if resp.status != 200:
                    m.gossip_messages.labels("sent", f"refused_{resp.status}").inc()
                    log.warning("peer refused gossip", extra={"peer": peer.id, "status": resp.status,
                                                               "body": answer[:200].decode(errors="replace")})
                    return "refused"
                node, boot, acked = decode_ack(self.secret, answer, resp.headers.get(SIGNATURE_HEADER))
        except (aiohttp.ClientError, TimeoutError, OSError):
            m.gossip_messages.labels("sent", "unreachable").inc()
            return "unreachable"
        except WireError as exc:
            m.gossip_refused.labels(f"ack_{exc.reason}").inc()
            return "refused"
        m.gossip_messages.labels("sent", "ok").inc()
        m.gossip_bytes.labels("sent").inc(len(body))
        m.gossip_entries.inc(len(entries))
        if node != peer.id:
            m.gossip_refused.labels("ack_wrong_peer").inc()
            return "refused"
        now = time.time()
        if not self.table.on_peer_boot(node, boot, now):
            self.table.on_ack(node, acked, now)
        self.last_ack[peer.id] = now
        return "ok"
