"""Bad input through the real CLIs: one line naming the key, the value and what is valid; exit 2;
before any work. Also: an unusable output folder, W&B without a network, the files' modes."""

from __future__ import annotations

import csv
import ctypes
import io
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from conftest import QUIET, REPO, cli_env, load_results, run_cli, train_cli

from score_exp.data import fetch
from score_exp.data.molecules import ESOL_SMILES_COLUMN, ESOL_TARGET_COLUMN

ONE_EPOCH = ["trainer.max_epochs=1", "task.model.hidden=16"]


def one_error_line(
    out: subprocess.CompletedProcess, prog: str = "score-train", code: int = 2
) -> str:
    """The process failed with exit ``code`` and exactly one ``<prog>: error: ...`` line, no
    traceback."""
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr and "HYDRA_FULL_ERROR" not in out.stderr, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, out.stderr
    return lines[0]


def assert_no_work(run_dir) -> None:
    """Nothing that a run produces: no result, no checkpoint, no metrics, no split record."""
    for name in ("results.json", "checkpoints", "metrics.csv", "splits.json"):
        assert not (run_dir / name).exists(), name


def esol_rows(n: int) -> list[tuple[str, str]]:
    rows = list(csv.DictReader(fetch("esol").open()))[:n]
    return [(r[ESOL_SMILES_COLUMN], r[ESOL_TARGET_COLUMN]) for r in rows]


def write_csv(path, rows, encoding: str = "utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(["smiles", "logS"])
        w.writerows(rows)
    return path


def own_csv(path) -> list[str]:
    return [f"task.data.path={path}", "task.data.target_column=logS"]


# ----------------------------------------------------------------------------- values (item 11)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["seed=abc"], "seed must be an integer in [0, 4294967295], got 'abc'"),
        (["seed=-1"], "seed must be an integer in [0, 4294967295], got -1"),
        (["trainer.max_epochs=abc"], "trainer.max_epochs must be an integer >= -1, got 'abc'"),
        (["task.data.batch_size=0"], "task.data.batch_size must be an integer >= 1, got 0"),
        (["task.module.lr=-1"], "task.module.lr must be a number > 0, got -1"),
        (
            ["task=esol_gnn", "task.model.conv=foo"],
            "task.model.conv must be one of mpnn, dmpnn, gine, gat, gcn, got 'foo'",
        ),
        (
            ["task.module.scheduler=foo"],
            "task.module.scheduler must be one of none, cosine, plateau, got 'foo'",
        ),
        # Raised inside Hydra's instantiate: unwrapped from its InstantiationException.
        (["task.data.num_workers=-1"], "task.data.num_workers must be an integer >= 0, got -1"),
        (
            ["task=shakespeare_char_cpu", "task.data.block_size=0"],
            "task.data.block_size must be an integer >= 1, got 0",
        ),
    ],
)
def test_a_bad_value_is_one_line_before_any_work(tmp_path, overrides, message):
    run_dir = tmp_path / "bad"
    line = one_error_line(train_cli(run_dir, *overrides))
    assert line == f"score-train: error: {message}"
    assert_no_work(run_dir)


def test_a_csv_too_small_to_split_fails_before_training(tmp_path):
    """10 rows split 8/1/1: R² cannot score one molecule; said before the first epoch."""
    data = write_csv(tmp_path / "ten.csv", esol_rows(10))
    run_dir = tmp_path / "ten"
    line = one_error_line(train_cli(run_dir, *ONE_EPOCH, *own_csv(data)))
    assert f"{data}: 10 valid molecules" in line and "give 8 train, 1 val, 1 test" in line
    assert "at least 2 molecules" in line
    assert_no_work(run_dir)


@pytest.mark.parametrize("prog, module", [("score-eval", "eval"), ("score-sample", "sample")])
def test_eval_and_sample_without_run_dir(prog, module):
    line = one_error_line(run_cli(module=f"score_exp.cli.{module}"), prog)
    assert line.startswith(f"{prog}: error: run_dir is required, e.g. {prog} run_dir=")


@pytest.mark.parametrize("prog, module", [("score-eval", "eval"), ("score-sample", "sample")])
def test_eval_and_sample_with_a_truncated_checkpoint(tmp_path, prog, module):
    import torch

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    # A run folder as score-train leaves it: the resolved config and a checkpoint, here cut short.
    out = run_cli("task=shakespeare_char_cpu", "--cfg", "job", "--resolve")
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir / "config.yaml").write_text(out.stdout)
    buf = io.BytesIO()
    torch.save({"state_dict": {"model.w": torch.zeros(1000)}, "global_step": 1}, buf)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    line = one_error_line(run_cli(f"run_dir={run_dir}", module=f"score_exp.cli.{module}"), prog)
    assert f"checkpoint {ckpt} is unreadable" in line


# ----------------------------------------------------------------------------- data (item 13)


def test_a_bom_prefixed_header_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark: the first column is still `smiles`."""
    from score_exp.data.molecules import read_molecule_csv

    data = write_csv(tmp_path / "bom.csv", esol_rows(20), encoding="utf-8-sig")
    assert data.read_bytes().startswith(b"\xef\xbb\xbfsmiles,")
    table = read_molecule_csv(data, "smiles", "logS")
    assert len(table) == 20 and not table.invalid


def test_a_directory_given_as_the_csv(tmp_path):
    (tmp_path / "mols.csv").mkdir()
    line = one_error_line(train_cli(tmp_path / "run", *own_csv(tmp_path / "mols.csv")))
    assert (
        line
        == f"score-train: error: molecule CSV {tmp_path / 'mols.csv'} is a directory, not a CSV file"
    )


def test_identical_molecules_leave_no_descriptor_and_fail_before_training(tmp_path):
    rows = [("CCO", y) for _, y in esol_rows(60)]  # 60 targets, one molecule
    data = write_csv(tmp_path / "same.csv", rows)
    run_dir = tmp_path / "same"
    line = one_error_line(train_cli(run_dir, *ONE_EPOCH, *own_csv(data)))
    assert "no descriptor varies over the 48 training molecules" in line
    assert_no_work(run_dir)


# ----------------------------------------------------------------------------- output folder


def test_a_file_where_the_run_folder_should_be(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    line = one_error_line(train_cli(blocker))
    assert line == (
        f"score-train: error: hydra.run.dir={blocker} cannot be a folder: it is a file; "
        "choose another hydra.run.dir"
    )
    line = one_error_line(train_cli(blocker / "run"))  # a parent is the file
    assert f"hydra.run.dir={blocker / 'run'} cannot be a folder: {blocker} is a file" in line
    out = run_cli("-m", f"hydra.sweep.dir={blocker}", "seed=0,1", *QUIET)  # a sweep's folder
    assert one_error_line(out).startswith(f"score-train: error: hydra.sweep.dir={blocker} ")
    assert blocker.read_text() == "not a folder"


def _without_dac_override() -> None:
    """In the child, before exec: drop the capabilities that let root ignore file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, from the bounding set
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.slow  # a new interpreter (it drops a capability before starting)
def test_a_read_only_output_folder(tmp_path):
    """``chmod 555`` stops writes, for root too once it runs without CAP_DAC_OVERRIDE."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    run_dir = ro / "run"
    cmd = [sys.executable, "-m", "score_exp.cli.train", f"hydra.run.dir={run_dir}", *QUIET]
    # As root, drop the override in the child (Linux); otherwise the mode alone stops writes.
    pre = _without_dac_override if os.geteuid() == 0 else None
    try:
        out = subprocess.run(
            cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300,
            preexec_fn=pre,
        )  # fmt: skip
    finally:
        ro.chmod(0o755)
    line = one_error_line(out)
    assert line == (
        f"score-train: error: hydra.run.dir={run_dir} is not writable: {ro} is read-only; "
        "choose another hydra.run.dir"
    )
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- W&B (item 6)


def _closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections are refused


@pytest.mark.slow  # waits out W&B's bounded start in a real interpreter (about 15 s)
def test_wandb_without_network_falls_back_to_offline_once(tmp_path):
    """An API key but no W&B server: the run starts offline within the bound and ends ok.

    The server is a closed loopback port (connection refused). Files are written under umask
    027 here: results, config and splits are then 0640 (item 7, through the CLI).
    """
    env = cli_env(
        WANDB_API_KEY="x" * 40,
        WANDB_BASE_URL=f"http://127.0.0.1:{_closed_loopback_port()}",
        NETRC=str(tmp_path / "no-netrc"),
    )
    env.pop("WANDB_MODE", None)
    run_dir = tmp_path / "wb"
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "score_exp.cli.train", f"hydra.run.dir={run_dir}", *QUIET, *ONE_EPOCH,
         "logger=wandb", "logger.wandb.init_timeout=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: os.umask(0o027),
    )  # fmt: skip
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    assert load_results(run_dir)["status"] == "ok"
    warnings = re.findall(r"W&B did not start online within 2s .*", out.stderr)
    assert len(warnings) == 1, out.stderr[-3000:]
    assert "logging offline instead" in warnings[0]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    # W&B's own default waits 90 s before failing the run; the whole run here is well inside it.
    assert wall < 90, wall
    for name in ("results.json", "config.yaml", "splits.json"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o640, name


# ----------------------------------------------------------------------------- modes (item 7)


@pytest.mark.parametrize(
    "mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_written_files_follow_the_umask(tmp_path, monkeypatch, mask, file_mode, dir_mode):
    from score_exp.data.shakespeare import prepare_tokens
    from score_exp.runs.files import atomic_write_json, atomic_write_text

    monkeypatch.setenv("SCORE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SCORE_DATA_OFFLINE", "1")
    old = os.umask(mask)
    try:
        written = [
            atomic_write_json(tmp_path / "results.json", {"status": "ok"}),
            atomic_write_text(tmp_path / "eval.csv", "steps\n4\n"),
            fetch("esol"),  # a copy from the mirror into the data cache
        ]
        text = tmp_path / "text.txt"
        text.write_text("hello world, " * 20)
        tokens = prepare_tokens(text, "char", cache=tmp_path / "tokens")
    finally:
        os.umask(old)
    written += [tokens.path("train"), tokens.root / "meta.json"]
    for path in written:
        assert path.stat().st_mode & 0o777 == file_mode, path
    assert tokens.root.stat().st_mode & 0o777 == dir_mode
    assert json.loads((tmp_path / "results.json").read_text()) == {"status": "ok"}
