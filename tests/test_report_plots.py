"""What the report's plots say on their axes: whole epochs, and which way the metric is better."""

from __future__ import annotations

import json

import pytest
import yaml
from test_report import write_run

from score_exp.report import plots
from score_exp.report.build import build_report


@pytest.fixture
def axes(monkeypatch):
    """Every figure the report saves: {name: [(x ticks in view, x label, y label), ...]}."""
    seen = {}
    save = plots._save

    def spy(fig, out, name):
        fig.canvas.draw()
        seen[name] = []
        for ax in fig.axes:
            lo, hi = sorted(ax.get_xlim())
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            seen[name].append((ticks, ax.get_xlabel(), ax.get_ylabel()))
        return save(fig, out, name)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


def _accuracy(run):
    """A run whose headline metric is an accuracy (higher is better)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["task"].update(headline="accuracy", monitor="val/accuracy", monitor_mode="max")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = json.loads((run / "results.json").read_text())
    res["test"] = {"accuracy": res["test"].pop("rmse")}
    res["best_val"]["metric"] = "val/accuracy"
    (run / "results.json").write_text(json.dumps(res))
    csv = (run / "metrics.csv").read_text().replace("val/rmse", "val/accuracy")
    (run / "metrics.csv").write_text(csv)


def test_epochs_are_whole_and_each_metric_axis_says_lower_is_better(tmp_path, axes):
    # Five epochs: matplotlib's default ticks would be 1.0, 1.5, 2.0 ... ("epoch 2.5").
    for seed in range(2):
        write_run(tmp_path, f"st{seed}", preset="stacked", share=False, seed=seed, params=300,
                  rmse=1.0, curve=[2.0, 1.6, 1.3, 1.1, 1.0])  # fmt: skip
        write_run(tmp_path, f"sc{seed}", seed=seed, rmse=0.9, curve=[1.9, 1.4, 1.2, 1.0, 0.9],
                  time_per_step=0.02)  # fmt: skip
    build_report([tmp_path], tmp_path / "out")
    (ticks, xlabel, ylabel), = axes["toy_sweep_toy_val_curves"]  # fmt: skip
    assert xlabel == "epoch" and len(ticks) >= 3
    assert all(float(t).is_integer() for t in ticks), ticks
    assert ylabel == "val/rmse (lower is better)"
    for name in ("toy_sweep_toy_vs_params", "toy_sweep_toy_vs_wall_time"):
        assert axes[name][0][2] == "test rmse (lower is better)", name


def test_a_higher_is_better_metric_says_so(tmp_path, axes):
    for seed in range(2):
        _accuracy(write_run(tmp_path, f"st{seed}", preset="stacked", share=False, seed=seed,
                            params=300, rmse=0.8, curve=[0.5, 0.7, 0.8]))  # fmt: skip
        _accuracy(write_run(tmp_path, f"sc{seed}", seed=seed, rmse=0.85, curve=[0.6, 0.8, 0.85]))
    build_report([tmp_path], tmp_path / "out")
    assert axes["toy_sweep_toy_val_curves"][0][2] == "val/accuracy (higher is better)"
    assert axes["toy_sweep_toy_vs_params"][0][2] == "test accuracy (higher is better)"


def test_a_plot_against_parameters_that_are_all_equal_is_not_drawn(tmp_path, axes):
    """Integrators share the block and its parameters: one x for every point says nothing."""
    for seed in range(2):
        for integrator in ("euler", "heun"):
            write_run(tmp_path, f"{integrator}{seed}", seed=seed, integrator=integrator,
                      curve=[1.0, 0.8], time_per_step=0.01 * (1 + (integrator == "heun")))  # fmt: skip
    rep = build_report([tmp_path], tmp_path / "out")
    names = {p.stem for p in rep.figures}
    assert "toy_sweep_toy_vs_wall_time" in names and "toy_sweep_toy_vs_params" not in names
