"""Logger factories that need more than a plain ``_target_``, and W&B's bounded start.

W&B's mode resolution and bounded start (:func:`resolve_mode`, :func:`init_run`) are shared by the
run loggers and the report. A run's results never depend on W&B: an online start that does not
succeed within ``init_timeout`` seconds (no network, W&B down, a wrong key) falls back to offline
logging with one warning, and the run goes on; ``wandb sync`` uploads it later.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from score_exp.errors import ScoreExpError

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")
INIT_TIMEOUT = 10.0  # seconds an online start may take before falling back to offline
#: Seconds an MLflow tracking server has to answer before a run that logs to it fails (one line).
TRACKING_TIMEOUT_S = 10.0


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


log = logging.getLogger(__name__)


def wandb_logger(
    project: str,
    save_dir: str,
    group: str | None = None,
    job_type: str | None = None,
    tags: list[str] | None = None,
    mode: str = "auto",
    name: str | None = None,
    init_timeout: float = INIT_TIMEOUT,
    resume_id: str | None = None,
    **kwargs,
):
    """A :class:`~lightning.pytorch.loggers.WandbLogger` that never prompts and never hangs.

    ``mode="auto"`` logs online when an API key is configured (``WANDB_API_KEY`` or
    ``~/.netrc``) and offline otherwise; offline runs are synced later with ``wandb sync``.
    An online start that does not succeed within ``init_timeout`` seconds (no network, W&B
    down, a wrong key) continues offline with one warning: the run never waits on W&B.
    ``resume_id`` (set by score-train for a resumed run, e.g. after a Slurm requeue) continues
    that W&B run (``resume="allow"``) instead of starting a new one.
    """
    if resume_id:
        kwargs.update(id=resume_id, resume="allow")
    mode = resolve_mode(mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    if mode == "online":
        kwargs["settings"] = bounded_settings(init_timeout, kwargs.get("settings"))
    return _BoundedWandbLogger(
        init_timeout,
        project=project,
        save_dir=save_dir,
        group=group,
        job_type=job_type,
        tags=[t for t in (tags or []) if t],
        name=name or Path(save_dir).name,
        offline=mode == "offline",
        mode=mode,
        **kwargs,
    )


def mlflow_logger(
    experiment_name: str,
    tracking_uri: str,
    run_dir: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    connect_timeout: float = TRACKING_TIMEOUT_S,
    **kwargs,
) -> MLFlowLogger:
    """Lightning's :class:`~lightning.pytorch.loggers.MLFlowLogger`, for any tracking URI.

    The run is named after its run folder (``run_dir``'s name, as for W&B), whatever the store:
    a server (``http://``), a database (``sqlite:///``) or a file store. The experiment is
    ``experiment_name``, shared by every run of a sweep: jobs that start together create it once
    (:class:`_SharedMLFlowLogger`). MLflow 3 refuses a ``file:`` tracking URI unless
    ``MLFLOW_ALLOW_FILE_STORE`` is set (the file store is in maintenance mode, not removed); a
    run that asked for it gets it.

    A tracking server (``http(s)://``) must answer within ``connect_timeout`` seconds before the
    run starts, else the run fails in one line (:class:`TrackingServerUnavailable`, exit 1):
    the policy is to fail early rather than train for hours unlogged. MLflow's own requests
    are bounded too (``MLFLOW_HTTP_REQUEST_TIMEOUT``, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, unless
    set), so a server that stops answering mid-run costs seconds, not MLflow's 7 retries.
    """
    if tracking_uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(connect_timeout, 1))))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        _probe(tracking_uri, connect_timeout)
    if tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if run_name is None and run_dir:
        run_name = Path(run_dir).name
    return _SharedMLFlowLogger(
        experiment_name=experiment_name,
        tracking_uri=tracking_uri,
        run_name=run_name,
        tags={k: str(v) for k, v in (tags or {}).items()},
        **kwargs,
    )


class TrackingServerUnavailable(ScoreExpError):
    """The MLflow tracking server did not answer in time (exit 1: a failure, not bad input)."""

    exit_code = 1


def _probe(uri: str, timeout: float) -> None:
    """Any HTTP answer (even an error status) within ``timeout`` seconds, else one line."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered
    except (OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        raise TrackingServerUnavailable(
            f"the MLflow tracking server {uri} did not answer within {timeout:g} s ({why}); "
            "start it, fix logger.mlflow.tracking_uri, or drop the logger (logger=csv)"
        ) from None


class _SharedMLFlowLogger(MLFlowLogger):
    """An MLFlowLogger whose experiment may be created by another job at the same moment.

    Lightning looks the experiment up by name and creates it when absent; two jobs of a parallel
    sweep that both find it absent would race, and the second one's creation fails
    (``RESOURCE_ALREADY_EXISTS``). Here the loser looks it up again.
    """

    @property
    def experiment(self):
        if not self._initialized and self._experiment_id is None and rank_zero_only.rank == 0:
            self._experiment_id = _experiment_id(
                self._mlflow_client, self._experiment_name, self._artifact_location
            )
        return super().experiment


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    """The id of the live experiment ``name``, created if there is none."""
    from mlflow.exceptions import MlflowException

    for _ in range(3):
        expt = client.get_experiment_by_name(name)
        if expt is not None and expt.lifecycle_stage != "deleted":
            return expt.experiment_id
        try:
            return client.create_experiment(name=name, artifact_location=artifact_location)
        except MlflowException as e:  # another job created it since the look-up
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    raise RuntimeError(f"MLflow experiment {name!r} exists but cannot be found (is it deleted?)")


def log_final(
    logger,
    metrics: Mapping[str, float],
    step: int,
    hparams: Mapping[str, Any],
    tags: Mapping[str, str],
    artifacts: list[Path],
    summary: Mapping[str, Any],
) -> None:
    """The run's closing numbers, in each logger's own way (rank 0, once, after testing).

    ``metrics`` are the best checkpoint's (``best/val/*``) and the test's (``test/*``): logged
    once at ``step``, under keys of their own, so a ``val/*`` curve holds validation passes only.
    TensorBoard also gets them as the HParams tab's metrics beside ``hparams``; MLflow gets
    ``tags`` and ``artifacts`` (``results.json``, ``config.yaml``); a W&B run gets them (and
    ``summary``) in its summary, since its history refuses a step that lies behind.
    """
    if isinstance(logger, WandbLogger):
        logger.experiment.summary.update({**summary, **metrics})
        return
    if metrics:
        logger.log_metrics(dict(metrics), step)
    if isinstance(logger, TensorBoardLogger):
        _tensorboard_hparams(logger, hparams, metrics)
    if isinstance(logger, MLFlowLogger):
        client, run_id = logger.experiment, logger.run_id
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value))
        for path in artifacts:
            if path.is_file():
                client.log_artifact(run_id, str(path))
    logger.finalize("success")  # written out (Lightning finalised the loggers after fit)


def _tensorboard_hparams(
    logger: TensorBoardLogger, hparams: Mapping[str, Any], metrics: Mapping[str, float]
) -> None:
    """TensorBoard's HParams tab: the run's hyperparameters and its headline metrics.

    The tab shows, per run, each hyperparameter and the last value of each metric tag named
    here (the scalars just logged). Lightning writes this only when ``log_hyperparams`` gets
    metrics, and then logs them at step 0; the summary is written here instead.
    """
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    def plain(v: Any) -> bool | int | float | str:
        return v if isinstance(v, (bool, int, float, str)) else str(v)

    exp, ssi, sei = hparams_summary({k: plain(v) for k, v in hparams.items()}, dict(metrics))
    writer = logger.experiment._get_file_writer()
    for summary in (exp, ssi, sei):
        writer.add_summary(summary)


def wandb_sync_hint(logger) -> str | None:
    """``wandb sync <folder>`` for a W&B run logged offline (None for any other logger)."""
    if not isinstance(logger, WandbLogger) or not getattr(logger, "_offline", False):
        return None
    run = logger.experiment
    folder = Path(run.dir).parent if getattr(run, "dir", None) else None  # .../offline-run-*/
    return f"wandb sync {folder}" if folder is not None else None


class _BoundedWandbLogger(WandbLogger):
    """Lightning's WandbLogger whose failed online start falls back to offline (one warning)."""

    def __init__(self, init_timeout: float, **kwargs):
        super().__init__(**kwargs)
        self._init_timeout = init_timeout

    @property
    def experiment(self):
        try:
            return super().experiment  # wandb.init, on rank 0 only (Lightning's decorator)
        except Exception as e:
            if self._experiment is not None or self._wandb_init.get("mode") != "online":
                raise
            warn_offline(e, self._init_timeout, self._wandb_init.get("dir"))
            self._wandb_init["mode"], self._offline = "offline", True
            return super().experiment


class AppendingCSVLogger(CSVLogger):
    """A CSVLogger that appends to an existing ``metrics.csv`` instead of deleting it.

    Lightning's writer removes ``metrics.csv`` when its folder is not empty, which would erase
    the curve of an interrupted run when it resumes into the same folder. Rows logged again
    after a resume (between the last checkpoint and the interruption) repeat their ``step``, as
    does the final evaluation at the best checkpoint; readers keep the first row per step
    (``score_exp.report.runs.read_curve``).
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer, but ``metrics.csv`` and ``hparams.yaml`` are replaced atomically.

    Lightning appends to ``metrics.csv`` and rewrites ``hparams.yaml`` in place: a hard link
    planted at either would have a file outside the run written, and a full disk leaves
    ``hparams.yaml`` empty. Here each save writes the whole file anew (a new inode, renamed
    over the old one: :func:`score_exp.runs.files.atomic_write_bytes`); a failed write keeps the old
    file and raises :class:`~score_exp.errors.WriteError` (one line).
    """

    def log_hparams(self, params: dict) -> None:
        from lightning.pytorch.core.saving import save_hparams_to_yaml

        from score_exp.errors import WriteError
        from score_exp.runs.files import mkstemp_shared

        self.hparams.update(params)
        path = Path(self.log_dir) / self.NAME_HPARAMS_FILE
        try:
            fd, tmp = mkstemp_shared(path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
        except OSError as e:
            raise WriteError(path, e) from None
        try:
            save_hparams_to_yaml(tmp, self.hparams)
            os.replace(tmp, path)  # a new inode: never written in place
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise WriteError(path, e) from None

    def save(self) -> None:
        from score_exp.runs.files import atomic_write_text, read_text

        if not self.metrics:
            return
        new_keys = self._record_new_keys()
        path = Path(self.metrics_file_path)
        old = read_text(path) if path.is_file() else ""
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=self.metrics_keys)
        if not old or new_keys:  # a new header: the old rows under it
            writer.writeheader()
            writer.writerows(csv.DictReader(io.StringIO(old, newline="")) if old else [])
            old = ""
        writer.writerows(self.metrics)
        atomic_write_text(path, old + buf.getvalue())
        self.metrics = []

    def _check_log_dir_exists(self) -> None:
        # Keep the file and its header; later saves append (and widen the header if needed).
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))
