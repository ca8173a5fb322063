"""A run's result is bound to its data: the content hash of every input file goes into its
fingerprint (:func:`input_hashes`), so edited data is another configuration.

The files a task reads are named by its data config: ``task.data.path`` (and any
``task.data.*_path``), hashed by content (sha256), or, when ``path`` is null, the registered
file ``task.data.registry_key`` (and the GPT-2 tokeniser files for ``tokenizer: gpt2``), whose
sha256 the registry pins (:mod:`score_exp.data.registry` checks every copy against it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Prefix of the fingerprint's input keys: ``input:task.data.path`` -> ``sha256:<hex>``.
INPUT = "input:"
_GPT2_FILES = ("gpt2_vocab_bpe", "gpt2_encoder_json")


def input_hashes(resolved: dict) -> dict[str, str]:
    """``{"input:<config key>": "sha256:<hex>"}`` for every input file of the resolved config.

    A path that names no file is left out (the data module then says what is missing).
    """
    from score_exp.data.registry import REGISTRY, sha256sum

    task = resolved.get("task") if isinstance(resolved, dict) else None
    data = task.get("data") if isinstance(task, dict) else None
    if not isinstance(data, dict):
        return {}
    out = {}
    for key, value in data.items():
        if (key == "path" or str(key).endswith("_path")) and isinstance(value, str) and value:
            path = Path(value).expanduser()
            if path.is_file():
                out[f"{INPUT}task.data.{key}"] = f"sha256:{sha256sum(path)}"
    registered = [data.get("registry_key")] if not data.get("path") else []
    if data.get("tokenizer") == "gpt2":
        registered += _GPT2_FILES
    for name in registered:
        if isinstance(name, str) and name in REGISTRY:
            out[f"{INPUT}registry.{name}"] = f"sha256:{REGISTRY[name].sha256}"
    return out


def without_inputs(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity without its input hashes (a folder made before they were recorded)."""
    return {k: v for k, v in identity.items() if not k.startswith(INPUT)}


def has_inputs(identity: dict[str, Any]) -> bool:
    return any(k.startswith(INPUT) for k in identity)


def changed_data(run_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """One line naming the input file whose content differs from the run's, or None."""
    for key in sorted(k for k in old.keys() | new.keys() if k.startswith(INPUT)):
        if old.get(key) == new.get(key):
            continue
        name = key[len(INPUT) :]
        file = new.get(name, old.get(name)) if name.startswith("task.") else f"registered {name}"
        then, now = (str(d.get(key, "<absent>"))[:19] for d in (old, new))
        return (
            f"{run_dir} holds a run of other data: {file} ({name}) changed since it ran "
            f"({then} -> {now}); use another folder, or overwrite=true to move the old run aside"
        )
    return None
