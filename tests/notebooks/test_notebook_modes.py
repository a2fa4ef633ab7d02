"""``mode`` in every notebook and in ``workbench drill``: strict is accepted, a bad mode (or a strict
cluster the nodes would refuse) is refused naming the parameter before a kernel or a process starts,
and quickstart really runs strict nodes and judges them against the plain envelope."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nbformat
import pytest

from workbench.cli import main as workbench_main
from workbench.run.notebooks import NotebookParameterError, check_parameters, run_notebook, run_notebook_cli
from workbench.spec.scenario import Scenario

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
WITH_MODE = ["quickstart", "failover_drill", "tuning", "capacity"]  # partition takes `modes`


@pytest.mark.parametrize("name", WITH_MODE)
def test_mode_strict_is_accepted_and_reaches_the_scenario(name: str) -> None:
    path = NOTEBOOKS / f"{name}.ipynb"
    assert check_parameters(path, {"mode": "strict"}) == {"mode": "strict"}
    assert check_parameters(path, {"mode": "eventual"}) == {"mode": "eventual"}
    nb = nbformat.read(path, as_version=4)
    params = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert 'mode = "eventual"' in params, f"{name}: eventual must stay the default"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code" and c.source != params)
    assert "mode=mode" in code, f"{name}: the mode parameter is not passed to the scenario"
    assert 'print(f"verdict: pass: ' in code or 'print("verdict: pass: ' in code, f"{name}: no verdict line"


@pytest.mark.parametrize("name", WITH_MODE)
def test_bad_mode_is_refused_before_a_kernel_starts(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.ipynb"
    with pytest.raises(NotebookParameterError, match=r"parameter 'mode'.*'eventual', 'strict'.*'bogus'"):
        run_notebook(NOTEBOOKS / f"{name}.ipynb", {"mode": "bogus"}, out)
    with pytest.raises(NotebookParameterError, match=r"parameter 'regions'.*at least 3 regions in strict mode"):
        run_notebook(NOTEBOOKS / f"{name}.ipynb", {"mode": "strict", "regions": 2}, out)
    assert check_parameters(NOTEBOOKS / f"{name}.ipynb", {"mode": "strict", "regions": 4})
    assert not list(tmp_path.iterdir()), "nothing may be written before the parameters pass"


def test_cli_refuses_a_bad_mode_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(notebook=str(NOTEBOOKS / "quickstart.ipynb"), parameter=[["mode", "bogus"]],
                              out=str(tmp_path / "q.ipynb"), cell_timeout=60)
    assert run_notebook_cli(args) == 2
    err = capsys.readouterr().err
    assert "'mode'" in err and "'eventual', 'strict'" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_every_swept_value_is_checked_in_the_notebooks_mode() -> None:
    tuning = NOTEBOOKS / "tuning.ipynb"
    # The nodes' lease (500 ms) must outlive 3 gossip intervals: fine in eventual mode, refused in strict.
    assert check_parameters(tuning, {"sweep_gossip_ms": [10.0, 200.0]})
    with pytest.raises(NotebookParameterError, match=r"'sweep_gossip_ms'.*at most 166.667 ms in strict mode"):
        check_parameters(tuning, {"sweep_gossip_ms": [10.0, 200.0], "mode": "strict"})
    with pytest.raises(NotebookParameterError, match=r"'sweep_burst'"):
        check_parameters(tuning, {"sweep_burst": [20.0, -1.0]})
    with pytest.raises(NotebookParameterError, match=r"'regions'.*strict mode.*\(in strict mode\)"):
        check_parameters(NOTEBOOKS / "strict_vs_eventual.ipynb", {"regions": 2, "partition_groups": "eu|us"})


def test_drill_mode_flag_is_checked_before_any_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert workbench_main(["drill", "--mode", "bogus", "--out", str(out), "--quiet"]) == 2
    assert "'mode': expected one of 'eventual', 'strict', got 'bogus'" in capsys.readouterr().err
    assert workbench_main(["drill", "--mode", "strict", "--regions", "2", "--out", str(out), "--quiet"]) == 2
    assert "'regions': expected at least 3 regions in strict mode" in capsys.readouterr().err
    nested = Scenario.build(regions=2).to_dict() | {"mode": "strict"}  # the nested form skips build's checks
    (tmp_path / "two.json").write_text(json.dumps(nested), encoding="utf-8")
    assert workbench_main(["drill", "--scenario", str(tmp_path / "two.json"), "--out", str(out), "--quiet"]) == 2
    assert "at least 3 regions in strict mode" in capsys.readouterr().err
    assert not out.exists()
    assert Scenario.build(mode="strict").mode == "strict"


@pytest.mark.notebooks
@pytest.mark.timeout(180)
def test_quickstart_runs_strict_nodes_and_judges_them_against_the_plain_envelope(tmp_path: Path) -> None:
    run = run_notebook(NOTEBOOKS / "quickstart.ipynb", {"mode": "strict", "duration_s": 3.0},
                       tmp_path / "quickstart.ipynb", cell_timeout=120, log_output=False)
    assert run.ok, f"failed at cell {run.failed_cell}: {run.error}"
    assert len(run.runs) == 1 and run.runs[0]["invariants_ok"], run.runs
    folder = Path(run.runs[0]["folder"])
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    assert meta["scenario"]["mode"] == "strict"
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert summary["envelope_slack_s"] == 0.0 and summary["checks"]["envelope"], summary["reasons"]
    assert summary["worst_window_excess_tokens"] <= 0.0
    assert '"edge_strict_' in (folder / "metrics.jsonl").read_text(encoding="utf-8"), "the nodes did not run strict"
    nb = nbformat.read(run.output, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")
    assert "verdict: pass: strict mode, judged against the plain envelope B + R·t (no allowance)" in text, text[-600:]
    assert "envelope held" in text
