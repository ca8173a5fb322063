"""W&B mode resolution shared by the run loggers and the report (no Lightning here)."""

from __future__ import annotations

import os
from pathlib import Path

MODES = ("auto", "online", "offline", "disabled")


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
