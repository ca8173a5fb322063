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


class WriteError(ScoreExpError, OSError):
    """A run-folder file could not be written (disk full, read-only, permissions).

    Raised by the atomic writers (:mod:`score_exp.runs.files`): the previous content of the file is
    intact (the new one was a temporary file, removed). An ``OSError`` too, so code that
    guards a write with ``except OSError`` keeps working; one line: ``cannot write <path>:
    <reason>``.
    """

    exit_code = 1

    def __init__(self, path, cause: OSError) -> None:
        reason = cause.strerror or str(cause) or type(cause).__name__
        OSError.__init__(self, cause.errno, reason, str(path))
        self.message = f"cannot write {path}: {reason} (its previous content is kept)"

    def __str__(self) -> str:
        return self.message


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


def check_int(key: str, value, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an integer >= ``minimum`` (and <= ``maximum``); a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(
            f"{key} must be an integer <= {maximum:,} (the project's sane maximum), got {value!r}"
        )
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
