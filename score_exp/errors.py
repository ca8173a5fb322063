"""Errors that the CLI reports as one clear message (no traceback) before any work starts."""


class ScoreExpError(Exception):
    """Base class: a user-facing problem with the configuration or the data."""

    exit_code = 2  # the CLIs' exit status for it


class ConfigError(ScoreExpError):
    """The configuration asks for something invalid (unknown name, steps < 1, dt <= 0, ...)."""


class DataError(ScoreExpError):
    """A data file is missing, corrupt (checksum) or malformed (columns, values)."""


class CheckpointWriteError(ScoreExpError):
    """A checkpoint could not be written (disk full, permissions); nothing partial was left."""

    exit_code = 1
