"""Report figures (matplotlib, written as PNG and SVG): curves, metric vs dt, params, wall time."""

from __future__ import annotations

import statistics
from pathlib import Path

from score_exp.report.runs import Run, last_values
from score_exp.report.tables import eval_settings, iteration_based
from score_exp.report.variants import Variant
from score_exp.runs.record import METRICS


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: reports are built on headless machines
    import matplotlib.pyplot as plt

    return plt


def better(hib: bool) -> str:
    """The direction a metric improves in, said on every axis that shows one."""
    return "higher is better" if hib else "lower is better"


def _metric_label(metric: str, hib: bool) -> str:
    return f"{metric} ({better(hib)})"


def _title(ax, task: str, what: str) -> None:
    # Two lines: "experiment / task" names are long and a one-line title ran off the figure.
    ax.set_title(f"{task}\n{what}", fontsize=9)


def _integer_x(ax) -> None:
    """Epochs and steps are counts: ticks at whole numbers only (never "2.5 epochs")."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.tight_layout()
    for p in paths:
        tmp = p.with_name(p.name + ".tmp")
        fig.savefig(tmp, dpi=130, format=p.suffix[1:])
        tmp.replace(p)  # atomic: a crashed report never leaves half an image
    _plt().close(fig)
    return paths


def val_curves(task: str, vs: list[Variant], out: Path, slug: str) -> list[Path]:
    """Mean val curve per variant with a min-max band over seeds."""
    plt = _plt()
    by_step = iteration_based([r for v in vs for r in v.runs])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drew = False
    metric = ""
    for v in vs:
        curves: dict[int, list[float]] = {}
        for r in v.ok_runs:
            metric = (r.record.best_val or {}).get("metric", metric)
            for row in r.curve:
                x = row["step"] if by_step or row["epoch"] is None else row["epoch"] + 1
                curves.setdefault(x, []).append(row["value"])
        if not curves:
            continue
        # Early-stopped seeds end at different epochs: plot only where at least half of the
        # runs still contribute, so the tail is not one seed's noise.
        need = max(1, (len(v.ok_runs) + 1) // 2)
        xs = [x for x in sorted(curves) if len(curves[x]) >= need]
        if not xs:
            continue
        mean = [statistics.fmean(curves[x]) for x in xs]
        (line,) = ax.plot(xs, mean, label=f"{v.label} (n={len(v.ok_runs)})")
        ax.fill_between(xs, [min(curves[x]) for x in xs], [max(curves[x]) for x in xs],
                        color=line.get_color(), alpha=0.2, linewidth=0)  # fmt: skip
        drew = True
    if not drew:
        plt.close(fig)
        return []
    ax.set_xlabel("step" if by_step else "epoch")
    _integer_x(ax)
    hib = next(r for v in vs for r in v.runs).higher_is_better
    ax.set_ylabel(_metric_label(metric or "val metric", hib))
    _title(ax, task, "val curves (mean, min-max band over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out, f"{slug}_val_curves")


def _scatter(task: str, vs: list[Variant], out: Path, slug: str, key: str, xlabel: str,
             name: str, logx: bool = False) -> list[Path]:  # fmt: skip
    plt = _plt()
    pts = []
    for v in vs:
        x, ys = v.mean_of(key), v.values()
        if x is None or not ys:
            continue
        err = statistics.stdev(ys) if len(ys) > 1 else 0.0
        pts.append((v.label, x, statistics.fmean(ys), err))
    if len({x for _, x, _, _ in pts}) < 2:  # one x for every variant (equal params): says nothing
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, x, y, err in pts:
        ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=3, label=label)
    if logx:
        ax.set_xscale("log")
        _plain_log_ticks(ax)
    ax.set_xlabel(xlabel)
    run = vs[0].runs[0]
    ax.set_ylabel(_metric_label(f"test {run.headline}", run.higher_is_better))
    _title(ax, task, f"test metric vs {xlabel} (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out, f"{slug}_{name}")


def _plain_log_ticks(ax) -> None:
    """Counts on a log axis as 200k / 1.1M (matplotlib's choice of labelled ticks, which labels
    some minor ticks when the axis spans less than a decade) instead of 2 x 10^5."""
    from matplotlib.ticker import LogFormatter

    class Counts(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
                if x >= div:
                    return f"{x / div:.3g}{unit}"
            return f"{x:.3g}"

    ax.xaxis.set_major_formatter(Counts(labelOnlyBase=False))
    ax.xaxis.set_minor_formatter(Counts(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def metric_vs_params(task, vs, out, slug) -> list[Path]:
    return _scatter(task, vs, out, slug, "params", "parameters", "vs_params", logx=True)


def metric_vs_wall_time(task, vs, out, slug) -> list[Path]:
    return _scatter(task, vs, out, slug, "wall_time_s", "wall time per run (s)", "vs_wall_time")


def metric_vs_dt(task: str, runs: list[Run], out: Path, slug: str) -> list[Path]:
    """Test metric against dt, one line per number of steps (shared depth; dt=null -> 1/steps)."""
    plt = _plt()
    ok = [r for r in runs if r.ok and r.get("depth.share") and r.test_metric() is not None]
    cells: dict[int, dict[float, list[float]]] = {}
    for r in ok:
        steps = r.get("depth.steps")
        dt = r.get("depth.dt")
        dt = 1.0 / steps if dt is None else float(dt)
        cells.setdefault(steps, {}).setdefault(dt, []).append(r.test_metric())
    if not cells or len({dt for c in cells.values() for dt in c}) < 2:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for steps in sorted(cells):
        dts = sorted(cells[steps])
        ys = [statistics.fmean(cells[steps][d]) for d in dts]
        es = [statistics.stdev(cells[steps][d]) if len(cells[steps][d]) > 1 else 0.0 for d in dts]
        ax.errorbar(dts, ys, yerr=es, marker="o", capsize=3, label=f"steps={steps}")
    ax.set_xlabel("dt (dt=null plotted at 1/steps)")
    ax.set_ylabel(_metric_label(f"test {ok[0].headline}", ok[0].higher_is_better))
    _title(ax, task, "test metric vs dt (shared depth, mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out, f"{slug}_vs_dt")


def metric_vs_inference_nfe(task: str, vs: list[Variant], out: Path, slug: str) -> list[Path]:
    """Test metric against the evaluations of F spent at inference (``score-eval``'s rows), one
    colour per training scheme: lines through the full step counts (one per integrator and
    horizon rule), open markers for halting thresholds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drew, headline, hib = False, "", False
    for v in vs:
        settings = eval_settings(v)
        if not settings:
            continue
        headline, hib = v.ok_runs[0].headline, v.ok_runs[0].higher_is_better
        color = None
        lines: dict[tuple, list[tuple[float, float, float]]] = {}
        halted = []
        for key, xs in settings.items():
            point = (statistics.fmean(x["nfe"] for x in xs),
                     statistics.fmean(x["metric"] for x in xs),
                     statistics.stdev(x["metric"] for x in xs) if len(xs) > 1 else 0.0)  # fmt: skip
            if key[4]:
                halted.append(point)
            else:
                lines.setdefault((key[1], key[3]), []).append(point)
        for (integrator, keep_horizon), pts in sorted(lines.items()):
            pts.sort()
            label = f"{v.label}: {integrator}" + (", horizon kept" if keep_horizon else "")
            bar = ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                              marker="o", capsize=3, color=color, label=label)  # fmt: skip
            color = bar.lines[0].get_color()
        if halted:
            ax.scatter([p[0] for p in halted], [p[1] for p in halted], facecolors="none",
                       edgecolors=color, label=f"{v.label}: halting")  # fmt: skip
        drew = True
    if not drew:
        plt.close(fig)
        return []
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluations of F per sample at inference (NFE spent)")
    ax.set_ylabel(_metric_label(f"test {headline}", hib))
    _title(ax, task, "test metric vs inference NFE")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out, f"{slug}_vs_inference_nfe")


def connection_heatmaps(task: str, vs: list[Variant], out: Path, slug: str) -> list[Path]:
    """ANCRe: the learned mixture weights of each variant (mean over seeds) as heat maps."""
    import numpy as np

    maps = []
    for v in vs:
        ws = [np.asarray(w) for r in v.ok_runs if (w := r.record.connection_weights)]
        if ws and all(w.shape == ws[0].shape for w in ws):
            maps.append((v.label, np.mean(ws, axis=0), len(ws)))
    if not maps:
        return []
    plt = _plt()
    import textwrap

    fig, axes = plt.subplots(1, len(maps), figsize=(max(6.4, 3.6 * len(maps)), 4.0), squeeze=False)
    for ax, (label, w, n) in zip(axes[0], maps, strict=True):
        im = ax.imshow(w, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(w.shape[1]))
        ax.set_yticks(range(w.shape[0]))
        ax.set_xlabel("earlier state h_i")
        ax.set_ylabel("step j")
        ax.set_title(textwrap.fill(f"{label} (n={n})", 40), fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{task}: learned connections softmax(c_j / tau)", fontsize=10)
    return _save(fig, out, f"{slug}_connections")


def diagnostics(task: str, vs: list[Variant], out: Path, slug: str) -> list[Path]:
    """Per-step contraction ratio and relative state change at the last validation, per variant."""
    series = []
    for v in vs:
        per_run = [last_values(r.path / METRICS, "diag/") for r in v.ok_runs]
        per_run = [d for d in per_run if d]
        if per_run:
            series.append((v.label, per_run))
    if not series:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for ax, kind, title in (
        (axes[0], "contraction", "||h_t+1 - h_t|| / ||h_t - h_t-1|| (< 1: contracts)"),
        (axes[1], "rel_change", "||h_t+1 - h_t|| / ||h_t||"),
    ):
        for label, per_run in series:
            steps = sorted(
                {
                    int(k.rsplit("step", 1)[1])
                    for d in per_run
                    for k in d
                    if k.startswith(f"diag/{kind}_step")
                }
            )
            ys = [
                statistics.fmean([d[k] for d in per_run if (k := f"diag/{kind}_step{t}") in d])
                for t in steps
            ]
            if steps:
                ax.plot(steps, ys, marker="o", label=label)
        ax.set_xlabel("step t")
        _integer_x(ax)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{task}: depth diagnostics at the last validation (mean over seeds)", fontsize=10)
    return _save(fig, out, f"{slug}_diagnostics")
