"""``task.model.compile=true`` on CPU: the same losses as eager, and no recompilation after warm-up.

Two kinds of test:

* through the real CLI with the default backend (inductor, which builds C++ kernels with the
  machine's C compiler): compiled and eager runs give the same training and validation losses,
  and ``TORCH_LOGS=recompiles`` shows the one inherent recompile (training -> validation);
* in one process, with a counted inventory of the graphs dynamo compiles while a real Trainer
  trains, validates, samples and evaluates with depth overrides. These use the ``aot_eager``
  backend (no C++ build, so they take seconds instead of minutes): whether a call recompiles is
  decided by dynamo's guards before any backend runs, so the count is the same under inductor.

Compile counts are ``torch._dynamo.utils.counters["stats"]["unique_graphs"]`` (one per compiled
graph; the models compile with no graph break, so one per (re)compilation).
"""

from __future__ import annotations

import csv
import math
import re

import lightning as L
import pytest
import torch
import torch._dynamo
from conftest import load_results, train_cli
from hydra.utils import instantiate
from torch._dynamo.utils import counters

from score_exp import run
from score_exp.tasks.callbacks import DepthDiagnostics

pytestmark = pytest.mark.slow

BACKEND = "aot_eager"


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


class GraphCount(L.Callback):
    """Compiled graphs after every training step and every validation."""

    def __init__(self) -> None:
        self.after_step: list[int] = []
        self.after_val: list[int] = []

    def on_train_batch_end(self, *args) -> None:
        self.after_step.append(graphs())

    def on_validation_end(self, trainer, pl_module) -> None:
        self.after_val.append(graphs())


def fit(compose, tmp_path, *overrides: str):
    """Build a task and its Trainer as score-train does, compile the model with BACKEND, fit it,
    then validate and test at the best checkpoint (as score-train does); count graphs."""
    cfg = compose(
        *overrides, f"trainer.default_root_dir={tmp_path}", "trainer.enable_progress_bar=false"
    )
    L.seed_everything(cfg.seed, verbose=False)
    datamodule, model, module, _ = run.build(cfg, "fit")
    model.compile(backend=BACKEND)
    torch._dynamo.reset()  # the cache and counters are per process: start from zero
    counters.clear()
    count = GraphCount()
    # score-train's no-grad trace of the depth at every validation too
    trainer = instantiate(cfg.trainer, callbacks=[count, DepthDiagnostics()], logger=False)
    trainer.fit(module, datamodule=datamodule)
    count.after_fit = graphs()
    trainer.validate(module, datamodule=datamodule, ckpt_path="best", verbose=False)
    trainer.test(module, datamodule=datamodule, ckpt_path="best", verbose=False)
    return model, datamodule, count


GPT_TINY = (
    "task=shakespeare_char_cpu",
    "depth=score",
    "task.max_steps=9",
    "task.val_check_interval=3",
    "task.data.eval_iters=2",
)


def test_gpt_compiles_once_for_training_once_for_evaluation(compose, tmp_path):
    *_, count = fit(compose, tmp_path, *GPT_TINY)
    assert count.after_step[0] == 1  # the first step compiles the training graph
    # Validation (eval mode, no grad) is one more graph, compiled at the first one; the steps
    # and validations after it, and the final validate/test at the best checkpoint, reuse them.
    assert count.after_val == [2, 2, 2, 2]  # 3 during fit, then trainer.validate
    assert count.after_step[-1] == count.after_fit == graphs() == 2


def test_gpt_sampling_and_depth_overrides_recompile_only_where_inherent(compose, tmp_path):
    model, datamodule, _ = fit(compose, tmp_path, *GPT_TINY)
    model.eval()
    depth = model.depth
    x, y = next(iter(datamodule.val_dataloader()))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        # Sampling, one prompt at a time as score-sample does: the context grows by one token
        # per call. The first length compiles a static graph, the second a dynamic one
        # (automatic dynamic shapes); then no more, whatever the prompt or number of tokens.
        model.generate(x[:1, :4].contiguous(), 3)
        assert graphs() == 2
        # another prompt, and past block_size (64): the context is cropped
        model.generate(x[1:2, :9].contiguous(), 70)
        assert graphs() == 2

        # score-eval's dt override: a float. Its first value specialises, the second makes it
        # dynamic; later values reuse that graph.
        torch._dynamo.reset()
        counters.clear()
        for dt in (0.25, 0.3):
            with depth.discretised(dt=dt):
                model(x, y)
        warm = graphs()
        assert warm == 2
        for dt in (0.4, 0.125, 0.7):
            with depth.discretised(dt=dt):
                model(x, y)
        assert graphs() == warm

        # A new step count or integrator is a new unrolled loop: one graph each (inherent), and
        # none when the same value comes again.
        torch._dynamo.reset()
        counters.clear()
        for steps in (2, 8, 2, 8):
            with depth.discretised(steps=steps):
                model(x, y)
        assert graphs() == 2
        for integrator in ("heun", "rk4", "heun"):
            with depth.discretised(integrator=integrator):
                model(x, y)
        assert graphs() == 4


def test_mlp_recompiles_only_in_the_first_epoch(compose, tmp_path):
    """ESOL's last training batch is smaller than 64: its first occurrence recompiles with a
    dynamic batch size, in the first epoch only; evaluation then compiles dynamic at once."""
    *_, count = fit(
        compose, tmp_path, "task=esol_mlp", "task.model.hidden=32", "trainer.max_epochs=3"
    )
    per_epoch = len(count.after_step) // 3
    first_epoch = count.after_val[0]
    # full batches: 1 graph; the short last one: +1 (batch size dynamic); evaluation: +1, its
    # full and short batches alike (dynamo remembers that this dimension varies)
    assert count.after_step[: per_epoch - 1] == [1] * (per_epoch - 1)
    assert count.after_step[per_epoch - 1] == 2
    assert first_epoch == 3
    assert count.after_step[per_epoch:] == [first_epoch] * (2 * per_epoch)
    assert count.after_val == [first_epoch] * 4  # 3 during fit, then trainer.validate
    assert graphs() == first_epoch  # the test split (64 + 49 molecules) too


# ----------------------------------------------------------------------------- the real CLI

RECOMPILING = re.compile(r"Recompiling function (\w+)")


def _train_losses(run_dir) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    key = "train/loss" if rows and "train/loss" in rows[0] else None
    assert key, "metrics.csv has no train/loss column"
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def _compiled_and_eager(tmp_path, *overrides):
    runs = {}
    for name, compile_ in (("eager", "false"), ("compiled", "true")):
        run_dir = tmp_path / name
        out = train_cli(
            run_dir,
            *overrides,
            f"task.model.compile={compile_}",
            env=_env(TORCH_LOGS="recompiles"),
        )
        assert out.returncode == 0, out.stderr[-3000:]
        r = load_results(run_dir)
        assert r["status"] == "ok", r.get("error")
        runs[name] = (r, _train_losses(run_dir), RECOMPILING.findall(out.stderr))
    return runs


def _env(**extra):
    from conftest import cli_env

    return cli_env(OMP_NUM_THREADS="1", **extra)


# Inductor's CPU kernels sum in another order than eager's: losses agree to float32 rounding,
# which a few dozen Adam steps amplify a little. Stated tolerance: 1e-4 relative.
RTOL = 1e-4


def test_cli_compiled_gpt_trains_like_eager_with_one_inherent_recompile(tmp_path):
    runs = _compiled_and_eager(
        tmp_path,
        "task=shakespeare_char_cpu",
        "task.max_steps=30",
        "task.val_check_interval=15",
        "task.data.eval_iters=4",
        "task.log_every_n_steps=5",
    )
    (eager, eager_loss, none), (compiled, compiled_loss, recompiles) = (
        runs["eager"],
        runs["compiled"],
    )
    assert none == []
    assert recompiles == ["forward"]  # training -> validation, once; never per step
    assert sorted(eager_loss) == sorted(compiled_loss) and len(eager_loss) >= 5
    for step, loss in eager_loss.items():
        assert math.isclose(compiled_loss[step], loss, rel_tol=RTOL), step
    assert math.isclose(compiled["test"]["loss"], eager["test"]["loss"], rel_tol=RTOL)
    assert compiled["params"] == eager["params"]  # nn.Module.compile keeps parameter names


def test_cli_compiled_mlp_trains_like_eager(tmp_path):
    # dropout=0: compiled dropout draws its masks from inductor's own generator, so with dropout
    # the two runs would differ by their masks, not by the compiler's numerics.
    runs = _compiled_and_eager(
        tmp_path,
        "task=esol_mlp",
        "task.model.hidden=64",
        "task.model.dropout=0",
        "trainer.max_epochs=4",
    )
    (eager, eager_loss, none), (compiled, compiled_loss, recompiles) = (
        runs["eager"],
        runs["compiled"],
    )
    assert none == []
    # the short last training batch (dynamic batch size), then evaluation: both in epoch 1
    assert len(recompiles) == 2
    assert len(eager_loss) == 4 and sorted(eager_loss) == sorted(compiled_loss)
    for step, loss in eager_loss.items():
        assert math.isclose(compiled_loss[step], loss, rel_tol=RTOL), step
    assert math.isclose(compiled["test"]["rmse"], eager["test"]["rmse"], rel_tol=RTOL)
