"""The package's architecture, read from its source (no import is run): no import circle, the
layering the README states, the doors apart, a short top level.

Every import counts: at the top of a module, inside a function, under ``TYPE_CHECKING``. An
``import a.b.c`` or ``from a.b import c`` is an arrow to the longest module of the package that
the name starts with (``score_exp.runs.record``, else the package ``score_exp.runs``).
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "score_exp"
#: Modules the top level of score_exp/ may hold at most (``__init__`` and ``__main__`` aside).
MAX_TOP_LEVEL = 8
#: Lines a module may hold at most.
MAX_LINES = 400


@cache
def modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str) -> str | None:
    """The longest module of the package that ``name`` is or starts with."""
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports(module: str) -> frozenset[str]:
    """Every top-level package or package module that ``module`` imports, anywhere in it."""
    path = modules()[module]
    is_pkg = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                here = module.split(".") if is_pkg else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, base] if base else here)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    out = set()
    for name in names:
        if name.split(".")[0] != "score_exp":
            out.add(name.split(".")[0])  # a third-party package: its top-level name
        elif (
            (target := _resolve(name))
            and target not in (module, "score_exp")
            and not module.startswith(target + ".")  # its own package is imported first anyway
        ):
            out.add(target)
    return frozenset(out)


def graph() -> dict[str, set[str]]:
    """The arrows between the package's modules."""
    return {m: {t for t in imports(m) if t.startswith("score_exp.")} for m in modules()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``g`` with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(g):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def _in(module: str, *wings: str) -> bool:
    return any(module == w or module.startswith(w + ".") for w in wings)


def doors() -> dict[str, str]:
    """``{command: module}`` of pyproject's ``[project.scripts]``: the doors."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


# ----------------------------------------------------------------------------- the checker


def test_the_checker_sees_circles_in_functions_and_under_type_checking(tmp_path, monkeypatch):
    pkg = tmp_path / "score_exp"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from score_exp import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from score_exp.c import X\n"
    )
    (pkg / "c.py").write_text("from . import a\nimport lightning.pytorch\n")
    (pkg / "core" / "d.py").write_text("from ..c import y\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    modules.cache_clear()
    imports.cache_clear()
    try:
        assert cycles(graph()) == [["score_exp.a", "score_exp.b", "score_exp.c"]]
        assert imports("score_exp.c") == {"score_exp.a", "lightning"}
        assert imports("score_exp.core.d") == {"score_exp.c"}
    finally:
        modules.cache_clear()
        imports.cache_clear()


# ----------------------------------------------------------------------------- the package


def test_no_import_circle_outside_the_core():
    found = [c for c in cycles(graph()) if not all(_in(m, "score_exp.core") for m in c)]
    assert found == [], "\n".join(" <-> ".join(c) for c in found)


# The core's own circle (core/depth.py and its parts) is issue 28's core rewrite (parts as child
# modules, one step loop): this assertion fails until that lands. Kept apart so that a failure
# names it.
def test_no_import_circle_inside_the_core():
    found = [c for c in cycles(graph()) if all(_in(m, "score_exp.core") for m in c)]
    assert found == [], "\n".join(" <-> ".join(c) for c in found)


# (wing, what it must not import, why): the README's layering, an arrow never pointing upwards.
LAYERS = [
    ("score_exp.core", {"score_exp.*", "lightning", "hydra", "omegaconf", "torch_geometric"},
     "the core knows no task, no Lightning, no Hydra (only itself)"),
    ("score_exp.models", {"score_exp.tasks", "score_exp.data", "score_exp.run", "score_exp.cli",
                          "score_exp.runs", "score_exp.report", "score_exp.bench", "lightning",
                          "hydra", "omegaconf"},
     "models are plain nn.Modules over the core"),
    ("score_exp.data", {"score_exp.models", "score_exp.tasks", "score_exp.run", "score_exp.cli",
                        "score_exp.report", "score_exp.bench", "lightning", "hydra"},
     "data reads and featurises files, for any model"),
    ("score_exp.runs", {"score_exp.run", "score_exp.cli", "score_exp.report", "score_exp.bench",
                        "score_exp.tasks", "score_exp.models"},
     "the run lifecycle reads and writes run folders as data, under the builder and the doors"),
    ("score_exp.config", {"score_exp.run", "score_exp.cli", "score_exp.runs", "score_exp.tasks",
                          "score_exp.models", "score_exp.data", "score_exp.report",
                          "score_exp.bench", "lightning"},
     "composition and the schema are the bottom floor of everything Hydra"),
    ("score_exp.report", {"score_exp.run", "score_exp.core", "score_exp.models", "score_exp.data",
                          "score_exp.bench", "lightning", "torch"},
     "the report reads run folders only (results.json through RunRecord)"),
    ("score_exp.errors", {"score_exp.*"}, "errors are everyone's"),
]  # fmt: skip


@pytest.mark.parametrize("wing, forbidden, why", LAYERS, ids=[w for w, _, _ in LAYERS])
def test_layering(wing, forbidden, why):
    bad = []
    for module in modules():
        if not _in(module, wing):
            continue
        for target in imports(module):
            if (
                "score_exp.*" in forbidden
                and target.startswith("score_exp.")
                and not _in(target, wing)
            ) or any(_in(target, f) for f in forbidden if f != "score_exp.*"):
                bad.append(f"{module} -> {target}")
    assert bad == [], f"{why}:\n" + "\n".join(bad)


def test_the_report_takes_of_the_tasks_only_the_loggers_w_and_b_start():
    bad = [
        f"{m} -> {t}"
        for m in modules()
        if _in(m, "score_exp.report")
        for t in imports(m)
        if _in(t, "score_exp.tasks") and t != "score_exp.tasks.loggers"
    ]
    assert bad == []


def test_no_door_imports_another():
    mods = doors()
    assert {"score-train", "score-eval", "score-sample", "score-tune"} <= set(mods)
    for name, module in mods.items():
        assert module in modules(), (name, module)
        others = {m for n, m in mods.items() if n != name}
        assert not imports(module) & others, (name, imports(module) & others)


def test_the_four_doors_live_in_cli():
    mods = doors()
    for name in ("score-train", "score-eval", "score-sample", "score-tune"):
        assert _in(mods[name], "score_exp.cli"), (name, mods[name])


def _long(core: bool) -> dict[str, int]:
    return {
        str(p.relative_to(REPO)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
        and _in(".".join(p.relative_to(REPO).with_suffix("").parts), "score_exp.core") == core
    }


def test_the_top_level_is_short_and_no_module_is_long():
    top = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(top) <= MAX_TOP_LEVEL, top
    assert _long(core=False) == {}


# Like the core's circle: the core's rewrite (issue 28) splits its long modules.
def test_no_core_module_is_long():
    assert _long(core=True) == {}
