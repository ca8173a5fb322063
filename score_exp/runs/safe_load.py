"""Rebuild, don't instantiate: a run's config from the project's configs and the folder's values.

A run folder's ``config.yaml`` is data. :func:`load_run_config` (what ``score-eval``,
``score-sample`` and every reader build a run from) composes the run's task from the project's
own config files (``configs/task/<task.name>.yaml``) and takes from the folder only plain values
for keys that composition has: no ``_target_`` other than the one the project's config names at
that place (a class that has moved since the folder was made is read under its new name:
:data:`~score_exp.runs.fingerprint.RENAMED_TARGETS`), no Hydra instantiation key (``_args_``, ``_partial_``...), no interpolation
(``${...}`` anywhere is refused: the file is loaded without resolvers), no mapping where the
project's config holds a value. The trainer, callbacks and loggers of the folder are not read:
a reader builds only ``task.data``, ``task.model`` and ``task.module``.

A task that is not the project's (your own package, README "Add a task") is trusted by exact
name: ``SCORE_EXP_TRUSTED_TARGETS=mypkg.data.MyData,mypkg.models.MyModel`` (comma-separated
dotted names, never prefixes). This module holds the one allow-list (:func:`allowed_targets`).

An Optuna study's database is data too: :func:`study_overrides` lets through only values
for keys the composed config has (or options of its config groups), never a ``_target_``, an added
or deleted key, an interpolation or a path of the run folder.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from score_exp.config import CONFIG_DIR, compose
from score_exp.errors import ConfigError, check_seed
from score_exp.runs.files import load_yaml
from score_exp.runs.fingerprint import RENAMED_TARGETS
from score_exp.runs.record import CONFIG, LIMITS, RunFolder

#: The environment variable naming your own task's classes (exact dotted names, comma-separated).
TRUSTED_ENV = "SCORE_EXP_TRUSTED_TARGETS"
#: The task nodes a reader instantiates (README "Add a task").
SLOTS = ("data", "model", "module")
#: Groups whose options a study may choose (``experiment=tune_esol_mlp`` ...).
STUDY_GROUPS = ("experiment", "task", "depth", "trainer", "logger", "callbacks")

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")


class UnsafeRunConfig(ConfigError):
    """A value of a run folder or study that is code, an interpolation or an unknown key."""


def trusted_targets() -> frozenset[str]:
    """The exact ``_target_`` names in ``$SCORE_EXP_TRUSTED_TARGETS``.

    Raises:
        ConfigError: an entry that is not a dotted name (``mypkg.`` prefixes are no longer
            accepted: a prefix reaches every module its package imports).
    """
    out = set()
    for entry in os.environ.get(TRUSTED_ENV, "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        if not _DOTTED.fullmatch(entry):
            raise ConfigError(
                f"{TRUSTED_ENV} names exact targets, comma-separated (e.g. "
                f"mypkg.data.MyData,mypkg.models.MyModel), got {entry!r}"
            )
        out.add(entry)
    return frozenset(out)


def _config_dir() -> Path:
    return Path(CONFIG_DIR)


def project_tasks() -> list[str]:
    """The project's task names (``configs/task/*.yaml`` without the ``_`` bases)."""
    return sorted(p.stem for p in (_config_dir() / "task").glob("*.yaml") if p.stem[0] != "_")


@functools.cache
def _project_task(name: str, model: str | None = None) -> dict:
    """The task node of ``configs/task/<name>.yaml`` (with ``task/model=<model>`` when given),
    composed, interpolations left as they are."""
    choice = [f"task/model={model}"] if model else []
    return OmegaConf.to_container(compose(f"task={name}", *choice).task, resolve=False)


def project_models() -> list[str]:
    """The options of the ``task/model`` group (``configs/task/model/*.yaml``)."""
    return sorted(p.stem for p in (_config_dir() / "task" / "model").glob("*.yaml"))


def _project_task_for(name: str, task: dict) -> dict:
    """The project's task ``name`` with the ``task/model`` option that builds the folder's model.

    A task's model is a config group (``task/model=attentivefp``): the option is found by the
    ``_target_`` the folder names, among the project's own options only. A task without the
    group, or a target none of its options builds, keeps the task's default (and is refused
    key by key by :func:`_values_onto`).
    """
    base = _project_task(name)
    model = task.get("model")
    target = model.get("_target_") if isinstance(model, dict) else None
    if target == base.get("model", {}).get("_target_"):
        return base
    for option in project_models():
        try:
            candidate = _project_task(name, option)
        except ConfigError:  # a task whose defaults have no model group
            return base
        if candidate.get("model", {}).get("_target_") == target:
            return candidate
    return base


def allowed_targets(slot: str) -> frozenset[str]:
    """What ``task.<slot>._target_`` of a task outside the project may name: the project's own
    classes for that slot (a task may reuse ``RegressionModule``) and :func:`trusted_targets`."""
    own = {_project_task(t)[slot].get("_target_") for t in project_tasks()}
    return frozenset(t for t in own if isinstance(t, str)) | trusted_targets()


# ----------------------------------------------------------------------------- run folders


def load_run_config(run_dir: str | os.PathLike) -> DictConfig:
    """A run folder's config, rebuilt: the project's task config with the folder's plain values.

    Returns a config holding ``seed``, ``task``, ``depth`` (and ``depth_preset``,
    ``experiment_name``), every value resolved.

    Raises:
        ConfigError: no ``config.yaml``, or one line naming the key that is code, an
            interpolation, unknown to the project's config, or of the wrong kind.
    """
    path = RunFolder(run_dir).config
    try:
        raw = load_yaml(path, LIMITS[CONFIG])
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} is not a score-train run folder (no {CONFIG})") from None
    if not isinstance(raw, dict):
        raise UnsafeRunConfig(f"{path} is not a score-train config (a mapping)")
    where = str(path)
    _refuse_interpolations(raw, where)
    task = raw.get("task")
    name = task.get("name") if isinstance(task, dict) else None
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UnsafeRunConfig(f"{where}: task.name is {name!r}, not a task's name")
    _refuse_code(task, where, "task", slots=True)
    task = _renamed(task)
    if name in project_tasks():
        task_cfg = _values_onto(_project_task_for(name, task), task, "task", where, name)
    else:
        task_cfg = _own_task(task, where, name)
    depth = raw.get("depth")
    if not isinstance(depth, dict):
        raise UnsafeRunConfig(f"{where}: depth is {type(depth).__name__}, not a mapping")
    _refuse_code(depth, where, "depth")
    try:
        seed = check_seed(raw.get("seed"))
    except ConfigError as e:
        raise UnsafeRunConfig(f"{where}: {e}") from None
    cfg: dict[str, Any] = {"seed": seed, "task": task_cfg, "depth": depth}
    for key in ("depth_preset", "experiment_name"):
        if isinstance(raw.get(key), str):
            cfg[key] = raw[key]
    out = OmegaConf.create(cfg)
    try:
        OmegaConf.resolve(out)  # the project's own interpolations (${seed}, ${task.max_steps})
    except Exception as e:
        raise UnsafeRunConfig(f"{where}: {str(e).splitlines()[0]}") from None
    return out


def _renamed(task: dict) -> dict:
    """``task`` with each slot's ``_target_`` renamed by :data:`RENAMED_TARGETS` (a copy)."""
    out = dict(task)
    for slot in SLOTS:
        node = out.get(slot)
        if isinstance(node, dict) and node.get("_target_") in RENAMED_TARGETS:
            out[slot] = {**node, "_target_": RENAMED_TARGETS[node["_target_"]]}
    return out


def _walk(node: Any, path: str):
    """``(dotted key, key, value)`` of every entry under ``node`` (mappings and lists)."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        sub = f"{path}.{key}" if isinstance(node, dict) else f"{path}[{key}]"
        yield sub, key, value
        if isinstance(value, (dict, list)):
            yield from _walk(value, sub)


def _refuse_interpolations(raw: dict, where: str) -> None:
    for sub, key, value in _walk(raw, ""):
        for text in (key, value):
            if isinstance(text, str) and "${" in text:
                raise UnsafeRunConfig(
                    f"{where}: {sub.lstrip('.')} = {text!r} is an interpolation: a run folder "
                    "holds resolved values only (nothing in it is resolved)"
                )


def _refuse_code(node: dict, where: str, path: str, slots: bool = False) -> None:
    """No ``_target_`` but at ``task.<slot>._target_``, no other ``_``-key, no non-str key."""
    for sub, key, value in _walk(node, path):
        if not isinstance(key, (str, int)):
            raise UnsafeRunConfig(f"{where}: {sub} has a key of type {type(key).__name__}")
        at_slot = slots and sub in {f"task.{s}._target_" for s in SLOTS}
        if key == "_target_" and not at_slot:
            raise UnsafeRunConfig(
                f"{where}: {sub} = {str(value)!r} is not allowed: a run folder names no code "
                f"(a reader builds task.data, task.model and task.module only)"
            )
        if isinstance(key, str) and key.startswith("_") and key != "_target_":
            raise UnsafeRunConfig(f"{where}: {sub} is not allowed: a run folder names no code")


def _values_onto(base: Any, folder: Any, path: str, where: str, name: str) -> Any:
    """``folder``'s values onto the project's ``base``, key by key (the schema is ``base``)."""
    if not isinstance(base, dict):
        if isinstance(folder, dict):
            raise UnsafeRunConfig(
                f"{where}: {path} is a mapping where configs/task/{name}.yaml holds a value"
            )
        return folder
    if not isinstance(folder, dict):
        raise UnsafeRunConfig(
            f"{where}: {path} = {folder!r} where configs/task/{name}.yaml holds a mapping"
        )
    out = dict(base)
    for key, value in folder.items():
        sub = f"{path}.{key}"
        if key == "_target_":
            if value != base.get("_target_"):
                raise UnsafeRunConfig(
                    f"{where}: {sub} = {value!r} is not allowed: configs/task/{name}.yaml "
                    f"builds {path} with {base.get('_target_')!r}"
                )
            continue
        if key not in base:
            raise UnsafeRunConfig(
                f"{where}: {sub} is not a key of configs/task/{name}.yaml (a run folder gives "
                "values for the project's keys only)"
            )
        out[key] = _values_onto(base[key], value, sub, where, name)
    return out


def _own_task(task: dict, where: str, name: str) -> dict:
    """A task outside the project: each slot's ``_target_`` must be allowed by exact name."""
    for slot in SLOTS:
        node = task.get(slot)
        target = node.get("_target_") if isinstance(node, dict) else None
        if not isinstance(target, str) or target not in allowed_targets(slot):
            raise UnsafeRunConfig(
                f"{where}: task.{slot}._target_ = {target!r} is not allowed: task {name!r} is not "
                f"one of the project's ({', '.join(project_tasks())}); trust your own classes by "
                f"exact name with {TRUSTED_ENV}=mypkg.data.MyData,mypkg.models.MyModel"
            )
    return task


# ----------------------------------------------------------------------------- Optuna studies


def study_overrides(overrides: list[str], where: str) -> list[str]:
    """The overrides a study stored, checked as values for known keys; Hydra's own dropped.

    Each ``key=value`` must change a key the composed ``score-train`` config has (or choose an
    existing option of a config group), with a plain value: no ``+``/``~`` prefix, no
    ``_target_`` or other ``_``-key, no interpolation, no sweep, and no key whose default is a
    path of the run folder (``${hydra:...}``: where checkpoints and logs go). ``hydra.*`` and
    ``hydra/*`` overrides (the study's own sweep settings, launcher) are left out: a re-trained
    run sets its own.

    Raises:
        ConfigError: one line naming the study and the override.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    def refuse(override: str, why: str) -> None:
        raise UnsafeRunConfig(
            f"{where}: the stored override {override!r} is not allowed ({why}): a study "
            "holds values for the project's keys only"
        )

    parser = OverridesParser.create()
    kept, groups = [], []
    for text in overrides:
        try:
            (o,) = parser.parse_overrides([text])
        except Exception as e:
            refuse(text, str(e).strip().splitlines()[0] if str(e).strip() else "not an override")
        key = o.key_or_group
        parts = re.split(r"[./@]", key)
        if o.type == OverrideType.CHANGE and o.package is None and parts[0] == "hydra":
            continue  # the study's sweep settings: not the run's configuration
        if o.type != OverrideType.CHANGE or o.package is not None:
            refuse(text, "a study may only change values of existing keys")
        if o.is_sweep_override() or "${" in text:
            refuse(text, "a sweep or an interpolation, not a value")
        if any(p.startswith("_") for p in parts):
            refuse(text, "instantiation keys are not values")
        value = o.value()
        if key in STUDY_GROUPS:
            options = [p.stem for p in (_config_dir() / key).glob("*.yaml") if p.stem[0] != "_"]
            if not isinstance(value, str) or value not in options:
                refuse(text, f"{key} must be one of {', '.join(sorted(options))}")
            groups.append(text)
        elif "/" in key:
            refuse(text, "not a key of the config")
        elif not _plain(value):
            refuse(text, "not a plain value")
        kept.append(text)
    composed = OmegaConf.to_container(compose(*groups), resolve=False)
    for text in kept:
        key = text.split("=", 1)[0]
        if key in STUDY_GROUPS:
            continue
        node: Any = composed
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                refuse(text, "no such key")
            node = node[part]
        defaults = [v for _, _, v in _walk(node, "")] if isinstance(node, (dict, list)) else [node]
        if any(isinstance(v, str) and "${hydra:" in v for v in defaults):
            refuse(text, "a path of the run folder")
    try:
        compose(*kept)  # types and values the schema refuses
    except ConfigError as e:
        raise UnsafeRunConfig(f"{where}: {e}") from None
    return kept


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))
