"""Delta-state gossip between peers over HTTP: one in-flight signed POST per peer per interval.

Each round sends the keys changed since the peer last acknowledged (all of each key's entries, so
state also travels transitively) and the peer answers with a signed ack of the change sequence it
merged.  An empty delta still goes out: it is the heartbeat that keeps the peer "live".
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from edge_server.config import NodeSpec
from edge_server.token_bucket import BucketTable
from edge_server.wire import SIGNATURE_HEADER, WireError, decode_ack, encode_delta

__all__ = ["Gossiper"]

log = logging.getLogger("edge_server.gossip")


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
        while True:
            started = loop.time()
            ok = await self.push(session, peer, url)
            failures = 0 if ok else failures + 1
            last = self.last_ack.get(peer.id)
            lag.set(time.time() - last if last else float("nan"))
            # A dead peer is retried at the normal pace for a while, then less often (at most 1 s).
            pause = self.interval_s if failures < 10 else min(1.0, self.interval_s * failures)
            await asyncio.sleep(max(0.0, pause - (loop.time() - started)))

    async def push(self, session: aiohttp.ClientSession, peer: NodeSpec, url: str) -> bool:
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
                    return False
                node, boot, acked = decode_ack(self.secret, answer, resp.headers.get(SIGNATURE_HEADER))
        except (aiohttp.ClientError, TimeoutError, OSError):
            m.gossip_messages.labels("sent", "unreachable").inc()
            return False
        except WireError as exc:
            m.gossip_refused.labels(f"ack_{exc.reason}").inc()
            return False
        m.gossip_messages.labels("sent", "ok").inc()
        m.gossip_bytes.labels("sent").inc(len(body))
        m.gossip_entries.inc(len(entries))
        if node != peer.id:
            m.gossip_refused.labels("ack_wrong_peer").inc()
            return False
        now = time.time()
        if not self.table.on_peer_boot(node, boot, now):
            self.table.on_ack(node, acked, now)
        self.last_ack[peer.id] = now
        return True
