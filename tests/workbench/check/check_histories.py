"""Hand-built histories for the checker's tests: small, explicit, and easy to break on purpose."""

from __future__ import annotations

from workbench.history import AuditEvent, FaultRecord, Recording, RequestRecord, StateSample
from workbench.spec.scenario import Scenario

__all__ = ["WALL", "audited_run", "recording", "request", "traffic"]

WALL = 1_000_000.0  # time.time() at the run clock's zero in every history here


def recording(scenario: Scenario, faults: list[FaultRecord] = (), **extra: object) -> Recording:
    """An empty, complete recording of ``scenario`` with the given applied faults."""
    rec = Recording(scenario=scenario.to_dict(), started_wall=WALL, ended_s=scenario.duration_s, complete=True)
    rec.faults = list(faults)
    rec.extra.update(extra)
    return rec


def request(t: float, home: str, node: str = "", *, key: str = "tenant-0000", status: int = 200,
            took: float = 0.005, error: str = "", rid: str = "", cost: int = 1,
            allowed: bool | None = None) -> RequestRecord:
    """One request sent at ``t`` (intended = actual send) and answered ``took`` seconds later by
    ``node`` (its region is the part before the dash; "" = no answer)."""
    region = node.rsplit("-", 1)[0] if node else ""
    return RequestRecord(t, t, t + took, home, region, node, key, cost, status, error, rid,
                         "check" if allowed is not None else "invoke", allowed)


def traffic(rec: Recording, home: str, node_at, *, start: float, end: float, step: float = 0.01,
            keys: tuple[str, ...] = ("tenant-0000",)) -> None:
    """Requests of ``home``'s clients every ``step`` seconds, keys in turn; ``node_at(t)`` says who
    answers at ``t``: a node id (200), ``None`` (connection refused) or a (node, status, took) tuple."""
    i = 0
    t = start
    while t < end - 1e-9:
        key = keys[i % len(keys)]
        answer = node_at(t)
        if answer is None:
            rec.requests.append(request(t, home, "", key=key, status=0, took=0.001,
                                        error="ClientConnectorError: Cannot connect to host"))
        elif isinstance(answer, tuple):
            node, status, took = answer
            rec.requests.append(request(t, home, node, key=key, status=status, took=took,
                                        error="" if status else "timeout after 5.0 s"))
        else:
            rec.requests.append(request(t, home, answer, key=key))
        i += 1
        t = round(start + i * step, 9)


def audited_run(scenario: Scenario, grants: list[tuple[float, str, str]], *, final_nodes: tuple[str, ...],
                final_t: float | None = None) -> Recording:
    """A consistent run: every (time, key, node) grant is answered 200, audited once, and every node
    in ``final_nodes`` ends with a state sample that sees every node's exact count."""
    rec = recording(scenario)
    counts: dict[str, dict[str, int]] = {}
    for i, (t, key, node) in enumerate(grants):
        rid = f"r{i}"
        region = node.rsplit("-", 1)[0]
        rec.requests.append(request(t, region, node, key=key, rid=rid))
        rec.audit.append(AuditEvent(i, f"{node}:{i}", key, 1, node, region, WALL + t + 0.001, rid, 1))
        counts.setdefault(key, {}).setdefault(node, 0)
        counts[key][node] += 1
    t_end = scenario.duration_s if final_t is None else final_t
    view = {k: {n: (1, c) for n, c in per.items()} for k, per in counts.items()}
    for node in final_nodes:
        rec.states.append(StateSample(t_end, node, WALL + t_end, {k: sum(v.values()) for k, v in counts.items()},
                                      {k: dict(v) for k, v in view.items()}))
    return rec
