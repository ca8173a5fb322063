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


# ----------------------------------------------------------------------------- the command line

#: Hydra's options that choose another config or read a file: the checks below assume the
#: project's own config, so they step aside.
_OTHER_CONFIG_FLAGS = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir",
                       "--experimental-rerun", "-h", "--help", "--hydra-help")  # fmt: skip
#: Node keys that are built by a constructor whose arguments the config's keys must name.
_CONSTRUCTED = ("task.model", "task.data", "task.module")


def check_overrides(
    argv: Sequence[str], config_dir: str = CONFIG_DIR, config_name: str = "train"
) -> Any:
    """Refuse, in one line and before Hydra makes any folder, an override Hydra would refuse in
    many lines or a constructor with a traceback.

    * a config group's option that does not exist (``depth=scor``, ``task=esol_mpl``; every
      value of a sweep): ``did you mean``, and the choices (never ``_`` bases or ``_schema``);
    * a key that is not in the config (``task.model.hiden=32``, ``trainer.max_epoch=3``), and an
      added key (``+task.model.hiden=32``) that the task's model, data module or LightningModule
      does not take: ``did you mean``;
    * ``depth.<key>=`` fields and types (:func:`check_depth_overrides`).

    Returns the config composed from ``argv`` (for a sweep: with each swept value's first), or
    None when it does not compose here (Hydra then reports it itself) or when ``argv`` asks for
    another config or for help.

    Raises:
        ConfigError: the first override refused, with a ``did you mean`` where one is near.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    check_depth_overrides(argv)
    if any(a.split("=")[0] in _OTHER_CONFIG_FLAGS for a in argv):
        return None
    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # Hydra reports bad syntax itself, with its own message
        return None
    running = GlobalHydra.instance().hydra  # inside a Hydra app: give it back as it was
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            choices, keys = [], []
            for o in parsed:
                group = o.key_or_group.split("@")[0]
                options = loader.get_group_options(group)
                if options or "/" in group:
                    _check_choice(o, group, options)
                    if not group.startswith("hydra/"):
                        choices.append(_first(o))
                elif not o.key_or_group.startswith("hydra.") and not o.is_delete():
                    keys.append(o)
            if not choices and not keys:
                return None
            choices = [c for c in choices if c]
            try:  # as the run will compose it (a sweep: its first values)
                cfg = hydra_compose(
                    config_name, overrides=[*choices, *filter(None, map(_first, keys))]
                )
            except Exception:
                cfg = None
            if cfg is None:  # which key is wrong? (else Hydra reports it itself)
                try:
                    base = hydra_compose(config_name, overrides=choices)
                except Exception:
                    return None
                for o in keys:
                    _check_key(base, o)
                return None
            for o in keys:
                _check_key(cfg, o)  # an added key is an argument its constructor takes
            return cfg
    finally:
        GlobalHydra.instance().clear()
        if running is not None:
            GlobalHydra.instance().initialize(running)


def _values(o: Any) -> list[Any]:
    """The values an override gives (each of a sweep's), or [] when it cannot say."""
    from hydra.core.override_parser.types import ChoiceSweep, Glob

    try:
        value = o.value()
    except Exception:
        return []
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    if isinstance(value, Glob) or o.is_sweep_override():
        return []  # a range or glob: Hydra expands it against the options itself
    return [value]


def _first(o: Any) -> str | None:
    """The override with its first value (a sweep's), as text; None when that is not simple."""
    values = _values(o)
    if not values:
        return None if o.is_sweep_override() else o.input_line
    prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(o.type.name, "")
    value = values[0]
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    return f"{prefix}{o.key_or_group}={text}"


def _near(word: str, candidates: Sequence[str]) -> str:
    near = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _check_choice(o: Any, group: str, options: list[str]) -> None:
    visible = sorted(x for x in options if not x.startswith("_"))
    if not options:
        raise ConfigError(f"unknown config group {group!r}")
    for value in _values(o):
        if value is None or value in options and not str(value).startswith("_"):
            continue
        raise ConfigError(
            f"unknown {group} {value!r}{_near(value, visible)}; choices: {', '.join(visible)}"
        )


def _check_key(cfg: DictConfig, o: Any) -> None:
    """``o``'s key exists in ``cfg`` (or, added with ``+``, is an argument its node's class takes)."""
    key = o.key_or_group
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False) if parent_key else cfg
    adding = o.type.name in ("ADD", "FORCE_ADD")
    if adding and parent is None:
        return  # `+a.b.c=1` makes its parents too
    if parent is None or not isinstance(parent, DictConfig):
        where = parent_key.rpartition(".")[0]
        node = OmegaConf.select(cfg, where) if where else cfg
        near = (
            _near(parent_key.rpartition(".")[2], list(node)) if isinstance(node, DictConfig) else ""
        )
        raise ConfigError(f"unknown key {parent_key!r} in {key}={_value_text(o)}{near}")
    if not adding and name not in parent:
        raise ConfigError(
            f"unknown key {key!r}{_near(name, [k for k in parent if k != '_target_'])}"
        )
    if adding and parent_key in _CONSTRUCTED and "_target_" in parent:
        params = _arguments(str(parent._target_))
        if params is not None and name not in params:
            taken = [p for p in params if p not in ("self", "depth", "model")]
            raise ConfigError(
                f"{parent._target_.rsplit('.', 1)[-1]} ({parent_key}) takes no argument "
                f"{name!r}{_near(name, taken)}"
            )


def check_arguments(cfg: DictConfig) -> None:
    """Every key of the composed ``task.model``, ``task.data`` and ``task.module`` nodes is an
    argument of its class: a key another group left behind (an experiment's ``task.model.hidden``
    after ``task/model=attentivefp``) is one line before the run folder exists, not a TypeError
    after it."""
    for where in _CONSTRUCTED:
        node = OmegaConf.select(cfg, where, throw_on_missing=False)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        params = _arguments(str(node._target_))
        extra = [k for k in node if not str(k).startswith("_") and k not in (params or [k])]
        if extra:
            taken = [p for p in params if p not in ("self", "depth", "model")]
            raise ConfigError(
                f"{node._target_.rsplit('.', 1)[-1]} ({where}) takes no argument "
                f"{extra[0]!r}{_near(extra[0], taken)}: another config group set it (drop it with "
                f"~{where}.{extra[0]}); it takes {', '.join(taken)}"
            )


def _value_text(o: Any) -> str:
    return o.input_line.split("=", 1)[1] if o.input_line and "=" in o.input_line else "..."


def _arguments(target: str) -> list[str] | None:
    """The keyword arguments ``target`` (a class or function path) takes, through the classes
    its ``**kwargs`` reach (``super().__init__(**kwargs)``); None when that cannot be told."""
    import inspect

    from hydra.utils import get_object

    try:
        obj = get_object(target)
        inits = (
            [k.__dict__["__init__"] for k in obj.__mro__ if "__init__" in k.__dict__]
            if inspect.isclass(obj)
            else [obj]
        )
        names: list[str] = []
        for init in inits:
            params = inspect.signature(init).parameters.values()
            names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                return names
    except Exception:
        return None
    return None  # **kwargs all the way up: anything may be taken


register_configs()
