"""W&B mode resolution and a bounded start, shared by the run loggers and the report (no Lightning).

A run's results never depend on W&B: an online start that does not succeed within
``init_timeout`` seconds (no network, W&B down, a wrong key) falls back to offline logging with
one warning, and the run goes on; ``wandb sync`` uploads it later.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")
INIT_TIMEOUT = 10.0  # seconds an online start may take before falling back to offline


def has_wandb_key() -> bool:
    """True when an API key is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``online`` iff a key is configured, else ``offline`` (never a login prompt)."""
    if mode not in MODES:
        raise ValueError(f"unknown wandb mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "auto":
        return "online" if has_wandb_key() else "offline"
    return mode


def bounded_settings(init_timeout: float = INIT_TIMEOUT, settings=None):
    """``wandb.Settings`` whose online start gives up after ``init_timeout`` seconds (W&B: 90)."""
    import wandb

    if not init_timeout > 0:
        raise ValueError(f"init_timeout must be > 0 seconds, got {init_timeout!r}")
    settings = settings if settings is not None else wandb.Settings()
    settings.init_timeout = float(init_timeout)
    return settings


def warn_offline(error: BaseException, init_timeout: float, where: str | None) -> None:
    """The one warning of a failed online start (the run goes on, logged offline)."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    log.warning(
        "W&B did not start online within %gs (%s: %s); logging offline instead%s; "
        "upload later with `wandb sync`",
        init_timeout,
        type(error).__name__,
        reason,
        f" under {where}" if where else "",
    )


def init_run(init_timeout: float = INIT_TIMEOUT, **kwargs):
    """``wandb.init(**kwargs)``: online at most ``init_timeout`` seconds, else offline (one warning)."""
    import wandb

    if kwargs.get("mode") != "online":
        return wandb.init(**kwargs)
    settings = bounded_settings(init_timeout, kwargs.pop("settings", None))
    try:
        return wandb.init(settings=settings, **kwargs)
    except Exception as e:  # CommError (timeout, refused), AuthenticationError, UsageError, ...
        warn_offline(e, init_timeout, kwargs.get("dir"))
        return wandb.init(**{**kwargs, "mode": "offline"})
