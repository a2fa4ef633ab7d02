"""The audit trail: segments of hash-chained events, signed heads, checkpoints, retention, tools.

``AuditLog`` is what a node writes through; ``verify``, ``export`` and ``usage`` are what the
``edge-server audit`` commands run on trails at rest (live, archived or copied elsewhere).
"""

from edge_server.audit.log import AuditLog, AuditUnavailable
from edge_server.audit.recovery import AuditCorrupt, Recovered
from edge_server.audit.seal import Retention

__all__ = ["AuditCorrupt", "AuditLog", "AuditUnavailable", "Recovered", "Retention"]
