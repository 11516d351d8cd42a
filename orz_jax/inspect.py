"""``python -m orz_jax.inspect RUN_DIR [--iteration N] [--sample K] [--png] [--out DIR]``: see what the critic sees.

Reads the rollout dumps of a run (``RUN_DIR/rollouts/``, written by :mod:`orz_jax.rollout_dump`) and writes
self-contained HTML pages (inline CSS, JS and SVG; no server, no network) into ``RUN_DIR/inspect/``:

* ``iter_NNNNNN.html``: every dumped response of one iteration with each token's background coloured by the
  advantage the update used (diverging map, legend); hovering a token shows the token, V(s_t), the
  advantages (normalised and raw), the return and the sampling log-prob. Above each response: the prompt,
  the reference and extracted answers, the reward, the value curve as a small line chart, and the
  repetition spans the trainer detects underlined in the text.
* ``summary.html``: over the dumped iterations, the explained variance of the critic before each update,
  the mean value at the first response token against the mean reward, values at the first / last token of
  correct vs incorrect responses, and the histogram of the normalised advantages.
* with ``--png``: ``iter_NNNNNN.png``, the value and advantage curves of the chosen samples (matplotlib).

(This module is named after the stdlib ``inspect``; it is only ever imported as ``orz_jax.inspect``, and no
module of the package imports it relatively, so the stdlib module is never shadowed.)
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

from orz_jax.rollout_dump import DumpError, list_iterations, load_dump, load_stats, repetition_spans

ADV_CAP = 3.0  # colour saturates at |normalised advantage| >= 3 (a few std away)


def token_repetition(pieces: Sequence[str]) -> list[bool]:
    """Per token: does it overlap a repetition span of the text the pieces make up."""
    text = "".join(pieces)
    flags = [False] * len(pieces)
    spans = repetition_spans(text)
    if not spans:
        return flags
    pos = 0
    for t, p in enumerate(pieces):
        a, b = pos, pos + max(len(p), 1)
        flags[t] = any(s < b and a < e for s, e in spans)
        pos += len(p)
    return flags


def _json_for_script(obj) -> str:
    """JSON safe inside <script>: no "</" can close the element early."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False).replace("</", "<\\/")


def _clean(x):
    """Arrays -> lists with NaN as None (strict JSON)."""
    if isinstance(x, np.ndarray):
        return [None if not np.isfinite(v) else float(v) for v in x.tolist()]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def sample_view(r: dict) -> dict:
    """The fields of one dump record the page uses."""
    keys = ("sample", "selected_by", "prompt_text", "reference", "extracted", "stop_reason", "reward", "score",
            "response_pieces", "values", "advantages", "advantages_raw", "returns", "sampling_logprobs")
    v = {k: _clean(r.get(k)) for k in keys}
    v["repetition"] = token_repetition(r["response_pieces"])
    return v


CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:18px;color:#1d1d1f;background:#fafafa}
h1{font-size:20px;margin:0 0 6px} h2{font-size:16px;margin:0 0 6px}
.meta{color:#555;margin-bottom:10px} a{color:#0b57d0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 14px;margin:12px 0}
.head{display:flex;gap:18px;align-items:flex-start;flex-wrap:wrap}
.facts{flex:1;min-width:320px}
.facts table{border-collapse:collapse} .facts td{padding:1px 10px 1px 0;vertical-align:top}
.facts td:first-child{color:#666;white-space:nowrap}
#table th,#table td{padding:2px 10px;text-align:right} #table th{font-weight:600}
pre.prompt{white-space:pre-wrap;background:#f3f3f3;padding:6px;border-radius:4px;margin:0;max-height:8em;overflow:auto}
.resp{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all;margin-top:8px;
      line-height:1.9}
.tok{border-radius:2px;padding:1px 0;cursor:default}
.tok.rep{text-decoration:underline wavy #7b2cbf;text-decoration-thickness:1.5px;text-underline-offset:3px}
.tok:hover{outline:1px solid #000}
.ok{color:#0a7d28;font-weight:600} .bad{color:#b3261e;font-weight:600}
#tip{position:fixed;display:none;background:#222;color:#fff;font:12px/1.4 ui-monospace,monospace;padding:6px 8px;
     border-radius:4px;pointer-events:none;z-index:10;white-space:pre}
.legend{display:flex;align-items:center;gap:8px;margin:6px 0 4px}
.bar{width:260px;height:12px;border:1px solid #aaa}
.charts{display:flex;gap:18px;flex-wrap:wrap}
svg text{font:11px system-ui,sans-serif;fill:#444}
"""

# Shared JS: diverging colour map, line / bar charts in SVG, error capture for the browser test.
JS_COMMON = r"""
window.__errors = [];
window.onerror = function (msg, src, line) {
  window.__errors.push(String(msg) + ' @' + line);
  document.body.setAttribute('data-errors', window.__errors.join(' | '));
};
function lerp(a, b, t) { return Math.round(a + (b - a) * t); }
// Red (negative) - white - blue (positive), saturating at +-cap.
function advColor(a, cap) {
  if (a === null || a === undefined || isNaN(a)) return 'rgb(235,235,235)';
  var t = Math.max(-1, Math.min(1, a / cap));
  var w = [255, 255, 255], neg = [202, 0, 32], pos = [5, 113, 176];
  var c = t < 0 ? neg : pos, u = Math.abs(t);
  return 'rgb(' + lerp(w[0], c[0], u) + ',' + lerp(w[1], c[1], u) + ',' + lerp(w[2], c[2], u) + ')';
}
var SVGNS = 'http://www.w3.org/2000/svg';
function el(name, attrs, parent) {
  var e = document.createElementNS(SVGNS, name);
  for (var k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function fmt(v, d) { return (v === null || v === undefined || isNaN(v)) ? '-' : Number(v).toFixed(d === undefined ? 3 : d); }
// series: [{name, color, xs, ys, dash}]; draws axes with min/max labels and a legend.
function lineChart(parent, series, opts) {
  opts = opts || {};
  var W = opts.width || 360, L = 42, R = 8, B = 22;
  // legend entries laid out in rows that fit the width; the plot starts below them
  var pos = [], lx = L + 4, row = 0;
  series.forEach(function (s) {
    var w = 8 + 6.2 * s.name.length;
    if (lx + w > W && lx > L + 4) { row++; lx = L + 4; }
    pos.push([lx, 12 + 12 * row]); lx += w;
  });
  var T = 16 + 12 * row, H = (opts.height || 140) + 12 * row;
  var svg = el('svg', {width: W, height: H, 'class': 'chart ' + (opts.cls || '')}, parent);
  var xs = [], ys = [];
  series.forEach(function (s) {
    s.xs.forEach(function (x, i) { if (s.ys[i] !== null && !isNaN(s.ys[i])) { xs.push(x); ys.push(s.ys[i]); } });
  });
  if (opts.ymin !== undefined) ys.push(opts.ymin);
  if (opts.ymax !== undefined) ys.push(opts.ymax);
  if (!xs.length) { el('text', {x: L, y: H / 2}, svg).textContent = 'no data'; return svg; }
  var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
  var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
  if (x1 === x0) { x1 = x0 + 1; } if (y1 === y0) { y1 = y0 + 1; }
  var px = function (x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  var py = function (y) { return T + (1 - (y - y0) / (y1 - y0)) * (H - T - B); };
  el('rect', {x: L, y: T, width: W - L - R, height: H - T - B, fill: '#fff', stroke: '#ccc'}, svg);
  if (y0 < 0 && y1 > 0) el('line', {x1: L, x2: W - R, y1: py(0), y2: py(0), stroke: '#999', 'stroke-dasharray': '2,2'}, svg);
  el('text', {x: L - 4, y: T + 4, 'text-anchor': 'end'}, svg).textContent = fmt(y1, 2);
  el('text', {x: L - 4, y: H - B, 'text-anchor': 'end'}, svg).textContent = fmt(y0, 2);
  el('text', {x: L, y: H - 6}, svg).textContent = String(x0);
  el('text', {x: W - R, y: H - 6, 'text-anchor': 'end'}, svg).textContent = (opts.xlabel ? opts.xlabel + ' ' : '') + x1;
  series.forEach(function (s, si) {
    var d = '', pen = false;
    s.xs.forEach(function (x, i) {
      var y = s.ys[i];
      if (y === null || isNaN(y)) { pen = false; return; }
      d += (pen ? 'L' : 'M') + px(x).toFixed(1) + ',' + py(y).toFixed(1); pen = true;
    });
    el('path', {d: d, fill: 'none', stroke: s.color, 'stroke-width': 1.6, 'stroke-dasharray': s.dash || '',
                'class': 'series'}, svg);
    if (s.xs.length < 40) s.xs.forEach(function (x, i) {
      if (s.ys[i] !== null && !isNaN(s.ys[i])) el('circle', {cx: px(x), cy: py(s.ys[i]), r: 2, fill: s.color}, svg);
    });
    var t = el('text', {x: pos[si][0], y: pos[si][1], fill: s.color}, svg); t.textContent = s.name;
    t.style.fill = s.color;
  });
  return svg;
}
function barChart(parent, counts, lo, hi, opts) {
  opts = opts || {};
  var W = opts.width || 360, H = opts.height || 140, L = 42, R = 8, T = 16, B = 22;
  var svg = el('svg', {width: W, height: H, 'class': 'chart hist'}, parent);
  var n = counts.length, mx = Math.max.apply(null, counts.concat([1]));
  var bw = (W - L - R) / n;
  el('rect', {x: L, y: T, width: W - L - R, height: H - T - B, fill: '#fff', stroke: '#ccc'}, svg);
  counts.forEach(function (c, i) {
    var mid = lo + (i + 0.5) * (hi - lo) / n, h = c / mx * (H - T - B);
    el('rect', {x: L + i * bw + 0.5, y: H - B - h, width: Math.max(bw - 1, 1), height: h,
                fill: advColor(mid, opts.cap || 3), stroke: '#777', 'stroke-width': 0.4, 'class': 'bin'}, svg);
  });
  el('text', {x: L, y: H - 6}, svg).textContent = String(lo);
  el('text', {x: W - R, y: H - 6, 'text-anchor': 'end'}, svg).textContent = String(hi);
  el('text', {x: L + (W - L - R) / 2, y: H - 6, 'text-anchor': 'middle'}, svg).textContent = '0';
  el('text', {x: L - 4, y: T + 4, 'text-anchor': 'end'}, svg).textContent = String(Math.round(mx));
  if (opts.title) el('text', {x: L + 4, y: 12}, svg).textContent = opts.title;
  return svg;
}
function legend(parent, cap) {
  var d = document.createElement('div'); d.className = 'legend';
  var stops = [];
  for (var i = 0; i <= 10; i++) { var a = -cap + 2 * cap * i / 10; stops.push(advColor(a, cap) + ' ' + (i * 10) + '%'); }
  d.innerHTML = '<span>advantage (normalised) &minus;' + cap + '</span><span class="bar" style="background:linear-gradient(90deg,' +
    stops.join(',') + ')"></span><span>+' + cap + '</span><span style="margin-left:14px">' +
    '<span class="tok rep">wavy underline</span> = repetition span (trainer\'s detector)</span>';
  parent.appendChild(d);
  return d;
}
"""

JS_ITERATION = r"""
(function () {
  var D = JSON.parse(document.getElementById('data').textContent);
  var root = document.getElementById('samples'), tip = document.getElementById('tip');
  legend(document.getElementById('legend'), D.cap);
  var ntok = 0;
  D.samples.forEach(function (s, si) {
    var card = document.createElement('div'); card.className = 'card sample'; card.id = 'sample-' + s.sample;
    var ok = s.reward !== null && s.reward > 0.5;
    var n = s.response_pieces.length, reps = s.repetition.filter(Boolean).length;
    var head = document.createElement('div'); head.className = 'head';
    var facts = document.createElement('div'); facts.className = 'facts';
    facts.innerHTML = '<h2>sample ' + s.sample + ' <span style="color:#666;font-weight:400">(' + s.selected_by +
      ' by mean advantage ' + fmt(s.score, 2) + ')</span></h2><table>' +
      '<tr><td>reward</td><td class="' + (ok ? 'ok' : 'bad') + '">' + fmt(s.reward, 1) + '</td></tr>' +
      '<tr><td>reference</td><td class="ref"></td></tr><tr><td>extracted</td><td class="ext"></td></tr>' +
      '<tr><td>stop reason</td><td>' + s.stop_reason + '</td></tr>' +
      '<tr><td>tokens</td><td>' + n + (reps ? ' (' + reps + ' in repetition spans)' : '') + '</td></tr>' +
      '<tr><td>V first / last</td><td>' + fmt(s.values[0]) + ' / ' + fmt(s.values[n - 1]) + '</td></tr>' +
      '<tr><td>prompt</td><td><pre class="prompt"></pre></td></tr></table>';
    facts.querySelector('.ref').textContent = s.reference === null ? '-' : s.reference;
    facts.querySelector('.ext').textContent = s.extracted === null ? '(none)' : s.extracted;
    facts.querySelector('.prompt').textContent = s.prompt_text;
    head.appendChild(facts);
    var ch = document.createElement('div'); ch.className = 'charts'; head.appendChild(ch);
    var xs = s.values.map(function (_, i) { return i; });
    lineChart(ch, [{name: 'V(s_t)', color: '#1b4f9c', xs: xs, ys: s.values},
                   {name: 'return', color: '#888', xs: xs, ys: s.returns, dash: '4,3'},
                   {name: 'adv raw', color: '#c2185b', xs: xs, ys: s.advantages_raw, dash: '1,2'}],
              {xlabel: 'token', cls: 'value-curve'});
    card.appendChild(head);
    var resp = document.createElement('div'); resp.className = 'resp';
    s.response_pieces.forEach(function (p, t) {
      var sp = document.createElement('span');
      sp.className = 'tok' + (s.repetition[t] ? ' rep' : '');
      sp.textContent = p.length ? p : '\u00b7';
      sp.style.background = advColor(s.advantages[t], D.cap);
      sp.dataset.t = t; sp.dataset.s = si;
      resp.appendChild(sp); ntok++;
    });
    card.appendChild(resp);
    root.appendChild(card);
  });
  root.addEventListener('mouseover', function (ev) {
    var t = ev.target; if (!t.classList || !t.classList.contains('tok')) return;
    var s = D.samples[+t.dataset.s], i = +t.dataset.t;
    tip.textContent = 'token ' + i + '  ' + JSON.stringify(s.response_pieces[i]) +
      '\nV(s_t)        ' + fmt(s.values[i], 4) + '\nadvantage     ' + fmt(s.advantages[i], 4) +
      '  (raw ' + fmt(s.advantages_raw[i], 4) + ')\nreturn        ' + fmt(s.returns[i], 4) +
      '\nlog-prob      ' + fmt(s.sampling_logprobs[i], 4) + (s.repetition[i] ? '\nin a repetition span' : '');
    tip.style.display = 'block';
  });
  root.addEventListener('mousemove', function (ev) {
    tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - 320) + 'px'; tip.style.top = (ev.clientY + 14) + 'px';
  });
  root.addEventListener('mouseout', function () { tip.style.display = 'none'; });
  document.body.setAttribute('data-samples', String(D.samples.length));
  document.body.setAttribute('data-tokens', String(ntok));
  document.body.setAttribute('data-rendered', '1');
})();
"""

JS_SUMMARY = r"""
(function () {
  var D = JSON.parse(document.getElementById('data').textContent);
  var S = D.stats, its = S.map(function (s) { return s.iteration; });
  var col = function (k) { return S.map(function (s) { return s[k] === undefined ? null : s[k]; }); };
  var c = document.getElementById('charts');
  lineChart(c, [{name: 'explained variance (V before update)', color: '#1b4f9c', xs: its, ys: col('explained_variance')},
                {name: 'critic EV (update)', color: '#888', xs: D.ev_iters, ys: D.ev_update, dash: '3,3'}],
            {xlabel: 'iter', width: 420, cls: 'ev'});
  lineChart(c, [{name: 'mean V(first token)', color: '#1b4f9c', xs: its, ys: col('value_first_mean')},
                {name: 'mean reward', color: '#0a7d28', xs: its, ys: col('reward_mean')}],
            {xlabel: 'iter', width: 420, cls: 'vfirst'});
  lineChart(c, [{name: 'V first, correct', color: '#0a7d28', xs: its, ys: col('value_first_correct')},
                {name: 'V first, incorrect', color: '#b3261e', xs: its, ys: col('value_first_incorrect')},
                {name: 'V last, correct', color: '#0a7d28', xs: its, ys: col('value_last_correct'), dash: '4,3'},
                {name: 'V last, incorrect', color: '#b3261e', xs: its, ys: col('value_last_incorrect'), dash: '4,3'}],
            {xlabel: 'iter', width: 420, cls: 'vcorrect'});
  var h = document.getElementById('hists');
  S.forEach(function (s) {
    barChart(h, s.adv_hist, s.adv_hist_range[0], s.adv_hist_range[1], {title: 'iteration ' + s.iteration, width: 260, height: 110});
  });
  var tb = document.getElementById('table');
  S.forEach(function (s) {
    var tr = document.createElement('tr');
    tr.innerHTML = '<td><a href="iter_' + String(s.iteration).padStart(6, '0') + '.html">' + s.iteration + '</a></td>' +
      ['reward_mean', 'explained_variance', 'value_first_mean', 'value_first_correct', 'value_first_incorrect',
       'value_last_correct', 'value_last_incorrect'].map(function (k) { return '<td>' + fmt(s[k]) + '</td>'; }).join('') +
      '<td>' + s.num_correct + ' / ' + s.num_samples + '</td>';
    tb.appendChild(tr);
  });
  document.body.setAttribute('data-iterations', String(S.length));
  document.body.setAttribute('data-rendered', '1');
})();
"""


def _page(title: str, body: str, data: dict, script: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"<div id=\"tip\"></div>\n<script type=\"application/json\" id=\"data\">{_json_for_script(data)}</script>\n"
            f"<script>{JS_COMMON}</script>\n<script>{script}</script>\n</body></html>\n")


def _nav(iterations: Sequence[int], current: Optional[int]) -> str:
    links = ['<a href="summary.html">summary</a>'] + [
        (f"<b>{i}</b>" if i == current else f'<a href="iter_{i:06d}.html">{i}</a>') for i in iterations]
    return '<div class="meta">iterations: ' + " &middot; ".join(links) + "</div>"


def iteration_page(run_dir: str, iteration: int, records: Sequence[dict], stats: Optional[dict],
                   iterations: Sequence[int]) -> str:
    """HTML of one dumped iteration (``records`` from :func:`load_dump`, possibly a subset)."""
    st = stats or {}
    f = lambda k: "-" if st.get(k) is None else f"{st[k]:.3f}"  # noqa: E731
    body = (f"<h1>{html.escape(os.path.basename(os.path.abspath(run_dir)))} &mdash; iteration {iteration}</h1>"
            + _nav(iterations, iteration)
            + f'<div class="meta">whole buffer before the update: mean reward {f("reward_mean")}, explained variance '
              f'{f("explained_variance")}, mean V(first token) {f("value_first_mean")} (correct '
              f'{f("value_first_correct")}, incorrect {f("value_first_incorrect")}), mean V(last token) correct '
              f'{f("value_last_correct")}, incorrect {f("value_last_incorrect")}. Token colour: the advantage the '
              "update used; hover a token for its value, advantages, return and log-prob.</div>"
            + '<div id="legend"></div><div id="samples"></div>')
    data = {"iteration": iteration, "cap": ADV_CAP, "samples": [sample_view(r) for r in records]}
    return _page(f"orz_jax inspect: iteration {iteration}", body, data, JS_ITERATION)


def summary_page(run_dir: str, stats: Sequence[dict], iterations: Sequence[int]) -> str:
    ev_iters, ev_update = [], []
    mpath = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(mpath):
        with open(mpath) as fh:
            for line in fh:
                row = json.loads(line)
                v = row.get("critic/explained_variance")
                if v is not None and np.isfinite(v):
                    ev_iters.append(row["iteration"])
                    ev_update.append(float(v))
    cols = ("iteration", "reward", "EV", "V first", "V first correct", "V first incorrect", "V last correct",
            "V last incorrect", "correct")
    body = (f"<h1>{html.escape(os.path.basename(os.path.abspath(run_dir)))} &mdash; critic summary</h1>"
            + _nav(iterations, None)
            + '<div class="meta">Statistics of the whole rollout buffer of each dumped iteration, with the critic '
              "before that iteration's update. EV = 1 - Var(R - V) / Var(R) over response tokens; the dashed line is "
              "the critic's explained variance during its update (metrics.jsonl).</div>"
            + '<div id="charts" class="charts"></div><h2>normalised advantages per dumped iteration</h2>'
              '<div id="hists" class="charts"></div><div class="card"><table id="table" class="facts"><tr>'
            + "".join(f"<th>{c}</th>" for c in cols) + "</tr></table></div>")
    data = {"stats": [{k: _clean(v) for k, v in s.items()} for s in stats], "ev_iters": ev_iters,
            "ev_update": ev_update}
    return _page("orz_jax inspect: summary", body, data, JS_SUMMARY)


def write_png(records: Sequence[dict], path: str, iteration: int) -> str:
    """Value and advantage curves of ``records`` (one line per sample), two panels, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_v, ax_a) = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in records:
        ok = r["reward"] is not None and r["reward"] > 0.5
        label = f"#{r['sample']} {r['selected_by']} (R={r['reward']:.0f})"
        ls = "-" if ok else "--"
        line, = ax_v.plot(r["values"], ls, lw=1.4, label=label)
        ax_a.plot(r["advantages"], ls, lw=1.4, color=line.get_color())
    ax_v.set(title=f"iteration {iteration}: critic value V(s_t)", xlabel="response token", ylabel="V")
    ax_a.set(title="advantage used by the update (normalised)", xlabel="response token", ylabel="advantage")
    ax_a.axhline(0, color="#999", lw=0.8)
    ax_v.legend(fontsize=7, loc="best")
    fig.text(0.01, 0.01, "solid: reward 1, dashed: reward 0", fontsize=8, color="#555")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def build(run_dir: str, iteration: Optional[int] = None, sample: Optional[int] = None, png: bool = False,
          out_dir: Optional[str] = None) -> dict[str, str]:
    """Write the pages (and PNG) for ``run_dir``; returns {"iteration": path, "summary": path, "png": path}.

    ``iteration``: a dumped iteration (default: the last); ``sample``: only the record of this buffer sample
    index (the ``sample`` field), or, when no record has it, the K-th record of the dump."""
    iterations = list_iterations(run_dir)
    if not iterations:
        raise DumpError(f"{run_dir}: no rollout dumps under {os.path.join(run_dir, 'rollouts')} (run the trainer with "
                        "experiment.dump_rollouts_every > 0)")
    it = iterations[-1] if iteration is None else iteration
    records = load_dump(run_dir, it)
    if sample is not None:
        chosen = [r for r in records if r["sample"] == sample]
        if not chosen and 0 <= sample < len(records):
            chosen = [records[sample]]
        if not chosen:
            raise DumpError(f"--sample {sample}: iteration {it} dumped samples {[r['sample'] for r in records]}")
        records = chosen
    stats = load_stats(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "inspect")
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    st = next((s for s in stats if s["iteration"] == it), None)
    paths["iteration"] = os.path.join(out_dir, f"iter_{it:06d}.html")
    with open(paths["iteration"], "w", encoding="utf-8") as f:
        f.write(iteration_page(run_dir, it, records, st, iterations))
    paths["summary"] = os.path.join(out_dir, "summary.html")
    with open(paths["summary"], "w", encoding="utf-8") as f:
        f.write(summary_page(run_dir, stats, iterations))
    if png:
        paths["png"] = write_png(records, os.path.join(out_dir, f"iter_{it:06d}.png"), it)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m orz_jax.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run's experiment.out_dir (holds rollouts/)")
    p.add_argument("--iteration", type=int, default=None, help="dumped iteration to show (default: the last)")
    p.add_argument("--sample", type=int, default=None, help="show only this sample (buffer index or K-th record)")
    p.add_argument("--png", action="store_true", help="also write a PNG of the value and advantage curves")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/inspect)")
    args = p.parse_args(argv)
    try:
        paths = build(args.run_dir, args.iteration, args.sample, args.png, args.out)
    except DumpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k in ("iteration", "summary", "png"):
        if k in paths:
            print(f"{k}: {paths[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
