"""The router's own loop lag is not the node's fault: while the loop lags, a try's connect timeout is
stretched, and a connect that still timed out is answered as a quick 503 shed (it never reached the
node), not a 502.  Pure logic on a router with a manual clock; the overload benchmark
(benchmarks/bench_overload.py) shows the collapse this prevents."""

from __future__ import annotations

import json

import test_router
from test_router import ManualClock

from edge_server.router import LOOP_LAG_SHED, SHED_HEADER


def test_connect_timeout_is_stretched_only_while_the_loop_lags():
    router = test_router.make_router(ManualClock())
    base = router.try_timeout()
    assert base.sock_connect == 0.25  # the default connect_timeout_ms
    router.loop_lag_s = 0.05  # under a quarter of the connect timeout: unchanged
    assert router.try_timeout() is base
    router.loop_lag_s = 0.5
    stretched = router.try_timeout()
    assert stretched.sock_connect == 0.25 + 1.0 and stretched.total == base.total


def test_a_connect_timeout_during_a_lag_is_a_quick_shed_not_a_502():
    router = test_router.make_router(ManualClock())
    node = router.nodes["us-1"]
    router.loop_lag_s = 0.5
    resp = router._try_error("invoke", "us", node, "connect_timeout", {})
    assert resp.status == 503
    assert json.loads(resp.body)["error"]["code"] == "router_overloaded"
    assert resp.headers["Retry-After"] == "1" and resp.headers[SHED_HEADER] == LOOP_LAG_SHED
    assert router.gate.shed[LOOP_LAG_SHED] == 1
    # on time, a connect timeout is the node's: 502, as before; a refused connect always is
    router.loop_lag_s = 0.0
    assert router._try_error("invoke", "us", node, "connect_timeout", {}).status == 502
    router.loop_lag_s = 0.5
    assert router._try_error("invoke", "us", node, "refused", {}).status == 502
    assert router.gate.shed[LOOP_LAG_SHED] == 1
