"""Admission control, the retry budget, error classification and the overload settings, without
processes: a real event loop for the gate (short queue deadlines, no fixed sleeps to wait for a
result), a manual clock for the budget."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import aiohttp
import pytest

from edge_server.admission import QUEUE_FULL, QUEUE_STALLED, QUEUE_TIMEOUT, Gate, RetryBudget
from edge_server.config import ConfigError, parse_cluster
from edge_server.router_health import classify


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_gate_admits_up_to_its_limit_queues_fifo_and_sheds_the_rest_at_once() -> None:
    gate = Gate(limit=2, queue_max=2, queue_timeout_s=5.0)
    assert gate.try_enter() and gate.try_enter()
    assert not gate.try_enter()
    order: list[int] = []

    async def waiter(i: int) -> str | None:
        reason = await gate.enter()
        order.append(i)
        return reason

    first, second = asyncio.create_task(waiter(1)), asyncio.create_task(waiter(2))
    await asyncio.sleep(0)
    assert gate.queued == 2
    assert await gate.enter() == QUEUE_FULL  # queue full: refused without waiting
    gate.leave()  # the slot goes straight to the oldest waiter
    assert await first is None and gate.inflight == 2 and gate.queued == 1
    gate.leave()
    assert await second is None and order == [1, 2]
    gate.leave()
    gate.leave()
    assert gate.inflight == 0 and gate.queued == 0 and gate.shed == {QUEUE_FULL: 1, QUEUE_TIMEOUT: 0, QUEUE_STALLED: 0}


async def test_gate_queue_has_a_deadline_and_a_cancelled_waiter_gives_its_place_back() -> None:
    gate = Gate(limit=1, queue_max=5, queue_timeout_s=0.02)
    assert gate.try_enter()
    assert await gate.enter() == QUEUE_TIMEOUT  # nobody left within the deadline
    assert gate.queued == 0 and gate.shed[QUEUE_TIMEOUT] == 1
    slow = Gate(limit=1, queue_max=5, queue_timeout_s=5.0)
    assert slow.try_enter()
    task = asyncio.create_task(slow.enter())
    await asyncio.sleep(0)
    assert slow.queued == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slow.queued == 0
    slow.leave()
    assert slow.inflight == 0  # the cancelled waiter did not swallow the slot


async def test_gate_with_no_queue_sheds_immediately() -> None:
    gate = Gate(limit=1, queue_max=0, queue_timeout_s=1.0)
    assert gate.try_enter()
    assert await gate.enter() == QUEUE_FULL


def test_retry_budget_is_a_share_of_recent_requests_plus_a_floor() -> None:
    clock = ManualClock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.5, clock=clock, window_s=10)  # floor: 5 per 10 s
    assert budget.left() == pytest.approx(5.0)
    for _ in range(5):
        assert budget.try_retry()
    assert not budget.try_retry()  # a storm of failures cannot retry everything
    for _ in range(10):
        budget.request()
    assert budget.left() == pytest.approx(2.0) and budget.try_retry() and budget.try_retry()
    assert not budget.try_retry()
    clock.now += 11  # the window slides: old requests and retries are forgotten
    assert budget.left() == pytest.approx(5.0)


def test_errors_are_classified_as_hard_or_soft_evidence() -> None:
    key = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 1, False, True, None, None, None)
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    unreachable = aiohttp.ClientConnectorError(key, OSError(errno.EHOSTUNREACH, "no route"))
    assert classify(refused) == "refused"
    assert classify(unreachable) == "unreachable"
    assert classify(aiohttp.ConnectionTimeoutError()) == "connect_timeout"
    assert classify(aiohttp.ServerTimeoutError()) == "timeout"
    assert classify(TimeoutError()) == "timeout"
    assert classify(aiohttp.ServerDisconnectedError()) == "reset"
    assert classify(aiohttp.ClientOSError(errno.ECONNRESET, "reset")) == "reset"


def _doc(**tables: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {"cluster": {"secret": "settings-test-secret"},
                           "regions": [{"name": "eu", "nodes": [{"id": "eu-1", "port": 9001}]}],
                           "limits": [{"pattern": "*", "rate": 10.0, "burst": 10}]}
    doc.update(tables)
    return doc


@pytest.mark.parametrize(("table", "key", "value", "expected"), [
    ("router", "max_ejected_share", 1.5, "a fraction between 0 and 1"),
    ("router", "panic_threshold", -0.1, "a number >= 0"),
    ("router", "panic_threshold", "half", "a number"),
    ("router", "check_try_timeout_ms", 0, "a number > 0"),
    ("router", "invoke_try_timeout_ms", -5, "a number > 0"),
    ("router", "invoke_header_timeout_ms", 0, "a number > 0"),
    ("router", "retry_inflight_invoke", "no", "true or false"),
    ("router", "fall", 0, "an integer >= 1"),
    ("router", "timeout_eject_count", 1.5, "an integer"),
    ("router", "max_inflight", 0, "an integer >= 1"),
    ("router", "queue_max", -1, "an integer >= 0"),
    ("router", "queue_timeout_ms", -1, "a number >= 0"),
    ("router", "connections_per_node", 0, "an integer >= 1"),
    ("router", "header_timeout_ms", 0, "a number > 0"),
    ("router", "max_connections", 0, "an integer >= 1"),
    ("router", "retry_budget_ratio", -1, "a number >= 0"),
    ("router", "retry_budget_min_per_s", True, "a number"),
    ("server", "queue_max", -1, "an integer >= 0"),
    ("server", "queue_timeout_ms", "soon", "a number"),
    ("server", "header_timeout_ms", 0, "a number > 0"),
    ("server", "max_connections", 0, "an integer >= 1"),
    ("router", "lag_target_ms", -1, "a number >= 0"),
    ("router", "lag_interval_ms", 0, "a number > 0"),
    ("router", "min_inflight", 0, "an integer >= 1"),
    ("router", "min_inflight", 9000, "an integer between 1 and max_inflight (8192)"),
    ("server", "lag_target_ms", "fast", "a number"),
    ("server", "min_inflight", 1.5, "an integer"),
])
def test_overload_settings_are_validated_naming_file_key_and_expected_value(table: str, key: str, value: Any,
                                                                            expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_cluster(_doc(**{table: {key: value}}), source="c.toml")
    assert err.value.key == f"{table}.{key}" and err.value.expected == expected
    assert str(err.value).startswith(f"c.toml: key '{table}.{key}': expected {expected}")


def test_overload_settings_have_documented_defaults() -> None:
    config = parse_cluster(_doc())
    rc, sv = config.router, config.server
    assert (rc.max_ejected_share, rc.panic_threshold, rc.check_try_timeout_ms, rc.retry_inflight_invoke) == (
        0.5, 0.5, 150.0, False)
    assert rc.invoke_header_timeout_ms == 200.0
    assert rc.max_inflight >= 1 and rc.queue_max >= 0 and sv.queue_max >= 0 and sv.header_timeout_ms > 0
    assert (rc.lag_target_ms, rc.lag_interval_ms, sv.lag_target_ms, sv.lag_interval_ms) == (100.0, 100.0, 150.0, 100.0)
    assert rc.min_inflight == sv.min_inflight == 32
    small = parse_cluster(_doc(server={"max_inflight": 4}))  # a default floor above a small limit follows it
    assert small.server.min_inflight == 4
