"""``score-bench`` on a tiny real config: its JSON, its parameter counts, its bad-input errors.

Only the shape and consistency of the figures are tested; their values are benchmark results.
"""

from __future__ import annotations

import json

import pytest
from conftest import load_results, run_cli, train_cli

BENCH_TINY = ["--task", "esol_mlp", "--override", "task.model.hidden=16"]
FAST = ["--repeats", "2", "--warmup", "1", "--steps-per-repeat", "2"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out_json = tmp_path_factory.mktemp("bench") / "bench.json"
    out = run_cli(
        *BENCH_TINY, *FAST, "--depth", "score", "--integrator", "euler", "rk4", "--lightning",
        "--json", str(out_json), module="score_exp.bench.cli", timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out_json.read_text()), out.stdout


@pytest.mark.slow
def test_json_holds_positive_times_for_every_variant(bench):
    data, stdout = bench
    assert [v["label"] for v in data["variants"]] == ["score+euler", "score+rk4"]
    for v in data["variants"]:
        assert len(v["step_s"]) == 2 and all(t > 0 for t in v["step_s"])
        assert v["step_s_min"] <= v["step_s_median"] <= v["step_s_max"]
        assert v["unit"] == "molecules" and v["items_per_step"] == 64
        assert v["throughput"] == pytest.approx(64 / v["step_s_median"])
        assert v["peak_mem_mb"] > 0 and v["train_mem_mb"] >= 0
        lt = v["lightning"]
        assert all(t > 0 for t in lt["step_s"])
        # The ratio is taken against the bare blocks timed alternately with Lightning's.
        bare = lt["bare_interleaved"]
        assert len(bare["step_s"]) == len(lt["step_s"]) == 2
        assert lt["throughput_ratio"] == pytest.approx(lt["throughput"] / bare["throughput"])
    assert "Lightning vs bare" in stdout and "rk4/euler" in stdout


@pytest.mark.slow
def test_nfe_ratio_of_rk4_over_euler_is_four(bench):
    data, _ = bench
    (ratio,) = [r for r in data["ratios"] if r["name"] == "rk4/euler"]
    assert ratio["nfe"] == 4 and ratio["params"] == 1
    assert data["variants"][0]["nfe"] == 4 and data["variants"][1]["nfe"] == 16
    # The step-time ratio comes from the interleaved timing of both variants in one process.
    euler, rk4 = (v["interleaved"] for v in data["variants"])
    assert len(euler["step_s"]) == len(rk4["step_s"]) == data["repeats"]
    assert ratio["interleaved"] is True
    assert ratio["step_time"] == pytest.approx(rk4["step_s_median"] / euler["step_s_median"])


@pytest.mark.slow
def test_params_equal_those_score_train_reports(bench, tmp_path):
    data, _ = bench
    run_dir = tmp_path / "run"
    out = train_cli(run_dir, "trainer.max_epochs=1", "task.model.hidden=16")
    assert out.returncode == 0, out.stderr[-3000:]
    assert data["variants"][0]["params"] == load_results(run_dir)["params"]


@pytest.mark.slow
def test_checkpoint_memory_measures_each_point_with_and_without(tmp_path):
    out_json = tmp_path / "mem.json"
    out = run_cli(
        *BENCH_TINY, *FAST, "--depth", "score", "--checkpoint-memory", "--checkpoint-steps", "2", "4",
        "--json", str(out_json), module="score_exp.bench.cli", timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out_json.read_text())
    points = {(v["steps"], v["checkpoint"]) for v in data["variants"]}
    assert points == {(2, False), (2, True), (4, False), (4, True)}
    assert set(data["checkpoint_memory"]) == {"checkpoint=false", "checkpoint=true"}
    assert "train memory 2 -> 4 steps" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--depth", "bogus"], "unknown depth preset 'bogus'; valid: "),
        (["--integrator", "dopri5"], "unknown integrator 'dopri5'; valid: euler, heun"),
        (["--task", "nope"], "unknown task 'nope'"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--depth", "stacked", "--checkpoint-memory"], "measures a shared model"),
    ],
)
def test_bad_input_is_one_clear_error_line(tmp_path, args, message):
    out = run_cli(
        *BENCH_TINY, *args, "--json", str(tmp_path / "b.json"), module="score_exp.bench.cli"
    )
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("score-bench: error: ") and message in line, line
    assert not (tmp_path / "b.json").exists()


def test_invalid_combinations_are_skipped_with_a_note():
    # stacked_plain is plain composition, not an ODE: only euler applies.
    from argparse import Namespace

    from score_exp.bench.cli import plan

    args = Namespace(
        task="esol_mlp", depth=["stacked_plain", "score"], integrator=["euler", "heun"],
        override=[], repeats=1, warmup=1, steps_per_repeat=1, checkpoint_memory=False,
        checkpoint_steps=[4, 8],
    )  # fmt: skip
    variants, notes = plan(args)
    assert [v["label"] for v in variants] == ["stacked_plain+euler", "score+euler", "score+heun"]
    assert len(notes) == 1 and "stacked_plain+heun" in notes[0]


def test_a_named_variant_is_measured_beside_its_base_and_compared_with_it():
    from argparse import Namespace

    from score_exp.bench.cli import plan
    from score_exp.bench.report import ratios

    args = Namespace(
        task="esol_mlp", depth=["score"], integrator=["euler"], override=[], repeats=1,
        warmup=1, steps_per_repeat=1, checkpoint_memory=False, checkpoint_steps=[4, 8],
        variant=[["ancre", "depth.connect=ancre"], ["deep", "depth.steps=8"]],
    )  # fmt: skip
    variants, notes = plan(args)
    assert [v["label"] for v in variants] == [
        "score+euler",
        "score+euler+ancre",
        "score+euler+deep",
    ]
    assert "depth.connect=ancre" in variants[1]["overrides"] and not notes
    assert [v["steps"] for v in variants] == [4, 4, 8]
    fake = [{**v, "step_s": [t], "step_s_median": t, "nfe": v["steps"], "params": 1}
            for v, t in zip(variants, (1.0, 1.5, 2.0), strict=True)]  # fmt: skip
    got = {(q["name"], q["of"]): (q["step_time"], q["nfe"]) for q in ratios(fake)}
    assert got == {
        ("ancre/base", "score+euler+ancre"): (1.5, 1.0),
        ("deep/base", "score+euler+deep"): (2.0, 2.0),
    }


@pytest.mark.parametrize(
    "variant, message",
    [
        (["depth.connect=ancre"], "takes a NAME first"),
        (["ancre"], "needs overrides k=v"),
        (["base", "depth.steps=2"], "reserved 'base'"),
        (["ancre", "depth.connect=nope"], "unknown connect 'nope'"),
    ],
)
def test_a_bad_variant_is_one_error_before_measuring(variant, message):
    from argparse import Namespace

    from score_exp.bench.cli import plan
    from score_exp.errors import ConfigError

    args = Namespace(
        task="esol_mlp", depth=["score"], integrator=["euler"], override=[], repeats=1,
        warmup=1, steps_per_repeat=1, checkpoint_memory=False, checkpoint_steps=[4, 8],
        variant=[variant],
    )  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        variants, notes = plan(args)
        if notes:  # a combination the depth rules reject is skipped with a note
            raise ConfigError(notes[0])
