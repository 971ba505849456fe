"""The report's per-feature table inside the HTML page: every feature with its status and its
presence in each model, searchable and sortable (a small inline script; no network), each row an
anchor (``report.html#f272``) with the feature's top-activating contexts one click away.

Part of the report stage (pipeline/report/html.py places it), not a stage.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from pipeline.maths.presence import SCORED
from pipeline.report.plots import COLORS

MAX_ROWS = 20_000
"""Wider SAEs list only their scored features here (the full table is in table.parquet/csv)."""
MAX_WITH_CONTEXTS = 2_000
"""Features whose contexts are embedded (scored ones first, then by id): the page stays small."""

SCRIPT = """
(function () {
  var table = document.getElementById('features'), body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var search = document.getElementById('feature-search'), shown = document.getElementById('feature-shown');
  function filter() {
    var q = search.value.trim().toLowerCase(), n = 0;
    rows.forEach(function (r) {
      var hit = !q || (/^[0-9]+$/.test(q) ? r.dataset.f === q : r.dataset.text.indexOf(q) >= 0);
      r.style.display = hit ? '' : 'none'; n += hit;
    });
    shown.textContent = n + ' of ' + rows.length + ' shown';
  }
  search.addEventListener('input', filter);
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
    th.addEventListener('click', function () {
      var down = th.dataset.order !== 'desc';
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { delete c.dataset.order; });
      th.dataset.order = down ? 'desc' : 'asc';
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        var nx = parseFloat(x), ny = parseFloat(y);
        if (isNaN(nx) !== isNaN(ny)) return isNaN(nx) ? 1 : -1;  // empty scores last
        var c = isNaN(nx) ? String(x).localeCompare(String(y)) : nx - ny;
        return down ? -c : c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  function open() {
    var row = document.getElementById(location.hash.slice(1));
    if (row && row.tagName === 'TR') { search.value = ''; filter(); row.scrollIntoView({block: 'center'}); }
  }
  window.addEventListener('hashchange', open); filter(); open();
})();
"""

CSS = """
.browser { margin: 8px 0 4px; } .browser input { font: inherit; padding: 3px 8px; width: 22em; max-width: 100%; }
.browser span { color: #59636e; margin-left: 10px; font-size: 13px; }
.tablewrap { max-height: 70vh; overflow: auto; border: 1px solid #d0d7de; border-radius: 6px; }
table.features { border-collapse: collapse; font-size: 13px; width: 100%; }
table.features th { position: sticky; top: 0; background: #f6f8fa; cursor: pointer; text-align: right;
  padding: 4px 8px; border-bottom: 1px solid #d0d7de; white-space: nowrap; user-select: none; }
table.features th[data-order=desc]::after { content: " ▼"; } table.features th[data-order=asc]::after { content: " ▲"; }
table.features td { padding: 2px 8px; text-align: right; border-bottom: 1px solid #eaeef2; vertical-align: top; }
table.features td.l, table.features th.l { text-align: left; }
table.features tr:target { background: #fff8c5; } table.features td.ctxs { text-align: left; max-width: 560px; }
table.features details .ctx { max-width: 540px; }
"""


def _cell(value: Any, text: str | None = None, left: bool = False) -> str:
    if isinstance(value, (float, np.floating)):
        v = f"{value:.6g}" if np.isfinite(value) else ""
        text = text if text is not None else (f"{value:.3f}" if np.isfinite(value) else "—")
    else:
        v = html.escape(str(value))
        text = text if text is not None else html.escape(str(value))
    return f'<td{" class=l" if left else ""} data-v="{v}">{text}</td>'


def feature_browser(report: Any, df: Any, contexts: Any, scan: dict[str, np.ndarray]) -> str:
    """The ``<h2>`` section with the search box and the table of every feature (or, past
    :data:`MAX_ROWS` features, of every scored one)."""
    roles = report.roles[1:]
    rows = df if len(df) <= MAX_ROWS else df[df["status"] == SCORED]
    scored_first = np.lexsort((rows["feature"].to_numpy(), (rows["status"] != SCORED).to_numpy()))
    with_contexts = set(rows["feature"].to_numpy()[scored_first][:MAX_WITH_CONTEXTS].tolist())
    contexts.prepare(sorted(with_contexts), scan)
    head = ["feature", "status", "frequency", "ceiling R²", "token R²"]
    for role in roles:
        name = "floor" if role.label == "floor" else role.fit
        head += [f"{name} presence", f"{name} class"]
        if f"{role.label}_presence_lo" in df and f"{role.label}_presence_hi" in df:
            head.append(f"{name} interval")
    head.append("top contexts")
    out = [
        "<h2>Every feature</h2>",
        '<p class="caption">Type a feature id (exact) or a word (status, class) to filter; click '
        "a column to sort; link to a feature as <code>report.html#f&lt;id&gt;</code>. Presence is "
        "empty where the feature is not scored (its status says why).</p>",
        '<div class="browser"><input id="feature-search" type="search" '
        'placeholder="feature id, status or class"><span id="feature-shown"></span></div>',
        '<div class="tablewrap"><table class="features" id="features"><thead><tr>'
        + "".join(
            f"<th{' class=l' if h in ('status', 'top contexts') or h.endswith('class') else ''}>"
            f"{html.escape(h)}</th>"
            for h in head
        )
        + "</tr></thead><tbody>",
    ]
    for r in rows.to_dict("records"):
        f = int(r["feature"])
        cells = [
            _cell(f),
            _cell(r["status"], left=True),
            _cell(float(r["frequency"]), f"{r['frequency']:.2e}"),
            _cell(float(r["ceiling_r2"])),
            _cell(float(r["token_r2"])),
        ]
        words = [str(r["status"])]
        for role in roles:
            cls = str(r[f"{role.label}_class"])
            words.append(cls)
            cells.append(_cell(float(r[f"{role.label}_presence"])))
            cells.append(
                _cell(cls, f'<span style="color:{COLORS.get(cls, "#57606a")}">{cls}</span>', True)
            )
            if f"{role.label}_presence_lo" in df and f"{role.label}_presence_hi" in df:
                lo, hi = (
                    float(r[f"{role.label}_presence_lo"]),
                    float(r[f"{role.label}_presence_hi"]),
                )
                text = f"{lo:.2f}–{hi:.2f}" if np.isfinite(lo) and np.isfinite(hi) else "—"
                cells.append(_cell(lo, text))
        lines = [
            contexts.rendered[(f, int(t))]
            for t in scan["top_token"][f]
            if t >= 0 and (f, int(t)) in contexts.rendered
        ]
        if lines:
            ctx = f"<details><summary>{len(lines)}</summary>{''.join(lines)}</details>"
        else:
            ctx = "none in the corpus" if f in with_contexts else "see table.parquet"
        cells.append(f'<td class="ctxs" data-v="{len(lines)}">{ctx}</td>')
        text = html.escape(" ".join(words).lower())
        out.append(f'<tr id="f{f}" data-f="{f}" data-text="{text}">{"".join(cells)}</tr>')
    out.append("</tbody></table></div>")
    if len(rows) < len(df):
        out.append(
            f'<p class="caption">{len(rows):,} scored features of {len(df):,} listed; every '
            "feature is in table.parquet / table.csv.</p>"
        )
    out.append(f"<script>{SCRIPT}</script>")
    return "\n".join(out)
