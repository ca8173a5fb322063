"""logger=mlflow against a real ``mlflow server``, checked through MLflow's REST API.

The suite starts the server itself, as the Slurm tests start Slurm: ``mlflow server`` from the
project's environment with a SQLite backend store and a local artifact folder, on a free
127.0.0.1 port, waited for on its ``/health`` endpoint, and stopped by its PID (its process
group) when the session ends. A tiny sweep then logs to it (``MLFLOW_TRACKING_URI``, as a user
points runs at a team server) and every check reads what the server answers over HTTP: one
experiment for the sweep, runs named after their folders, params, tags, the metrics per step
(``val/*`` = the validation passes, the best checkpoint once under ``best/val/*``), and
``results.json`` / ``config.yaml`` as artifacts, byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import QUIET, cli_env, load_results, run_cli

pytestmark = pytest.mark.slow

START_TIMEOUT = 240  # seconds: the server's first start creates its tables (slow on a busy CPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """The URL of a running ``mlflow server`` (SQLite store, local artifacts), stopped at the end."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow) if mlflow.exists() else "mlflow",
        "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    # No job runner (MLflow's GenAI jobs: a pool of consumer processes this test never uses).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                tail = (root / "server.log").read_text()[-2000:]
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n{tail}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > START_TIMEOUT:
                pytest.fail(f"mlflow server did not answer {url}/health in {START_TIMEOUT}s")
            time.sleep(0.5)
        yield url
    finally:
        # Its own process group (start_new_session): the server and its uvicorn worker.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _get(url: str, path: str, **params) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}") as r:
        return json.loads(r.read())


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def _artifact(url: str, run_id: str, path: str) -> bytes:
    query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
    with urllib.request.urlopen(f"{url}/get-artifact?{query}") as r:
        return r.read()


def _history(url: str, run_id: str, key: str) -> dict[int, float]:
    rows = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key)
    rows = rows.get("metrics", [])
    assert len({m["step"] for m in rows}) == len(rows), f"{key}: a step logged twice"
    return {int(m["step"]): m["value"] for m in rows}


def test_a_sweep_logs_to_a_real_mlflow_server_in_one_experiment(tmp_path, mlflow_server):
    url = mlflow_server
    sweep = tmp_path / "sweep"
    out = run_cli(
        "-m",
        "logger=mlflow",
        "experiment_name=mlflow_sweep",
        f"hydra.sweep.dir={sweep}",
        "seed=0,1",
        "trainer.max_epochs=2",
        "task.model.hidden=16",
        *QUIET,
        env=cli_env(MLFLOW_TRACKING_URI=url),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    folders = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert [f.name.split(",")[0] for f in folders] == ["seed=0", "seed=1"]

    # One experiment, named by the sweep, holding both runs, each named after its folder.
    expt = _get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="mlflow_sweep")
    expt_id = expt["experiment"]["experiment_id"]
    runs = _post(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [expt_id]})["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    assert sorted(by_name) == [f.name for f in folders]

    for folder in folders:
        run = by_name[folder.name]
        run_id = run["info"]["run_id"]
        results = load_results(folder)
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["seed"] == str(results["seed"])
        assert params["depth.dt"] == "0.5" and params["task.model.hidden"] == "16"
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["mlflow.runName"] == folder.name
        assert {k: tags[k] for k in ("task", "depth", "integrator", "seed", "status")} == {
            "task": "esol_mlp",
            "depth": "score",
            "integrator": "euler",
            "seed": str(results["seed"]),
            "status": "ok",
        }
        assert tags["mlflow.source.git.commit"] == results["git"]
        assert tags["run_dir"] == str(folder)

        # Metrics per step: the validation passes (one per epoch), then the best checkpoint's
        # numbers once, on that pass's step; no val/ point past the last step trained.
        val = _history(url, run_id, "val/rmse")
        train = _history(url, run_id, "train/loss")
        assert len(val) == 2 and max(val) == max(train)
        best_step = results["best_val"]["step"] - 1
        assert _history(url, run_id, "best/val/rmse") == {
            best_step: pytest.approx(results["val"]["rmse"], rel=1e-6)
        }
        assert val[best_step] == pytest.approx(results["best_val"]["value"], rel=1e-6)
        assert _history(url, run_id, "test/rmse") == {
            best_step: pytest.approx(results["test"]["rmse"], rel=1e-6)
        }

        # results.json and config.yaml, uploaded through the server, byte for byte.
        listed = _get(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id)
        assert {f["path"] for f in listed["files"]} >= {"results.json", "config.yaml"}
        for name in ("results.json", "config.yaml"):
            assert _artifact(url, run_id, name) == (folder / name).read_bytes(), name
