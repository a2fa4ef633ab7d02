"""A voter killed with kill -9 and restarted, with real processes: from its saved ledger it grants at
once but never overlaps a grant it made before; with its ledger gone it grants nothing for a whole
reclaim time.  Judged on behaviour read from ``/v1/state`` and the ledger file, never on timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from procs import metric_value, wait_until
from test_strict_node import StrictProcs

from edge_server.config import StrictConfig

LEASE_MS = 3000.0  # long enough that the restarted voter's saved grants still count when we look


class LongLease(StrictProcs):
    strict = StrictConfig(lease_ms=LEASE_MS)


def voter(c: LongLease, node: str) -> dict:
    return c.state(node)["strict"]["voter"]


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_voter_killed_and_restarted_never_overlaps_its_old_grants(tmp_path: Path) -> None:
    with LongLease(tmp_path, rate=100, burst=100) as c:
        assert voter(c, "eu-1")["started_from"] == "none"  # a first start: it waits one reclaim time
        wait_until(lambda: all(c.state(n)["strict"]["lease_valid"] for n in c.nodes), timeout=20.0,
                   what="every node's first lease")
        assert metric_value(c.metrics("eu-1"), "edge_strict_voter_ledger_writes_total", outcome="ok") >= 1
        ledger = c.audit_dir / "voter-eu.ledger.json"
        old_inc = c.state("eu-1")["strict"]["incarnation"]

        c.kill9("eu-1")
        saved = json.loads(ledger.read_text())  # exactly what the restarted voter reads
        assert saved["incarnations"]["eu-1"] == old_inc and saved["granted"], saved
        capacity = 2 / 3  # quorum 2 of 3 voters
        c.restart("eu-1")
        v = voter(c, "eu-1")
        assert v["started_from"] == "restored" and v["epoch"] == saved["epoch"]
        assert v["incarnations"]["eu-1"] in (old_inc, c.state("eu-1")["strict"]["incarnation"])
        # every grant it made before the kill still counts, for a whole reclaim time from its start ...
        for node, (_inc, share) in saved["granted"].items():
            assert v["ledger"].get(node, 0.0) >= share - 1e-9, (node, share, v)
        # ... and nothing it grants after the restart overlaps them
        for _ in range(5):
            v = voter(c, "eu-1")
            assert sum(v["ledger"].values()) <= capacity + 1e-9, v
            assert sum(c.state(n)["strict"]["phi"] for n in c.nodes) <= 1 + 1e-9
        # its host's new incarnation waits until the old incarnation's saved grant has run out
        wait_until(lambda: voter(c, "eu-1")["refused"].get("old_incarnation_lease", 0) >= 1, timeout=10.0,
                   what="the new eu-1 incarnation refused while the old one's grant counts")

        c.kill9("eu-1")
        ledger.unlink()  # the data directory lost (its ledger part)
        c.restart("eu-1")
        assert voter(c, "eu-1")["started_from"] == "none"
        wait_until(lambda: voter(c, "eu-1")["refused"].get("epoch_settling", 0) >= 1, timeout=10.0,
                   what="the voter with no ledger refusing while it waits")
        assert voter(c, "eu-1")["epoch"] >= 1
