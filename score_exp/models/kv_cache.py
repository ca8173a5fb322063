"""A KV cache for incremental decoding through a recurrent depth: K/V per (step, stage).

In a stacked GPT, layer ``l``'s attention reads the keys and values layer ``l`` computed for the
earlier tokens. In a recurrent depth the same holds per *evaluation of the block*: step ``l``'s
stage ``s`` (the integrator's ``s``-th evaluation within the step, e.g. ``k1 .. k4`` of ``rk4``)
attends to the K/V that the same (step, stage) computed for every earlier token. Attention is
causal, so an earlier token's state at (step, stage) never depends on later tokens: keeping
those K/V and feeding one new token at a time gives the logits of the full forward (to float
rounding). The depth passes each block call its :class:`~score_exp.core.StepContext`
(``index``, ``stage``, ``rows``); the cache is keyed by it, and the core knows nothing of it.

Options beyond the exact cache:

* ``slots=k`` (Huginn's KV-cache sharing): step ``n`` writes and reads slot ``n mod k``, so the
  cache holds ``k`` steps' K/V whatever the step count (memory flat in ``steps``). An earlier
  token's K/V in slot ``j`` are those of its last step ``n`` with ``n mod k = j``.
* Per-token exit: a token whose iteration stopped after ``m`` steps (``used``) wrote no K/V for
  the steps after; each slot it did not write gets the K/V of its last computed step (slot
  ``(m - 1) mod k``, same stage), so later tokens attending there see its latest state.
  The alternative (``exit_kv="final"``, shared blocks without injection): the K/V of its final
  state, those its next step would have used (one more projection).
* ``last_h``: the final state of each row's last token (before ``ln_f``), for warm start.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from score_exp.core import StepContext


class KVCache:
    """Keys and values of ``rows`` sequences, per (slot, stage), up to ``max_len`` positions.

    Args:
        rows: the batch size (sequences decoded together, aligned: every row holds ``pos``
            tokens).
        n_head, head_size: the attention's heads and their width.
        max_len: positions the cache holds (the model's ``block_size``).
        steps: the depth's step count (slots without ``slots``); stages: evaluations of the
            block per step (the integrator's ``evals_per_step``).
        slots: bounded cache, step ``n`` uses slot ``n mod slots``; None: one slot per step.
        warm_start: a single-token forward starts its state from :attr:`last_h`.
        exit_kv: what a row that stopped early gives the steps it skipped: ``last`` (its last
            computed step's K/V) or ``final`` (the K/V of its final state).
        dtype, device: of the K/V tensors.

    Attributes:
        pos: tokens held per row (the position of the next token).
        last_h: ``(rows, 1, C)``, the final state of each row's last token, or None.
    """

    def __init__(
        self,
        rows: int,
        n_head: int,
        head_size: int,
        max_len: int,
        steps: int,
        stages: int = 1,
        slots: int | None = None,
        warm_start: bool = False,
        exit_kv: str = "last",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if slots is not None and (
            isinstance(slots, bool) or not isinstance(slots, int) or slots < 1
        ):
            raise ValueError(f"kv_slots must be an integer >= 1 or null, got {slots!r}")
        self.steps, self.stages, self.max_len = steps, stages, max_len
        self.slots = steps if slots is None else min(slots, steps)
        shape = (self.slots, stages, rows, n_head, max_len, head_size)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Which (slot, stage, row) the forward under way wrote (the rest is filled in advance()).
        self.written = torch.zeros(self.slots, stages, rows, dtype=torch.bool, device=device)
        self.pos = 0
        self.warm_start = warm_start
        if exit_kv not in ("last", "final"):
            raise ValueError(f"exit_kv must be last or final, got {exit_kv!r}")
        self.exit_kv = exit_kv
        self.last_h: Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Memory of the K/V tensors: ``2 * slots * stages * rows * max_len * C`` values."""
        return self.k.nbytes + self.v.nbytes

    def attend(self, step: StepContext, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store the new tokens' ``k, v`` at (step, stage) and attend ``q`` to every token held.

        ``q, k, v``: ``(R, nh, T, hs)`` for the ``T`` new tokens of the ``R`` running rows
        (``step.rows``; None: all rows). Returns ``(R, nh, T, hs)``.
        """
        slot, stage, rows = step.index % self.slots, step.stage, step.rows
        p, T = self.pos, q.shape[2]
        if p + T > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {p} + {T} do not fit")
        keys, values = self.k[slot, stage], self.v[slot, stage]  # (rows, nh, max_len, hs) views
        if rows is None:
            keys[:, :, p : p + T], values[:, :, p : p + T] = k, v
            K, V = keys[:, :, : p + T], values[:, :, : p + T]  # (R, nh, p + T, hs)
            self.written[slot, stage] = True
        else:
            keys[rows, :, p : p + T], values[rows, :, p : p + T] = k, v
            K, V = keys[rows, :, : p + T], values[rows, :, : p + T]
            self.written[slot, stage, rows] = True
        if T == 1:  # one new token sees every token held: no mask
            return F.scaled_dot_product_attention(q, K, V)
        if p == 0:  # a prefill: the square causal mask
            return F.scaled_dot_product_attention(q, K, V, is_causal=True)
        # T new tokens after p held ones: token i sees positions <= p + i (SDPA's is_causal
        # aligns a non-square mask to the top left, not to the end).
        mask = torch.ones(T, p + T, dtype=torch.bool, device=q.device).tril(p)  # (T, p + T)
        return F.scaled_dot_product_attention(q, K, V, attn_mask=mask)

    def advance(
        self, T: int, used: Tensor | int | None = None, fill: tuple[Tensor, Tensor] | None = None
    ) -> None:
        """End a forward of ``T`` tokens: fill what a row that stopped early did not write, move
        :attr:`pos` on. ``used``: the steps each row computed, ``(rows,)``, or one count for
        every row (None: :attr:`steps`); ``fill``: ``(k, v)``, ``(rows, nh, T, hs)``, what
        the skipped slots get instead of the last computed step's (``exit_kv="final"``)."""
        if not bool(self.written.all()):
            p = self.pos
            for r in (~self.written.all(1).all(0)).nonzero().flatten().tolist():
                m = int(used[r]) if torch.is_tensor(used) else (used or self.steps)
                last = (max(m, 1) - 1) % self.slots  # the slot of the row's last computed step
                miss = ~self.written[:, :, r]  # (slots, stages)
                for j, s in miss.nonzero().tolist():
                    if fill is not None:
                        self.k[j, s, r, :, p : p + T], self.v[j, s, r, :, p : p + T] = (
                            fill[0][r],
                            fill[1][r],
                        )
                        continue
                    self.k[j, s, r, :, p : p + T] = self.k[last, s, r, :, p : p + T]
                    self.v[j, s, r, :, p : p + T] = self.v[last, s, r, :, p : p + T]
        self.written.zero_()
        self.pos += T

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` positions (speculative decoding's rejected drafts go)."""
        if not 0 <= n <= self.pos:
            raise ValueError(f"cannot truncate a cache of {self.pos} positions to {n}")
        self.pos = n
        self.written.zero_()
