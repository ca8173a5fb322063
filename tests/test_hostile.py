"""The hostile cases of round three (issue 30): bounded reads, bounded waits, writes that trust
nothing, and every case one line.

Most cases run in-process on tiny inputs; a real command runs only where the behaviour is about
the process (signals, exit codes, what is printed). Cases that need a small full file system or
a read-only bind mount mount one (root); where that is not possible they skip with one line,
and fail under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUIET, REPO, TINY, cli_env, run_cli, train_cli
from test_bad_input import one_error_line as one_line

from score_exp.errors import ConfigError, DataError


@pytest.fixture
def finished(tiny_run):
    """The session's finished TINY esol_mlp run (conftest.tiny_run): read it, edit a copy."""
    return tiny_run[0]


def copy_run(finished: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(finished, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def in_thread(fn, timeout: float = 20.0):
    """``fn()`` in a daemon thread: its result, or a failure if it is still waiting after
    ``timeout`` seconds (a FIFO opened for reading would block for ever)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still waiting after {timeout} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ----------------------------------------------------------------------------- mounts


def _skip_or_fail(why: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run this test: {why}")
    pytest.skip(why)


@contextlib.contextmanager
def small_fs(path: Path, size: str = "256k"):
    """A tmpfs of ``size`` mounted at ``path`` (root only)."""
    path.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)  # fmt: skip
    if got.returncode:
        _skip_or_fail(f"cannot mount a tmpfs ({got.stderr.strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` (a folder) made read-only in place by a read-only bind mount (root only)."""
    got = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)],
                         capture_output=True, text=True)  # fmt: skip
    if got.returncode == 0:  # older mount(8) binds read-write first: remount read-only
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True)
    probe = path / ".probe"
    try:
        probe.touch()
        probe.unlink()
        writable = True
    except OSError:
        writable = False
    if got.returncode or writable:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        _skip_or_fail(f"cannot make {path} read-only ({got.stderr.strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last byte."""
    fd = os.open(folder / "ballast", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


# ============================================================================ 1. bounded reads


def test_a_checkpoint_inflating_past_its_size_is_refused_from_the_zip_directory(finished, tmp_path):
    """One storage record of 256 MiB deflated zeros in a ~400 kB file: refused before any
    tensor is built (the same loader serves score-eval, score-sample and resume)."""
    from score_exp.runs.checkpoints import load_checkpoint

    src = finished / "checkpoints" / "last.ckpt"
    bad = tmp_path / "inflated.ckpt"
    inflate(src, bad, 256 << 20)
    assert bad.stat().st_size < 2 << 20
    with pytest.raises(DataError, match="inflates to 268,435,456 bytes"):
        load_checkpoint(bad)
    assert load_checkpoint(src)["global_step"] > 0  # torch's own checkpoints load as before


def inflate(src: Path, dst: Path, nbytes: int) -> None:
    """A copy of checkpoint ``src`` whose first storage record holds ``nbytes`` deflated zeros."""
    chunk = b"\0" * (1 << 20)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        done = False
        for info in zin.infolist():
            if not done and "/data/" in info.filename and "." not in info.filename.rsplit("/")[-1]:
                zi = zipfile.ZipInfo(info.filename)
                zi.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(zi, "w", force_zip64=True) as w:
                    for _ in range(nbytes // len(chunk)):
                        w.write(chunk)
                done = True
            else:
                zout.writestr(info, zin.read(info.filename))


@pytest.mark.parametrize("text", ["10" + "0" * 400, "1e400", "[" * 100_000 + "]" * 100_000])
def test_results_json_with_a_huge_number_or_deep_nesting_is_one_line(finished, tmp_path, text):
    from score_exp.runs.record import RecordError, RunRecord

    run = copy_run(finished, tmp_path)
    data = json.loads((run / "results.json").read_text())
    raw = json.dumps(data)
    raw = raw.replace('"params": ' + str(data["params"]), '"params": ' + text)
    (run / "results.json").write_text(raw)
    with pytest.raises(RecordError) as e:
        RunRecord.load(run)
    assert "\n" not in str(e.value) and ("out of range" in str(e.value) or "deep" in str(e.value))


def test_fingerprint_nested_100000_deep_is_one_line(finished, tmp_path):
    from score_exp.runs.fingerprint import stored_identity
    from score_exp.runs.record import RunDirError

    run = copy_run(finished, tmp_path)
    (run / "fingerprint.json").write_text('{"identity": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RunDirError, match="levels deep"):
        stored_identity(run)


def test_report_refuses_a_huge_recorded_runs_json_by_size_before_reading_it(tmp_path, capsys):
    from score_exp.report.cli import main
    from score_exp.runs.files import RECORDED_RUNS_LIMIT

    big = tmp_path / "runs.json"
    with open(big, "wb") as f:  # sparse: no disk used, but fstat says 3 GB
        f.truncate(3 << 30)
    assert big.stat().st_size > RECORDED_RUNS_LIMIT
    assert main([str(big), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "limit" in err[0], err


def test_sizes_have_sane_maxima_before_any_model_is_built(finished, tmp_path):
    """depth.steps: 100000000 in a run folder (score-eval ran on past 150 s and ignored
    SIGTERM): refused in one line; widths and contexts likewise."""
    from score_exp.config import depth_spec
    from score_exp.core.spec import MAX_STEPS
    from score_exp.models.limits import MAX_WIDTH
    from score_exp.models.mlp import RecurrentMLP as MLP
    from score_exp.run import run_config

    run = copy_run(finished, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["depth"]["steps"] = 100_000_000
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="steps must be <= 100,000"):
        depth_spec(run_config(run))
    spec = depth_spec(run_config(finished))
    with pytest.raises(ConfigError, match="task.model.hidden must be an integer <= 65,536"):
        MLP(8, spec, hidden=10**9)
    assert MAX_STEPS == 100_000 and MAX_WIDTH == 65_536


def test_a_gpt_context_has_a_sane_maximum():
    from score_exp.core import DepthSpec
    from score_exp.models.gpt import GPT

    with pytest.raises(ConfigError, match="task.data.block_size must be an integer <= 65,536"):
        GPT(vocab_size=65, block_size=10**7, depth=DepthSpec(steps=1), n_head=1, n_embd=8)


# ============================================================================ 2. bounded waits


def _has_stop_handler(pid: int) -> bool:
    """The process catches SIGALRM: score_exp.runs.stop is installed (its door has started)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGALRM - 1)))
    except OSError:
        pass
    return False


def _signal_when(proc: subprocess.Popen, ready, signum: int, wait: float = 120.0) -> float:
    """Send ``signum`` once ``ready()`` (or after ``wait`` seconds); the time it was sent."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait and proc.poll() is None and not ready():
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signum)
    return time.monotonic()


def _popen(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_score_eval_stops_within_seconds_of_sigterm_inside_one_long_forward(finished, tmp_path):
    """Lightning's SIGTERM handler waits for the end of a batch; one batch of 50,000 steps
    would keep the process computing for minutes."""
    run = copy_run(finished, tmp_path)
    proc = _popen("score_exp.cli.eval", f"run_dir={run}", "depth.steps=50000")
    try:
        # the forward has begun: the data module and weights are loaded, the model is running
        sent = _signal_when(proc, lambda: _has_stop_handler(proc.pid), signal.SIGTERM)
        time.sleep(0)  # the signal is in flight
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert took < 20, took
    assert "score-eval: stopped by SIGTERM" in err and "Traceback" not in err, err[-3000:]
    assert not (run / "eval.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_training_stops_within_seconds_records_interrupted_and_says_how_to_resume(tmp_path, signum):
    """A batch of 30,000 steps takes minutes: SIGTERM used to wait for its end, SIGINT exited 1
    without the resume line."""
    run = tmp_path / "run"
    proc = _popen("score_exp.cli.train", f"hydra.run.dir={run}", *QUIET, "depth.steps=30000",
                  "task.model.hidden=64", "trainer.max_epochs=1")  # fmt: skip
    try:
        sent = _signal_when(proc, lambda: (run / "hparams.yaml").exists(), signum, wait=300)
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err[-3000:]
    assert took < 30, took  # score_exp.runs.stop.TRAIN_GRACE_S (10 s) and the record
    assert "re-run the same command to resume" in err, err[-3000:]
    assert json.loads((run / "results.json").read_text())["status"] == "interrupted"


def test_a_fifo_lock_a_folder_lock_or_a_hard_linked_lock_is_refused_never_waited_on(tmp_path):
    from score_exp.runs.lock import RunLock, in_training
    from score_exp.runs.record import RunDirError

    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    for kind in ("fifo", "dir", "hardlink"):
        run = tmp_path / kind
        run.mkdir()
        lock = run / ".lock"
        if kind == "fifo":
            os.mkfifo(lock)
        elif kind == "dir":
            lock.mkdir()
        else:
            os.link(outside, lock)
        with pytest.raises(RunDirError) as e:
            in_thread(lambda r=run: RunLock(r).acquire())
        assert "\n" not in str(e.value) and str(lock) in str(e.value)
        if kind != "hardlink":
            with pytest.raises(RunDirError, match="not a regular file"):
                in_thread(lambda r=run: in_training(r))
    assert outside.read_text() == "precious\n"  # the pid never landed in it


def test_a_fifo_as_a_data_path_or_in_the_data_cache_is_refused_never_waited_on(
    tmp_path, monkeypatch
):
    from score_exp.data.molecules import compute_descriptors, read_molecule_csv
    from score_exp.data.registry import fetch

    fifo = tmp_path / "data.csv"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        in_thread(lambda: read_molecule_csv(fifo, "smiles", "y"))
    # a FIFO where the registry caches a file
    monkeypatch.setenv("SCORE_DATA_DIR", str(tmp_path / "cache"))
    from score_exp.data.registry import REGISTRY, data_dir

    target = data_dir() / REGISTRY["esol"].relpath
    target.parent.mkdir(parents=True)
    os.mkfifo(target)
    with pytest.raises(DataError, match="not a regular file"):
        in_thread(lambda: fetch("esol"))
    # a FIFO where the descriptors of these molecules are cached: recomputed, not waited on
    import hashlib

    import rdkit

    from score_exp.data.molecules import descriptor_names

    smiles = ["CCO", "c1ccccc1"]
    key = hashlib.sha256(
        "\n".join([rdkit.__version__, ",".join(descriptor_names()), *smiles]).encode()
    ).hexdigest()[:16]
    cache = tmp_path / "desc"
    cache.mkdir()
    os.mkfifo(cache / f"rdkit-descriptors-{key}.npy")
    X = in_thread(lambda: compute_descriptors(smiles, cache=cache))
    assert X.shape[0] == 2


def test_a_molecule_over_the_atom_limit_is_skipped_and_counted_as_invalid(tmp_path):
    from score_exp.data.molecules import MAX_ATOMS, compute_descriptors, read_molecule_csv

    csv_path = tmp_path / "m.csv"
    rows = f"CCO,1.0\n{'C' * 5001},2.0\nc1ccccc1,3.0\n{'C' * (MAX_ATOMS + 1)},4.0\n"
    csv_path.write_text("smiles,y\n" + rows)
    table = read_molecule_csv(csv_path, "smiles", "y")
    assert table.smiles == ["CCO", "c1ccccc1"] and table.n_read == 4
    assert [r for r, _, _ in table.invalid] == [1, 3]
    assert f"{MAX_ATOMS + 1} atoms, over {MAX_ATOMS}" in table.invalid[1][2]
    assert table.summary()["n_invalid"] == 2
    # the descriptor step bounds its own time too (a 300-atom molecule took 27 s)
    t0 = time.monotonic()
    X = compute_descriptors(["C" * 300, "CCO"])
    assert time.monotonic() - t0 < 10 and torch.isnan(torch.from_numpy(X[0])).all()


def test_two_smiles_columns_are_refused(tmp_path):
    from score_exp.data.molecules import read_molecule_csv

    csv_path = tmp_path / "m.csv"
    csv_path.write_text("smiles,y,smiles\nCCO,1.0,c1ccccc1\n")
    with pytest.raises(DataError, match="names column 'smiles' 2 times"):
        read_molecule_csv(csv_path, "smiles", "y")


def test_an_mlflow_server_that_does_not_answer_fails_in_one_line_within_its_timeout():
    from score_exp.tasks.loggers import TrackingServerUnavailable, mlflow_logger

    with socket.socket() as server:  # accepts connections (the backlog), never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(TrackingServerUnavailable) as e:
            mlflow_logger("x", uri, connect_timeout=1)
        assert time.monotonic() - t0 < 10
    assert "did not answer within 1 s" in str(e.value) and e.value.exit_code == 1


# ============================================================================ 3. writes


def test_metrics_csv_and_hparams_yaml_are_new_inodes_a_hard_link_keeps_its_content(tmp_path):
    from score_exp.tasks.loggers import AppendingCSVLogger

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,val/rmse\n0,9,1.5\n")
    outside = {n: tmp_path / f"outside-{n}" for n in ("metrics.csv", "hparams.yaml")}
    outside["hparams.yaml"].write_text("mine: 1\n")
    os.link(run / "metrics.csv", outside["metrics.csv"])
    os.link(outside["hparams.yaml"], run / "hparams.yaml")
    before = {n: p.read_text() for n, p in outside.items()}
    logger = AppendingCSVLogger(save_dir=str(run), name="", version="")
    logger.log_hyperparams({"seed": 1})
    logger.log_metrics({"val/rmse": 1.25, "epoch": 1}, step=19)
    logger.log_metrics({"train/loss": 0.5, "epoch": 1}, step=20)  # a new column: a new header
    logger.save()
    assert {n: p.read_text() for n, p in outside.items()} == before
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["epoch", "step", "train/loss", "val/rmse"]
    assert len(rows) == 4 and "seed: 1" in (run / "hparams.yaml").read_text()


def test_a_full_disk_keeps_the_previous_record_and_says_what_could_not_be_written(tmp_path):
    from score_exp.errors import WriteError
    from score_exp.runs.record import RunRecord
    from score_exp.tasks.loggers import AppendingCSVLogger

    with small_fs(tmp_path / "fs") as fs:
        RunRecord(task="esol_mlp", status="interrupted").save(fs)
        logger = AppendingCSVLogger(save_dir=str(fs), name="", version="")
        logger.log_hyperparams({"seed": 1})
        hparams = (fs / "hparams.yaml").read_text()
        fill(fs)
        with pytest.raises(WriteError) as e:
            RunRecord(task="esol_mlp", status="ok", params=10**6, extra={"x": "y" * 4096}).save(fs)
        assert str(e.value).startswith(f"cannot write {fs / 'results.json'}: No space left")
        assert RunRecord.load(fs).status == "interrupted"
        with pytest.raises(WriteError, match="hparams.yaml: No space left"):
            logger.log_hyperparams({"big": "z" * 65536})
        assert (fs / "hparams.yaml").read_text() == hparams  # not emptied
        assert not [p for p in fs.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_score_eval_in_a_read_only_run_folder_prints_its_row_and_exits_1(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    with read_only(run):
        out = run_cli(f"run_dir={run}", "depth.steps=2", module="score_exp.cli.eval")
    line = one_line(out, "score-eval", code=1)
    assert "eval.csv" in line and "printed to stdout" in line
    header, row = out.stdout.strip().splitlines()[:2]
    assert header.startswith("steps,") and row.startswith("2,")


# ============================================================================ 4. one line


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tb_file", "tb_read_only", "mlflow_read_only"])
def test_a_logger_folder_that_cannot_be_written_is_one_line_before_work(tmp_path, case):
    run = tmp_path / "run"
    ro = tmp_path / "ro"
    ro.mkdir()
    if case == "tb_file":
        run.mkdir()
        (run / "tensorboard").write_text("a file\n")
        args = ["logger=tensorboard"]
    elif case == "tb_read_only":
        args = ["logger=tensorboard", f"logger.tensorboard.save_dir={ro}"]
    else:
        args = ["logger=mlflow", f"logger.mlflow.tracking_uri=file:{ro}/mlruns"]
    with read_only(ro) if case != "tb_file" else contextlib.nullcontext():
        out = train_cli(run, *TINY, *args)
    line = one_line(out, "score-train")
    assert "logger." in line


def test_a_line_break_in_an_override_is_one_line():
    out = run_cli("seed=1\n2", module="score_exp.cli.train")
    assert "line break" in one_line(out, "score-train")


def test_score_eval_names_depth_steps(finished):
    out = run_cli(f"run_dir={finished}", "depth.steps=abc", module="score_exp.cli.eval")
    assert "depth.steps must be an integer" in one_line(out, "score-eval")


def test_every_n_train_steps_zero_is_a_config_error_naming_its_key(tmp_path):
    from score_exp.tasks.callbacks import LastCheckpoint

    with pytest.raises(ConfigError, match="callbacks.last_checkpoint.every_n_train_steps"):
        LastCheckpoint(str(tmp_path), every_n_train_steps=0)


@pytest.mark.slow
def test_an_incompatible_last_ckpt_on_resume_is_one_line_and_keeps_the_record(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    record = json.loads((run / "results.json").read_text())
    record["status"] = "interrupted"
    (run / "results.json").write_text(json.dumps(record))
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["state_dict"] = {k + "_renamed": v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, last)
    out = train_cli(run, *TINY)  # the same configuration: it resumes from last.ckpt
    assert "cannot resume from" in one_line(out, "score-train")
    assert json.loads((run / "results.json").read_text())["status"] == "interrupted"


def test_report_counts_a_nan_test_metric_as_not_ok_and_skips_non_utf8_names(finished, tmp_path):
    from score_exp.report.build import build_report

    root = tmp_path / "runs"
    nan_run = copy_run(finished, root, "nan")
    record = json.loads((nan_run / "results.json").read_text())
    record["test"]["rmse"] = float("nan")
    (nan_run / "results.json").write_text(json.dumps(record))
    copy_run(finished, root, "good")
    copy_run(finished, Path(os.fsdecode(bytes(root) + b"/bad-\xff-name")), "")
    report = build_report([root], tmp_path / "out")
    statuses = sorted(s for _, s, _ in report.not_ok)
    assert statuses == ["non-finite", "unreadable"], report.not_ok
    md = (tmp_path / "out" / "report.md").read_text()
    assert "1 ok, 2 not ok" in md


def test_score_tune_retrain_gives_two_studies_of_one_preset_their_own_folders(tmp_path):
    from score_exp.cli.tune import study_folders

    dbs = [tmp_path / "a" / "score" / "optuna.db", tmp_path / "b" / "score" / "optuna.db"]
    assert study_folders(dbs) == ["a/score", "b/score"]
    assert study_folders(dbs[:1] + [tmp_path / "b" / "stacked" / "optuna.db"]) == ["score", "stacked"]  # fmt: skip


def test_write_error_is_an_oserror_with_one_line():
    from score_exp.errors import WriteError

    e = WriteError("/r/results.json", OSError(errno.EROFS, "Read-only file system"))
    assert isinstance(e, OSError) and e.errno == errno.EROFS and e.exit_code == 1
    assert str(e) == "cannot write /r/results.json: Read-only file system (its previous content is kept)"  # fmt: skip
