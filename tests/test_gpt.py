"""nanoGPT on Tiny Shakespeare: tokenisers, token memmaps, the GPT model, the LM task, the CLIs."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch
from conftest import REPO, cli_env, load_results, run_cli, train_cli
from torch import nn

from score_exp.config import depth_spec
from score_exp.data.registry import fetch
from score_exp.data.shakespeare import (
    CharTokenizer,
    GPT2Tokenizer,
    prepare_tokens,
    tokenizer_from_meta,
)
from score_exp.errors import DataError
from score_exp.models import GPT
from score_exp.run import build
from score_exp.tasks.lm import LanguageModelModule, nanogpt_lr
from score_exp.tasks.shakespeare import FixedWindows, RandomWindows

PRESETS = ("score", "stacked", "stacked_plain", "skip05", "shared_residual", "shared_plain")
LN65 = math.log(65)


def build_model(cfg) -> GPT:
    """The model exactly as score-train builds it from a composed config (the builder's)."""
    torch.manual_seed(0)
    return build(cfg).model


def block_params(model: GPT) -> int:
    return sum(p.numel() for p in model.depth.parameters())


# ----------------------------------------------------------------------------- tokenisers


def test_char_tokenizer_round_trips_shakespeare():
    text = fetch("shakespeare").read_text()
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    assert tok.itos[:3] == ["\n", " ", "!"] and tok.itos[-1] == "z"  # sorted, as nanoGPT
    snippet = text[:2000]
    assert tok.decode(tok.encode(snippet)) == snippet
    assert tokenizer_from_meta(tok.meta()).encode(snippet) == tok.encode(snippet)
    with pytest.raises(DataError, match="not in the 65-symbol vocabulary"):
        tok.encode("café")


def test_gpt2_tokenizer_from_the_mirror_files():
    tok = GPT2Tokenizer()
    assert tok.encode("hello world") == [31373, 995]
    assert tok.vocab_size == 50257
    text = fetch("shakespeare").read_text()[:3000]
    assert tok.decode(tok.encode(text)) == text


# ----------------------------------------------------------------------------- token memmaps


def test_prepare_tokens_writes_cached_memmaps(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    src = tmp_path / "tiny.txt"
    src.write_text(text)
    cache = tmp_path / "cache"

    files = prepare_tokens(src, "char", cache=cache)
    split_at = int(len(text) * 0.9)  # nanoGPT: first 90% train, last 10% val
    tok = files.tokenizer()
    train, val = files.load("train"), files.load("val")
    assert train.dtype == np.uint16 and isinstance(train, np.memmap)
    assert tok.decode(train) == text[:split_at] and tok.decode(val) == text[split_at:]
    assert files.meta["vocab_size"] == len(set(text)) and files.meta["n_val"] == len(val)
    assert (files.root / "meta.json").is_file()

    # Prepared once: a second call returns the same files without rewriting them.
    mtime = files.path("train").stat().st_mtime_ns
    again = prepare_tokens(src, "char", cache=cache)
    assert again.root == files.root and again.path("train").stat().st_mtime_ns == mtime

    # A different tokeniser or text never reuses these files.
    assert prepare_tokens(src, "gpt2", cache=cache).root != files.root
    src.write_text(text.upper())
    upper = prepare_tokens(src, "char", cache=cache)
    assert (
        upper.root != files.root
        and upper.tokenizer().decode(upper.load("val")) == text.upper()[split_at:]
    )

    # A truncated file (e.g. a crash in another tool) is detected and prepared again.
    with open(upper.path("train"), "r+b") as f:
        f.truncate(10)
    assert len(prepare_tokens(src, "char", cache=cache).load("train")) == split_at


def test_prepare_tokens_rejects_bad_input(tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare_tokens(tmp_path / "missing.txt", "char", cache=tmp_path)
    (tmp_path / "t.txt").write_text("abc")
    with pytest.raises(DataError, match="unknown tokenizer"):
        prepare_tokens(tmp_path / "t.txt", "bytes", cache=tmp_path)
    with pytest.raises(DataError, match="too few"):
        prepare_tokens(tmp_path / "t.txt", "char", cache=tmp_path)


def test_gpt2_tokens_of_shakespeare_match_nanogpt(tmp_path):
    files = prepare_tokens(fetch("shakespeare"), "gpt2", cache=tmp_path)
    # nanoGPT's data/shakespeare/prepare.py: "train has 301,966 tokens, val has 36,059 tokens"
    assert (files.meta["n_train"], files.meta["n_val"]) == (301_966, 36_059)


def test_gpt2_task_builds_a_50257_token_model(compose):
    cfg = compose("task=shakespeare_gpt2", "depth=stacked")
    dm, model, _, _ = build(cfg)
    assert dm.model_kwargs() == {"vocab_size": 50257, "block_size": 256}
    text = fetch("shakespeare").read_text()
    head = dm.tokenizer.decode(dm.data["val"][:50])
    assert len(head) > 50 and text[int(0.9 * len(text)) :].startswith(head)
    L, C = cfg.task.steps, cfg.task.model.n_embd
    # nanoGPT's count for n_layer=6, n_embd=384 and GPT-2's vocabulary (no padding).
    assert model.get_num_params() == 12 * L * C**2 + (2 * L + 1) * C + 50257 * C == 29_920_512


def test_random_windows_are_seeded_and_val_windows_fixed():
    data = np.arange(1000, dtype=np.uint16)
    first = [b for b, _ in zip(RandomWindows(data, 8, 4, seed=0), range(3), strict=False)]
    again = [b for b, _ in zip(RandomWindows(data, 8, 4, seed=0), range(3), strict=False)]
    other = next(iter(RandomWindows(data, 8, 4, seed=1)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], other[0])
    resumed = next(iter(RandomWindows(data, 8, 4, seed=0, start=2)))  # a resumed run
    assert torch.equal(resumed[0], first[2][0])
    ranks = [iter(RandomWindows(data, 8, 4, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    assert torch.equal(next(ranks[1])[0], first[1][0])  # 2 ranks share out the same stream
    assert torch.equal(next(ranks[0])[0], first[0][0]) and torch.equal(
        next(ranks[0])[0], first[2][0]
    )
    x, y = first[0]
    assert x.shape == y.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])  # y = x shifted
    val = FixedWindows(data, 8, 4, n_batches=5, seed=1337)
    assert len(val) == 5 and torch.equal(val[2][0], val[2][0])
    assert int(val.starts.max()) <= len(data) - 8 - 1


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("depth", ["stacked", "score"])
def test_attention_is_causal(compose, depth):
    model = build_model(compose("task=shakespeare_char_cpu", f"depth={depth}")).eval()
    idx = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(0))
    t = 17
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 65
    with torch.no_grad():
        before, _ = model(idx, idx)
        after, _ = model(changed, idx)
    assert torch.equal(before[:, :t], after[:, :t])  # the past never sees the future
    assert not torch.allclose(before[:, t:], after[:, t:])


@pytest.mark.parametrize(
    ("task", "nanogpt", "total"),
    [("shakespeare_char", 10_646_784, 10_745_088), ("shakespeare_char_cpu", 795_904, 804_096)],
)
def test_stacked_model_has_nanogpt_parameter_count(compose, task, nanogpt, total):
    cfg = compose(f"task={task}", "depth=stacked")
    spec = depth_spec(cfg)
    assert (spec.share, spec.update) == (False, "none")  # stacked = plain composition = nanoGPT
    model = build_model(cfg)
    assert model.get_num_params() == nanogpt  # nanoGPT's count: no position embeddings
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == total  # train.py's

    # nanoGPT's optimizer groups: decay on >= 2-D tensors only.
    module = LanguageModelModule(model, vocab={"tokenizer": "char"})
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    C, n_layer = cfg.task.model.n_embd, cfg.task.steps
    assert len(no_decay["params"]) == 2 * n_layer + 1 and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for p in no_decay["params"]) == (2 * n_layer + 1) * C  # LayerNorm gains
    assert sum(p.numel() for p in decay["params"]) == total - (2 * n_layer + 1) * C


@pytest.mark.parametrize("task", ["shakespeare_char", "shakespeare_char_cpu"])
def test_shared_blocks_hold_one_over_steps_of_the_stack(compose, task):
    stacked = build_model(compose(f"task={task}", "depth=stacked"))
    shared = build_model(compose(f"task={task}", "depth=score"))
    steps = compose(f"task={task}").task.steps
    assert len(shared.depth.blocks) == 1 and len(stacked.depth.blocks) == steps
    assert block_params(shared) * steps == block_params(stacked)
    # Embeddings, ln_f and the tied head are the same in both.
    assert stacked.get_num_params() - block_params(stacked) == (
        shared.get_num_params() - block_params(shared)
    )


def test_residual_projection_init_uses_the_number_of_applications(compose):
    for depth in ("stacked", "score"):
        model = build_model(compose("task=shakespeare_char", f"depth={depth}"))
        std = model.depth.blocks[0].mlp.c_proj.weight.std().item()
        assert std == pytest.approx(0.02 / math.sqrt(2 * 6), rel=0.05)  # 6 steps, shared or not
        assert model.depth.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight is model.lm_head.weight  # tied


@pytest.mark.parametrize("preset", PRESETS)
def test_each_depth_preset_trains_a_step(compose, preset):
    cfg = compose("task=shakespeare_char_cpu", f"depth={preset}")
    model = build_model(cfg)
    x, y = torch.randint(0, 65, (2, 2, 16), generator=torch.Generator().manual_seed(1))
    logits, loss = model(x, y)
    assert logits.shape == (2, 16, 65) and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.depth.nfe == cfg.task.steps
    assert model.generate(x[:1, :4], 5).shape == (1, 9)


def test_loss_at_init_is_about_ln_vocab(compose):
    cfg = compose("task=shakespeare_char_cpu", "depth=stacked")
    model = build_model(cfg).eval()
    files = prepare_tokens(fetch("shakespeare"), "char")
    x, y = FixedWindows(files.load("val"), 64, 12, n_batches=1, seed=0)[0]
    with torch.no_grad():
        _, loss = model(x, y)
    assert loss.item() == pytest.approx(LN65, abs=0.1)  # ln(65) = 4.17


def test_the_scheduler_sets_nanogpt_learning_rates_to_the_bit():
    # LambdaLR's lr * (lr_t / lr) missed nanoGPT's lr_t by an ulp at 79 of the GPU preset's 5000
    # steps; the module's scheduler sets lr_t itself.
    module = LanguageModelModule(nn.Linear(2, 2))  # the GPU preset's schedule (the defaults)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    for it in range(5001):
        want = nanogpt_lr(it, 1e-3, 1e-4, 100, 5000)
        assert [g["lr"] for g in opt.param_groups] == [want, want], it
        opt.step()
        sched.step()


def test_nanogpt_learning_rate_schedule():
    lr = dict(lr=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000)
    assert nanogpt_lr(0, **lr) == pytest.approx(1e-3 / 101)
    assert nanogpt_lr(100, **lr) == pytest.approx(1e-3)  # end of warmup: the peak
    assert nanogpt_lr(1050, **lr) == pytest.approx(5.5e-4)  # half way down the cosine
    assert nanogpt_lr(2000, **lr) == pytest.approx(1e-4) == nanogpt_lr(5000, **lr)


# ----------------------------------------------------------------------------- CLI

TINY_GPT = [
    "task=shakespeare_char_cpu",
    "depth=stacked",
    "task.max_steps=60",
    "task.val_check_interval=20",
    "task.data.eval_iters=4",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("shakespeare") / "run"
    proc = train_cli(run_dir, *TINY_GPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_cli_trains_char_cpu_preset_and_writes_results(trained_run):
    r = load_results(trained_run)
    assert r["status"] == "ok" and r["task"] == "shakespeare_char_cpu"
    assert r["params"] == 804_096 and r["nfe"] == 4
    assert r["depth"]["share"] is False and r["depth"]["update"] == "none"
    assert r["best_val"]["metric"] == "val/loss"
    assert set(r["test"]) == {"loss", "bpc"}  # test = the val split again
    assert r["test"]["loss"] == pytest.approx(r["best_val"]["value"], rel=1e-5)
    assert r["test"]["bpc"] == pytest.approx(r["test"]["loss"] / math.log(2), rel=1e-5)
    assert (trained_run / "config.yaml").is_file() and (trained_run / "splits.json").is_file()


@pytest.mark.slow
def test_loss_decreases_over_a_short_run(trained_run):
    with open(trained_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_steps = {r["step"] for r in rows if r.get("train/loss")}
    # Evaluations during training (the final validation at the best checkpoint comes after).
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss") and r["step"] in train_steps]
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(val) == 3  # steps 20, 40, 60
    assert val[0] > val[1] > val[2] and val[2] < LN65 - 0.6
    assert train[-1] < train[0]
    assert all(float(r["train/tokens_per_s"]) > 0 for r in rows if r.get("train/tokens_per_s"))


@pytest.mark.slow
def test_same_seed_same_numbers_and_resume_continues_the_run(trained_run, tmp_path):
    def val_at(run_dir, step: int) -> float:
        with open(run_dir / "metrics.csv") as f:
            rows = [
                r for r in csv.DictReader(f) if r.get("val/loss") and r["step"] == str(step - 1)
            ]
        return float(rows[0]["val/loss"])

    # A 40-step run killed at step 20 (SIGTERM, as a pre-empted job) gives the very numbers of
    # the 60-step run up to there (same seed; warmup lasts 100 steps, so the learning rates are
    # the same), and re-running the same command resumes the same training stream to step 40.
    short = tmp_path / "run"
    kill = ["+callbacks.kill._target_=sweep_helpers.SigtermAt", "+callbacks.kill.step=20"]
    env = cli_env(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    proc = train_cli(short, *TINY_GPT, "task.max_steps=40", *kill, env=env)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert val_at(short, 20) == val_at(trained_run, 20)  # exact: same code, same machine
    proc = train_cli(short, *TINY_GPT, "task.max_steps=40", *kill, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout + proc.stderr
    assert val_at(short, 40) == pytest.approx(val_at(trained_run, 40), rel=1e-5)


# 20 optimiser steps through nanoGPT's warmup, cosine decay and floor (lr_decay_iters 15), at
# nanoGPT's default learning rates (train.py: 6e-4, min_lr 6e-5).
NANOGPT_20 = [
    "task=shakespeare_char_cpu",
    "depth=stacked",
    "task.max_steps=20",
    "task.val_check_interval=20",
    "task.data.eval_iters=1",
    "task.module.lr=6e-4",
    "task.module.min_lr=6e-5",
    "task.module.warmup_iters=5",
    "task.module.lr_decay_iters=15",
    "trainer.log_every_n_steps=1",
]


def _nanogpt_train_py(cfg, steps: int) -> tuple[list[float], dict]:
    """nanoGPT's ``train.py`` loop, written as it is there: the same model init, batches,
    AdamW groups (decay on >= 2-D tensors), ``get_lr`` set before each step, loss.backward(),
    ``clip_grad_norm_(model.parameters(), grad_clip)``, step, ``zero_grad(set_to_none=True)``.
    Returns every loss and the final state dict."""
    m, hp, data = cfg.task.model, cfg.task.module, cfg.task.data
    torch.manual_seed(cfg.seed)
    model = GPT(vocab_size=65, block_size=data.block_size, depth=depth_spec(cfg),
                n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout, bias=m.bias)  # fmt: skip
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = [
        {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": hp.weight_decay},
        {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
    files = prepare_tokens(fetch("shakespeare"), "char")
    batches = iter(RandomWindows(files.load("train"), data.block_size, data.batch_size, data.seed))
    losses = []
    model.train()
    for it in range(steps):
        lr = nanogpt_lr(it, hp.lr, hp.min_lr, hp.warmup_iters, hp.lr_decay_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        X, Y = next(batches)
        _, loss = model(X, Y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.task.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model.state_dict()


@pytest.mark.slow
def test_score_train_is_nanogpt_train_py_to_the_bit(tmp_path, compose):
    # The real score-train (Trainer, trainer=cpu, callbacks, checkpoints) against nanoGPT's
    # loop in this process: every loss and every final weight equal bit for bit. A property of
    # the code on one machine and thread count (both run single-threaded here): another CPU's
    # kernels round differently, for both sides alike. Before, Lightning clipped the norm over
    # the optimiser's groups (another float32 summation order) and LambdaLR's lr * (lr_t / lr)
    # missed nanoGPT's lr_t by an ulp at some steps.
    run = tmp_path / "run"
    proc = train_cli(run, *NANOGPT_20, env=cli_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run / "metrics.csv") as f:
        got = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want, final = _nanogpt_train_py(compose(*NANOGPT_20), 20)
    finally:
        torch.set_num_threads(threads)
    assert got == want  # all 20 losses
    differ = [k for k, v in final.items() if not torch.equal(state[f"model.{k}"], v)]
    assert not differ, differ
    assert len(final) == len([k for k in state if k.startswith("model.")])


def test_a_budget_shorter_than_the_eval_interval_is_an_error(tmp_path):
    proc = train_cli(tmp_path / "run", *TINY_GPT, "task.max_steps=10", "task.val_check_interval=20")
    assert proc.returncode == 2
    assert "would never be computed" in proc.stderr.splitlines()[-1]


@pytest.mark.slow
def test_score_sample_prints_samples_of_the_requested_length(trained_run):
    sep = "---------------"
    proc = run_cli(
        f"run_dir={trained_run}",
        "num_samples=2",
        "max_new_tokens=50",
        "prompt=ROMEO:",
        "seed=3",
        module="score_exp.cli.sample",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded" in proc.stderr and "loaded" not in proc.stdout  # logs on stderr only
    samples = proc.stdout.split(f"\n{sep}\n")
    assert samples[-1] == "" and len(samples) == 3
    vocab = set(fetch("shakespeare").read_text())
    for text in samples[:2]:
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 50
        assert set(text) <= vocab


def test_score_sample_reports_a_missing_run_or_checkpoint(tmp_path):
    proc = run_cli(f"run_dir={tmp_path / 'nope'}", module="score_exp.cli.sample")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and proc.stdout == ""
    (tmp_path / "config.yaml").write_text("task: {}\n")
    proc = run_cli(f"run_dir={tmp_path}", module="score_exp.cli.sample")
    assert proc.returncode == 2 and "holds no checkpoint" in proc.stderr


class _FusedAdamW(LanguageModelModule):
    """The optimizer ``configure_optimizers`` picks on CUDA (fused AdamW), here on CPU."""

    def configure_optimizers(self):
        out = super().configure_optimizers()
        opt = out["optimizer"]
        fused = torch.optim.AdamW(opt.param_groups, fused=True)
        out["lr_scheduler"]["scheduler"].optimizer = fused
        return {**out, "optimizer": fused}


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_clips_the_gradient_norm_with_fused_adamw(compose, fused):
    # Lightning's mixed-precision plugin refuses to clip for fused AdamW (nanoGPT's optimizer on
    # CUDA): `trainer=gpu` failed at its first step on an H200 until the module clipped itself.
    import lightning as L

    cfg = compose("task=shakespeare_char_cpu", "depth=stacked")
    module = (_FusedAdamW if fused else LanguageModelModule)(build_model(cfg))
    batches = torch.randint(0, 65, (2, 2, 4, 16), generator=torch.Generator().manual_seed(1))
    norms = []

    class GradNorm(L.Callback):  # after the optimiser step: the gradients it used
        def on_train_batch_end(self, trainer, pl_module, *args):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", gradient_clip_val=0.01, max_steps=2,
        callbacks=[GradNorm()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(list(batches), batch_size=None))  # 2 x (x, y)
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW)
    assert trainer.optimizers[0].defaults["fused"] is fused
    assert len(norms) == 2 and all(n == pytest.approx(0.01, rel=1e-3) for n in norms)
