"""configs/callbacks/default.yaml is the one registration path of the run's callbacks, and each of
them is a no-op for a run without its feature."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY, load_results, train_cli, train_in_process
from torch import nn

from score_exp.core import DepthSpec, RecurrentDepth

# The callbacks of every run, in the order score-train gives them to Lightning (the order in
# which Lightning calls them, checkpoint callbacks last): the order of the code that built them.
REGISTERED = {
    "model_checkpoint": "lightning.pytorch.callbacks.ModelCheckpoint",
    "early_stopping": "lightning.pytorch.callbacks.EarlyStopping",
    "last_checkpoint": "score_exp.tasks.callbacks.LastCheckpoint",
    "divergence": "score_exp.tasks.callbacks.DivergenceDetector",
    "timer": "score_exp.tasks.callbacks.RunTimer",
    "rng_state": "score_exp.tasks.callbacks.RNGStateCheckpoint",
    "relative_best": "score_exp.tasks.relocation.RelativeBestCheckpoint",
    "depth_diagnostics": "score_exp.tasks.callbacks.DepthDiagnostics",
    "depth_growth": "score_exp.tasks.callbacks.DepthGrowth",
    "random_depth": "score_exp.tasks.callbacks.RandomDepth",
    "fixed_point_solves": "score_exp.tasks.callbacks.FixedPointSolves",
}
# The callbacks of a depth feature: for a run without it they log and save nothing.
FEATURE = ("depth_growth", "random_depth", "fixed_point_solves")


def test_every_callback_of_a_run_is_registered_in_yaml_in_order(compose):
    cfg = compose()
    assert {k: v["_target_"] for k, v in cfg.callbacks.items()} == REGISTERED
    assert cfg.callbacks.random_depth.seed == cfg.seed


def _block():
    return nn.Sequential(nn.Linear(5, 5), nn.Tanh())


def _toy(monitor: str, depth: bool):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.depth = RecurrentDepth(_block, DepthSpec(steps=3, dt=0.5))
            if not depth:  # a model without a RecurrentDepth (a reference model)
                self.model.depth = nn.Linear(5, 5)
            self.head = nn.Linear(5, 1)

        def forward(self, x):
            return self.head(self.model.depth(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log(monitor, nn.functional.mse_loss(self(x), y).sqrt())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Module()


def _fit(cfg, callbacks, tmp_path, depth: bool = True):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 5), torch.randn(32, 1))
    module = _toy(cfg.task.monitor, depth)
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.Checkpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=16))
    return trainer, module


@pytest.mark.parametrize("name", list(REGISTERED))
@pytest.mark.parametrize("depth", [True, False], ids=["score", "no-depth"])
def test_each_registered_callback_changes_nothing_in_a_run_without_its_feature(
    compose, tmp_path, name, depth
):
    """Every callback of the YAML, as the YAML builds it, on a depth without growth, drawn steps
    or a solver (and on a model without a depth): the trained weights are those of a run
    without it, nothing raises, and a feature's callback logs and saves nothing."""
    from hydra.utils import instantiate

    cfg = compose()
    entry = cfg.callbacks[name]
    if "dirpath" in entry:  # ${hydra:runtime.output_dir} exists in a Hydra run only
        entry.dirpath = str(tmp_path / "checkpoints")
    callback = instantiate(entry)
    _, without = _fit(cfg, [], tmp_path / "without", depth)
    trainer, module = _fit(cfg, [callback], tmp_path / "with", depth)
    for (k, a), (_, b) in zip(
        without.state_dict().items(), module.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    if name in FEATURE:
        assert callback.active is False and callback.state_dict() == {}
        assert set(trainer.callback_metrics) == {cfg.task.monitor}


def _without_feature_callbacks(run_dir) -> dict:
    """Whatever a run folder holds that the run's numbers or resume state are made of."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return {
        "metrics": (run_dir / "metrics.csv").read_text(),
        "callback states": sorted(ckpt["callbacks"]),
        "results": {k: load_results(run_dir)[k] for k in ("val", "test", "params", "nfe")},
    }


@pytest.fixture
def process_threads():
    """Torch's thread count and oneDNN switch in this process, restored after the test."""
    saved = torch.get_num_threads(), torch.backends.mkldnn.enabled
    yield saved
    torch.set_num_threads(saved[0])
    torch.backends.mkldnn.enabled = saved[1]


@pytest.mark.slow
def test_the_feature_callbacks_are_no_ops_in_a_real_run(tmp_path, process_threads):
    """score-train with every feature callback nulled writes the same numbers, metrics and
    checkpoint states as with them (a score depth: no growth, fixed steps, unrolled).

    The second run starts in a process that an earlier run left at another thread count and
    oneDNN off (what a portable run or Lightning's DDP launcher leaves): the bits of a reduction
    depend on the thread count, so unless each run takes its process's own defaults, the two
    runs differ (issue 28's intermittent failure: score_exp.numerics.apply pins them)."""
    on, off = tmp_path / "on", tmp_path / "off"
    assert train_in_process(on, *TINY).status == "ok"
    torch.set_num_threads(1 if process_threads[0] > 1 else 2)
    torch.backends.mkldnn.enabled = False
    assert train_in_process(off, *TINY, *(f"callbacks.{n}=null" for n in FEATURE)).status == "ok"
    assert load_results(on)["numerics"] == load_results(off)["numerics"]
    assert _without_feature_callbacks(on) == _without_feature_callbacks(off)


@pytest.mark.slow
def test_a_folder_made_before_the_callbacks_were_registered_is_still_recognised(tiny_run, tmp_path):
    """A run folder whose fingerprint predates the YAML entries (made when score-train built
    these callbacks in code) is skipped by the same command, not refused as another config."""
    from score_exp.runs.fingerprint import fingerprint
    from score_exp.runs.record import FINGERPRINT

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)  # score-train's TINY run (a copy: edited below)
    # What that score-train wrote: the same identity without the entries added since.
    path = run_dir / FINGERPRINT
    added = tuple(f"callbacks.{n}" for n in list(REGISTERED)[4:])
    stored = json.loads(path.read_text())["identity"]
    old = {k: v for k, v in stored.items() if not k.startswith(added)}
    path.write_text(json.dumps({"fingerprint": fingerprint(old), "identity": old}))
    out = train_cli(run_dir, *TINY)
    assert out.returncode == 0 and "already finished" in out.stderr, out.stderr[-400:]


@pytest.mark.slow
def test_a_nulled_divergence_detector_or_timer_is_replaced_by_its_default(tmp_path):
    """The two callbacks whose state results.json records cannot be switched off: nulled, each
    runs with its defaults (divergence: non-finite checks only), so the record stays complete."""
    run_dir = tmp_path / "run"
    train_in_process(run_dir, *TINY, "callbacks.divergence=null", "callbacks.timer=null")
    results = load_results(run_dir)
    assert results["status"] == "ok" and results["epochs_timed"] == 2
    assert results["time_per_step_s"] > 0
