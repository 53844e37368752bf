"""Reports people read, from the merged results of a run (`report --html`, `--heatmap`): one
self-contained HTML page (the support table, then every pair in a table to sort by any column and
filter by backend, status and text, each failure with the command that reruns it) and a heatmap
PNG of the worst err/tol per backend x scenario (matplotlib, the `plots` extra)."""
from __future__ import annotations

import html
import json

from .kinds import KINDS
from .known import known_outcome
from .options import pytest_flag
from .report import failing, format_table
from .result import Result, Status


def reproduce(r: Result, profile: str, seed: int) -> str:
    """The one command that reruns this pair alone."""
    kind = KINDS[r.kind]  # its test is in tests/<test>.py
    backend = r.backend.removeprefix("probe-") if r.probe else r.backend
    flag = pytest_flag
    return (f'python -m pytest "tests/{kind.test}.py::{kind.test_id(r.backend, r.case)}" {flag("backend")} {backend} '
            f"{flag('scenario')} {r.scenario} {flag('profile')} {profile} {flag('seed')} {seed}"
            + (f" {flag('probe')}" if r.probe else ""))


def _status(r: Result) -> str:
    known = known_outcome(r)
    return known[0].upper() if known else r.status.value


def write_html(path: str, results: list[Result], profile: str, seed: int, runs: list[str]) -> None:
    rows = [[r.backend, r.scenario, r.case, _status(r), None if r.ratio is None else round(r.ratio, 3),
             r.reason[:300] if r.status != Status.PASS else "",
             reproduce(r, profile, seed) if failing(r) else ""] for r in results]
    data = json.dumps(rows, separators=(",", ":")).replace("</", "<\\/")
    page = _PAGE.replace("@RUNS@", "".join(f"<li>{html.escape(run)}</li>" for run in runs))
    page = page.replace("@TABLE@", _markdown_table_to_html(format_table(results, markdown=True)))
    with open(path, "w") as f:
        f.write(page.replace("@DATA@", data))


def _markdown_table_to_html(md: str) -> str:
    """format_table's Markdown (tables, ### headings, paragraphs) as HTML."""
    out = []
    for block in md.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines:
            continue
        if lines[0].startswith("|"):
            cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if not line.startswith("| ---")]
            head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f'<td class="{_cell_class(c)}">{html.escape(c)}</td>' for c in row)
                           + "</tr>" for row in cells[1:])
            out.append(f'<table class="matrix"><tr>{head}</tr>{body}</table>')
        elif lines[0].startswith("#"):
            out.append(f"<h3>{html.escape(lines[0].lstrip('#').strip())}</h3>")
        else:
            out.append(f"<p>{html.escape(' '.join(lines))}</p>")
    return "\n".join(out)


def _cell_class(text: str) -> str:
    return "fail" if text.startswith("FAIL") else "skip" if text == "skip" else "pass" if "/" in text else ""


def write_heatmap(path: str, results: list[Result]) -> None:
    """Worst err/tol of each backend x scenario (pairs that ran), failures marked; grey: none ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    backends = sorted({r.backend for r in results})
    scenarios = list(dict.fromkeys(r.scenario for r in results))
    worst = np.full((len(scenarios), len(backends)), np.nan)
    failed = np.zeros_like(worst, dtype=bool)
    for r in results:
        i, j = scenarios.index(r.scenario), backends.index(r.backend)
        if r.ratio is not None and r.status != Status.SKIP:
            worst[i, j] = np.nanmax([worst[i, j], r.ratio])
        failed[i, j] |= failing(r)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(backends), 1.2 + 0.32 * len(scenarios)))
    cmap = matplotlib.colormaps["viridis"].with_extremes(over="red", bad="lightgrey")
    im = ax.imshow(worst, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), v in np.ndenumerate(worst):
        if not np.isnan(v) or failed[i, j]:
            label = ("FAIL " if failed[i, j] else "") + ("" if np.isnan(v) else f"{v:.2f}")
            ax.text(j, i, label, ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(backends)), backends, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(scenarios)), scenarios, fontsize=8)
    fig.colorbar(im, ax=ax, extend="max", label="worst err / tol (1 passes; red: over)")
    ax.set_title("worst err/tol per backend x scenario", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Attention conformance report</title>
<style>
body { font: 13px system-ui, sans-serif; margin: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; }
.matrix td.pass { background: #e8f6e8; } .matrix td.fail { background: #fbdada; } .matrix td.skip { color: #999; }
#pairs td.FAIL, #pairs td.ERROR, #pairs td.CRASH, #pairs td.TIMEOUT, #pairs td.XPASS, #pairs td.EXPIRED
  { background: #fbdada; font-weight: bold; }
#pairs td.PASS { color: #2a7d2a; } #pairs td.SKIP { color: #999; } #pairs td.XFAIL { background: #fdf1d0; }
code { font-size: 12px; background: #f6f6f6; padding: 1px 3px; user-select: all; }
.controls > * { margin-right: 1em; }
</style></head><body>
<h1>Attention conformance report</h1>
<ul>@RUNS@</ul>
<h2>Support table</h2>
@TABLE@
<h2>Every pair</h2>
<div class="controls">
  backend <select id="backend"><option value="">all</option></select>
  status <select id="status"><option value="">all</option></select>
  text <input id="text" size="40" placeholder="case, reason ...">
  <span id="count"></span>
</div>
<table id="pairs"><thead><tr>
  <th data-col="0">backend</th><th data-col="1">scenario</th><th data-col="2">case</th><th data-col="3">status</th>
  <th data-col="4">err/tol</th><th data-col="5">reason / rerun it</th>
</tr></thead><tbody></tbody></table>
<script>
const ROWS = @DATA@;
const SHOWN = 1000;
let sortCol = 3, sortDir = 1;
const $ = id => document.getElementById(id);
for (const [id, col] of [["backend", 0], ["status", 3]]) {
  for (const v of [...new Set(ROWS.map(r => r[col]))].sort()) $(id).add(new Option(v, v));
}
const order = {FAIL: 0, ERROR: 0, CRASH: 0, TIMEOUT: 0, EXPIRED: 0, XPASS: 0, XFAIL: 1, PASS: 2, SKIP: 3};
function key(r) { return sortCol === 3 ? order[r[3]] : sortCol === 4 ? (r[4] ?? -1) : r[sortCol]; }
function render() {
  const b = $("backend").value, s = $("status").value, t = $("text").value.toLowerCase();
  const rows = ROWS.filter(r => (!b || r[0] === b) && (!s || r[3] === s)
                          && (!t || (r[2] + " " + r[5]).toLowerCase().includes(t)));
  rows.sort((x, y) => { const a = key(x), c = key(y); return a < c ? -sortDir : a > c ? sortDir : 0; });
  $("count").textContent = rows.length + " pairs" + (rows.length > SHOWN ? ", the first " + SHOWN + " shown" : "");
  const esc = x => String(x ?? "").replace(/&/g, "&amp;").replace(/</g, "&lt;");
  document.querySelector("#pairs tbody").innerHTML = rows.slice(0, SHOWN).map(r =>
    `<tr><td>${esc(r[0])}</td><td>${esc(r[1])}</td><td>${esc(r[2])}</td><td class="${r[3]}">${r[3]}</td>` +
    `<td>${r[4] ?? ""}</td><td>${esc(r[5])}${r[6] ? "<br><code>" + esc(r[6]) + "</code>" : ""}</td></tr>`).join("");
}
document.querySelectorAll("#pairs th").forEach(th => th.onclick = () => {
  const c = +th.dataset.col; sortDir = c === sortCol ? -sortDir : 1; sortCol = c; render();
});
for (const id of ["backend", "status", "text"]) $(id).oninput = render;
render();
</script></body></html>
"""
