"""``score-eval``: re-discretise a trained run's depth and evaluate it (ContinuousNet-style).

The run folder's ``config.yaml`` rebuilds the data module, the model and its LightningModule;
the weights come from the best checkpoint. The depth then runs with the requested ``steps``,
``integrator``, ``dt`` or ``adaptive_eps`` (inside the core's
:meth:`~score_exp.core.RecurrentDepth.discretised`, so every task works unchanged) and the
split is evaluated. Each evaluation appends one row to ``<run_dir>/eval.csv`` (rewritten atomically).
A run that a process still trains (its folder lock is held) is refused in one line.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from score_exp import numerics
from score_exp.cli.common import bad_input_exits, check_argv, require
from score_exp.config import CONFIG_DIR, depth_spec
from score_exp.core.spec import HALTS, MAX_STEPS
from score_exp.errors import ConfigError, WriteError, check_int
from score_exp.run import find_checkpoint, load_run, run_config
from score_exp.runs import stop
from score_exp.runs.files import UnsafeRunFile, atomic_write_text, load_yaml, read_text
from score_exp.runs.lock import in_training
from score_exp.runs.record import CONFIG, LIMITS, RunFolder, limit

# Columns printed by the table (eval.csv keeps every metric of the split).
SHOWN = ("steps", "integrator", "dt", "adaptive_eps", "halt", "per_token", "kv_slots",
         "warm_start", "steps_used", "steps_dist", "nfe", "nfe_spent", "solver_converged",
         "solver_max_residual", "tokens_per_s", "seconds")  # fmt: skip


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.run_dir`` with ``cfg.depth``'s overrides; append and return the row."""
    import lightning as L
    import torch

    from score_exp.tasks.callbacks import find_depth

    # Lightning adds its own stderr handler on import; Hydra's handlers suffice (as in train.py).
    logging.getLogger("lightning").handlers.clear()
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split must be test or val, got {cfg.split!r}")
    run_dir = (
        Path(require(cfg, "run_dir", "score-eval run_dir=outputs/esol_mlp/<run>"))
        .expanduser()
        .resolve()
    )  # absolute, as find_checkpoint's path (relative_to below)
    ckpt_path = find_checkpoint(run_dir, cfg.checkpoint)  # a missing one fails before any work
    RunFolder(run_dir).refuse_links()  # eval.csv is never written through a link
    _check_request(cfg, run_dir)
    run_cfg = run_config(run_dir)
    spec = depth_spec(run_cfg)
    over = cfg.depth
    # The run's own kernels (main() entered its numerics mode before torch started): a portable
    # run is evaluated in portable numerics, so its rows are the same bits on any x86-64 CPU.
    kernels = numerics.apply(run_numerics(run_dir))

    loaded = load_run(run_dir, cfg.checkpoint, "fit", spec, {"compile": False})
    datamodule, module = loaded.task.datamodule, loaded.task.module
    depth = find_depth(module)
    if depth is None:
        raise ConfigError(f"run {run_dir} has no RecurrentDepth to re-discretise")
    if over.halt is not None:
        from score_exp.models.mlp import check_halt

        check_halt(over.halt, getattr(loaded.task.model, "halts", HALTS))

    used: list[Any] = []
    spent: list[tuple[float, int]] = []  # (evaluations of F per sample, samples) per forward
    solves: list[tuple[Any, Any]] = []  # solver=fixed_point: (converged, residual) per sample

    def count(mod, args, output):
        if mod.last_steps_used is not None:
            used.append(mod.last_steps_used.float())
        if mod.last_nfe is not None:
            n = len(mod.last_steps_used) if mod.last_steps_used is not None else 1
            spent.append((float(mod.last_nfe), n))
        if mod.last_converged is not None:
            solves.append((mod.last_converged, mod.last_residual))

    # The core's re-discretisation: its rules (step counts, horizon, integrators) live there.
    try:
        discretised = depth.discretised(
            steps=over.steps,  # an integer (2.5 is refused, not truncated)
            dt=over.dt,
            integrator=over.integrator,
            keep_horizon=bool(over.keep_horizon),
            adaptive_eps=over.adaptive_eps,
            halt=over.halt,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.get("per_token"):
        with discretised as d:
            row = _per_token(cfg, loaded, d)
    else:
        row, d = _teacher_forced(cfg, L, module, datamodule, depth, discretised, count)
    row = {
        "steps": d.steps,
        "integrator": d.integrator,
        "dt": round(float(sum(float(v) for v in d.dts) / len(d.dts)), 8),
        "keep_horizon": bool(over.keep_horizon),
        "adaptive_eps": d.adaptive_eps if d.adaptive_eps is not None else "",
        "halt": d.halt if d.adaptive_eps is not None else "",
        "steps_used": round(float(torch.cat(used).mean()), 4) if used else d.steps,
        "nfe": d.nfe,
        # Evaluations of F actually spent per sample (halting stops samples early; the
        # fixed-point solver's iterations + 1): the mean over the split's samples.
        "nfe_spent": round(sum(v * n for v, n in spent) / sum(n for _, n in spent), 4)
        if spent
        else d.nfe,
        **_solver_columns(solves),
        "seconds": row.pop("seconds"),
        "checkpoint": str(ckpt_path.relative_to(run_dir)),
        "numerics": kernels["mode"],
        **row,
    }
    try:
        append_row(RunFolder(run_dir).eval_csv, row)
    except WriteError as e:  # a full disk, a read-only folder: the row is not lost
        raise RowNotWritten(e, row) from None
    return row


def _teacher_forced(cfg, L, module, datamodule, depth, discretised, count):
    """The split evaluated by the task's own test/validate loop: its metrics and seconds, and
    the discretisation it ran."""
    trainer = L.Trainer(
        accelerator=cfg.device if cfg.device != "cuda" else "gpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    run = trainer.test if cfg.split == "test" else trainer.validate
    t0 = time.perf_counter()
    handle = depth.register_forward_hook(count)
    try:
        with discretised as d:
            metrics = run(module, datamodule=datamodule, verbose=False)
    finally:
        handle.remove()
    seconds = time.perf_counter() - t0
    merged = {k: float(v) for m in metrics for k, v in m.items() if k.startswith(cfg.split + "/")}
    return {"seconds": round(seconds, 4), **merged}, d


def _per_token(cfg: DictConfig, loaded, d) -> dict[str, Any]:
    """``per_token=true`` (a language model): the split decoded one token at a time with the
    KV cache, each token halting on its own, its loss at the compute that rule spends."""
    import math

    from score_exp.models.generation import Decoder, Stats, teacher_forced_loss

    model, datamodule = loaded.task.model.eval().to(cfg.device), loaded.task.datamodule
    if not hasattr(model, "block_size") or not hasattr(datamodule, "tokenizer"):
        raise ConfigError("per_token=true decodes a language model: this run is not one")
    try:
        decoder = Decoder(model, cfg.get("kv_slots"), bool(cfg.get("warm_start")))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    datamodule.setup("test")
    loader = datamodule.test_dataloader() if cfg.split == "test" else datamodule.val_dataloader()
    stats = Stats()
    loss = teacher_forced_loss(decoder, loader, stats)
    dist = " ".join(f"{k}:{v}" for k, v in sorted(stats.steps.items()))
    return {
        "per_token": True,
        "kv_slots": cfg.get("kv_slots") if cfg.get("kv_slots") is not None else "",
        "warm_start": bool(cfg.get("warm_start")),
        "steps_used": round(stats.mean_steps, 4),
        "steps_dist": dist,
        "nfe_spent": round(stats.mean_steps * d.evals_per_step, 4),
        "tokens_per_s": round(stats.tokens / stats.seconds, 1),
        "seconds": round(stats.seconds, 4),
        f"{cfg.split}/loss": loss,
        f"{cfg.split}/bpc": loss / math.log(2),
    }


class RowNotWritten(WriteError):
    """``eval.csv`` could not be written; the computed ``row`` is printed instead."""

    def __init__(self, cause: WriteError, row: dict[str, Any]) -> None:
        OSError.__init__(self, cause.errno, cause.strerror, cause.filename)
        self.message = f"{cause}; the row is printed to stdout instead"
        self.row = row


def _check_request(cfg: DictConfig, run_dir: Path) -> None:
    """What no object owns, before any work: the device, and a run that is still training."""
    import torch

    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {cfg.device!r}")
    steps = cfg.depth.get("steps")
    if steps is not None:  # before the run is loaded: the key as the user wrote it
        check_int("depth.steps", steps, 1, MAX_STEPS)
    if not isinstance(cfg.get("per_token", False), bool) or not isinstance(
        cfg.get("warm_start", False), bool
    ):
        raise ConfigError("per_token and warm_start must be true or false")
    if cfg.get("kv_slots") is not None:
        check_int("kv_slots", cfg.kv_slots, 1)
    if (cfg.get("kv_slots") is not None or cfg.get("warm_start")) and not cfg.get("per_token"):
        raise ConfigError("kv_slots and warm_start decode one token at a time: add per_token=true")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu")
    holder = in_training(run_dir)
    if holder is not None:
        raise ConfigError(
            f"{run_dir} is in training ({holder}): score-eval evaluates finished runs; "
            "wait for it to end"
        )


def _solver_columns(solves: list[tuple[Any, Any]]) -> dict[str, Any]:
    """``solver=fixed_point``: the fraction of the split's samples whose solve converged and
    the largest relative residual (no columns for a depth that is not solved)."""
    import torch

    if not solves:
        return {}
    converged = torch.cat([c.reshape(-1) for c, _ in solves])
    residual = torch.cat([r.reshape(-1) for _, r in solves])
    return {
        "solver_converged": round(float(converged.float().mean()), 4),
        "solver_max_residual": float(f"{float(residual.max()):.4g}"),
    }


def append_row(path: Path, row: dict[str, Any]) -> list[dict[str, str]]:
    """Append ``row`` to the CSV at ``path`` (columns: the union, in first-seen order)."""
    rows: list[dict[str, Any]] = []
    if path.exists():
        rows = list(csv.DictReader(io.StringIO(read_text(path, limit(path)), newline="")))
    rows.append(row)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return rows


def format_table(path: Path, metric: str) -> str:
    """The eval.csv at ``path`` as an aligned text table of the shown columns and ``metric``."""
    rows = list(csv.DictReader(io.StringIO(read_text(path, limit(path)), newline="")))
    cols = [c for c in (*SHOWN, metric) if rows and c in rows[0]]
    # The metric to 4 decimals, as score-report prints it (eval.csv keeps every digit).
    rows = [{**r, metric: _decimals(r.get(metric, ""))} for r in rows]
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(widths[c]) for c in cols)]
    lines += ["  ".join(r.get(c, "").rjust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _decimals(cell: str, digits: int = 4) -> str:
    try:
        return f"{float(cell):.{digits}f}"
    except ValueError:  # empty, or not a number
        return cell


def _implicit_multirun(argv: list[str]) -> list[str]:
    """``key=a,b`` sweeps: add ``--multirun`` when the user did not (Hydra would refuse)."""
    if any(a in ("-m", "--multirun") for a in argv):
        return argv
    sweep = re.compile(r"^[\w.+~]+=[^\[\]{}'\"]*,")
    if any(sweep.match(a) for a in argv):
        return [argv[0], "--multirun", *argv[1:]]
    return argv


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _main(cfg: DictConfig) -> float | None:
    stop.install(grace=0)  # SIGTERM / SIGINT end it at once, even inside one long forward
    with bad_input_exits("score-eval", "no row was written"):
        try:
            row = evaluate(cfg)
        except RowNotWritten as e:  # the row goes to stdout, the error line to stderr
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(e.row))
            writer.writeheader()
            writer.writerow(e.row)
            print(buf.getvalue(), end="", flush=True)
            raise
    run_cfg = run_config(Path(cfg.run_dir).expanduser())
    metric = f"{cfg.split}/{run_cfg.task.get('headline', 'rmse')}"
    print(format_table(RunFolder(Path(cfg.run_dir).expanduser()).eval_csv, metric), flush=True)
    value = row.get(metric)
    return value if value is None or math.isfinite(value) else None


def run_numerics(run_dir: Path) -> dict[str, Any]:
    """The ``numerics`` node of a run folder's ``config.yaml`` (``mode``, ``threads``), read as
    plain data; ``{}`` (the default mode) when it has none or it is not a known mode."""
    try:
        raw = load_yaml(RunFolder(run_dir).config, LIMITS[CONFIG])
    except (OSError, UnsafeRunFile):
        return {}  # evaluate() refuses the folder itself, in its own words
    node = raw.get("numerics") if isinstance(raw, dict) else None
    if not isinstance(node, dict) or node.get("mode") not in numerics.MODES:
        return {}
    threads = node.get("threads", 1)
    ok = isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1
    return {"mode": node["mode"], "threads": threads if ok else 1}


def _numerics_argv(argv: list[str]) -> list[str]:
    """``numerics=portable`` when a run folder named on the command line (``run_dir=A`` or a
    sweep ``run_dir=A,B``) was trained in portable numerics: score-eval then enters that mode
    before torch starts (:func:`score_exp.numerics.enter`)."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "run_dir" and value:
            for d in value.split(","):
                if run_numerics(Path(d.strip()).expanduser()).get("mode") == "portable":
                    return ["numerics=portable"]
    return []


def main() -> None:
    """Console entry point of ``score-eval``."""
    check_argv("score-eval", sys.argv[1:])
    numerics.enter(_numerics_argv(sys.argv[1:]))  # a portable run's kernels (may re-execute)
    sys.argv = _implicit_multirun(sys.argv)
    _main()


if __name__ == "__main__":
    main()
