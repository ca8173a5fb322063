"""Generation that uses the recurrence: a KV cache, per-token exit, warm start and
self-speculative decoding (Geiping et al. 2025, arXiv 2502.05171, "Huginn", section 6).

:class:`Decoder` feeds a :class:`~score_exp.models.gpt.GPT` one token at a time through a
:class:`~score_exp.models.kv_cache.KVCache` (per step and integrator stage), so each new token
costs one token's depth instead of the whole context's. Everything the depth runs is its
current discretisation: per-token exit is ``depth.discretised(halt=..., adaptive_eps=...)``
around the decoding, and each single-token forward halts on its own (the halting runner's
samples are the rows, one token each). Options:

* ``kv_slots=k``: the bounded cache (step ``n`` in slot ``n mod k``, ``kv_cache.py``).
* ``warm_start``: each token's iteration starts from the previous token's final state.
* ``speculative_steps=s``: draft ``draft_tokens`` tokens with the first ``s`` steps of the
  iteration (the same ``dt``: the draft's K/V at those steps are the full model's), verify
  them with the full depth in one forward, keep the agreeing prefix and one token of the
  verifier. Under greedy sampling (``top_k=1``) the text is that of plain decoding; otherwise
  the speculative-sampling rule (Leviathan et al. 2023) keeps the full depth's distribution.

Beyond ``block_size`` a cached decoder drops the oldest half of the window and refills the
cache from the rest (one prefill every ``block_size / 2`` tokens): learned absolute positions
make nanoGPT's crop-every-token unreusable. Up to ``block_size`` the logits are those of the
plain forward.

:func:`teacher_forced_loss` runs the same per-token rule on given text: the loss at the compute
that the rule spends.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from score_exp.models.kv_cache import KVCache


@dataclass
class Stats:
    """What a decoding spent: tokens, seconds, steps per token, speculative acceptance."""

    tokens: int = 0
    seconds: float = 0.0
    steps: Counter = field(default_factory=Counter)  # steps per token -> tokens
    drafted: int = 0
    accepted: int = 0
    cache_bytes: int = 0

    def count_steps(self, used: Tensor | int, rows: int = 1) -> None:
        if torch.is_tensor(used):
            self.steps.update(used.tolist())
        else:
            self.steps[int(used)] += rows

    @property
    def mean_steps(self) -> float:
        n = sum(self.steps.values())
        return sum(k * v for k, v in self.steps.items()) / n if n else float("nan")

    def summary(self) -> str:
        """One line per figure, for stderr."""
        dist = ", ".join(f"{k}: {v}" for k, v in sorted(self.steps.items()))
        lines = [
            f"tokens/s: {self.tokens / self.seconds:.1f} ({self.tokens} tokens in "
            f"{self.seconds:.2f} s)",
            f"steps per token: mean {self.mean_steps:.3f}; distribution {{{dist}}}",
        ]
        if self.drafted:
            lines.append(
                f"acceptance rate: {self.accepted / self.drafted:.3f} ({self.accepted} of "
                f"{self.drafted} drafted tokens)"
            )
        if self.cache_bytes:
            lines.append(f"kv cache: {self.cache_bytes / 2**20:.2f} MiB")
        return "\n".join(lines)


def next_token(
    logits: Tensor, vocab_size: int, temperature: float, top_k: int | None, generator
) -> tuple[Tensor, Tensor]:
    """Sample from the last logits ``(B, V_padded)``: ``(token (B, 1), probs (B, V))``, as
    nanoGPT's ``generate`` (padded ids masked, top-k, temperature)."""
    logits = logits.float() / temperature
    logits[:, vocab_size:] = -float("inf")  # padded ids are no tokens
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator), probs


class Decoder:
    """Incremental decoding of a GPT (eval mode) with a KV cache.

    Args:
        model: a :class:`~score_exp.models.gpt.GPT`.
        kv_slots: the bounded cache's slot count (None: one per step).
        warm_start: start each token's state from the previous token's final state.
        speculative_steps: the draft's step count (None: no speculation); draft_tokens: the
            tokens drafted per verification.
        exit_kv: per-token exit, what a token that stopped early gives the steps it skipped:
            ``last`` (its last computed step's K/V) or ``final`` (its final state's).
    """

    def __init__(
        self,
        model,
        kv_slots: int | None = None,
        warm_start: bool = False,
        speculative_steps: int | None = None,
        draft_tokens: int = 4,
        exit_kv: str = "last",
    ):
        self.model, self.depth = model, model.depth
        self.kv_slots, self.warm_start = kv_slots, warm_start
        self.speculative_steps, self.draft_tokens = speculative_steps, draft_tokens
        self.exit_kv = exit_kv
        check_options(model, kv_slots, warm_start, speculative_steps, draft_tokens)
        if exit_kv == "final" and (not model.depth.spec.share or model.depth.spec.inject != "none"):
            raise ValueError("exit_kv=final projects the final state: share=true, inject=none")

    def new_cache(self, rows: int) -> KVCache:
        m, d = self.model, self.depth.discretisation
        p = next(m.parameters())
        return KVCache(
            rows, m.n_head, m.n_embd // m.n_head, m.block_size, d.steps, d.evals_per_step,
            self.kv_slots, self.warm_start, self.exit_kv, p.dtype, p.device,
        )  # fmt: skip

    def feed(self, cache: KVCache, idx: Tensor, stats: Stats | None = None) -> Tensor:
        """The logits ``(B, T, V)`` of ``idx``'s tokens after those the cache holds."""
        logits, _ = self.model(idx, cache=cache)
        if stats is not None:
            used = self.depth.last_steps_used
            stats.count_steps(self.depth.discretisation.steps if used is None else used, len(idx))
        return logits

    def start(self, idx: Tensor) -> KVCache:
        """A cache holding all of ``idx`` but its last token (which the next feed gives)."""
        cache = self.new_cache(idx.shape[0])
        if idx.shape[1] > 1:
            self.feed(cache, idx[:, :-1])
        return cache

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stats: Stats | None = None,
    ) -> Tensor:
        """``idx`` ``(B, T)`` -> ``(B, T + max_new_tokens)``, as ``GPT.generate`` with a cache."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if self.speculative_steps is not None and idx.shape[0] != 1:
            raise ValueError("speculative decoding verifies one sequence at a time (batch 1)")
        stats = Stats() if stats is None else stats
        t0 = time.perf_counter()
        window = self.model.block_size
        cache = self.start(idx[:, -window:])
        new = 0
        while new < max_new_tokens:
            if cache.pos + 1 > window:
                # Full: refill from the last half window (learned positions shift otherwise).
                cache = self.start(idx[:, -(window // 2) :])
            if self.speculative_steps is not None:
                out = self._speculate(cache, idx, max_new_tokens - new, temperature, top_k,
                                      generator, stats)  # fmt: skip
            else:
                logits = self.feed(cache, idx[:, -1:], stats)
                out, _ = next_token(logits[:, -1], self.model.vocab_size, temperature, top_k,
                                    generator)  # fmt: skip
            idx = torch.cat((idx, out), dim=1)
            new += out.shape[1]
        stats.tokens += max_new_tokens * idx.shape[0]
        stats.seconds += time.perf_counter() - t0
        stats.cache_bytes = max(stats.cache_bytes, cache.nbytes)
        return idx

    def _speculate(self, cache, idx, left, temperature, top_k, generator, stats) -> Tensor:
        """One draft-and-verify round: the tokens it adds, ``(1, >= 1)``."""
        vocab, pos = self.model.vocab_size, cache.pos
        n = min(self.draft_tokens, left - 1, self.model.block_size - pos - 1)
        drafts, qs = [], []
        if n > 0:
            # The draft: the first s steps of the same iteration (same dt, so its K/V at those
            # steps are the full depth's), read out after step s.
            dt = float(self.depth.dts()[0])
            with self.depth.discretised(steps=self.speculative_steps, dt=dt):
                tok = idx[:, -1:]
                for _ in range(n):
                    logits = self.feed(cache, tok)
                    tok, q = next_token(logits[:, -1], vocab, temperature, top_k, generator)
                    drafts.append(tok)
                    qs.append(q)
            cache.truncate(pos)
            stats.drafted += n
        fed = torch.cat([idx[:, -1:], *drafts], dim=1)  # (1, n + 1)
        logits = self.feed(cache, fed)  # the full depth over all drafts at once
        stats.count_steps(self.depth.discretisation.steps, 1)  # per token kept, below
        out = []
        for i in range(n + 1):
            p_logits = logits[:, i]
            if i == n:  # every draft kept: the verifier's next token, free
                tok, _ = next_token(p_logits, vocab, temperature, top_k, generator)
                out.append(tok)
                break
            d = drafts[i]
            _, p = next_token(p_logits.clone(), vocab, temperature, top_k, generator)
            if top_k == 1:  # greedy: keep the draft iff it is the verifier's argmax
                keep = bool(p[0, d[0, 0]] > 0)
            else:  # speculative sampling: keep with probability min(1, p / q)
                ratio = p[0, d[0, 0]] / qs[i][0, d[0, 0]].clamp_min(1e-30)
                keep = bool(torch.rand((), generator=generator, device=p.device) < ratio)
            if keep:
                stats.accepted += 1
                out.append(d)
                continue
            residual = (p - qs[i]).clamp_min(0)  # (1, V): the rest of p's mass
            if top_k == 1 or not bool(residual.sum() > 0):
                residual = p
            out.append(torch.multinomial(residual / residual.sum(), 1, generator=generator))
            break
        stats.count_steps(self.depth.discretisation.steps, len(out) - 1)
        cache.truncate(pos + len(out))  # the fed tokens whose successors were kept
        return torch.cat(out, dim=1)


def check_options(model, kv_slots, warm_start, speculative_steps, draft_tokens) -> None:
    """What the depth can decode with, before any work (``ValueError`` with the rule)."""
    spec, d = model.depth.spec, model.depth.discretisation
    if spec.solver != "unroll":
        raise ValueError(
            "the KV cache keys K/V by step: it needs solver=unroll (use kv_cache=false)"
        )
    if kv_slots is not None:
        if isinstance(kv_slots, bool) or not isinstance(kv_slots, int) or kv_slots < 1:
            raise ValueError(f"kv_slots must be an integer >= 1 or null, got {kv_slots!r}")
        if not spec.share:
            raise ValueError(
                "kv_slots shares K/V between the steps of one block: it needs share=true"
            )
    if warm_start and spec.inject == "none":
        raise ValueError(
            "warm_start replaces a token's initial state (its embedding) by the previous token's "
            "final state: it needs a depth that injects its input every step (inject=add|concat)"
        )
    if speculative_steps is not None:
        s = speculative_steps
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < d.steps:
            raise ValueError(
                f"speculative_steps must be an integer in [1, {d.steps - 1}], got {s!r}"
            )
        if not spec.share or spec.connect != "chain":
            raise ValueError(
                "speculative_steps drafts with fewer steps: it needs share=true, connect=chain"
            )
        if d.adaptive_eps is not None or warm_start:
            raise ValueError("speculative_steps runs fixed depths: no adaptive_eps, no warm_start")
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
            raise ValueError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")


@torch.no_grad()
def teacher_forced_loss(decoder: Decoder, batches, stats: Stats | None = None) -> float:
    """The mean next-token loss of ``(x, y)`` batches decoded one token at a time (the
    decoder's cache, exit rule, slots, warm start): the loss at the compute generation spends."""
    total, count = 0.0, 0
    stats = Stats() if stats is None else stats
    t0 = time.perf_counter()
    device = next(decoder.model.parameters()).device
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        cache = decoder.new_cache(x.shape[0])
        for t in range(x.shape[1]):
            logits = decoder.feed(cache, x[:, t : t + 1], stats)  # (B, 1, V)
            nll = F.cross_entropy(logits[:, 0].float(), y[:, t], ignore_index=-1, reduction="sum")
            total += float(nll)
            count += int((y[:, t] != -1).sum())
        stats.tokens += x.numel()
        stats.cache_bytes = max(stats.cache_bytes, cache.nbytes)
    stats.seconds += time.perf_counter() - t0
    return total / count


@torch.no_grad()
def plain_generate(model, idx, max_new_tokens, temperature, top_k, generator, stats=None):
    """nanoGPT's ``generate`` (the whole context each token), with ``stats`` kept: steps per
    token are the depth's per forward (a halting depth stops the whole context at once)."""
    stats = Stats() if stats is None else stats

    def count(mod, args, output):
        used = mod.last_steps_used
        stats.count_steps(mod.discretisation.steps if used is None else used, args[0].shape[0])

    handle = model.depth.register_forward_hook(count)
    t0 = time.perf_counter()
    try:
        out = model.generate(idx, max_new_tokens, temperature, top_k, generator=generator)
    finally:
        handle.remove()
    stats.seconds += time.perf_counter() - t0
    stats.tokens += max_new_tokens * idx.shape[0]
    return out
