"""The results page: one self-contained static HTML file (``score-report --html``, and the published
``docs/results/index.html`` of ``make results``).

Everything is inside the file: the tables (sortable by a click on a column's header, a few lines of
inline JavaScript), the claims and their rules, the plots (PNG, base64 data URIs), the runs not
averaged in and the provenance. Nothing is fetched: no CDN, font, script or style from anywhere, so
the page opens from a file, an archive or a mail attachment the same.

The page is rendered from a :class:`~score_exp.report.build.Report` (the same objects report.md is
written from) and holds no clock time of its own: the published page re-renders from ``runs.json``
to the same text (:func:`score_exp.report.snapshot.check` compares it with the images masked,
:data:`IMAGE_RE`).
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path

from score_exp.report.tables import Table

PAGE = "index.html"
# A plot inlined in the page; :func:`mask_images` replaces each one's bytes by a placeholder.
IMAGE_RE = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")
VERDICT_CLASSES = ("supported", "contradicted", "inconclusive", "mixed")


@dataclass
class Part:
    """One report on the page: the main one (``name`` empty) or a tuned snapshot's."""

    name: str
    report: object  # score_exp.report.build.Report
    provenance: str  # Markdown (PROVENANCE.md, or score-report's own: report.cli.provenance)
    headline: str = ""  # Markdown (HEADLINE.md), shown first
    literature: str = ""  # Markdown (LITERATURE.md): the papers' RMSEs beside the project's


# --------------------------------------------------------------------------- small renderers


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    """Markdown's inline subset the report writes: `code` and **bold** (after escaping)."""
    out = esc(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _cell(text: str, lists: bool = False) -> str:
    classes = ["verdict", text] if text in VERDICT_CLASSES else []
    if len(text) <= 24:  # numbers, intervals, short labels: never broken over two lines
        classes.append("nw")
    cls = f' class="{" ".join(classes)}"' if classes else ""
    body = "<br>".join(_inline(x) for x in text.split("; ")) if lists else _inline(text)
    return f"<td{cls}>{body}</td>"


def table_html(header: list[str], rows: list[list[str]], title: str = "", note: str = "",
               lists: bool = False) -> str:  # fmt: skip
    """A sortable table; ``data-rows`` holds how many rows the data has (the browser test counts
    the rendered rows against the report's own tables). ``lists``: a cell's "; "-separated items
    (HEADLINE.md's per-experiment cells) one per line."""
    out = ['<div class="table">']
    if title:
        out.append(f"<h4>{_inline(title)}</h4>")
    out.append(f'<div class="scroll"><table class="sortable" data-rows="{len(rows)}">')
    out.append("<thead><tr>" + "".join(
        f'<th scope="col" aria-sort="none" title="sort by {esc(h)}">{_inline(h)}</th>'
        for h in header) + "</tr></thead>")  # fmt: skip
    out.append("<tbody>")
    out += ["<tr>" + "".join(_cell(c, lists) for c in row) + "</tr>" for row in rows]
    out.append("</tbody></table></div>")
    if note:
        out.append(f'<div class="note">{markdown(note)}</div>')
    out.append("</div>")
    return "\n".join(out)


def _table(t: Table) -> str:
    return table_html(t.header, t.rows, t.title, t.note)


def markdown(text: str) -> str:
    """The Markdown subset report.md, claims.md, HEADLINE.md and PROVENANCE.md use: headings,
    pipe tables, ``- `` lists (with indented continuation lines) and paragraphs."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"(#{1,6}) (.*)", line):
            level = min(len(m.group(1)) + 2, 6)  # under the page's own h1-h2
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split(" | ")])
                i += 1
            header, body = block[0], [r for r in block[1:] if not re.fullmatch(r"[-|: ]*", "|".join(r))]  # fmt: skip
            out.append(table_html(header, body, lists=True))
        elif line.startswith("- "):
            items: list[str] = []
            while i < len(lines) and (lines[i].startswith("- ") or (items and lines[i].startswith("  "))):  # fmt: skip
                if lines[i].startswith("- "):
                    items.append(lines[i][2:])
                else:
                    items[-1] += " " + lines[i].strip()
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("|", "- ", "#")):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def png_data_uri(path: Path) -> str:
    """A plot as a data URI, re-encoded with a 256-colour palette (the page is about 3x smaller
    and a line plot looks the same)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        pal = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    pal.save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    wide = ' class="wide"' if w > 2 * h else ""  # side-by-side panels: the grid's full width
    alt = path.stem.replace("_", " ")
    return (f'<figure{wide}><img src="{png_data_uri(path)}" alt="{esc(alt)}" width="{w}" '
            f'height="{h}"><figcaption>{esc(path.name)}</figcaption></figure>')  # fmt: skip


def mask_images(page: str) -> str:
    """The page with every inlined image's bytes replaced: what the snapshot check compares (the
    plots, like the PNG files, are drawn from the same runs but not compared byte for byte)."""
    return IMAGE_RE.sub("data:image/png;base64,(image)", page)


# --------------------------------------------------------------------------- the page


def _better(hib: bool) -> str:
    from score_exp.report.plots import better

    return better(hib)


def _part_html(part: Part, prefix: str) -> tuple[str, list[tuple[str, str]]]:
    """One report's sections and its table-of-contents entries ``(anchor, title)``."""
    r = part.report
    toc: list[tuple[str, str]] = []
    out: list[str] = []

    def section(title: str, body: str, level: int = 2) -> None:
        anchor = f"{prefix}{_slug(title)}"
        toc.append((anchor, title))
        out.append(f'<section id="{anchor}"><h{level}>{esc(title)}</h{level}>\n{body}\n</section>')

    ok = sum(run.ok for run in r.runs)
    if part.name:
        out.append(f'<h2 class="part" id="{prefix}top">Tuned: {esc(part.name)}</h2>')
        toc.append((f"{prefix}top", f"Tuned: {part.name}"))
    summary = (f'<p class="summary">{len(r.runs)} runs: {ok} ok, {len(r.not_ok)} not ok '
               "(listed under <em>Runs not averaged in</em>, never averaged).</p>")  # fmt: skip
    out.append(summary)
    if part.headline.strip():
        section("Headline", markdown(part.headline))
    if r.claim_tables:
        caps = [r.cap] if r.cap is not None else []
        section("Claims of the paper", "\n".join(_table(t) for t in [*r.claim_tables, *caps]))
    for s in r.sections:
        body = [f'<p class="direction">Test metric: {_better(s.higher_is_better)}.</p>']
        body += [_table(t) for t in s.tables]
        pngs = [p for p in s.figures if p.suffix == ".png"]
        if pngs:
            body.append('<div class="figures">' + "\n".join(_figure(p) for p in pngs) + "</div>")
        section(s.task, "\n".join(body))
    if part.literature.strip():
        # LITERATURE.md's own title is the section's
        section("Literature", markdown(part.literature.split("\n", 1)[1]))
    if r.not_ok:
        rows = [[p, status, detail] for p, status, detail in r.not_ok]
        body = table_html(["run", "status", "detail"], rows)
    else:
        body = "<p>None: every run finished ok.</p>"
    section("Runs not averaged in", body)
    section("Provenance", markdown(part.provenance))
    return "\n".join(out), toc


def _breakable(text: str) -> str:
    """Long experiment names may break after an underscore (never inside a word); short ones
    (``esol_gnn``) stay whole."""
    return " ".join(w.replace("_", "_<wbr>") if len(w) > 20 else w for w in esc(text).split(" "))


def page(parts: list[Part], title: str = "score_exp results") -> str:
    """The whole page: a table of contents, then each part (the main report first)."""
    bodies, nav = [], []
    for k, part in enumerate(parts):
        body, entries = _part_html(part, "" if k == 0 else f"{_slug(part.name)}-")
        bodies.append(body)
        items = [f'<li><a href="#{a}">{_breakable(t)}</a></li>' for a, t in entries]
        if k == 0:
            nav += items
        else:  # a tuned part: its own entry, with its sections under it
            nav.append(f"{items[0][:-5]}<ol>{''.join(items[1:])}</ol></li>")
    nav = "".join(nav)
    return TEMPLATE.format(title=esc(title), nav=nav, body="\n".join(bodies), css=CSS, js=JS)


TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="score_exp score-report">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<nav><h1>{title}</h1><p class="hint">Click a column header to sort a table.</p><ol>{nav}</ol></nav>
<main>
{body}
</main>
<script>{js}</script>
</body>
</html>
"""

CSS = """
:root { --fg: #1d2329; --muted: #5b6670; --line: #d5dbe1; --stripe: #f5f7f9; --accent: #2b62b8; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
  color: var(--fg); display: flex; align-items: flex-start; }
nav { position: sticky; top: 0; width: 19rem; flex: none; height: 100vh; overflow-y: auto;
  padding: 1rem; border-right: 1px solid var(--line); background: #fbfcfd; font-size: 13px; }
nav h1 { font-size: 1.15rem; margin: 0 0 .3rem; }
nav ol { padding-left: 1.2rem; margin: .5rem 0; }
nav li { margin: .15rem 0; overflow-wrap: anywhere; }
nav a { color: var(--accent); text-decoration: none; }
.hint { color: var(--muted); margin: 0; }
main { flex: 1; min-width: 0; padding: 1rem 2rem 4rem; max-width: 1500px; }
h2 { border-bottom: 2px solid var(--line); padding-bottom: .2rem; margin-top: 2.2rem; }
h2.part { border-bottom-color: var(--accent); }
h4 { margin: 1.2rem 0 .4rem; }
.table { margin-bottom: 1.2rem; }
.summary, .direction { color: var(--muted); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #eef2f6; cursor: pointer; user-select: none; white-space: nowrap; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: var(--stripe); }
td.nw { white-space: nowrap; }
td.verdict { font-weight: 600; }
td.supported { color: #17702f; } td.contradicted { color: #b3261e; }
td.inconclusive { color: var(--muted); } td.mixed { color: #9a6200; }
.note { color: var(--muted); font-size: 13px; max-width: 70rem; }
.note p, .note ul { margin: .3rem 0; }
code { font-size: 12px; background: #f0f2f4; padding: 0 .2rem; border-radius: 3px;
  overflow-wrap: anywhere; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 1rem;
  margin-top: 1rem; }
figure { margin: 0; border: 1px solid var(--line); padding: .4rem; background: #fff; }
figure.wide { grid-column: 1 / -1; max-width: 1000px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 12px; margin-top: .2rem; }
@media (max-width: 900px) { body { display: block; } nav { position: static; width: auto;
  height: auto; border-right: 0; border-bottom: 1px solid var(--line); } main { padding: 1rem; } }
"""

# Sort a table by the clicked column: numbers numerically (the first number of a cell, so
# "0.603 ± 0.074" sorts by its mean and "117,454" by its value), text as text, n/a and "—" last.
JS = """
(function () {
  function key(text) {
    var t = text.replace(/,/g, "").replace(/\\u2212/g, "-").trim();
    var m = t.match(/^[-+]?(\\d+\\.?\\d*|\\.\\d+)(e[-+]?\\d+)?/i);
    return m ? { n: parseFloat(m[0]), s: t } : { n: null, s: t.toLowerCase() };
  }
  function sortBy(th) {
    var table = th.closest("table"), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    Array.prototype.forEach.call(th.parentNode.children, function (h) {
      h.setAttribute("aria-sort", "none");
    });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col] ? a.cells[col].textContent : "");
      var y = key(b.cells[col] ? b.cells[col].textContent : "");
      var blank = function (k) { return k.s === "" || k.s === "n/a" || k.s === "\\u2014"; };
      if (blank(x) !== blank(y)) { return blank(x) ? 1 : -1; }
      if (x.n !== null && y.n !== null) { return dir * (x.n - y.n); }
      if (x.n !== null || y.n !== null) { return x.n !== null ? -1 : 1; }
      return dir * x.s.localeCompare(y.s);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    th.addEventListener("click", function () { sortBy(th); });
  });
})();
"""


def folder_parts(
    snap: Path, reports: dict, provenance: str, headline: str, literature: str = ""
) -> list[Part]:
    """The parts of a published snapshot's page: ``reports`` by folder (``""``: ``snap`` itself,
    ``tune_<task>``: a tuned one), each with its own provenance and headline files; the main part
    also with ``literature`` (Markdown: the papers' numbers beside the snapshot's)."""

    def text(path: Path) -> str:
        return path.read_text() if path.is_file() else ""

    return [Part(name, report, text(snap / name / provenance), text(snap / name / headline),
                 "" if name else literature)
            for name, report in reports.items()]  # fmt: skip


def check_page(path: Path, made: str, record: str) -> list[str]:
    """A committed page against ``made``, the one re-rendered from ``record`` (images masked: the
    plots are drawn from the same runs), and each of its images a PNG."""
    if not path.is_file():
        return [f"{path}: missing (make results writes it)"]
    committed = path.read_text()
    problems = []
    if mask_images(committed) != mask_images(made):
        problems.append(f"{path}: differs from the page score-report makes of {record}")
    for uri in IMAGE_RE.findall(committed):
        if not base64.b64decode(uri.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n"):
            problems.append(f"{path}: an inlined image is not a PNG")
            break
    return problems


def write_page(out: Path, parts: list[Part], title: str = "score_exp results") -> Path:
    """Write :func:`page` to ``out/index.html`` (atomically) and return its path."""
    from score_exp.runs.files import atomic_write_text

    path = out / PAGE
    atomic_write_text(path, page(parts, title))
    return path
