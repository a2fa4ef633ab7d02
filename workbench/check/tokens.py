"""Token loss, from sources that do not derive from each other.

1. the grants the clients saw: every admitted reply, by its request id;
2. the union of the nodes' audit trails;
3. every peer's final view of every node's count (``StateSample.counts`` of OTHER nodes: what the
   cluster charges for that node's grants), never a node's own counter, which it rebuilt from the
   very audit trail it would be compared with;
4. the replicas of the trails held in other regions (``[audit] replicate``): what the holders
   wrote of each origin's lines, on their own disks.  A replica event the origin's own trail does
   not have (its disk was lost) still accounts for its grant -- unless the origin's trail goes on
   around it (a hole in the middle of a trail is not a lost disk); a replica event that differs from the
   origin's, or a grant answered before the replica's newest event of that node but absent from
   it, is a disagreement.  Events the replica had not received by the end are the recovery point,
   counted, not loss.

Separate counts: double grants of one request id (also those the router itself saw: a hedged check
granted by both its tries, from its sampled state and metrics), grants audited but never answered as a grant,
answers with no audit event, audited costs that differ from the request's, and peer views that
disagree with the audit.  A token is *lost* when a source shows it and another that must show it
does not.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workbench.check.outages import OutageLog, build_log
from workbench.check.verdict import NOTHING_MEASURED, Verdict, scenario_of, spend_publication_delay_s
from workbench.history import AuditEvent, Recording, StateSample

__all__ = ["INFLIGHT_S", "check_token_loss", "read_replicas", "replica_folder"]

# A grant this young (by the view's wall clock, or before a node's death) may be missing from a peer's
# view without being lost: a gossip round, its delivery and the view's own scrape.
INFLIGHT_S = 0.25
# faults around which one request id may be granted on two nodes without a double grant
_ORPHANING = ("kill", "pause", "resume", "blackhole", "heal", "end_blackhole")


def _final_views(rec: Recording, log: OutageLog | None) -> dict[str, StateSample]:
    """Each node's last state sample, for the nodes that were up at the end (a dead node's last
    sample is an old view, not a final one)."""
    last: dict[str, StateSample] = {}
    for s in rec.states:
        if s.node not in last or s.t_s >= last[s.node].t_s:
            last[s.node] = s
    if log is not None:
        last = {n: s for n, s in last.items() if log.down_at_end(n) is None}
    return last


def replica_folder(rec: Recording) -> Path | None:
    """Where the run's replicas are: ``extra["audit_replicas_dir"]``, else the ``audit/replicas``
    folder of the cluster's run folder (the drill's nodes write their trails there); None when the
    run has none (replication off, or the folder is gone)."""
    extra = rec.extra or {}
    cluster = extra.get("cluster") if isinstance(extra.get("cluster"), dict) else {}
    candidates = [extra.get("audit_replicas_dir"),
                  cluster.get("run_dir") and Path(cluster["run_dir"]) / "audit" / "replicas",
                  extra.get("results_dir") and Path(extra["results_dir"]) / "cluster" / "audit" / "replicas"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def read_replicas(folder: Path) -> list[AuditEvent]:
    """Every event of every replica trail in ``folder`` (sealed segments and the open one); a line
    that is not an event raises ``ValueError`` naming its file and line."""
    from edge_server.audit.export import iter_events

    return [AuditEvent.from_json(ev) for _line, ev in iter_events([folder])]


def _same(a: AuditEvent, b: AuditEvent) -> bool:
    return (a.key, a.cost, a.request_id, a.gen, a.ts, a.region) == (b.key, b.cost, b.request_id, b.gen, b.ts,
                                                                     b.region)


def _replica_source(rec: Recording, replicas: Sequence[AuditEvent], started_wall: float,
                    ended_s: float | None) -> tuple[list[AuditEvent], dict[str, Any], list[str]]:
    """Source 4 against sources 1 and 2: the replica-only events (to add to the audit), the figures,
    and the reasons.  Nodes without a replica are listed, not judged (a single region has none)."""
    own = {(ev.node, ev.seq): ev for ev in rec.audit}
    held: dict[str, dict[int, AuditEvent]] = defaultdict(dict)
    for ev in replicas:
        held[ev.node][ev.seq] = ev
    only = [ev for node in sorted(held) for seq, ev in sorted(held[node].items()) if (node, seq) not in own]
    # A lost disk loses a whole trail (or, rebuilt from a lagging replica, nothing before the rebuild);
    # retention removes its oldest segments.  A replica event missing *inside* the range the origin's
    # own trail still holds is neither: that trail lost an answered grant from its middle.
    spans: dict[str, tuple[int, int]] = {}
    for node, seq in own:
        low, high = spans.get(node, (seq, seq))
        spans[node] = (min(low, seq), max(high, seq))
    holes = [f"{ev.node}:{ev.seq}" for ev in only if ev.node in spans
             and spans[ev.node][0] < ev.seq < spans[ev.node][1]]
    differ = [f"{node}:{seq}" for node in sorted(held) for seq, ev in sorted(held[node].items())
              if (node, seq) in own and not _same(own[(node, seq)], ev)]
    newest_ts = {node: max(ev.ts for ev in evs.values()) for node, evs in held.items()}
    ids = {node: {ev.request_id for ev in evs.values()} for node, evs in held.items()}
    absent = [r.request_id for r in rec.requests if r.admitted and r.request_id and r.node in held
              and r.request_id not in ids[r.node] and started_wall + r.end_s <= newest_ts[r.node]]
    last_seq = {node: max(evs) for node, evs in held.items()}
    behind: Counter[str] = Counter(ev.node for ev in rec.audit if ev.node in held and ev.seq > last_seq[ev.node])
    end = started_wall + (ended_s or 0.0)
    oldest_behind = {}
    for ev in rec.audit:
        if ev.node in held and ev.seq > last_seq[ev.node]:
            oldest_behind[ev.node] = round(max(oldest_behind.get(ev.node, 0.0), end - ev.ts), 3)
    reasons = []
    if holes:
        reasons.append(f"{len(holes)} grants have no audit event in their node's own trail although it goes on "
                       f"after them; only the replica holds them (e.g. {holes[:3]})")
    if differ:
        reasons.append(f"{len(differ)} replica events differ from their origin's own trail (e.g. {differ[:3]})")
    if absent:
        reasons.append(f"{len(absent)} admitted replies are missing from their node's replica although it holds "
                       f"later events of that node (e.g. {absent[:3]})")
    figures = {"replica_events": len(replicas), "replica_nodes": sorted(held),
               "nodes_without_replica": sorted({ev.node for ev in rec.audit} - set(held)),
               "accounted_by_replica_only": len(only), "origin_trail_holes": len(holes),
               "replica_mismatch": len(differ),
               "replica_missing_grants": len(absent), "not_replicated_at_end": dict(sorted(behind.items())),
               "not_replicated_oldest_age_s": dict(sorted(oldest_behind.items()))}
    return only, figures, reasons


def check_token_loss(rec: Recording, *, inflight_s: float | None = None,
                     replicas: Sequence[AuditEvent] | None = None) -> Verdict:
    """Every grant is in all sources exactly once.

    A node killed or paused (and not back at the end) may die with grants it audited but had not
    gossiped yet: those within ``inflight_s`` before its death are counted as
    ``unpropagated_at_death``, not as loss; anything older is loss.  While a partition or blackhole
    is still in force at the end, peers that lag are ``unverified``.  A peer's view that lacks only
    grants made after it was taken, or within ``inflight_s`` before (by the view's own wall clock), is
    ``granted_after_view``, not loss: after an overloaded run the nodes still serve requests the router
    and the client gave up on, and those grants reach the audit trails after the final views.

    ``inflight_s`` defaults to :data:`INFLIGHT_S` plus the nodes' spend publication delay
    (:func:`~workbench.check.verdict.spend_publication_delay_s`: a strict node publishes a key's spends
    up to 0.25 s late, so a peer's view may lack them for that much longer).

    ``replicas``: the replica trails' events; by default read from :func:`replica_folder` (the one
    thing this check reads from disk: the replicas stay where the cluster's holders wrote them).
    """
    scenario = scenario_of(rec)
    if inflight_s is None:
        inflight_s = INFLIGHT_S + spend_publication_delay_s(scenario)
    log = build_log(rec.faults, scenario.topology) if scenario is not None else None
    reasons: list[str] = []
    replica_figures: dict[str, Any] = {"replicas": "none (replication off, or no replica folder)"}
    audit = list(rec.audit)
    if replicas is None:
        folder = replica_folder(rec)
        try:
            replicas = read_replicas(folder) if folder is not None else []
        except (OSError, ValueError) as exc:
            reasons.append(f"the replica trails could not be read: {exc}")
            replicas = []
    if replicas:
        only, replica_figures, replica_reasons = _replica_source(rec, replicas, rec.started_wall, rec.ended_s)
        audit += only
        reasons += replica_reasons

    # -- source 1 against source 2: request ids
    audit_ids = Counter(ev.request_id for ev in audit if ev.request_id)
    audit_cost = {ev.request_id: ev.cost for ev in audit if ev.request_id}
    admitted = [r for r in rec.requests if r.admitted]
    with_id = [r for r in admitted if r.request_id]
    no_id = len(admitted) - len(with_id)
    missing = [r.request_id for r in with_id if r.request_id not in audit_ids]
    answered_ids = {r.request_id for r in with_id}
    seen_ids = {r.request_id: r for r in rec.requests if r.request_id}
    unanswered = [rid for rid in audit_ids if rid not in answered_ids]
    unanswered_as_error = sum(1 for rid in unanswered if rid in seen_ids)
    # A node killed after auditing a grant but before answering, or one that held a request (paused,
    # blackholed) and granted it when it came back after the router had retried it elsewhere under the
    # same id.  The tokens were spent twice (both are in the envelope), the client got one answer: an
    # orphaned grant at a fault, reported, not a double grant.  A heal has no target: every node.
    deaths = [(f.t_s, f.target) for f in rec.faults if f.action in _ORPHANING]
    by_rid: dict[str, list[AuditEvent]] = defaultdict(list)
    for ev in audit:
        if ev.request_id and audit_ids[ev.request_id] > 1:
            by_rid[ev.request_id].append(ev)
    orphaned: list[str] = []
    duplicated: list[str] = []
    router_seen = {rid for sample in rec.routers for rid in sample.double_grants}
    for rid, events in sorted(by_rid.items()):
        nodes = {ev.node for ev in events}
        died = [ev for ev in events if any(abs(rec.started_wall + t - ev.ts) <= inflight_s
                                           and target in ("", ev.node, ev.region) for t, target in deaths)]
        if len(nodes) == len(events) and len(events) - len(died) <= 1 and died and rid not in router_seen:
            orphaned.append(rid)
        else:
            duplicated.append(rid)
    # The router's own evidence (edge_server/hedge_watch.py): a hedged check whose losing try it followed
    # to a grant.  Both nodes answered, so neither died with the grant: a double grant even next to a
    # fault (a node paused for less than its try's deadline grants when it resumes).
    router_not_audited = sorted(rid for rid in router_seen if audit_ids[rid] < 2)
    after_retry = [rid for rid in duplicated if rid in seen_ids and seen_ids[rid].retried_from]
    cost_mismatch = [r.request_id for r in with_id if r.request_id in audit_cost
                     and audit_ids[r.request_id] == 1 and audit_cost[r.request_id] != r.cost]
    if missing:
        reasons.append(f"{len(missing)} admitted replies have no audit event (e.g. {missing[:3]})")
    if duplicated:
        reasons.append(f"{len(duplicated)} request ids granted more than once (e.g. {duplicated[:3]})")
    if router_not_audited:
        reasons.append(f"{len(router_not_audited)} double grants the router saw are not in two audit trails "
                       f"(e.g. {router_not_audited[:3]})")
    if cost_mismatch:
        reasons.append(f"{len(cost_mismatch)} audited costs differ from the request's (e.g. {cost_mismatch[:3]})")
    if admitted and not with_id:
        reasons.append(f"{NOTHING_MEASURED}: none of the {len(admitted)} admitted replies carries a request id")

    # -- source 3 against source 2: every peer's final view of every node's count
    audited: dict[tuple[str, str], dict[int, list[AuditEvent]]] = defaultdict(lambda: defaultdict(list))
    for ev in audit:
        audited[(ev.node, ev.key)][ev.gen].append(ev)
    views = _final_views(rec, log)
    nodes = sorted({ev.node for ev in audit} | {n for s in views.values() for e in s.counts.values() for n in e})
    ahead: list[str] = []
    behind: list[str] = []
    unpropagated: list[str] = []
    unverified: list[str] = []
    after_view: list[str] = []  # the missing grants are younger than the view: it could not know them
    compared = 0
    keys = sorted({k for (_n, k) in audited} | {k for s in views.values() for k in s.counts})
    for node in nodes:
        death = log.last_death(node) if log is not None and log.down_at_end(node) is not None else None
        for key in keys:
            gens = audited.get((node, key), {})
            newest = max(gens, default=None)
            for peer, view in sorted(views.items()):
                if peer == node:
                    continue  # a node's own counter is rebuilt from its audit: not an independent source
                gen, count = view.counts.get(key, {}).get(node, (None, 0))
                if newest is None and gen is None:
                    continue
                compared += 1
                total = sum(ev.cost for ev in gens.get(gen, [])) if gen is not None else 0
                where = f"{peer}'s view of {node} key {key!r}"
                if gen is not None and ((gen not in gens and count > 0) or count > total):
                    ahead.append(f"{where}: gen {gen} count {count}, audited {total}")
                    continue
                # the view may be of an older generation: then the newest one is the reference
                ref = newest if newest is not None and (gen is None or newest > gen) else gen
                events = sorted(gens.get(ref, []), key=lambda e: e.ts)
                want = sum(ev.cost for ev in events)
                have = count if ref == gen else 0
                if have >= want:
                    continue
                text = f"{where}: gen {gen} count {count}, audited gen {ref} {want}"
                late = _tail(events, want - have)
                if all(ev.ts >= view.wall - inflight_s for ev in late):
                    after_view.append(text + " (granted after, or just before, the view was taken)")
                elif death is not None and all(rec.started_wall + death - inflight_s <= ev.ts for ev in late):
                    unpropagated.append(text + " (granted just before it died)")
                elif log is not None and log.network_cuts:
                    unverified.append(text + " (a partition or blackhole was still in force at the end)")
                else:
                    behind.append(text)
    if ahead:
        reasons.append(f"{len(ahead)} peer views count tokens the audit trails never recorded: " + "; ".join(ahead[:3]))
    if behind:
        reasons.append(f"{len(behind)} peer views never learnt of audited grants: " + "; ".join(behind[:3]))
    peers_note = None
    if len(views) < 2 and scenario is not None and len(scenario.topology.node_ids) < 2:
        peers_note = "single node: no peer view to compare (not applicable)"
    elif not views and (audit or admitted):
        reasons.append(f"{NOTHING_MEASURED}: no node's final state was recorded (no peer view to compare)")
    if not rec.requests and not audit:
        reasons.append(f"{NOTHING_MEASURED}: no request and no audit event recorded")
    silent = sorted({ev.node for ev in audit} - set(views))
    figures = {
        "admitted_replies": len(admitted), "audit_events": len(rec.audit), "peer_views_compared": compared,
        "missing": len(missing), "answered_without_audit": len(missing),
        "duplicated": len(duplicated), "double_grants": len(duplicated), "orphaned_at_kill": len(orphaned),
        "double_grants_after_retry": len(after_retry), "router_double_grants": _router_double_grants(rec),
        "router_double_grants_listed": len(router_seen), "router_double_grants_not_audited": len(router_not_audited),
        "unanswered_grants": len(unanswered), "unanswered_grants_answered_as_error": unanswered_as_error,
        "cost_mismatch": len(cost_mismatch), "peer_view_ahead": len(ahead), "peer_view_behind": len(behind),
        "mismatched": len(ahead) + len(behind), "unpropagated_at_death": unpropagated, "unverified": unverified,
        "granted_after_view": after_view, "inflight_allowance_s": inflight_s,
        "replies_without_request_id": no_id, "nodes_without_final_state": silent,
        "token_loss": (len(missing) + len(duplicated) + len(cost_mismatch) + len(ahead) + len(behind)
                       + replica_figures.get("replica_mismatch", 0) + replica_figures.get("replica_missing_grants", 0)
                       + replica_figures.get("origin_trail_holes", 0)),
        "looked_at": (f"{len(with_id)} admitted replies with request ids, {len(audit)} audit events, "
                      f"{compared} peer views (of {len(views)} nodes' final states), "
                      f"{len(replicas)} replica events"),
        **replica_figures,
    }
    if peers_note:
        figures["note"] = peers_note
    return Verdict(not reasons, reasons, figures)


def _router_double_grants(rec: Recording) -> int | None:
    """The router's ``router_hedge_losers_total{result="double_grant"}`` at its last scrape (summed over
    routes); None when the history has no such sample (an older router, or no router)."""
    by_t: dict[float, float] = defaultdict(float)
    for m in rec.metrics:
        if m.name == "router_hedge_losers_total" and m.labels.get("result") == "double_grant":
            by_t[m.t_s] += m.value
    return int(by_t[max(by_t)]) if by_t else None


def _tail(events: list[AuditEvent], tokens: int) -> list[AuditEvent]:
    """The latest events that make up ``tokens`` (what a lagging view is missing)."""
    out, acc = [], 0
    for ev in reversed(events):
        if acc >= tokens:
            break
        out.append(ev)
        acc += ev.cost
    return out
