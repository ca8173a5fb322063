"""The results page (``score-report --html``, the published ``docs/results/index.html``) opened in
a real headless Chromium (the system's, driven by Playwright): every image loads, every table has
the rows of the report's own tables, the tables sort, nothing is fetched and nothing logs an error.

Without a browser (``scripts/install_browser.sh`` installs Debian's ``chromium``) or Playwright
these tests skip with one line, and fail instead where ``$CI`` is set.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from test_report import write_run

PUBLISHED = REPO / "docs" / "results"
BROWSERS = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")


def _browser_path() -> str | None:
    for name in (os.environ.get("SCORE_BROWSER"), *BROWSERS):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (one per test module); skips, or fails under CI, when there is none."""
    why, path = None, _browser_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "the playwright package is not installed (pip install -e '.[dev]')"
    else:
        if path is None:
            why = (
                "no Chromium on PATH (scripts/install_browser.sh installs it; or set SCORE_BROWSER)"
            )
    if why:
        message = f"results page browser test: {why}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, page_file: Path) -> dict:
    """Load ``page_file`` and return what a reader gets: images, tables, errors, requests."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"failed request: {r.url}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(page_file.resolve().as_uri(), wait_until="load")
    images = page.evaluate(
        "Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0, alt: i.alt}))"
    )
    tables = page.evaluate(
        """Array.from(document.querySelectorAll('table')).map(t => ({
            header: Array.from(t.tHead.rows[0].cells).map(c => c.textContent.trim()),
            rows: Array.from(t.tBodies[0].rows).map(r =>
                Array.from(r.cells).map(c => c.textContent.trim())),
            declared: Number(t.dataset.rows)}))"""
    )
    return {"page": page, "images": images, "tables": tables, "errors": errors,
            "requests": [u for u in requests if not u.startswith(("file:", "data:"))]}  # fmt: skip


def markdown_tables(md: str) -> list[dict]:
    """Every pipe table of a Markdown file: its header and rows, cells as the page shows them."""

    def cells(line: str) -> list[str]:
        return [re.sub(r"\*\*|`", "", c.strip()) for c in line.strip().strip("|").split(" | ")]

    out, lines = [], md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header, i = cells(lines[i]), i + 2
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            out.append({"header": header, "rows": rows})
        else:
            i += 1
    return out


def _key(t: dict) -> tuple:
    return (tuple(t["header"]), len(t["rows"]), tuple(r[0] for r in t["rows"]))


def assert_page_shows(seen: dict, folders: list[Path], with_headline: bool) -> None:
    """The page holds exactly the tables (header, row count, first cells) and plots of the
    report.md (and HEADLINE.md, LITERATURE.md) of each folder, every image decoded, no error, no fetch."""
    assert seen["errors"] == [], seen["errors"]
    assert seen["requests"] == [], f"the page fetched {seen['requests']}"
    expected, plots = [], 0
    for d in folders:
        md = (d / "report.md").read_text()
        expected += markdown_tables(md)
        plots += len(re.findall(r"!\[[^\]]*\]\([^)]+\.png\)", md))
        if with_headline:
            expected += markdown_tables((d / "HEADLINE.md").read_text())
        if (d / "LITERATURE.md").is_file():  # a published snapshot's: the papers beside ours
            expected += markdown_tables((d / "LITERATURE.md").read_text())
    assert plots > 0 and len(seen["images"]) == plots, (len(seen["images"]), plots)
    broken = [i["alt"] for i in seen["images"] if not i["ok"]]
    assert broken == [], f"images that did not load: {broken}"
    for t in seen["tables"]:
        assert len(t["rows"]) == t["declared"], t["header"]
    assert sorted(map(_key, seen["tables"])) == sorted(map(_key, expected))


def test_score_report_html_in_a_real_browser(tmp_path, browser):
    runs = tmp_path / "runs"
    for seed in range(3):
        write_run(runs, f"stacked{seed}", preset="stacked", share=False, seed=seed, params=300,
                  rmse=1.0 + 0.02 * seed, curve=[2.0, 1.4, 1.0])  # fmt: skip
        write_run(runs, f"score{seed}", seed=seed, rmse=0.9 + 0.03 * seed, curve=[1.8, 1.1, 0.9])
        write_run(runs, f"heun{seed}", seed=seed, integrator="heun", rmse=0.95, curve=[1.8, 1.0],
                  time_per_step=0.02)  # fmt: skip
    write_run(runs, "failed", seed=4, status="failed")
    out = tmp_path / "report"
    proc = run_cli(str(runs), "--out", str(out), "--html", module="score_exp.report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"page: {out / 'index.html'}" in proc.stdout
    # What the terminal shows: the variant table and the paired differences, the metric's way.
    assert "## toy_sweep / toy (test metric: lower is better)" in proc.stdout
    assert (
        "### toy_sweep / toy: depth variants" in proc.stdout
        and "| score depth.integrator=heun | 3/3 |" in proc.stdout
    )
    assert "### toy_sweep / toy: paired differences against stacked" in proc.stdout
    assert "also in report.md: integrators" in proc.stdout
    assert "Verdict rule" not in proc.stdout  # in claims.md, named on the last lines

    seen = open_page(browser, out / "index.html")
    assert_page_shows(seen, [out], with_headline=False)
    titles = {t["header"][0] for t in seen["tables"]}
    assert {"variant", "claim", "integrator", "run"} <= titles  # variants, claims, not ok
    not_ok = next(t for t in seen["tables"] if t["header"] == ["run", "status", "detail"])
    assert [r[1] for r in not_ok["rows"]] == ["failed"]

    # A click on "n pairs"... no: on the variant table's metric column sorts by its mean.
    page = seen["page"]
    table = page.locator("table").filter(has=page.locator("th", has_text="n ok/total")).first
    cells = lambda: [c.strip() for c in table.locator("tbody tr td:nth-child(3)").all_inner_texts()]  # noqa: E731
    header = table.locator("th", has_text="test rmse")
    header.click()
    up = [float(c.split()[0]) for c in cells()]
    assert up == sorted(up) and header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert [float(c.split()[0]) for c in cells()] == sorted(up, reverse=True)
    assert seen["errors"] == []
    page.close()


def test_published_results_page_in_a_real_browser(browser):
    """docs/results/index.html, as committed: its tables are those of the committed report.md
    and HEADLINE.md files (which tests/test_snapshot.py checks against runs.json)."""
    page_file = PUBLISHED / "index.html"
    assert page_file.is_file(), "docs/results/index.html is missing: make results (or results-page)"
    folders = [PUBLISHED, *sorted(p for p in PUBLISHED.glob("tune_*") if p.is_dir())]
    seen = open_page(browser, page_file)
    assert_page_shows(seen, folders, with_headline=True)
    text = seen["page"].inner_text("body")
    assert "Provenance" in text and "Claims of the paper" in text
    for d in folders[1:]:
        assert f"Tuned: {d.name}" in text
    seen["page"].close()
