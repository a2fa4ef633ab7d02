"""What happened in a run: the record types (one per thing) and the results folder that stores them."""

from workbench.history.recording import FORMAT_VERSION, Recording, RecordingError
from workbench.history.records import (
    AuditEvent,
    FaultRecord,
    MetricSample,
    ProcessSample,
    RequestRecord,
    StateSample,
    parse_metrics,
)

__all__ = [
    "FORMAT_VERSION",
    "AuditEvent",
    "FaultRecord",
    "MetricSample",
    "ProcessSample",
    "Recording",
    "RecordingError",
    "RequestRecord",
    "StateSample",
    "parse_metrics",
]
