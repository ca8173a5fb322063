"""The bottom floor of everything Hydra: the config tree, composing it, and its schema.

- :data:`CONFIG_DIR` (the checkout's ``configs/``) and :func:`compose` (the config ``score-train``
  would run, without a Hydra run): the builder (:mod:`score_exp.run`) and the run-folder reader
  (:mod:`score_exp.runs.safe_load`) compose alike.
- the ``depth`` group's structured config (derived from :class:`DepthSpec`), the one-line checks
  of ``depth.<key>=`` overrides, the spec of a composed config, and ``--help``'s list of groups.

:func:`register_configs` runs when this module is imported, so every door composes with the
schema: a preset holds only what differs and a misspelt key is refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from score_exp.core import DepthSpec
from score_exp.errors import ConfigError

#: The Hydra config tree (``configs/`` of the checkout). Defined here only.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def compose(*overrides: str, config_name: str = "train") -> DictConfig:
    """The config ``score-train`` (or ``config_name``) would run, without a Hydra run.

    Raises:
        ConfigError: an override Hydra refuses (syntax, unknown key or option, wrong type).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_depth_overrides(overrides)
    # Inside a Hydra app (score-eval rebuilding a run from the project's configs), Hydra is
    # already initialised: compose beside it and give it back as it was.
    running = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        skip = ("full_key", "object_type", "reference_type")
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = " ".join(ln for ln in lines if not ln.startswith(skip)) or type(e).__name__
        raise ConfigError(f"cannot compose {' '.join(overrides)}: {why}") from None
    finally:
        if running is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(running)


def _schema_type(tp: Any) -> Any:
    """The OmegaConf type of a DepthSpec field: itself where OmegaConf knows it, else ``Any``."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if tp in (int, float, bool, str):
        return tp
    if origin is typing.Literal and all(isinstance(a, str) for a in args):
        return str  # OmegaConf 2.3 has no Literal: a string, whose value DepthSpec checks
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        inner = _schema_type(args[0])
        return typing.Optional[inner] if inner is not Any else Any  # noqa: UP045 (OmegaConf)
    return Any  # lists, unions: checked by DepthSpec.__post_init__


def depth_schema() -> type:
    """A structured-config dataclass with DepthSpec's fields (derived, so new fields come free).

    Its ``steps`` defaults to ``${task.steps}``: every preset takes the task's depth unless it
    says otherwise. Types OmegaConf cannot express become ``Any`` (the spec validates them).
    """
    hints = typing.get_type_hints(DepthSpec)
    fields = []
    for f in dataclasses.fields(DepthSpec):
        if f.default is not dataclasses.MISSING:
            default = dataclasses.field(default=f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = dataclasses.field(default_factory=f.default_factory)
        else:
            default = dataclasses.field(default="???")
        if f.name == "steps":
            default = dataclasses.field(default="${task.steps}")  # type: ignore[arg-type]
        fields.append((f.name, _schema_type(hints[f.name]), default))
    return dataclasses.make_dataclass("DepthSchema", fields)


def register_configs() -> None:
    """Register the config schemas with Hydra's ConfigStore (idempotent).

    ``depth/_schema``: every ``configs/depth/*.yaml`` preset starts from it (``defaults: [_schema,
    _self_]``), so a preset holds only what differs and an unknown or mistyped key is refused.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="depth", name="_schema", node=depth_schema())
    if not OmegaConf.has_resolver("score_help_groups"):
        OmegaConf.register_new_resolver("score_help_groups", help_groups)


HELP_GROUPS = (
    "task", "task/model", "depth", "trainer", "logger", "callbacks", "experiment", "hydra/launcher", "hydra/sweeper"
)  # fmt: skip


def help_groups() -> str:
    """``--help``'s list of choices: user-facing groups; internals (``_``-prefixed) hidden."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    lines = []
    for group in HELP_GROUPS:
        options = [o for o in sorted(loader.get_group_options(group)) if not o.startswith("_")]
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def check_depth_overrides(overrides: Sequence[str]) -> None:
    """Refuse ``depth.<key>=`` overrides whose key is no DepthSpec field, in one line.

    Hydra's own refusal (by the schema) is several lines; `score-train` and :func:`compose`
    (hence `score-bench`) run this check first.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fields = [f.name for f in dataclasses.fields(DepthSpec)]
    candidates = [o for o in overrides if o.lstrip("+~").startswith("depth.")]
    if not candidates:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(candidates)
    except Exception:  # Hydra reports bad syntax itself, with its own message
        return
    for o in parsed:
        key = o.key_or_group.split(".", 1)[1].split(".")[0]
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; valid: {', '.join(fields)}"
            raise ConfigError(f"unknown depth field {key!r}{hint}")
        _check_depth_type(key, o)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_depth_type(key: str, override: Any) -> None:
    """A ``depth.<key>=value`` the schema cannot hold (``steps=2.5``): one line, not Hydra's."""
    from omegaconf.errors import ValidationError

    nested = override.key_or_group.count(".") > 1
    if nested or override.is_sweep_override() or override.is_delete():
        return  # a sweep's values are checked job by job; Hydra reports the rest itself
    try:
        value = override.value()
        OmegaConf.merge(OmegaConf.structured(depth_schema()), {key: value})
    except ValidationError:
        tp = typing.get_type_hints(DepthSpec)[key]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        what = _TYPE_NAMES.get(inner[0], "another type")
        null = " or null" if type(None) in typing.get_args(tp) else ""
        raise ConfigError(f"depth.{key} must be {what}{null}, got {value!r}") from None
    except Exception:
        return  # an interpolation, a resolver: Hydra reports it itself


def depth_spec(cfg: DictConfig) -> DepthSpec:
    """Build and validate the :class:`DepthSpec` of a composed config.

    Raises:
        ConfigError: a field the spec refuses (unknown name, ``steps < 1``, ``dt <= 0``, ...).
    """
    fields = OmegaConf.to_container(cfg.depth, resolve=True)
    try:
        return DepthSpec(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid depth config: {e}") from None


register_configs()
