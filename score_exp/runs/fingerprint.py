"""A run folder's identity: its resolved config minus the keys that make no run, plus the
content hash of every input file (edited data is another configuration).

A folder is bound to the sha256 of its identity (:func:`fingerprint`, ``fingerprint.json``).
Re-running with the same fingerprint skips a finished run or resumes an unfinished one; another
fingerprint is refused with one line naming the keys that differ (:func:`differences`).

:data:`NON_IDENTITY` is the one list of config keys that do not make a run. The fingerprint
leaves them out (:func:`run_identity`), a sweep's job folders are not named by them
(:func:`dirname_exclude_keys`, Hydra's ``exclude_keys`` in ``configs/train.yaml``), and the
report does not group variants by them (:func:`score_exp.report.runs.varied_keys`).

The files a task reads are named by its data config: ``task.data.path`` (and any
``task.data.*_path``), hashed by content (sha256), or, when ``path`` is null, the registered
file ``task.data.registry_key`` (and the GPT-2 tokeniser files for ``tokenizer: gpt2``), whose
sha256 the registry pins (:mod:`score_exp.data.registry` checks every copy against it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from score_exp.errors import ScoreExpError
from score_exp.runs.files import load_yaml, read_json
from score_exp.runs.record import CONFIG, FINGERPRINT, LIMITS, RunDirError, RunFolder

#: Config keys that do not change a run's numbers (a key covers its sub-keys): where it is
#: logged or shown, what a re-run does with a finished folder, the output paths, loader workers
#: (the data streams do not depend on them) and how often last.ckpt is written. Device,
#: precision, deterministic, the budget, early stopping and the monitored metric DO change
#: results. Changing this list changes every run's fingerprint: old folders would be refused.
NON_IDENTITY = (
    "logger",
    "experiment_name",
    "skip_finished",
    "fail_on_diverge",
    "overwrite",
    "objective",
    "tune",  # score-tune's study settings (tune_* experiments): the trials' values are overrides
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.default_root_dir",
    "task.data.num_workers",
    "task.data.pin_memory",
    "callbacks.model_checkpoint.dirpath",
    "callbacks.model_checkpoint.save_last",
    "callbacks.last_checkpoint",
    # The callbacks every run registers (configs/callbacks/default.yaml): fixed wiring, driven by
    # depth.* and seed, which the identity holds; a nulled entry still changes the fingerprint.
    "callbacks.timer._target_",
    "callbacks.rng_state._target_",
    "callbacks.relative_best._target_",
    "callbacks.depth_diagnostics._target_",
    "callbacks.depth_growth._target_",
    "callbacks.random_depth._target_",
    "callbacks.fixed_point_solves._target_",
    "callbacks.random_depth.seed",
)
#: Overrides that choose how a sweep is launched or grouped, not a config key of the run: also
#: left out of a job's folder name (the experiment names the sweep folder; the trainer group is
#: the device, whose change a run's fingerprint refuses in the same folder).
LAUNCH_OVERRIDES = ("experiment", "trainer", "hydra.launcher", "hydra.sweep.dir", "hydra/launcher")
LEGACY = "<from config.yaml>"  # marks an identity read from a folder made before fingerprints
#: ``task.<slot>._target_`` names that run folders of an older score_exp hold, and the class that
#: builds the same object today (a class that moved, never one that changed): such a folder is
#: read (:mod:`score_exp.runs.safe_load`) and recognised (:func:`stored_identity`) as if it named
#: the new one. The project's configs name only the new paths.
RENAMED_TARGETS = {
    "score_exp.tasks.lm.ShakespeareDataModule": "score_exp.tasks.shakespeare.ShakespeareDataModule",
}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"depth": {"dt": 0.5}}`` -> ``{"depth.dt": 0.5}``: the key names of loggers and reports."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def non_identity(key: str) -> bool:
    """True for a flat config key that :data:`NON_IDENTITY` covers (itself or a parent)."""
    return any(key == c or key.startswith(c + ".") for c in NON_IDENTITY)


def dirname_exclude_keys() -> list[str]:
    """Hydra's ``override_dirname.exclude_keys`` of ``configs/train.yaml``: the overrides that
    do not name a sweep job's folder (a test checks that the YAML holds exactly these)."""
    return [*LAUNCH_OVERRIDES, *NON_IDENTITY]


# ----------------------------------------------------------------------------- identity


def run_identity(resolved: dict, run_dir: Path) -> dict[str, Any]:
    """The flat ``{dotted key: value}`` that a run folder is bound to.

    ``resolved`` is the resolved config; :data:`NON_IDENTITY` keys are dropped and the run
    folder's own path is replaced by ``<run_dir>`` so that a moved or copied folder keeps its
    identity.
    """
    here = str(Path(run_dir).resolve())
    out = {}
    for key, value in flatten(resolved).items():
        if non_identity(key):
            continue
        if isinstance(value, str) and here in value:
            value = value.replace(here, "<run_dir>")
        out[key] = value
    from score_exp.numerics import identity_keys

    return identity_keys(out)  # numerics.*: only a mode other than the default


def fingerprint(identity: dict[str, Any]) -> str:
    """sha256 of the identity (sorted JSON)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``key: old -> new`` for every key that differs (at most ``limit``, then a count)."""
    missing = "<absent>"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, missing) != new.get(k, missing))
    # changed values first, then added/removed
    keys.sort(key=lambda k: k not in old or k not in new)
    parts = [f"{k}: {_show(old.get(k, missing))} -> {_show(new.get(k, missing))}" for k in keys]
    if len(parts) > limit:
        parts = parts[:limit] + [f"... {len(parts) - limit} more"]
    return "; ".join(parts)


def _show(value: Any) -> str:
    return value if value == "<absent>" else json.dumps(value, default=str)


def stored_identity(run_dir: Path) -> dict[str, Any] | None:
    """The identity a folder is bound to: ``fingerprint.json``, else its ``config.yaml``.

    A folder written before fingerprints existed has only ``config.yaml`` (the resolved config);
    its identity is computed from it (marked :data:`LEGACY`), so an unchanged config adopts the
    folder. Keys added to the configs since then are not in it and are not compared.

    A class the folder names that has moved since is read under its new name
    (:data:`RENAMED_TARGETS`), so a finished run is still skipped and an interrupted one resumed.

    Raises:
        RunDirError: the folder holds a run (checkpoints or results) but neither file.
    """
    folder = RunFolder(run_dir)
    if folder.fingerprint.is_file():
        try:
            return _renamed(dict(read_json(folder.fingerprint, LIMITS[FINGERPRINT])["identity"]))
        except (OSError, ValueError, KeyError, TypeError, ScoreExpError) as e:
            raise RunDirError(
                f"{folder.fingerprint} is unreadable ({e}); pass overwrite=true to start afresh"
            ) from None
    if folder.config.is_file():
        try:
            resolved = load_yaml(
                folder.config, LIMITS[CONFIG]
            )  # bounded, alias-limited, nothing resolved
        except ScoreExpError as e:  # one line, not a traceback
            raise RunDirError(f"{e}; pass overwrite=true to start afresh") from None
        if not isinstance(resolved, dict):
            raise RunDirError(
                f"{folder.config} is not a mapping; pass overwrite=true to start afresh"
            )
        return {**_renamed(run_identity(resolved, run_dir)), LEGACY: True}
    if folder.results.exists() or folder.checkpoints.exists():
        raise RunDirError(
            f"{run_dir} holds a run with no {CONFIG} or {FINGERPRINT}: its configuration is "
            "unknown; pass overwrite=true to move it aside and start afresh"
        )
    return None


def _renamed(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` with each ``..._target_`` value renamed by :data:`RENAMED_TARGETS`."""
    return {
        k: RENAMED_TARGETS.get(v, v) if k.endswith("._target_") and isinstance(v, str) else v
        for k, v in identity.items()
    }


def full_identity(resolved: dict, run_dir: Path) -> dict[str, Any]:
    """What a run folder is bound to: the config's identity and the hashes of its input files."""
    return {**run_identity(resolved, run_dir), **input_hashes(resolved)}


def comparable_identity(identity: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """``identity`` as the folder's stored ``old`` one was made, so the two compare.

    A folder made before fingerprints (``old`` marked :data:`LEGACY`, a mark this removes) knows
    only its own keys; one made before input files were hashed has no hashes.
    """
    if old.pop(LEGACY, False):
        identity = {k: v for k, v in identity.items() if k in old}  # keys added since
    if not has_inputs(old):  # made before data was fingerprinted
        identity = without_inputs(identity)
    return identity


# ----------------------------------------------------------------------------- input files

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
