"""A node's endpoints for its peers: gossip, strict messages, audit reads and replicas.

Peers' messages are signed; a refused one is counted and answered with its reason, never merged.
"""

from __future__ import annotations

import logging
import time

import orjson
from aiohttp import web

from edge_server.api_input import JSON, ApiError, int_param, json_bytes, read_body, read_body_bytes
from edge_server.audit import AuditCorrupt
from edge_server.node import Node
from edge_server.wire import SIGNATURE_HEADER, WireError, decode_delta, encode_ack, sign

__all__ = ["MAX_GOSSIP_BYTES", "audit", "audit_replica", "audit_replica_held", "audit_replica_read", "gossip",
           "strict_messages"]

log = logging.getLogger("edge_server.app")

MAX_GOSSIP_BYTES = 32 * 1024 * 1024


async def audit(node: Node, request: web.BaseRequest) -> web.Response:
    after = int_param(request, "after", 0)
    limit = int_param(request, "limit", 1000, maximum=10_000)
    events = node.audit.read(after, limit)
    return web.json_response({"node": node.spec.id, "region": node.spec.region, "events": events,
                              "next": events[-1]["seq"] if events else after,
                              "last_seq": node.audit.last_seq})


async def audit_replica(node: Node, request: web.BaseRequest) -> web.Response:
    """Lines of another node's trail for the replica this node holds (see ``audit/replica.py``)."""
    raw = await read_body(request, MAX_GOSSIP_BYTES)
    if len(raw) > MAX_GOSSIP_BYTES:
        raise ApiError(413, "body_too_large", f"replica message over {MAX_GOSSIP_BYTES} bytes")
    status, body = node.replicas.receive(raw, request.headers.get(SIGNATURE_HEADER))
    headers = {SIGNATURE_HEADER: sign(node.config.secret, body)} if status == 200 else None
    return json_bytes(body, status, headers)


async def audit_replica_read(node: Node, request: web.BaseRequest) -> web.Response:
    """``?origin=ID&after=SEQ&limit=N``: the lines this node holds of ``origin``'s trail (signed),
    for ``origin`` rebuilding a lost trail before it serves."""
    origin = request.query.get("origin", "")
    if origin not in node.node_ids or origin == node.spec.id:
        raise ApiError(400, "invalid_query", "origin must be another node of the cluster", "origin")
    after = int_param(request, "after", 0)
    limit = int_param(request, "limit", 1000, maximum=10_000)
    body = node.replicas.serve(origin, node.config.node(origin).region, after, limit)
    return web.Response(body=body, headers={"Content-Type": "application/x-ndjson",
                                            SIGNATURE_HEADER: sign(node.config.secret, body)})


async def audit_replica_held(node: Node, request: web.BaseRequest) -> web.Response:
    """``?origin=ID&nonce=N``: how much of ``origin``'s trail this node holds (signed, with the nonce),
    for ``origin`` starting with no trail: a first start, or a lost disk (``audit/bootstrap.py``)."""
    origin = request.query.get("origin", "")
    if origin not in node.node_ids or origin == node.spec.id:
        raise ApiError(400, "invalid_query", "origin must be another node of the cluster", "origin")
    nonce = request.query.get("nonce", "")
    if not 8 <= len(nonce) <= 64:
        raise ApiError(400, "invalid_query", "nonce must be 8 to 64 characters", "nonce")
    try:
        held = node.replicas.held(origin, node.config.node(origin).region)
    except (AuditCorrupt, OSError) as exc:  # no answer rather than a wrong "none"
        raise ApiError(503, "replica_unavailable", f"the replica of {origin} cannot be opened: {exc}") from None
    body = orjson.dumps({"origin": origin, "holder": node.spec.id, "last_seq": held, "nonce": nonce})
    return json_bytes(body, 200, {SIGNATURE_HEADER: sign(node.config.secret, body)})


async def strict_messages(node: Node, request: web.BaseRequest) -> web.Response:
    """Strict mode's signed messages (``edge_server.strict_gossip``): refused ones are counted, never merged."""
    if node.strict is None:
        raise ApiError(409, "wrong_mode", f"this node runs mode {node.config.mode!r}; /v1/strict is strict mode's")
    raw = await read_body_bytes(request, MAX_GOSSIP_BYTES)
    if len(raw) > MAX_GOSSIP_BYTES:
        raise ApiError(413, "body_too_large", f"strict message batch over {MAX_GOSSIP_BYTES} bytes")
    status, answer = node.strict.handle_batch(raw)
    return web.json_response(answer, status=status)


async def gossip(node: Node, request: web.BaseRequest) -> web.Response:
    if node.strict is not None:
        raise ApiError(409, "wrong_mode", "this node runs mode 'strict': its messages go to /v1/strict")
    if node.table is None:
        raise ApiError(503, "starting", "the node is still recovering its audit trail")
    m = node.metrics
    raw = await read_body(request, MAX_GOSSIP_BYTES)
    try:
        if len(raw) > MAX_GOSSIP_BYTES:
            raise WireError("too_large", "gossip body too large", 413)
        delta = decode_delta(node.config.secret, raw, request.headers.get(SIGNATURE_HEADER),
                             max_key_bytes=node.config.server.max_key_bytes, known_nodes=node.node_ids)
        now = time.time()
        node.replay.check(delta, now)
    except WireError as exc:
        m.gossip_refused.labels(exc.reason).inc()
        m.gossip_messages.labels("received", "refused").inc()
        log.warning("gossip refused", extra={"reason": exc.reason, "detail": str(exc),
                                             "remote": request.remote})
        raise ApiError(exc.status, f"gossip_{exc.reason}", str(exc)) from None
    table = node.table
    assert table is not None
    if table.on_peer_boot(delta.sender, delta.boot, now):
        log.info("peer restarted", extra={"peer": delta.sender})
    table.merge(delta.sender, delta.entries, now)
    m.gossip_messages.labels("received", "ok").inc()
    m.gossip_bytes.labels("received").inc(len(raw))
    body, signature = encode_ack(node.config.secret, node.spec.id, node.boot, delta.upto)
    return web.Response(body=body, content_type=JSON, headers={SIGNATURE_HEADER: signature})
