"""The builder: the one place that composes a config, builds a task and loads a run folder.

Every door (``score-train``, ``score-eval``, ``score-sample``, ``score-bench``) imports this
module and never another door, so a run, an evaluation, a sample and a benchmark build exactly
the same objects from the same config:

    cfg = compose("task=esol_mlp", "depth=stacked")     # score_exp.config: the real configs
    task = build(cfg)                                   # Task(datamodule, model, module, spec)
    run = load_run("outputs/esol_mlp/<run>")            # the same, plus the run's best weights

A task is three config nodes, ``task.data``, ``task.model`` and ``task.module`` (``_target_`` +
arguments), whose objects honour the contract below (:class:`TaskData`, :class:`TaskModule`). The
model is called as ``model(depth=DepthSpec, **datamodule.model_kwargs())`` and the module as
``module(model=model, **datamodule.module_kwargs())``. Nothing else is required: a new task is a
YAML file in a config group plus its classes (README "Add a task"); this module needs no edit.

Composition and the ``depth`` group's schema are :mod:`score_exp.config` (imported here, so the
schema is registered with Hydra's ConfigStore before anything is composed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

from omegaconf import DictConfig

from score_exp.config import check_arguments, depth_spec
from score_exp.core import DepthSpec
from score_exp.errors import ConfigError, DataError, user_error
from score_exp.runs.checkpoints import find_checkpoint, load_checkpoint
from score_exp.runs.record import CONFIG as RUN_CONFIG
from score_exp.runs.safe_load import load_run_config

log = logging.getLogger("score_exp.run")


# ----------------------------------------------------------------------------- the task contract


@runtime_checkable
class TaskData(Protocol):
    """What a task's data module (``task.data``, a ``LightningDataModule``) provides.

    ``prepare_data()`` and ``setup(stage)`` are Lightning's; then, once set up:

    * ``model_kwargs()``: arguments of the model that come from the data (input features,
      vocabulary size, ...), passed beside ``depth=``.
    * ``module_kwargs()``: arguments of the LightningModule that come from the data (target
      statistics, vocabulary), passed beside ``model=``. The module saves them as hyper-parameters:
      :func:`load_run` checks that a run's data still gives the same ones.
    * ``split_record()``: a JSON-able record of the split (indices, sizes), written to the run
      folder as ``splits.json``.
    * ``train_dataloader()``, ``val_dataloader()``, ``test_dataloader()``: Lightning's.
    """

    def prepare_data(self) -> None: ...

    def setup(self, stage: str | None = None) -> None: ...

    def model_kwargs(self) -> dict[str, Any]: ...

    def module_kwargs(self) -> dict[str, Any]: ...

    def split_record(self) -> dict[str, Any]: ...

    def train_dataloader(self) -> Iterable: ...

    def val_dataloader(self) -> Iterable: ...

    def test_dataloader(self) -> Iterable: ...


@runtime_checkable
class TaskModule(Protocol):
    """What a task's LightningModule (``task.module``) provides beyond Lightning's hooks.

    * ``model``: the ``nn.Module`` it trains (its ``depth`` attribute, a
      :class:`~score_exp.core.RecurrentDepth`, is what diagnostics, growth and ``score-eval`` use).
    * ``training_step(batch, batch_idx) -> loss`` and ``configure_optimizers()``: the training
      work; ``score-bench`` times exactly these, so a benchmark times what a run trains.
    * ``validation_step`` / ``test_step`` logging ``val/<metric>`` and ``test/<metric>``, among them
      ``task.monitor`` and ``test/<task.headline>``.
    """

    model: Any

    def training_step(self, batch: Any, batch_idx: int) -> Any: ...

    def configure_optimizers(self) -> Any: ...


class Task(NamedTuple):
    """What :func:`build` returns: the three objects of a run and its validated depth."""

    datamodule: TaskData
    model: Any
    module: TaskModule
    spec: DepthSpec


class LoadedRun(NamedTuple):
    """What :func:`load_run` returns: a run folder's task with the checkpoint's weights loaded."""

    cfg: DictConfig
    task: Task
    checkpoint: Path
    meta: dict[str, Any]  # the checkpoint without its state_dict: epoch, global_step, hparams


# ----------------------------------------------------------------------------- building


def build(
    cfg: DictConfig,
    stage: str = "fit",
    spec: DepthSpec | None = None,
    model_overrides: dict[str, Any] | None = None,
) -> Task:
    """Data module (prepared and set up for ``stage``), model and LightningModule of ``cfg``.

    The one place a task is built: training, evaluation, sampling and benchmarks all call it.

    Args:
        cfg: a composed ``score-train`` config (or a run folder's ``config.yaml``).
        stage: Lightning's ``setup`` stage of the data module.
        spec: the depth; default ``depth_spec(cfg)``.
        model_overrides: model arguments replacing the config's (e.g. ``compile=False``).

    Raises:
        ConfigError: the data module does not honour :class:`TaskData`.
    """
    from hydra.utils import instantiate

    spec = depth_spec(cfg) if spec is None else spec
    datamodule = data_module(cfg)
    missing = [
        m for m in ("model_kwargs", "module_kwargs", "split_record") if not hasattr(datamodule, m)
    ]
    if missing:
        raise ConfigError(
            f"{type(datamodule).__name__} (task.data) lacks {', '.join(missing)}: "
            "a task's data module must honour score_exp.run.TaskData"
        )
    datamodule.prepare_data()
    datamodule.setup(stage)
    overrides = {k: v for k, v in (model_overrides or {}).items() if k in cfg.task.model}
    # _partial_: Hydra would turn the DepthSpec dataclass into a DictConfig if passed to instantiate.
    model = instantiate(cfg.task.model, _partial_=True)(
        depth=spec, **datamodule.model_kwargs(), **overrides
    )
    module = instantiate(cfg.task.module, model=model, **datamodule.module_kwargs())
    return Task(datamodule, model, module, spec)


def data_module(cfg: DictConfig):
    """The task's data module, built but not prepared: its constructor checks its values.

    Raises:
        ScoreExpError: a bad ``task.data`` value, unwrapped from Hydra's instantiate.
    """
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.task.data)
    except Exception as e:
        if (error := user_error(e)) is None:
            raise
        raise error from None


def trainable_params(model) -> int:
    """Parameters that the optimiser updates (the count in ``results.json``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- run folders


def run_config(run_dir: Path) -> DictConfig:
    """The config of a run folder, rebuilt: the project's task config with the folder's values.

    Only plain values for the project's keys are taken from ``config.yaml`` (no ``_target_``,
    no interpolation), so that building it runs nothing but the project's (and the explicitly
    trusted) classes (:func:`score_exp.runs.safe_load.load_run_config`).
    """
    return load_run_config(Path(run_dir))


def load_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    stage: str = "fit",
    spec: DepthSpec | None = None,
    model_overrides: dict[str, Any] | None = None,
) -> LoadedRun:
    """Rebuild a run from its folder: its config, its task, its checkpoint's weights.

    The model is built from ``config.yaml`` exactly as ``score-train`` built it (seeded with the
    run's seed), then the checkpoint's ``state_dict`` is loaded into the module (a grown depth
    resizes itself to it).

    Args:
        run_dir: a ``score-train`` run folder.
        checkpoint: relative to ``run_dir``; default results.json's best, else ``last.ckpt``.
        stage, spec, model_overrides: as for :func:`build` (``spec`` default: the run's).

    Raises:
        ConfigError: no such folder or checkpoint.
        DataError: the data rebuilt from the config differs from the one the checkpoint was
            trained on (a ``module_kwargs()`` value such as the vocabulary changed).
    """
    import lightning as L

    run_dir = Path(run_dir).expanduser()
    ckpt_path = find_checkpoint(run_dir, checkpoint)
    cfg = run_config(run_dir)
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise DataError(
            f"checkpoint {ckpt_path} holds no state_dict (a mapping of parameter names to "
            "tensors): it is not a score-train checkpoint"
        )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = build(cfg, stage, spec=spec, model_overrides=model_overrides)
    saved = ckpt.get("hyper_parameters")
    saved = saved if isinstance(saved, dict) else {}
    for key, value in task.datamodule.module_kwargs().items():
        if key in saved and saved[key] != value:
            raise DataError(
                f"the {key} rebuilt from {run_dir / RUN_CONFIG} differs from the one the "
                f"checkpoint {ckpt_path} was trained with (has the data changed?)"
            )
    try:
        task.module.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as e:
        why = " ".join(str(e).split())  # torch lists every missing key and shape on lines
        raise DataError(
            f"checkpoint {ckpt_path} does not match the model rebuilt from "
            f"{run_dir / RUN_CONFIG}: {why[:300]}{'...' if len(why) > 300 else ''}"
        ) from None
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    log.info("loaded %s (step %s) with depth %s", ckpt_path, ckpt.get("global_step"), task.spec)
    return LoadedRun(cfg, task, ckpt_path, meta)


def check_constructors(cfg: DictConfig) -> None:
    """The values the data module and the LightningModule check in their constructors, before
    Hydra makes the run folder (cheap: nothing is read or built; only the builder instantiates a
    task's objects, so this check lives here)."""
    import torch
    from hydra.utils import instantiate

    check_arguments(cfg)  # the model's too: by signature, as it needs the data's sizes
    for node, kwargs in (("data", {}), ("module", {"model": torch.nn.Identity()})):
        try:
            instantiate(cfg.task[node], **kwargs)
        except Exception as e:
            if (error := user_error(e)) is not None:
                raise error from None
            # Anything else (an argument only the data provides): the run reports it itself.
