"""Generation with the recurrence (issue 31): the KV cache per (step, stage), per-token exit, the
bounded cache, warm start and self-speculative decoding, in-process on tiny random models; the
``score-sample`` door on a tiny trained run."""

from __future__ import annotations

import pytest
import torch

from score_exp.core import DepthSpec
from score_exp.models import GPT
from score_exp.models.generation import Decoder, Stats, teacher_forced_loss
from score_exp.models.kv_cache import KVCache

SPECS = {
    "stacked": DepthSpec(share=False, steps=3, update="none", dt=1.0),  # nanoGPT
    "score": DepthSpec(steps=3, dt=0.5),  # euler
    "heun": DepthSpec(steps=3, dt=0.5, integrator="heun"),
    "rk4": DepthSpec(steps=3, dt=0.5, integrator="rk4"),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run op by op: one thread (two fight over a loaded CPU, 20x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(spec: DepthSpec, block_size: int = 320, sharp: float = 1.0) -> GPT:
    torch.manual_seed(0)
    model = GPT(11, block_size, spec, n_head=2, n_embd=16).eval()
    with torch.no_grad():  # larger logits: greedy choices far from ties (float noise)
        model.lm_head.weight.mul_(sharp)
    return model


@pytest.mark.parametrize("name", SPECS)
def test_cached_logits_equal_the_full_forward_over_300_tokens(name):
    model = tiny(SPECS[name])
    x = torch.randint(0, 11, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(x, x)  # (2, 300, V): position t sees tokens <= t, as the prefix does
        dec = Decoder(model)
        cache = dec.new_cache(2)
        parts = [dec.feed(cache, x[:, :50])]  # a prefill, two tokens at once, then one by one
        parts.append(dec.feed(cache, x[:, 50:52]))
        parts += [dec.feed(cache, x[:, t : t + 1]) for t in range(52, 300)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 300


@pytest.mark.parametrize("name", ["stacked", "rk4"])
def test_greedy_generation_with_the_cache_is_the_plain_generation(name):
    model = tiny(SPECS[name], block_size=64, sharp=30.0)
    prompt = torch.tensor([[1, 2, 3]])
    plain = model.generate(prompt, 50, top_k=1)  # nanoGPT's: the whole context each token
    stats = Stats()
    cached = Decoder(model).generate(prompt, 50, top_k=1, stats=stats)
    assert torch.equal(cached, plain)
    assert stats.tokens == 50 and stats.steps == {3: 50} and stats.cache_bytes > 0


def test_past_block_size_the_cache_refills_from_the_last_half_window():
    model = tiny(SPECS["score"], block_size=16, sharp=30.0)
    out = Decoder(model).generate(torch.tensor([[1, 2, 3]]), 40, top_k=1)
    assert out.shape == (1, 43)
    # The first tokens, while the context fits, are the plain ones.
    torch.testing.assert_close(out[:, :16], model.generate(torch.tensor([[1, 2, 3]]), 13, top_k=1))
    # Speculative decoding refills at the same tokens: the same text past block_size too.
    for s in (1, 2):
        spec = Decoder(model, speculative_steps=s).generate(torch.tensor([[1, 2, 3]]), 40, top_k=1)
        assert torch.equal(spec, out), s


def test_speculative_greedy_output_is_plain_full_depth_decoding():
    model = tiny(DepthSpec(steps=4, dt=0.5), block_size=128, sharp=30.0)
    prompt = torch.tensor([[4, 5]])
    plain = model.generate(prompt, 100, top_k=1)
    for s in (1, 3):
        stats = Stats()
        spec = Decoder(model, speculative_steps=s, draft_tokens=5).generate(
            prompt, 100, top_k=1, stats=stats
        )
        assert torch.equal(spec, plain), s
        assert stats.drafted > 0 and 0 <= stats.accepted <= stats.drafted
        assert stats.tokens == 100


def test_speculative_sampling_gives_tokens_of_the_vocabulary():
    model = tiny(DepthSpec(steps=4, dt=0.5), block_size=64)
    g = torch.Generator().manual_seed(0)
    out = Decoder(model, speculative_steps=2).generate(
        torch.tensor([[1]]), 80, top_k=5, generator=g
    )
    assert out.shape == (1, 81) and int(out.max()) < 11


def test_per_token_exit_stops_each_token_on_its_own_and_fills_its_kv():
    model = tiny(DepthSpec(steps=6, dt=0.5))
    x = torch.randint(0, 11, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(x, x)
        # A threshold no change reaches: every token runs every step, the exact cache.
        with model.depth.discretised(adaptive_eps=1e-12, halt="state"):
            stats = Stats()
            dec = Decoder(model)
            cache = dec.new_cache(3)
            parts = [dec.feed(cache, x[:, t : t + 1], stats) for t in range(40)]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        assert stats.steps == {6: 120}
        # The KL criterion with a middling threshold: tokens stop at different steps.
        for halt, eps in (("kl", 1e-6), ("state", 0.05)):
            with model.depth.discretised(adaptive_eps=eps, halt=halt):
                stats = Stats()
                loss = teacher_forced_loss(Decoder(model), [(x, x)], stats)
            assert sum(stats.steps.values()) == 120 and 1 <= stats.mean_steps < 6, stats.steps
            assert len(stats.steps) > 1 and loss > 0
            # The alternative fill of the skipped steps: the final state's K/V.
            with model.depth.discretised(adaptive_eps=eps, halt=halt):
                final = teacher_forced_loss(Decoder(model, exit_kv="final"), [(x, x)])
            assert final != loss and final > 0


def test_a_row_that_stopped_early_gives_later_steps_the_kv_of_its_last_step():
    cache = KVCache(rows=2, n_head=1, head_size=1, max_len=4, steps=4)
    from score_exp.core import StepContext

    one = torch.ones(1, 1, 1, 1)
    for n in range(4):  # row 0 runs 4 steps (K = 10 + n), row 1 stops after 2 (K = 20 + n)
        rows = torch.tensor([0, 1]) if n < 2 else torch.tensor([0])
        k = torch.cat([one * (10 + n), one * (20 + n)])[: len(rows)]
        cache.attend(StepContext(n, 0, rows), k, k, k)
    cache.advance(1, torch.tensor([4, 2]))
    assert cache.k[:, 0, 0, 0, 0, 0].tolist() == [10, 11, 12, 13]
    assert cache.k[:, 0, 1, 0, 0, 0].tolist() == [20, 21, 21, 21]  # steps 2, 3: step 1's
    assert cache.pos == 1


def test_bounded_cache_slots_hold_memory_flat_in_the_step_count():
    sizes = {}
    for steps in (4, 8):
        model = tiny(DepthSpec(steps=steps, dt=0.5), block_size=32)
        x = torch.randint(0, 11, (1, 32), generator=torch.Generator().manual_seed(3))
        full = teacher_forced_loss(Decoder(model), [(x, x)])
        k_all = Decoder(model, kv_slots=steps)  # as many slots as steps: the full cache
        assert teacher_forced_loss(k_all, [(x, x)]) == pytest.approx(full, rel=1e-6)
        stats = Stats()
        bounded = teacher_forced_loss(Decoder(model, kv_slots=2), [(x, x)], stats)
        assert bounded != full and bounded > 0
        sizes[steps] = (stats.cache_bytes, Decoder(model).new_cache(1).nbytes)
    assert sizes[4][0] == sizes[8][0]  # 2 slots whatever the steps
    assert sizes[8][1] == 2 * sizes[4][1] == 4 * sizes[4][0]


def test_warm_start_needs_injection_and_changes_only_later_tokens():
    with pytest.raises(ValueError, match="inject=add"):
        Decoder(tiny(SPECS["score"]), warm_start=True)
    model = tiny(DepthSpec(steps=3, dt=0.5, inject="add"), block_size=32)
    x = torch.randint(0, 11, (2, 20), generator=torch.Generator().manual_seed(4))
    cold, warm = (Decoder(model, warm_start=w) for w in (False, True))
    with torch.no_grad():
        a, b = cold.new_cache(2), warm.new_cache(2)
        la = torch.cat([cold.feed(a, x[:, t : t + 1]) for t in range(20)], 1)
        lb = torch.cat([warm.feed(b, x[:, t : t + 1]) for t in range(20)], 1)
    torch.testing.assert_close(la[:, 0], lb[:, 0])  # the first token has no previous state
    assert not torch.allclose(la[:, 1:], lb[:, 1:])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kv_slots": 0}, "kv_slots must be"),
        ({"speculative_steps": 3}, r"speculative_steps must be an integer in \[1, 2\]"),
        ({"speculative_steps": 1, "draft_tokens": 0}, "draft_tokens must be"),
    ],
)
def test_decoder_options_are_checked_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Decoder(tiny(SPECS["score"]), **kwargs)
    with pytest.raises(ValueError, match="share=true"):
        Decoder(tiny(SPECS["stacked"]), kv_slots=2)


# ----------------------------------------------------------------------------- score-sample


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """A tiny shared (depth=score) Shakespeare run, trained once for this file."""
    from conftest import train_cli

    run_dir = tmp_path_factory.mktemp("generation") / "run"
    proc = train_cli(
        run_dir, "task=shakespeare_char_cpu", "depth=score", "task.max_steps=40",
        "task.val_check_interval=40", "task.data.eval_iters=1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def sample(run_dir, *args):
    from conftest import run_cli

    return run_cli(
        f"run_dir={run_dir}", "max_new_tokens=40", "prompt=ROMEO:", "top_k=1", *args,
        module="score_exp.cli.sample",
    )  # fmt: skip


@pytest.mark.slow
def test_score_sample_greedy_text_is_the_same_with_and_without_the_cache(shared_run):
    cached, plain, spec = (
        sample(shared_run, *a) for a in ([], ["kv_cache=false"], ["speculative_steps=2"])
    )
    for proc in (cached, plain, spec):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "tokens/s:" in proc.stderr and "tokens/s" not in proc.stdout
        assert "steps per token: mean 4.000; distribution {4: 40}" in proc.stderr
    assert cached.stdout == plain.stdout == spec.stdout
    assert cached.stdout.startswith("ROMEO:") and len(cached.stdout.split("\n---")[0]) == 46
    assert "acceptance rate:" in spec.stderr and "acceptance rate" not in cached.stderr
    # Past block_size (64) the cache refills from the last half window; speculative decoding
    # refills at the same tokens: the same text.
    long = [sample(shared_run, "max_new_tokens=150", *a) for a in ([], ["speculative_steps=1"],
                                                                    ["speculative_steps=3"])]  # fmt: skip
    assert all(p.returncode == 0 for p in long)
    assert long[0].stdout == long[1].stdout == long[2].stdout


@pytest.mark.slow
def test_score_sample_per_token_exit_and_bounded_cache_report_their_steps(shared_run):
    proc = sample(shared_run, "depth.halt=kl", "depth.adaptive_eps=1e-3", "kv_slots=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("steps per token"))
    dist = line.split("distribution ")[1]
    assert sum(int(v.split(": ")[1]) for v in dist.strip("{}").split(", ")) == 40
    proc = sample(shared_run, "warm_start=true")
    assert proc.returncode == 2 and "inject=add|concat" in proc.stderr and proc.stdout == ""
    proc = sample(shared_run, "kv_cache=false", "kv_slots=2")
    assert proc.returncode == 2 and "drop kv_cache=false" in proc.stderr


@pytest.mark.slow
def test_score_eval_per_token_gives_the_loss_at_the_compute_of_the_rule(shared_run, tmp_path):
    import csv
    import shutil

    from conftest import run_cli

    run = tmp_path / "run"
    shutil.copytree(shared_run, run)
    for args in ([], ["per_token=true"], ["per_token=true", "depth.adaptive_eps=1e-3",
                                          "depth.halt=kl", "kv_slots=2"]):  # fmt: skip
        proc = run_cli(f"run_dir={run}", *args, module="score_exp.cli.eval")
        assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run / "eval.csv") as f:
        plain, cached, exit_ = list(csv.DictReader(f))
    # Decoded one token at a time with the cache: the loss of the plain forward.
    assert float(cached["test/loss"]) == pytest.approx(float(plain["test/loss"]), rel=1e-5)
    assert cached["steps_dist"] == "4:768" and cached["per_token"] == "True"
    assert 1 <= float(exit_["steps_used"]) <= 4 and exit_["kv_slots"] == "2"
    counts = [int(x.split(":")[1]) for x in exit_["steps_dist"].split()]
    assert sum(counts) == 768  # 1 batch of 12 x 64 tokens
    proc = run_cli(f"run_dir={run}", "kv_slots=2", module="score_exp.cli.eval")
    assert proc.returncode == 2 and "add per_token=true" in proc.stderr
