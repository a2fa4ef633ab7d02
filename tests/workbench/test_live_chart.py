"""The live chart sends each point once (extend), and a view that opens late gets the whole history."""

from __future__ import annotations

from typing import Any

from workbench.ui.live_chart import LiveChart

PANELS = [{"title": "t", "series": [{"id": "a", "name": "a", "color": "#000", "dash": "solid"}]}]


def test_extend_sends_only_new_points_and_sync_sends_all():
    chart = LiveChart(PANELS, x_max=10)
    sent: list[Any] = []
    chart.send = lambda content, buffers=None: sent.append(content)  # type: ignore[method-assign]
    chart.extend([0.5, 1.0], {"a": [1.0, 2.0]})
    chart.extend([1.5], {"a": [None]})
    chart.extend([], {"a": []})  # nothing new: nothing sent
    assert sent == [{"kind": "extend", "t": [0.5, 1.0], "y": {"a": [1.0, 2.0]}},
                    {"kind": "extend", "t": [1.5], "y": {"a": [None]}}]
    chart._on_msg(chart, {"kind": "sync"}, [])
    assert sent[-1] == {"kind": "reset", "t": [0.5, 1.0, 1.5], "y": {"a": [1.0, 2.0, None]}}
    chart._on_msg(chart, {"kind": "other"}, [])
    assert len(sent) == 3
