"""The builder (``score_exp.run``): one way to compose, build and load; the extension points."""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import CONFIG_DIR, QUIET, REPO, cli_env, load_results, run_cli, train_cli

from score_exp import config, run
from score_exp.core import DepthSpec
from score_exp.errors import ConfigError
from score_exp.tasks.training_step import training_step_fn

TOY_CONFIGS = Path(__file__).parent / "toy"
DOORS = {"train": "cli/train.py", "eval": "cli/eval.py", "sample": "cli/sample.py",
         "bench": "bench/cli.py"}  # fmt: skip


def _toy_env() -> dict[str, str]:
    """The test folder on the path, as a user's own package would be (no framework edit)."""
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(Path(__file__).parent)])
    return env


def test_a_task_outside_the_framework_trains_and_loads_through_the_extension_points(
    tmp_path, monkeypatch
):
    run_dir = tmp_path / "toy"
    out = run_cli(
        "--config-dir", str(TOY_CONFIGS), f"hydra.run.dir={run_dir}", *QUIET, "task=toy",
        env=_toy_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    r = load_results(run_dir)
    assert r["status"] == "ok" and r["task"] == "toy" and r["nfe"] == 2
    assert r["depth"]["steps"] == 2 and math.isfinite(r["test"]["rmse"])
    # encoder 8*16+16, one shared block 16*16+16, head 16+1
    assert r["params"] == 8 * 16 + 16 + 16 * 16 + 16 + 16 + 1
    assert (run_dir / "splits.json").is_file()

    # A run folder may name only the project's classes unless the user trusts their own, by
    # exact name (a prefix would reach every module the package imports).
    with pytest.raises(ConfigError, match="'toy_task.ToyRegressionData' is not allowed"):
        run.load_run(run_dir)
    monkeypatch.setenv("SCORE_EXP_TRUSTED_TARGETS", "toy_task.ToyRegressionData")
    with pytest.raises(ConfigError, match="'toy_task.ToyModel' is not allowed"):
        run.load_run(run_dir)
    monkeypatch.setenv("SCORE_EXP_TRUSTED_TARGETS", "toy_task.ToyRegressionData,toy_task.ToyModel")
    loaded = run.load_run(run_dir)  # the same builder, in this process
    assert loaded.cfg.task.name == "toy" and loaded.checkpoint.name.startswith("best-")
    saved = run.load_checkpoint(loaded.checkpoint)["state_dict"]
    for k, v in loaded.task.module.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_a_data_module_without_the_contract_is_one_clear_error(compose):
    cfg = compose("task=esol_mlp")
    cfg.task.data = {"_target_": "torch.nn.Identity"}
    with pytest.raises(ConfigError, match="lacks model_kwargs, module_kwargs, split_record"):
        run.build(cfg)


@pytest.mark.parametrize("override", ["depth.stpes=3", "+depth.stpes=3"])
def test_a_misspelt_depth_field_is_one_error_line(tmp_path, override):
    out = train_cli(tmp_path / "run", override)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line == "score-train: error: unknown depth field 'stpes' (did you mean 'steps'?)"
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="unknown depth field 'stpes'"):
        config.compose(override)


def test_the_depth_schema_refuses_a_misspelt_or_mistyped_key_in_a_config_file(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "bad.yaml").write_text("# @package _global_\ndepth:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match="stpes"):
        config.compose(f"hydra.searchpath=[file://{tmp_path}]", "experiment=bad")
    with pytest.raises(ConfigError, match="steps"):
        config.compose("depth.steps=many")


def test_presets_hold_only_what_differs_from_the_schema(compose):
    import yaml

    defaults = {f: getattr(DepthSpec, f) for f in DepthSpec.__dataclass_fields__}
    for path in sorted((Path(CONFIG_DIR) / "depth").glob("*.yaml")):
        preset = yaml.safe_load(path.read_text()) or {}
        assert preset.pop("defaults")[0] in ("_schema", "score"), path.name
        same = [k for k, v in preset.items() if k in defaults and defaults[k] == v]
        assert not same, f"{path.name} repeats the schema's defaults {same}"
    # The schema's own defaults are DepthSpec's, with the task's steps.
    cfg = compose("task=esol_mlp", "depth=score", "task.steps=3")
    assert config.depth_spec(cfg) == DepthSpec(steps=3)


def test_help_lists_the_choices_launchers_included_and_hides_internals():
    out = run_cli("--help")
    assert out.returncode == 0
    listing = out.stdout.split("Config groups", 1)[1].split("Composed config", 1)[0]
    groups = {
        line.split(":", 1)[0]: {o.strip() for o in line.split(":", 1)[1].split(",")}
        for line in listing.splitlines()[1:]
        if ":" in line
    }
    assert set(groups) == set(config.HELP_GROUPS)
    assert {"basic", "joblib", "submitit_local", "slurm"} <= groups["hydra/launcher"]
    assert {"cpu", "gpu", "ddp"} <= groups["trainer"] and "esol_mlp" in groups["task"]
    listed = set().union(*groups.values())
    assert not any(o.startswith("_") for o in listed), listed
    assert "task_base" not in out.stdout and "default" not in groups["trainer"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_doors_import_the_builder_and_never_each_other():
    pkg = REPO / "score_exp"
    modules = {d: "score_exp." + p.removesuffix(".py").replace("/", ".") for d, p in DOORS.items()}
    for door, path in DOORS.items():
        imported = _imports(pkg / path)
        # A door's own helpers in cli/ that are no door themselves (cli/common.py, cli/fit.py:
        # the run's sequence after the claim) count as the door's.
        helpers = {
            m for m in imported if m.startswith("score_exp.cli.") and m not in modules.values()
        }
        for m in helpers:
            if (pkg / (m.removeprefix("score_exp.").replace(".", "/") + ".py")).is_file():
                imported |= _imports(pkg / (m.removeprefix("score_exp.").replace(".", "/") + ".py"))
        others = {m for d, m in modules.items() if d != door}
        assert not imported & others, (door, imported & others)
        assert imported & {"score_exp.run", "score_exp"}, door
    # Only the builder reads checkpoints (through runs/checkpoints.py, the run-folder reader,
    # which loads them as data) and instantiates a task's objects.
    wings = [pkg, pkg / "cli", pkg / "bench", pkg / "runs", REPO / "scripts"]
    for path in [p for w in wings for p in w.glob("*.py")]:
        text = path.read_text()
        if path.relative_to(REPO).as_posix() not in (
            "score_exp/run.py",
            "score_exp/runs/checkpoints.py",
        ):
            assert "torch.load(" not in text, path
            assert "instantiate(cfg.task" not in text and "instantiate(run_cfg" not in text, path


def test_a_benchmark_step_is_the_modules_own_training_step(compose):
    cfg = compose("task=esol_mlp", "task.model.hidden=16", "task.model.dropout=0.0")
    torch.manual_seed(0)
    datamodule, model, module, _ = run.build(cfg)
    step = training_step_fn(module, cfg.task.gradient_clip_val)
    # The module's optimiser: AdamW with the task's weight decay (not a benchmark's own).
    assert type(step.optimizer).__name__ == "AdamW"
    assert step.optimizer.param_groups[0]["weight_decay"] == cfg.task.module.weight_decay
    batch = next(iter(datamodule.train_dataloader()))
    pred, y = module(batch)
    expected = torch.nn.functional.mse_loss(pred, y)
    before = [p.detach().clone() for p in model.parameters()]
    loss = step(batch, 0)
    assert torch.allclose(loss, expected)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not hasattr(module, "__dict__") or "log" not in module.__dict__  # restored after
