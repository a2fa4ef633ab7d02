"""Replication in ``/metrics``: the sender's recovery point and backlog, the holder's refusals.

Read at scrape time from :class:`~edge_server.audit.replica.Replicator` and
:class:`~edge_server.audit.replica.ReplicaStore` (nothing on the hot path).  ``edge_audit_replication_lag_seconds``
is the recovery point: the age of the oldest event the holder has not acknowledged, what losing this
node's disk now would lose; the events behind are on disk (segments), not in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_server.audit.replica import ReplicaStore, Replicator

__all__ = ["ReplicationCollector"]


class ReplicationCollector(Collector):
    """Metric families of one node's replication (sender side only when it replicates)."""

    def __init__(self, sender: Replicator | None, store: ReplicaStore) -> None:
        self.sender, self.store = sender, store

    def collect(self) -> Iterator[Metric]:
        sender = self.sender
        if sender is not None:
            labels = ["holder"]
            target = [sender.target.id]
            for name, doc, value in (
                    ("edge_audit_replication_lag_seconds", "Recovery point: age of the oldest event the "
                     "replica holder has not acknowledged (0: up to date)", sender.lag_s(time.time())),
                    ("edge_audit_replication_lag_events", "Events the replica holder has not acknowledged",
                     sender.audit.last_seq - sender.acked),
                    ("edge_audit_replication_acked_seq", "Newest seq the replica holder acknowledged", sender.acked),
                    ("edge_audit_replication_conflict", "1 while the holder holds another trail of this node",
                     1 if sender.conflict else 0)):
                gauge = GaugeMetricFamily(name, doc, labels=labels)
                gauge.add_metric(target, value)
                yield gauge
            for name, doc, value in (
                    ("edge_audit_replication_messages", "Replica messages acknowledged or refused", sender.messages),
                    ("edge_audit_replication_events", "Events the holder appended", sender.events),
                    ("edge_audit_replication_failures", "Replica sends that failed (resent)", sender.failures)):
                counter = CounterMetricFamily(name, doc, labels=labels)
                counter.add_metric(target, value)
                yield counter
        held = GaugeMetricFamily("edge_audit_replica_held_seq", "Newest seq held of another node's trail",
                                 labels=["origin"])
        for origin, replica in sorted(self.store.logs.items()):
            held.add_metric([origin], replica.last_seq)
        yield held
        refused = CounterMetricFamily("edge_audit_replica_refused", "Replica messages refused", labels=["reason"])
        for reason, n in sorted(self.store.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        yield CounterMetricFamily("edge_audit_replica_received", "Events appended to replicas held",
                                  value=self.store.received)
