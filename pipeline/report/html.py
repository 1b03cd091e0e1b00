"""``index.html``: one self-contained page (inline CSS, figures as base64 PNG data URIs, no script, no
external resource), readable offline and attachable to an e-mail as a single file."""

from __future__ import annotations

import base64
import html
import re
from typing import Iterable, Mapping

import pandas as pd

from pipeline.report.plots import Plot
from pipeline.report.tables import Table

CSS = """
:root { --fg: #1b1b1b; --muted: #5a5a5a; --line: #d9d9d9; --zebra: #f6f7f9; --delta: #fff1d6; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); margin: 0 auto; padding: 24px 32px 64px; max-width: 1500px; }
h1 { font-size: 1.6em; margin: 0 0 .3em; }
h2 { font-size: 1.25em; margin: 1.8em 0 .4em; border-bottom: 1px solid var(--line); padding-bottom: .2em; }
h3 { font-size: 1.05em; margin: 1.2em 0 .3em; }
p.caption, figcaption, .meta dd, .muted { color: var(--muted); font-size: .92em; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; margin: .6em 0 1em; }
dl.meta dt { font-weight: 600; }
dl.meta dd { margin: 0; color: var(--fg); word-break: break-all; }
code { font: .92em ui-monospace, "DejaVu Sans Mono", monospace; background: var(--zebra); padding: 0 .25em; }
nav ul { display: flex; flex-wrap: wrap; gap: .3em 1.2em; padding: 0; list-style: none; margin: .4em 0; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: .4em 0 .6em; font-size: .9em; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: .3em .6em; white-space: nowrap; }
th { background: #eef0f3; text-align: left; position: sticky; top: 0; }
td.num, th.num { text-align: right; }
tbody tr:nth-child(even) td { background: var(--zebra); }
tbody tr.delta td { background: var(--delta); font-weight: 700; border-top: 1px solid #e0b766; }
ul.notes li { margin: .15em 0; }
figure { margin: 1.2em 0 2em; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid var(--line); }
details summary { cursor: pointer; font-weight: 600; margin: .5em 0; }
"""


def _e(text) -> str:
    return html.escape("" if text is None else str(text))


def _inline_markdown(text: str) -> str:
    """Escape, then render the two inline Markdown forms the captions use: **bold** and `code`."""
    text = _e(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def table_html(table: Table) -> str:
    head = "".join(f'<th class="{"num" if i >= table.align_right_from else ""}">{_e(h)}</th>'
                   for i, h in enumerate(table.header))
    body = []
    for cells, delta in zip(table.rows, table.highlight):
        tds = "".join(f'<td class="{"num" if i >= table.align_right_from else ""}">{_e(c)}</td>'
                      for i, c in enumerate(cells))
        body.append(f'<tr class="delta">{tds}</tr>' if delta else f"<tr>{tds}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def plain_table_html(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def figure_html(plot: Plot) -> str:
    data = base64.b64encode(plot.png.read_bytes()).decode("ascii")
    return (f'<figure id="{_e(plot.stem)}"><img src="data:image/png;base64,{data}" alt="{_e(plot.title)}">'
            f"<figcaption><strong>{_e(plot.title)}.</strong> {_inline_markdown(plot.caption)}</figcaption></figure>")


def render_page(*, title: str, meta: Mapping[str, str], notes: Iterable[str], tables: list[Table],
                plots: list[Plot], run_list: pd.DataFrame, params: Mapping[str, object]) -> str:
    """The whole page as a string."""
    notes = list(notes)
    sections = [("Tables", "tables"), ("Figures", "figures"), ("Runs", "runs"), ("Parameters", "params")]
    parts = [f"<h1>{_e(title)}</h1>",
             '<dl class="meta">' + "".join(f"<dt>{_e(k)}</dt><dd>{_inline_markdown(v)}</dd>" for k, v in meta.items())
             + "</dl>",
             "<nav><ul>" + "".join(f'<li><a href="#{a}">{_e(t)}</a></li>' for t, a in sections) + "</ul></nav>"]
    if notes:
        parts.append('<h2 id="notes">Notes</h2><ul class="notes">'
                     + "".join(f"<li>{_inline_markdown(n)}</li>" for n in notes) + "</ul>")
    parts.append('<h2 id="tables">Tables</h2>')
    for t in tables:
        parts.append(f'<h3 id="{_anchor(t.title)}">{_e(t.title)}</h3>{table_html(t)}'
                     f'<p class="caption">{_inline_markdown(t.caption)}</p>')
    parts.append('<h2 id="figures">Figures</h2>')
    parts.extend(figure_html(p) for p in plots)
    if not plots:
        parts.append('<p class="muted">No figure could be drawn from these runs (see the notes).</p>')
    parts.append(f'<h2 id="runs">Runs ({len(run_list)})</h2>{plain_table_html(run_list)}')
    params_frame = pd.DataFrame({"key": list(params), "value": [str(v) for v in params.values()]})
    parts.append(f'<h2 id="params">Parameters</h2><details><summary>{len(params_frame)} parameters behind '
                 f'these runs (click to expand)</summary>{plain_table_html(params_frame)}</details>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
