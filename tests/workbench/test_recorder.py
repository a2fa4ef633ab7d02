"""Recording: records round-trip through a results folder; bad folders are refused clearly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.history import (
    FORMAT_VERSION,
    AuditEvent,
    FaultRecord,
    MetricSample,
    ProcessSample,
    Recording,
    RecordingError,
    RequestRecord,
    RouterSample,
    StateSample,
    parse_metrics,
)
from workbench.spec.scenario import Scenario

STATE = {"node": "eu-1", "region": "eu", "time": 1000.5, "change_seq": 3, "live_peers": ["us-1"],
         "keys": {"tenant-0000": {"global": 7, "nodes": {"eu-1": {"gen": 2, "count": 5},
                                                          "us-1": {"gen": 1, "count": 2}},
                                  "level": 3.0, "rate": 10.0, "burst": 10.0}}}
ROUTER_STATE = {"clock": 5.0, "panic": False, "inflight": 3, "nodes": [
    {"id": "eu-1", "region": "eu", "healthy": True, "usable": True, "evidence": None, "reason": "ok",
     "last_check_ms": 1.2},
    {"id": "us-1", "region": "us", "healthy": False, "usable": False, "evidence": "refused", "reason": "down"}]}
AUDIT = {"seq": 4, "id": "eu-1:4", "key": "tenant-0000", "cost": 1, "node": "eu-1", "region": "eu",
         "ts": 1000.25, "request_id": "r-1", "gen": 2, "extra_field_from_later_server": True}


def sample_recording() -> Recording:
    rec = Recording(scenario=Scenario.build().to_dict(), started_wall=1000.0, ended_s=30.0, complete=True,
                    extra={"generator_lag_p99_ms": 1.5})
    rec.requests += [RequestRecord(0.1, 0.1005, 0.15, "eu", "eu", "eu-1", "tenant-0000", 1, 200, "", "r-1"),
                     RequestRecord(0.2, 0.2, 0.21, "us", "", "", "tenant-0000", 1, 0, "ConnectionRefused"),
                     RequestRecord(0.3, 0.3, 0.31, "ap", "ap", "ap-1", "k", 2, 200, "", "r-3", "check", False)]
    rec.faults.append(FaultRecord(10.0, "kill", "us", {"pids": [123]}))
    rec.metrics.append(MetricSample(1.0, "eu-1", "edge_requests_total", {"route": "invoke", "status": "200"}, 5.0))
    rec.states.append(StateSample.from_state(1.0, STATE))
    rec.audit.append(AuditEvent.from_json(AUDIT))
    rec.processes.append(ProcessSample(1.0, "eu-1", 12.5, 40.2))
    rec.routers.append(RouterSample.from_state(1.0, ROUTER_STATE))
    return rec


def test_records_compute_what_callers_need() -> None:
    r = RequestRecord(1.0, 1.25, 1.5, "eu", "us", "us-1", "t", status=200)
    assert r.latency_ms == pytest.approx(500.0) and r.service_ms == pytest.approx(250.0)
    assert r.admitted
    assert not RequestRecord(0, 0, 0, "eu", "", "", "t", status=429).admitted
    assert not RequestRecord(0, 0, 0, "eu", "eu", "eu-1", "t", status=200, route="check", allowed=False).admitted
    s = StateSample.from_state(2.0, STATE)
    assert s.global_counts == {"tenant-0000": 7}
    assert s.counts["tenant-0000"]["eu-1"] == (2, 5) and s.wall == 1000.5
    assert AuditEvent.from_json(AUDIT).request_id == "r-1"
    router = RouterSample.from_state(2.0, ROUTER_STATE)  # the routing table, nothing the metrics hold
    assert router.nodes == {"eu-1": {"usable": True, "healthy": True, "evidence": "", "reason": "ok"},
                            "us-1": {"usable": False, "healthy": False, "evidence": "refused", "reason": "down"}}
    assert Recording(started_wall=1000.0).wall_to_run(1000.25) == 0.25


def test_save_load_round_trip(tmp_path) -> None:
    rec = sample_recording()
    rec.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "audit.jsonl", "faults.jsonl", "meta.json", "metrics.jsonl", "processes.jsonl", "requests.jsonl",
        "routers.jsonl", "states.jsonl"]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["complete"] is True
    back = Recording.load(tmp_path / "run")
    assert back == rec
    assert Scenario.from_dict(back.scenario) == Scenario.build()


def test_incomplete_run_is_marked(tmp_path) -> None:
    rec = sample_recording()
    rec.mark_incomplete("interrupted (KeyboardInterrupt)")
    back = Recording.load(rec.save(tmp_path / "r"))
    assert not back.complete and back.incomplete_reason == "interrupted (KeyboardInterrupt)"


def test_save_overwrites_a_folder(tmp_path) -> None:
    rec = sample_recording()
    rec.save(tmp_path / "r")
    rec.requests = rec.requests[:1]
    rec.save(tmp_path / "r")
    assert len(Recording.load(tmp_path / "r").requests) == 1


def test_load_refuses_bad_folders(tmp_path) -> None:
    with pytest.raises(RecordingError, match="no such results folder"):
        Recording.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordingError, match=r"no meta\.json"):
        Recording.load(tmp_path / "empty")
    folder = sample_recording().save(tmp_path / "old")
    meta = json.loads((folder / "meta.json").read_text())
    for version, word in ((0, "older"), (FORMAT_VERSION + 1, "unknown"), (None, "unknown")):
        meta["format_version"] = version
        (folder / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(RecordingError, match=f"{word} format") as info:
            Recording.load(folder)
        assert f"format_version {FORMAT_VERSION}" in str(info.value)


def test_load_names_a_bad_line(tmp_path) -> None:
    folder = sample_recording().save(tmp_path / "r")
    with (folder / "requests.jsonl").open("a") as fh:
        fh.write('{"intended_s": 1}\n')
    with pytest.raises(RecordingError, match=r"requests\.jsonl:4: bad RequestRecord"):
        Recording.load(folder)
    folder = sample_recording().save(tmp_path / "r2")
    (folder / "audit.jsonl").unlink()
    with pytest.raises(RecordingError, match="missing"):
        Recording.load(folder)
    folder = sample_recording().save(tmp_path / "r3")
    (folder / "faults.jsonl").write_text("")
    with pytest.raises(RecordingError, match=r"meta\.json says 1"):
        Recording.load(folder)


def test_save_refuses_nan(tmp_path) -> None:
    rec = sample_recording()
    rec.processes.append(ProcessSample(1.0, "x", float("nan"), 1.0))
    with pytest.raises(ValueError):
        rec.save(tmp_path / "r")


def test_hundred_thousand_requests_round_trip(tmp_path) -> None:
    """Correctness at size; how long it takes is a figure for a benchmark, not a test's pass mark
    (a shared machine makes any bound flaky)."""
    rec = Recording(started_wall=0.0)
    rec.requests = [RequestRecord(i * 1e-4, i * 1e-4, i * 1e-4 + 0.01, "eu", "eu", "eu-1", f"tenant-{i % 50:04d}",
                                  1, 200 if i % 3 else 429, "", f"r-{i}") for i in range(100_000)]
    rec.save(tmp_path / "big")
    back = Recording.load(tmp_path / "big")
    assert back.requests == rec.requests


def test_parse_metrics() -> None:
    text = ("# HELP edge_requests_total Requests.\n# TYPE edge_requests_total counter\n"
            'edge_requests_total{route="invoke",status="200"} 12.0\n'
            "# HELP edge_live_keys Keys.\n# TYPE edge_live_keys gauge\nedge_live_keys 3.0\n"
            "# HELP g NaN gauge.\n# TYPE g gauge\ng NaN\n")
    samples = parse_metrics(text, 1.5, "eu-1")
    assert MetricSample(1.5, "eu-1", "edge_requests_total", {"route": "invoke", "status": "200"}, 12.0) in samples
    assert MetricSample(1.5, "eu-1", "edge_live_keys", {}, 3.0) in samples
    assert all(s.name != "g" for s in samples)


def test_parse_metrics_keeping_some_names_gives_the_samples_of_the_whole_parse_it_keeps() -> None:
    """The drill's periodic scrape parses only the overload lines of a real router page (a router's
    own registry, exposed as its /metrics is): the same samples as the whole page's, filtered."""
    from prometheus_client import generate_latest

    from edge_server.router_metrics import RouterMetrics
    from workbench.run.drill import keep_overload_sample

    m = RouterMetrics()
    m.requests.labels("check", "200", "eu", "eu").inc(7)
    m.shed.labels("check").inc(2)
    m.upstream.labels("eu").observe(0.01)
    text = generate_latest(m.registry).decode()

    def key(s: MetricSample) -> tuple:
        return s.name, sorted(s.labels.items()), s.value

    whole = sorted(key(s) for s in parse_metrics(text, 2.0, "router") if keep_overload_sample(s.name))
    kept = sorted(key(s) for s in parse_metrics(text, 2.0, "router", keep_overload_sample))
    assert kept == whole
    assert ("router_requests_total", [("home", "eu"), ("region", "eu"), ("route", "check"), ("status", "200")],
            7.0) in kept
    assert not any(name.endswith("_bucket") for name, _l, _v in kept)


text_ = st.text(max_size=12)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
requests = st.builds(RequestRecord, floats, floats, floats, text_, text_, text_, text_, st.integers(1, 10**6),
                     st.integers(0, 599), text_, text_, st.sampled_from(["invoke", "check"]),
                     st.sampled_from([None, True, False]))
states = st.builds(StateSample, floats, text_, floats, st.dictionaries(text_, st.integers(0, 2**53), max_size=3),
                   st.dictionaries(text_, st.dictionaries(text_, st.tuples(st.integers(0, 2**40),
                                                                           st.integers(0, 2**40)), max_size=3),
                                   max_size=3))


@settings(max_examples=40, deadline=None)
@given(st.lists(requests, max_size=20), st.lists(states, max_size=5))
def test_round_trip_property(tmp_path_factory, reqs, sts) -> None:
    folder = tmp_path_factory.mktemp("prop")
    rec = Recording(requests=reqs, states=sts, started_wall=5.0)
    rec.save(folder)
    assert Recording.load(folder) == rec
