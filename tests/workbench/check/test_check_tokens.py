"""Token loss from three sources (client replies, audit trails, peers' final views): each disagreement
has its own count, and a bad history fails while a consistent one passes."""

from __future__ import annotations

from check_histories import WALL, audited_run, request

from workbench.check import check_token_loss
from workbench.history import AuditEvent, FaultRecord, MetricSample, RouterSample, StateSample
from workbench.spec.scenario import Scenario

SCEN = Scenario.build(rate=10, burst=5, duration_s=10)
NODES = ("eu-1", "us-1", "ap-1")


def grants(n: int = 12) -> list[tuple[float, str, str]]:
    return [(0.5 + 0.5 * i, "tenant-0000", NODES[i % 3]) for i in range(n)]


def test_three_sources_that_agree_pass_and_say_what_they_compared() -> None:
    v = check_token_loss(audited_run(SCEN, grants(), final_nodes=NODES))
    assert v.ok, v.reasons
    assert v.figures["peer_views_compared"] == 6  # 3 nodes x 2 peers each, one key
    assert "12 admitted replies" in v.figures["looked_at"] and "6 peer views" in v.figures["looked_at"]


def test_a_double_grant_of_one_request_id_has_its_own_count() -> None:
    rec = audited_run(SCEN, grants(), final_nodes=NODES)
    ev = rec.audit[4]
    rec.audit.append(AuditEvent(99, f"{ev.node}:99", ev.key, 1, ev.node, ev.region, ev.ts + 0.5, ev.request_id, 1))
    for s in rec.states:  # the peers did count the second grant
        gen, count = s.counts["tenant-0000"][ev.node]
        s.counts["tenant-0000"][ev.node] = (gen, count + 1)
    v = check_token_loss(rec)
    assert not v.ok and v.figures["double_grants"] == 1 and v.figures["peer_view_behind"] == 0
    assert "granted more than once" in v.reasons[0]


def test_a_grant_audited_but_never_answered_is_counted_not_lost() -> None:
    rec = audited_run(SCEN, grants(), final_nodes=NODES)
    rec.requests[2].status, rec.requests[2].error = 502, "skill_failed"  # tokens spent, answer an error
    rec.requests.pop(5)  # the reply never came at all
    v = check_token_loss(rec)
    assert v.ok, v.reasons
    assert v.figures["unanswered_grants"] == 2 and v.figures["unanswered_grants_answered_as_error"] == 1


def test_an_answer_without_an_audit_event_is_loss() -> None:
    rec = audited_run(SCEN, grants(), final_nodes=NODES)
    rec.requests.append(request(7.0, "eu", "eu-1", rid="ghost"))
    v = check_token_loss(rec)
    assert not v.ok and v.figures["answered_without_audit"] == 1 and "ghost" in v.reasons[0]


def test_a_peer_that_never_learnt_of_audited_grants_is_loss_when_the_node_lived() -> None:
    rec = audited_run(SCEN, grants(), final_nodes=NODES)
    rec.states[2].counts["tenant-0000"]["eu-1"] = (1, 1)  # ap-1 saw 1 of eu-1's 4 grants
    v = check_token_loss(rec)
    assert not v.ok and v.figures["peer_view_behind"] == 1
    assert "ap-1's view of eu-1" in v.reasons[0]


def test_grants_made_after_the_final_views_are_not_loss_but_older_ones_are() -> None:
    # After an overloaded run the nodes still serve what the router gave up on: a grant audited after
    # the peers' final views were taken cannot be in them.
    rec = audited_run(SCEN, grants(), final_nodes=NODES)
    late = AuditEvent(99, "ap-1:99", "tenant-0000", 1, "ap-1", "ap", WALL + SCEN.duration_s + 0.8, "r-late", 1)
    rec.audit.append(late)
    v = check_token_loss(rec)
    assert v.ok, v.reasons
    assert len(v.figures["granted_after_view"]) == 2 and v.figures["peer_view_behind"] == 0  # eu-1's and us-1's
    late.ts = WALL + 3.0  # granted long before the views: the peers should have learnt of it
    rec.audit.sort(key=lambda ev: ev.ts)
    v = check_token_loss(rec)
    assert not v.ok and v.figures["peer_view_behind"] == 2 and not v.figures["granted_after_view"]


def test_grants_made_just_before_a_node_died_may_be_missing_from_its_peers_views() -> None:
    scen = Scenario.build(rate=10, burst=5, duration_s=10, kill_region_at_s=6.2, kill_region="eu")
    rec = audited_run(scen, [g for g in grants() if g[0] < 6.2], final_nodes=("us-1", "ap-1"))
    rec.faults = [FaultRecord(6.2, "kill", "eu")]
    last = max((ev for ev in rec.audit if ev.node == "eu-1"), key=lambda ev: ev.ts)
    last.ts = WALL + 6.1  # granted 100 ms before the kill, never gossiped
    for s in rec.states:
        gen, count = s.counts["tenant-0000"]["eu-1"]
        s.counts["tenant-0000"]["eu-1"] = (gen, count - 1)
    v = check_token_loss(rec)
    assert v.ok, v.reasons
    assert len(v.figures["unpropagated_at_death"]) == 2
    last.ts = WALL + 3.0  # long before the kill: the peers should have had it
    rec.audit.sort(key=lambda ev: ev.ts)
    assert not check_token_loss(rec).ok


def test_a_dead_nodes_old_view_is_not_a_final_view() -> None:
    scen = Scenario.build(rate=10, burst=5, duration_s=10, kill_region_at_s=8.0, kill_region="ap")
    rec = audited_run(scen, grants(), final_nodes=("eu-1", "us-1"))
    rec.faults = [FaultRecord(8.0, "kill", "ap")]
    rec.states.append(StateSample(1.0, "ap-1", WALL + 1.0, {}, {"tenant-0000": {"ap-1": (1, 0)}}))
    v = check_token_loss(rec)
    assert v.ok, v.reasons
    assert v.figures["peer_views_compared"] == 4  # eu-1 and us-1 on each other and ap-1; ap-1's stale view ignored


def test_nothing_recorded_is_a_failure_and_so_is_no_final_state() -> None:
    assert "nothing measured" in check_token_loss(audited_run(SCEN, [], final_nodes=())).reasons[-1]
    rec = audited_run(SCEN, grants(), final_nodes=())
    v = check_token_loss(rec)
    assert not v.ok and "no node's final state" in v.reasons[0]


def test_a_paused_node_that_grants_a_retried_request_at_its_resume_is_an_orphaned_grant() -> None:
    scen = Scenario.build(rate=10, burst=5, duration_s=10)
    rec = audited_run(scen, grants(), final_nodes=NODES)
    rec.faults = [FaultRecord(2.0, "pause", "eu"), FaultRecord(4.0, "resume", "eu")]
    ev = next(e for e in rec.audit if e.node == "us-1")  # the retry's grant, answered to the client
    held = AuditEvent(77, "eu-1:77", ev.key, 1, "eu-1", "eu", WALL + 4.05, ev.request_id, 1)
    rec.audit.append(held)
    for s in rec.states:
        if s.node != "eu-1":
            gen, count = s.counts["tenant-0000"]["eu-1"]
            s.counts["tenant-0000"]["eu-1"] = (gen, count + 1)
    v = check_token_loss(rec)
    assert v.ok, v.reasons
    assert v.figures["orphaned_at_kill"] == 1 and v.figures["double_grants"] == 0
    held.ts = WALL + 6.0  # long after the resume: nothing explains it
    assert not check_token_loss(rec).ok


def test_a_grant_at_the_resume_that_the_router_saw_granted_twice_is_a_double_grant() -> None:
    """The same history as above, but the router followed its hedge's losing try to a grant
    (edge_server/hedge_watch.py) and listed the id: both nodes answered, so it is no orphan."""
    scen = Scenario.build(rate=10, burst=5, duration_s=10)
    rec = audited_run(scen, grants(), final_nodes=NODES)
    rec.faults = [FaultRecord(2.0, "pause", "eu"), FaultRecord(4.0, "resume", "eu")]
    ev = next(e for e in rec.audit if e.node == "us-1")
    rec.audit.append(AuditEvent(77, "eu-1:77", ev.key, 1, "eu-1", "eu", WALL + 4.05, ev.request_id, 1))
    for s in rec.states:
        if s.node != "eu-1":
            gen, count = s.counts["tenant-0000"]["eu-1"]
            s.counts["tenant-0000"]["eu-1"] = (gen, count + 1)
    rec.routers = [RouterSample(4.2, {}, [ev.request_id])]
    rec.metrics = [MetricSample(4.2, "router", "router_hedge_losers_total",
                                {"route": "/v1/limits/check", "result": "double_grant"}, 1.0)]
    v = check_token_loss(rec)
    assert not v.ok and any("granted more than once" in r for r in v.reasons)
    assert v.figures["double_grants"] == 1 and v.figures["orphaned_at_kill"] == 0
    assert v.figures["router_double_grants"] == 1 and v.figures["router_double_grants_not_audited"] == 0


def test_a_double_grant_the_router_saw_but_no_trail_holds_twice_fails() -> None:
    rec = audited_run(SCEN, grants(), final_nodes=NODES)
    rec.routers = [RouterSample(3.0, {}, [rec.audit[2].request_id])]
    v = check_token_loss(rec)
    assert not v.ok and v.figures["router_double_grants_not_audited"] == 1 and v.figures["double_grants"] == 0
    assert any("not in two audit trails" in r for r in v.reasons)
    assert v.figures["router_double_grants"] is None  # no router metric in this history
