"""The targets convention (benchmarks/_targets.py): a missed target is reported, never a failure; a crash,
a missing or stale results file, or invalid data is."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks._targets import check_targets, classify, legacy_targets, summary_table, target  # noqa: E402


def _results(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _doc(*targets: dict) -> dict:
    return {"benchmark": "b", "quick": True, "figures": {"x": 1}, "targets": list(targets)}


def test_target_states_met_missed_and_not_measured() -> None:
    met = target("open p50", 900.0, "<", 2000, "ms")
    assert met["met"] is True and met["target"] == "< 2,000 ms" and met["measured"] == 900.0
    assert target("open p50", 2300.0, "<", 2000, "ms")["met"] is False
    assert target("open p50", None, "<", 2000, "ms")["met"] is None
    assert target("open p50", float("nan"), "<", 2000)["met"] is None
    with pytest.raises(ValueError, match="op"):
        target("x", 1, "=<", 2)


def test_a_missed_target_with_exit_0_is_missed_not_failed(tmp_path: Path) -> None:
    started = time.time()
    path = _results(tmp_path / "b.json", _doc(target("a", 1, ">=", 2), target("b", 3, ">=", 2)))
    status, why, targets = classify(0, path, started)
    assert status == "missed" and "1 of 2" in why and len(targets) == 2
    path = _results(tmp_path / "c.json", _doc(target("b", 3, ">=", 2)))
    assert classify(0, path, started)[0] == "ok"


def test_exit_1_is_a_missed_target_only_when_the_fresh_results_say_so(tmp_path: Path) -> None:
    started = time.time()
    legacy = _results(tmp_path / "r.json", {"figures": {"max_open_ms": 2000, "pass": False}})
    status, why, targets = classify(1, legacy, started)
    assert status == "missed" and "older convention" in why
    assert [t["met"] for t in targets] == [False]
    all_met = _results(tmp_path / "m.json", _doc(target("a", 3, ">=", 2)))
    assert classify(1, all_met, started)[0] == "failed"  # exit 1 with nothing missed: a crash
    assert classify(2, legacy, started)[0] == "failed"  # only the one older missed-target status
    assert classify(124, legacy, started)[1].endswith("(over its time budget)")


def test_missing_stale_and_invalid_results_are_failures(tmp_path: Path) -> None:
    started = time.time()
    assert classify(0, tmp_path / "absent.json", started)[:2] == ("failed", "exit 0; absent.json not written")
    stale = _results(tmp_path / "stale.json", _doc())
    os.utime(stale, (started - 60, started - 60))
    assert "stale" in classify(0, stale, started)[1]
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    assert classify(0, broken, started)[0] == "failed"
    bad_target = _results(tmp_path / "bad.json", {"figures": {}, "targets": [{"name": "x", "met": "yes"}]})
    status, why, _ = classify(0, bad_target, started)
    assert status == "failed" and "targets[0]" in why
    not_a_doc = _results(tmp_path / "list.json", [1, 2])
    assert classify(0, not_a_doc, started)[0] == "failed"


def test_check_targets_names_the_entry_and_key() -> None:
    good = [target("a", 1, "<", 2)]
    assert check_targets(good) == good
    with pytest.raises(ValueError, match=r"targets\[0\]: missing"):
        check_targets([{"name": "a"}])
    with pytest.raises(ValueError, match=r"targets\[0\]\.op"):
        check_targets([{**good[0], "op": "~"}])
    with pytest.raises(ValueError, match="a list"):
        check_targets({"a": 1})


def test_legacy_results_give_their_pass_flags_and_rows() -> None:
    figures = {"pass": True, "scenarios": {"steady": {"pass": False, "deviation_pct": 4.1}},
               "meets_target": {"p99": False, "errors": True}, "rows": [{"row": "memory", "met": True}]}
    found = {t["name"]: t["met"] for t in legacy_targets(figures)}
    assert found == {"pass": True, "scenarios.steady.pass": False, "meets_target.p99": False,
                     "meets_target.errors": True, "memory": True}


def test_summary_table_shows_every_target_with_its_figure() -> None:
    runs = {"bench_x.py": {"targets": [target("open p50", 2310.0, "<", 2000, "ms"), target("n", None, ">=", 1)]}}
    text = summary_table(runs, lambda rows, header: "\n".join(" | ".join(map(str, r)) for r in [header, *rows]))
    assert "bench_x.py | open p50 | < 2,000 ms | 2310 ms | MISSED" in text
    assert "not measured" in text
    assert summary_table({}, lambda rows, header: "") == "(no targets reported)"


def test_a_results_file_names_no_temporary_folder_and_no_checkout_path() -> None:
    import tempfile

    from benchmarks._procs import REPO, scrub_paths

    work = f"{tempfile.gettempdir()}/bench-audit-h9uadqw9"
    text = f'"wrk -s {work}/disk/random_keys.lua http://127.0.0.1:1/", "{REPO}/benchmarks/x.py"'
    clean = scrub_paths(text)
    assert clean == '"wrk -s <workdir>/disk/random_keys.lua http://127.0.0.1:1/", "<repo>/benchmarks/x.py"'
