"""A light live chart for notebooks: one widget, a few canvas panels, only new points on the wire.

Why not plotly ``FigureWidget`` while a drill runs: each one ships plotly.js (~4.8 MB) as its own
front-end module, and redrawing five of them in full twice a second held the page's main thread for
seconds on a 2-core machine and stalled the load generator (issue 11).  This widget's front end is
~150 lines of canvas drawing; the kernel sends each new bin once (``extend``), the page appends it
and redraws at most once per animation frame.  A view that opens late (a re-rendered output, a
second browser tab) asks the kernel for the whole history once (``sync``).  The final figures of a
run stay plotly (``workbench.ui.charts``), static, drawn once.

It draws, it never computes: every value comes from ``workbench.check`` (the live tracker's series).

DOM contract (tests and benchmarks read it): the view's root is ``div.wb-live`` with ``data-draws``
(redraws so far), ``data-points`` (points drawn in the last redraw) and ``data-first-draw-ms``
(``performance.now()`` of the first redraw that had points); one ``canvas`` per panel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anywidget
import traitlets

__all__ = ["LiveChart", "Series"]

Series = dict[str, Any]  # {"id", "name", "color", "dash": "solid" | "dash" | "dot", "width"?, "legend"?: False}

_ESM = r"""
const DASH = {solid: [], dash: [6, 4], dot: [2, 3]};
function render({ model, el }) {
  const root = document.createElement('div');
  root.className = 'wb-live';
  root.dataset.draws = '0';
  root.dataset.points = '0';
  el.appendChild(root);
  let t = [], y = {}, pending = false, draws = 0;
  const views = model.get('panels').map((p) => {
    const box = document.createElement('div');
    box.className = 'wb-live-panel';
    const head = document.createElement('div');
    head.className = 'wb-live-title';
    head.innerHTML = `<b></b><span class="wb-live-legend"></span>`;
    head.firstChild.textContent = p.title;
    if (p.note) {
      const note = document.createElement('span');
      note.textContent = p.note;
      head.lastChild.appendChild(note);
    }
    for (const s of p.series) {
      if (s.legend === false) continue;
      const item = document.createElement('span');
      const style = {solid: 'solid', dash: 'dashed', dot: 'dotted'}[s.dash] || 'solid';
      item.innerHTML = `<i style="border-top:2px ${style} ${s.color}"></i>`;
      item.appendChild(document.createTextNode(s.name));
      head.lastChild.appendChild(item);
    }
    const canvas = document.createElement('canvas');
    box.appendChild(head);
    box.appendChild(canvas);
    root.appendChild(box);
    return {p, canvas};
  });
  const schedule = () => { if (!pending) { pending = true; requestAnimationFrame(draw); } };
  function ticks(lo, hi, n) {
    const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw || 1)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(+v.toFixed(6));
    return out;
  }
  function drawPanel({p, canvas}, markers, xMax, index) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(200, canvas.clientWidth), h = p.height || 150;
    if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
    if (canvas.height !== Math.round(h * dpr)) { canvas.height = Math.round(h * dpr); canvas.style.height = h + 'px'; }
    const g = canvas.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const L = 48, R = 8, T = 6, B = 20, pw = w - L - R, ph = h - T - B;
    let lo = p.ymin === undefined ? Infinity : p.ymin, hi = -Infinity, n = 0;
    for (const s of p.series) for (const v of (y[s.id] || [])) {
      if (v === null || v === undefined) continue;
      n += 1; if (v < lo) lo = v; if (v > hi) hi = v;
    }
    if (!isFinite(lo)) lo = 0;
    if (!isFinite(hi) || hi <= lo) hi = lo + 1;
    hi += (hi - lo) * 0.08;
    const X = (v) => L + (v / xMax) * pw, Y = (v) => T + ph - ((v - lo) / (hi - lo)) * ph;
    g.font = '10px sans-serif'; g.fillStyle = '#6b7280'; g.strokeStyle = '#e5e7eb'; g.lineWidth = 1; g.setLineDash([]);
    for (const v of ticks(lo, hi, 4)) {
      g.beginPath(); g.moveTo(L, Y(v)); g.lineTo(L + pw, Y(v)); g.stroke();
      g.textAlign = 'right'; g.fillText(String(v), L - 4, Y(v) + 3);
    }
    for (const v of ticks(0, xMax, 6)) { g.textAlign = 'center'; g.fillText(v + ' s', X(v), h - 6); }
    if (lo < 0 && hi > 0) {
      g.strokeStyle = '#9ca3af'; g.beginPath(); g.moveTo(L, Y(0)); g.lineTo(L + pw, Y(0)); g.stroke();
    }
    for (const [mt, label, color, only] of markers) {
      if (only !== undefined && only !== null && only !== index) continue;
      g.strokeStyle = color; g.setLineDash([2, 3]);
      g.beginPath(); g.moveTo(X(mt), T); g.lineTo(X(mt), T + ph); g.stroke();
      g.fillStyle = color; g.textAlign = 'left'; g.fillText(label, X(mt) + 3, T + 9);
    }
    for (const s of p.series) {
      const ys = y[s.id] || [];
      g.strokeStyle = s.color; g.lineWidth = s.width || 1.5; g.setLineDash(DASH[s.dash] || []);
      g.beginPath();
      let up = true;
      for (let i = 0; i < ys.length && i < t.length; i++) {
        if (ys[i] === null || ys[i] === undefined) { up = true; continue; }
        if (up) g.moveTo(X(t[i]), Y(ys[i])); else g.lineTo(X(t[i]), Y(ys[i]));
        up = false;
      }
      g.stroke();
    }
    return n;
  }
  function draw() {
    pending = false;
    const markers = model.get('markers'), xMax = Math.max(model.get('x_max'), t.length ? t[t.length - 1] : 0) || 1;
    let points = 0;
    views.forEach((v, i) => { points += drawPanel(v, markers, xMax, i); });
    draws += 1;
    root.dataset.draws = String(draws);
    root.dataset.points = String(points);
    if (points > 0 && !root.dataset.firstDrawMs) root.dataset.firstDrawMs = String(performance.now());
  }
  const onMsg = (msg) => {
    if (msg.kind === 'reset') { t = msg.t.slice(); y = {}; for (const k in msg.y) y[k] = msg.y[k].slice(); }
    else if (msg.kind === 'extend') {
      for (const v of msg.t) t.push(v);
      for (const k in msg.y) { const a = y[k] || (y[k] = []); for (const v of msg.y[k]) a.push(v); }
    } else return;
    schedule();
  };
  model.on('msg:custom', onMsg);
  model.on('change:markers', schedule);
  model.on('change:x_max', schedule);
  const ro = new ResizeObserver(schedule);
  ro.observe(root);
  model.send({kind: 'sync'});
  schedule();
  return () => { ro.disconnect(); model.off('msg:custom', onMsg); };
}
export default { render };
"""

_CSS = """
.wb-live { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 8px; width: 100%; }
.wb-live-panel { border: 1px solid #e5e7eb; border-radius: 4px; padding: 4px; background: #fff; min-width: 0; }
.wb-live-panel canvas { width: 100%; display: block; }
.wb-live-title { font: 12px sans-serif; color: #111827; display: flex; flex-wrap: wrap; gap: 4px 10px; }
.wb-live-legend { display: contents; color: #374151; }
.wb-live-legend i { display: inline-block; width: 16px; height: 0; margin: 0 3px 3px 0; vertical-align: middle; }
"""


class LiveChart(anywidget.AnyWidget):
    """Panels of lines over the run clock; :meth:`extend` appends new points and sends only those.

    ``panels``: ``[{"title", "series": [Series, ...], "note"?, "height"?, "ymin"?}]`` (fixed at creation);
    ``markers``: ``[[t_s, label, color, panel?], ...]`` drawn as dotted vertical lines on every panel,
    or only on panel number ``panel`` (0-based) when given.
    """

    _esm = _ESM
    _css = _CSS
    panels = traitlets.List().tag(sync=True)
    x_max = traitlets.Float(1.0).tag(sync=True)
    markers = traitlets.List().tag(sync=True)

    def __init__(self, panels: Sequence[Mapping[str, Any]], x_max: float) -> None:
        super().__init__(panels=[dict(p) for p in panels], x_max=float(x_max))
        self.t: list[float] = []
        self.y: dict[str, list[float | None]] = {s["id"]: [] for p in panels for s in p["series"]}
        self.sent_messages = 0
        self.on_msg(self._on_msg)

    def extend(self, t: Sequence[float], values: Mapping[str, Sequence[float | None]]) -> None:
        """Append points (``t`` and, per series id, one value per ``t``) and send just those."""
        if not t:
            return
        self.t += list(t)
        for key, column in values.items():
            self.y.setdefault(key, []).extend(column)
        self.sent_messages += 1
        self.send({"kind": "extend", "t": list(t), "y": {k: list(v) for k, v in values.items()}})

    def _on_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if isinstance(content, dict) and content.get("kind") == "sync":  # a view opened: all so far
            self.send({"kind": "reset", "t": self.t, "y": self.y})
