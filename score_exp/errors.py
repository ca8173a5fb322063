"""Errors that the CLI reports as one clear message (no traceback) before any work starts."""

from __future__ import annotations


class ScoreExpError(Exception):
    """Base class: a user-facing problem with the configuration or the data."""

    exit_code = 2  # the CLIs' exit status for it


class ConfigError(ScoreExpError, ValueError):
    """The configuration asks for something invalid (unknown name, steps < 1, dt <= 0, ...).

    Raised by the object that owns the value (a data module, a LightningModule, a model), with
    the config key, the value and what is valid: ``task.data.batch_size must be >= 1, got 0``.
    """


class DataError(ScoreExpError):
    """A data file is missing, corrupt (checksum) or malformed (columns, values)."""


class CheckpointWriteError(ScoreExpError):
    """A checkpoint could not be written (disk full, permissions); nothing partial was left."""

    exit_code = 1


def user_error(exc: BaseException | None) -> ScoreExpError | None:
    """The :class:`ScoreExpError` behind ``exc``: itself, or the error a library wrapped.

    Hydra's ``instantiate`` re-raises a constructor's error as an ``InstantiationException``
    (``raise ... from e``); the CLIs unwrap it here, in one place, so the user reads the
    constructor's one line instead of Hydra's wrapper and a traceback. None when no
    ScoreExpError is on the ``__cause__`` chain (a bug or a crash: shown in full).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ScoreExpError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def check_int(key: str, value, minimum: int) -> int:
    """``value`` as an integer >= ``minimum``; a ConfigError naming ``key`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def check_number(key: str, value, minimum: float = 0.0, strict: bool = True) -> float:
    """``value`` as a finite number > ``minimum`` (>= when not ``strict``); else a ConfigError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and abs(value) != float("inf") and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ConfigError(
            f"{key} must be a number {'>' if strict else '>='} {minimum:g}, got {value!r}"
        )
    return float(value)


def check_choice(key: str, value, choices) -> str:
    """``value`` as one of ``choices``; a ConfigError listing them otherwise."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


MAX_SEED = 2**32 - 1  # NumPy's and Lightning's seed range


def check_seed(value, key: str = "seed") -> int:
    """``value`` as a seed: an integer in ``[0, 2**32 - 1]`` (a ConfigError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{key} must be an integer in [0, {MAX_SEED}], got {value!r}")
    return value
