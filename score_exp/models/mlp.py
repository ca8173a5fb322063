"""MLP regressor with recurrent depth: ``Linear`` encoder -> depth of MLP blocks -> ``Linear`` head."""

from __future__ import annotations

from torch import Tensor, nn

from score_exp.core import DepthSpec, RecurrentDepth
from score_exp.errors import ConfigError, check_choice, check_int
from score_exp.models.limits import MAX_WIDTH

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
NORMS = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d, "none": lambda _: nn.Identity()}


def _lookup(table: dict, name: str, key: str):
    return table[check_choice(key, name, tuple(table))]


def check_halt(halt: str, halts: tuple[str, ...] = ("state",), key: str = "depth.halt") -> str:
    """``halt`` is a criterion this model supports (``kl`` needs the readouts that only a
    language model passes to its depth); a ConfigError naming ``key`` otherwise. A name that is
    no criterion at all is left to the core's check, which lists the valid ones."""
    from score_exp.core.spec import HALTS

    if halt in HALTS and halt not in halts:
        raise ConfigError(
            f"{key}={halt} compares next-token distributions, which only a language model "
            f"passes to its depth; this model supports {key}={' or '.join(halts)}"
        )
    return halt


class MLPBlock(nn.Module):
    """``F(h) = dropout(act(Linear(norm(h))))``: a proposal for the next state, with no skip.

    The skip (contractive or residual) is the depth's job, so the same block serves every
    ``update``.

    ``skip=True`` returns ``h + F(h)`` instead (the paper author's block): the contractive Euler
    step ``(1 - dt) h + dt (h + F(h))`` then becomes ``h + dt F(h)``.
    """

    def __init__(self, hidden: int, act: str = "relu", norm: str = "layer", dropout: float = 0.0,
                 skip: bool = False):  # fmt: skip
        super().__init__()
        self.skip = skip
        self.norm = _lookup(NORMS, norm, "task.model.norm")(hidden)
        self.linear = nn.Linear(hidden, hidden)
        self.act = _lookup(ACTIVATIONS, act, "task.model.act")()
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        f = self.dropout(self.act(self.linear(self.norm(h))))  # (B, hidden)
        return h + f if self.skip else f

    def extra_repr(self) -> str:
        return f"skip={self.skip}"


class RecurrentMLP(nn.Module):
    """``Linear(in_features, hidden)`` -> depth of :class:`MLPBlock` -> ``Linear(hidden, out)``.

    Args:
        in_features: input width (e.g. number of kept RDKit descriptors).
        depth: the depth specification (shared or stacked, update, steps, dt, integrator).
        hidden: state width.
        out_features: output width (1 for a scalar regression target).
        act, norm, dropout: block hyperparameters.
        block_skip: blocks return ``h + F(h)`` (the paper author's block) instead of ``F(h)``.
        compile: ``torch.compile`` this module in place (``nn.Module.compile``: parameter names
            and checkpoints are unchanged), as :class:`~score_exp.models.GPT`.
    """

    halts = ("state", "ponder")  # the halting criteria (depth.halt) this model supports

    def __init__(
        self,
        in_features: int,
        depth: DepthSpec,
        hidden: int = 256,
        out_features: int = 1,
        act: str = "relu",
        norm: str = "layer",
        dropout: float = 0.1,
        block_skip: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        check_int("task.model.hidden", hidden, 1, MAX_WIDTH)  # before any weight is allocated
        check_halt(depth.halt, self.halts)
        self.in_features, self.hidden, self.out_features = in_features, hidden, out_features
        self.encoder = nn.Linear(in_features, hidden)
        self.depth = RecurrentDepth(
            lambda: MLPBlock(hidden, act, norm, dropout, block_skip), depth, hidden
        )
        self.head = nn.Linear(hidden, out_features)
        if compile:
            self.compile()

    def reset_parameters(self) -> None:
        self.encoder.reset_parameters()
        self.depth.reset_parameters()
        self.head.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)  # (B, hidden)
        h = self.depth(h)  # (B, hidden)
        return self.head(h)  # (B, out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden={self.hidden}, out_features={self.out_features}"
