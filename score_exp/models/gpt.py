"""nanoGPT (Karpathy's ``model.py``) with its stack of blocks replaced by a recurrent depth.

Token + position embeddings -> depth of Transformer blocks -> final LayerNorm -> tied LM head.

The block ``F(h)`` is the WHOLE nanoGPT block, skips included::

    F(h) = g + mlp(ln_2(g)),   g = h + attn(ln_1(h))

so ``DepthSpec(share=False, update="none")`` (``h <- F(h)`` with ``steps`` independent blocks) IS
nanoGPT, parameter for parameter, and ``depth=score`` is ``h <- (1 - dt) h + dt F(h)`` with one
shared block (the paper's transformer code writes it ``x + dt * (block(x) - x)``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from score_exp.core import DepthSpec, RecurrentDepth, StepContext
from score_exp.errors import check_int
from score_exp.models.kv_cache import KVCache
from score_exp.models.limits import MAX_SEQ_LEN, MAX_WIDTH


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_embd, self.n_head, self.dropout = n_embd, n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, step: StepContext | None = None, kv: KVCache | None = None
    ) -> Tensor:
        B, T, C = x.shape  # batch, sequence length, embedding width (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )  # (B, nh, T, hs)
        else:  # incremental decoding: the earlier tokens' K/V of this (step, stage), kept
            y = kv.attend(step, q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, dropout={self.dropout}"


class MLP(nn.Module):
    """``Linear(C, 4C) -> GELU -> Linear(4C, C) -> Dropout``."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """nanoGPT's pre-LayerNorm Transformer block, skips included: a proposal for the next state."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(
        self, h: Tensor, step: StepContext | None = None, kv: KVCache | None = None
    ) -> Tensor:
        # step: where the depth calls it (step, integrator stage, running rows); with a KV cache
        # (``kv``, generation only) the attention keeps its K/V per (step, stage).
        h = h + self.attn(self.ln_1(h), step, kv)  # (B, T, C)
        return h + self.mlp(self.ln_2(h))  # (B, T, C)


def _all_rows(rows: Tensor, ctx: dict) -> dict:
    """Halting's ``select``: the KV cache reads the running rows from the step context."""
    return ctx


class GPT(nn.Module):
    """nanoGPT's GPT with a :class:`~score_exp.core.RecurrentDepth` of :class:`Block`.

    Args:
        vocab_size: number of token ids the data can hold (65 for Shakespeare-char, 50257 GPT-2).
        block_size: maximum context length (number of learned positions).
        depth: the depth specification; ``steps`` plays nanoGPT's ``n_layer``.
        n_head, n_embd: attention heads and embedding width.
        dropout: dropout on embeddings, attention weights and residual branches (nanoGPT's).
        bias: biases in Linear and LayerNorm layers (nanoGPT's default: False).
        pad_vocab_to_multiple_of: round the embedding table up (nanoGPT pads GPT-2's 50257 to
            50304 = 64 * 786 for faster matmuls); the padded ids are never targets and are masked
            out when sampling. 1 = no padding.
        compile: ``torch.compile`` this module in place (``nn.Module.compile``: parameter names
            and checkpoints are unchanged).
    """

    halts = ("state", "kl", "ponder")  # kl: successive next-token distributions (readout=)

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        depth: DepthSpec,
        n_head: int = 6,
        n_embd: int = 384,
        dropout: float = 0.0,
        bias: bool = False,
        pad_vocab_to_multiple_of: int = 1,
        compile: bool = False,
    ):
        super().__init__()
        check_int("task.model.n_embd", n_embd, 1, MAX_WIDTH)  # before any weight is allocated
        check_int("task.data.block_size", block_size, 1, MAX_SEQ_LEN)
        if vocab_size < 1 or block_size < 1:
            raise ValueError(
                f"vocab_size and block_size must be >= 1, got {vocab_size}, {block_size}"
            )
        if pad_vocab_to_multiple_of < 1:
            raise ValueError(
                f"pad_vocab_to_multiple_of must be >= 1, got {pad_vocab_to_multiple_of}"
            )
        self.vocab_size, self.block_size = vocab_size, block_size
        self.n_head, self.n_embd, self.dropout, self.bias = n_head, n_embd, dropout, bias
        m = pad_vocab_to_multiple_of
        self.padded_vocab_size = (vocab_size + m - 1) // m * m

        self.wte = nn.Embedding(self.padded_vocab_size, n_embd)  # token embeddings
        self.wpe = nn.Embedding(block_size, n_embd)  # learned position embeddings
        self.drop = nn.Dropout(dropout)
        self.depth = RecurrentDepth(lambda: Block(n_embd, n_head, dropout, bias), depth, n_embd)
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, self.padded_vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as nanoGPT: one tensor for input and output embeddings.
        self.wte.weight = self.lm_head.weight
        self.reset_parameters()
        if compile:
            self.compile()

    @property
    def n_layer(self) -> int:
        # nanoGPT scales each residual projection by 1/sqrt(2 * n_layer), because 2 * n_layer
        # residual branches add up along the depth. With shared weights the count that matters
        # is still the number of times a block is APPLIED, so n_layer = spec.steps (not the
        # number of distinct blocks, which is 1): the same init for stacked and shared models.
        return self.depth.spec.steps

    def reset_parameters(self) -> None:
        """nanoGPT's initialisation: N(0, 0.02) for Linear/Embedding, zero biases, scaled c_proj."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.n_layer))

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameters counted once (tied embeddings once); nanoGPT's way drops the positions."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Logits and (with ``targets``) the mean cross-entropy, as nanoGPT.

        Args:
            idx: token ids, ``(B, T)`` with ``T <= block_size``.
            targets: next-token ids ``(B, T)``; ``-1`` is ignored.
            cache: incremental decoding (``generation.py``): ``idx`` are the tokens after the
                ``cache.pos`` tokens the cache holds, and it keeps their K/V.

        Returns:
            ``(logits, loss)``: logits ``(B, T, V)`` with targets or a cache; otherwise only the
            last position's ``(B, 1, V)`` (all that generation needs) and loss None.
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if self.block_size < start + T:
            raise ValueError(
                f"cannot forward a sequence of length {start + T}, block_size is {self.block_size}"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        h = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        if cache is None:
            h = self.depth(h, readout=self._next_token_logits)  # (B, T, C); readout: halt=kl
        else:
            h = self._cached_depth(h, cache)  # (B, T, C)
        h = self.ln_f(h)  # (B, T, C)
        if targets is None and cache is None:
            return self.lm_head(h[:, [-1], :]), None  # (B, 1, V)
        logits = self.lm_head(h)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
        )
        return logits, loss

    def _cached_depth(self, e: Tensor, cache: KVCache) -> Tensor:
        """The depth over ``T`` new tokens with the cache, which then holds them.

        Halting (``adaptive_eps``) stops each row on its own: a row is one sequence's ``T``
        new tokens, one token when decoding, so the exit is per token. Warm start: a single
        new token starts from the previous token's final state instead of its embedding.
        """
        warm = cache.warm_start and cache.last_h is not None and e.shape[1] == 1
        h = self.depth(
            e,
            readout=self._next_token_logits,
            select=_all_rows,  # the cache is cut by the step context's rows, not here
            h0=cache.last_h if warm else None,
            kv=cache,
        )
        used = self.depth.last_steps_used  # per row when halting; else every step ran
        fill = None
        if cache.exit_kv == "final" and used is not None:  # the alternative fill (kv_cache.py)
            block = self.depth.blocks[0]
            _, k, v = block.attn.c_attn(block.ln_1(h)).split(self.n_embd, dim=2)  # (B, T, C)
            B, T, C = h.shape
            k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (k, v))
            fill = (k, v)  # (B, nh, T, hs): the K/V the next step would have used
        cache.advance(e.shape[1], self.depth.discretisation.steps if used is None else used, fill)
        cache.last_h = h[:, -1:]  # (B, 1, C)
        return h

    def _next_token_logits(self, h: Tensor) -> Tensor:
        """The logits a state would give: ``lm_head(ln_f(h))``, ``(B, T, V)``."""
        return self.lm_head(self.ln_f(h))

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` more tokens: ``idx`` ``(B, T)`` -> ``(B, T + max_new_tokens)``.

        The context is cropped to the last ``block_size`` tokens; call ``eval()`` first for
        deterministic dropout-free sampling.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for _ in range(max_new_tokens):
            # (B, <=block_size); a fresh tensor, not a cropped view, whose strides and offset
            # torch.compile would guard on (a recompile once the context is cropped).
            idx_cond = idx[:, -self.block_size :].clone(memory_format=torch.contiguous_format)
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float() / temperature  # (B, V_padded)
            logits[:, self.vocab_size :] = -float("inf")  # padded ids are no tokens
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, padded_vocab_size={self.padded_vocab_size}, "
            f"block_size={self.block_size}, n_head={self.n_head}, n_embd={self.n_embd}, "
            f"dropout={self.dropout}, bias={self.bias}"
        )
