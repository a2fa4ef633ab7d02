"""What happened in a run: the record types (one per thing) and the results folder that stores them."""

from workbench.history.recording import FORMAT_VERSION, Recording, RecordingError
from workbench.history.records import (
    CUT_AT_END,
    AuditEvent,
    FaultRecord,
    MetricSample,
    ProcessSample,
    RequestRecord,
    RouterSample,
    StateSample,
    parse_metrics,
)

__all__ = [
    "CUT_AT_END",
    "FORMAT_VERSION",
    "AuditEvent",
    "FaultRecord",
    "MetricSample",
    "ProcessSample",
    "Recording",
    "RecordingError",
    "RequestRecord",
    "RouterSample",
    "StateSample",
    "parse_metrics",
]
