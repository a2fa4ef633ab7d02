"""A node's boot id grows across restarts even when its clock went back (peers would refuse it)."""

from __future__ import annotations

from pathlib import Path

from edge_server.boot import next_boot, take_boot


def test_the_wall_clock_decides_unless_it_went_back() -> None:
    assert next_boot(5_000, None) == 5_000
    assert next_boot(5_000, 4_000) == 5_000
    assert next_boot(5_000, 9_000) == 9_001  # clock stepped back: still newer than the last boot
    assert next_boot(9_000, 9_000) == 9_001


def test_the_last_boot_is_kept_in_the_data_directory(tmp_path: Path) -> None:
    first = take_boot(tmp_path, "eu-1", 10_000)
    assert first == 10_000 and (tmp_path / "eu-1.boot").read_text().strip() == "10000"
    assert take_boot(tmp_path, "eu-1", 3_000) == 10_001  # restarted with its clock 7 s behind
    assert take_boot(tmp_path, "us-1", 3_000) == 3_000  # per node
    (tmp_path / "eu-1.boot").write_text("garbage")  # a torn file: the wall clock decides
    assert take_boot(tmp_path, "eu-1", 2_000) == 2_000
