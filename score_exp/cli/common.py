"""What the command-line doors share: bad input as one line and exit 2, before any work.

Values are validated by the objects that own them (data modules, LightningModules, models raise
:class:`~score_exp.errors.ConfigError` naming their key). What no object owns is checked here:
the top-level keys and the Trainer's budget (:func:`check_run_config`), a mandatory value left
at ``???`` (:func:`require`), and the output folder, which Hydra creates before the task runs
(:class:`CheckOutputDir`, :class:`RefuseLinkedRunDir`: Hydra callbacks). :func:`bad_input_exits`
turns such an error, raised while a door works, into that one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from score_exp.errors import ConfigError, check_int, check_seed, user_error
from score_exp.runs.files import UnsafeRunFile, check_output_dir
from score_exp.runs.record import RunFolder

log = logging.getLogger(__name__)


def check_run_config(cfg: DictConfig) -> None:
    """The keys of a ``score-train`` config that no constructor owns, before any work.

    Raises:
        ConfigError: ``seed`` is not a seed, or ``trainer.max_epochs`` / ``trainer.max_steps``
            is not an integer >= -1 (-1: no limit).
    """
    check_seed(cfg.get("seed"))
    trainer = cfg.get("trainer") or {}
    for name in ("max_epochs", "max_steps"):
        if trainer.get(name) is not None:
            check_int(f"trainer.{name}", trainer.get(name), -1)


def require(cfg: DictConfig, key: str, example: str) -> Any:
    """``cfg[key]``, or a ConfigError saying how to give it when it is missing (``???``)."""
    if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
        raise ConfigError(f"{key} is required, e.g. {example}")
    return cfg[key]


@contextlib.contextmanager
def bad_input_exits(prog: str, stopped: str = "") -> Iterator[None]:
    """Bad input raised inside (a :class:`~score_exp.errors.ScoreExpError`, or a constructor's
    unwrapped from Hydra's instantiate) ends the door with one line and its exit code (2; 1
    for a failed write); a stop by SIGTERM / SIGINT (:mod:`score_exp.runs.stop`) with one line
    (``stopped``: what that means) and 128 + the signal; anything else propagates with its
    traceback."""
    from score_exp.runs import stop

    try:
        yield
    except Exception as exc:
        if (e := user_error(exc)) is None:
            raise
        log.error("%s", e)
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, SystemExit):  # Lightning turns a KeyboardInterrupt into exit 1
        if stop.received() is None:
            raise
        stop.exit_stopped(prog, stopped)


def check_argv(prog: str, argv: list[str]) -> None:
    """Refuse, in one line (exit 2), an override holding a line break: Hydra's lexer would end
    in its own multi-line error (an override comes from a shell line: a newline is a slip)."""
    for arg in argv:
        if "\n" in arg or "\r" in arg:
            print(
                f"{prog}: error: the override {arg!r} holds a line break; give each override "
                "as one word of the command line (key=value)",
                file=sys.stderr,
            )
            sys.exit(2)


#: Run folders that this process's Hydra run creates (they did not exist before it started).
created_run_dirs: set[Path] = set()

#: What a run writes before its work starts (the files of a refused run, nothing else).
_BEFORE_WORK = ("train.log", ".lock", "fingerprint.json", "config.yaml", "splits.json",
                ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")  # fmt: skip


def remove_refused_run_dir(path: str | os.PathLike) -> bool:
    """Remove a run folder that this process created for a run refused as bad input.

    Only a folder made by this very run (:data:`created_run_dirs`), and only the files a run
    writes before any work; a folder holding anything else (a checkpoint, results.json, a file
    of the user's) is left as it is. Returns whether the folder is gone.
    """
    path = Path(path).absolute()
    if path not in created_run_dirs or path.is_symlink() or not path.is_dir():
        return False
    for name in _BEFORE_WORK:
        f = path / name
        if f.is_file() and not f.is_symlink():
            f.unlink()
    for folder in (path / ".hydra", path):
        with contextlib.suppress(OSError):  # not empty (something else is in it), or gone
            folder.rmdir()
    return not path.exists()


class CheckOutputDir(Callback):
    """Hydra callback: refuse an unusable output folder in one line (exit 2) before Hydra makes it.

    Hydra creates ``hydra.run.dir`` (``hydra.sweep.dir`` for ``-m``) before the task function
    runs, so a file in the way or a read-only parent would otherwise end in Hydra's traceback.

    Args:
        prog: the command's name, for the message (``score-train``).
    """

    def __init__(self, prog: str):
        self.prog = prog

    def _check(self, config: DictConfig, key: str) -> None:
        from hydra.core.hydra_config import HydraConfig

        # The folder's name may read Hydra's own state (${hydra:runtime.choices.depth} in the
        # default run folder), which Hydra sets only once the job starts: set it for the check.
        hydra_config = HydraConfig.instance()
        before = hydra_config.cfg
        hydra_config.set_config(config)
        try:
            path = check_output_dir(str(OmegaConf.select(config, key)), key)
        except ConfigError as e:
            print(f"{self.prog}: error: {e}", file=sys.stderr)
            sys.exit(2)  # SystemExit: Hydra turns a callback's Exception into a mere warning
        finally:
            hydra_config.cfg = before
        if key == "hydra.run.dir" and not path.exists():
            created_run_dirs.add(path)  # Hydra makes it: a run refused later removes it

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")


class RefuseLinkedRunDir(Callback):
    """Hydra callback of ``score-eval``: :meth:`RunFolder.refuse_links` on ``run_dir`` before a sweep
    writes its ``multirun.yaml`` there (one line, exit 2).

    Args:
        prog: the command's name, for the message.
    """

    def __init__(self, prog: str) -> None:
        self.prog = prog

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        run_dir = OmegaConf.select(config, "run_dir", default=None, throw_on_missing=False)
        try:
            if isinstance(run_dir, str) and run_dir:
                RunFolder(Path(run_dir).expanduser()).refuse_links()
        except UnsafeRunFile as e:
            print(f"{self.prog}: error: {e}", file=sys.stderr)
            sys.exit(2)  # SystemExit: Hydra turns a callback's Exception into a warning
