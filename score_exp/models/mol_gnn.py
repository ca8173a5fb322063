"""Molecular GNN with recurrent depth: atom encoder -> depth of conv blocks -> readout -> MLP head.

Every block ``F(h, edge_index, edge_attr)`` returns a *proposal for the next node state*
(conv -> norm -> act -> dropout), never ``h + conv(h)``: the skip belongs to the depth, so
``contractive`` (SCORE), ``residual`` and ``none`` updates and every integrator apply unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import (
    GATConv,
    GATv2Conv,
    GCNConv,
    GINEConv,
    MessagePassing,
    global_add_pool,
    global_mean_pool,
)
from torch_geometric.utils import scatter

from score_exp.core import DepthSpec, RecurrentDepth
from score_exp.errors import ConfigError, check_choice, check_int
from score_exp.models.limits import MAX_WIDTH
from score_exp.models.mlp import check_halt

CONVS = ("mpnn", "dmpnn", "gine", "gat", "gcn")
READOUTS = ("attentive", "mean", "sum")


class EdgeNetworkConv(MessagePassing):
    """Gilmer et al.'s edge network (PyG's ``NNConv``): ``x_i' = W x_i + mean_j x_j A(e_ji)``.

    ``A(e)`` is a ``hidden x hidden`` matrix made by a small MLP from the bond features. Bond
    features take few distinct values (about a dozen on ESOL), so ``A`` is computed once per
    distinct feature vector and messages are grouped by it: the same function as ``NNConv``
    without materialising an ``(E, hidden, hidden)`` tensor, which is what makes the paper's
    width of 128 affordable on a CPU.
    """

    def __init__(self, hidden: int, edge_dim: int, edge_hidden: int = 32):
        super().__init__(aggr="mean")
        self.hidden = hidden
        self.edge_net = nn.Sequential(
            nn.Linear(edge_dim, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, hidden * hidden)
        )
        self.root = nn.Linear(hidden, hidden)

    def reset_parameters(self) -> None:
        for m in self.edge_net:
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self.root.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        kinds, order, counts = self._kinds(edge_attr)
        A = self.edge_net(kinds).view(-1, self.hidden, self.hidden)  # (K, hidden, hidden)
        return self.root(x) + self.propagate(edge_index, x=x, A=A, order=order, counts=counts)

    def _kinds(self, edge_attr: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """The distinct bond feature vectors ``(K, D)``, the edges grouped by them ``(E,)`` and
        the group sizes. A shared block sees the same ``edge_attr`` at every step of a forward:
        the grouping is made once per tensor, not once per step (same values: it is a pure
        function of ``edge_attr``)."""
        memo = self.__dict__.get("_memo")
        if memo is not None and memo[0] is edge_attr:
            return memo[1]
        kinds, kind, counts = torch.unique(
            edge_attr, dim=0, return_inverse=True, return_counts=True
        )  # (K, D), (E,), (K,)
        out = (kinds, torch.argsort(kind), counts.tolist())  # edges grouped by kind
        self.__dict__["_memo"] = (edge_attr, out)  # a plain attribute: no buffer, no state
        return out

    def message(self, x_j: Tensor, A: Tensor, order: Tensor, counts: list[int]) -> Tensor:
        if not counts:  # no edge (single-atom molecules, e.g. the last ones left by halting)
            return x_j.new_zeros(0, self.hidden)  # (0, hidden): mean aggregation gives zeros
        grouped = x_j[order].split(counts)  # K chunks of (E_k, hidden)
        msg = torch.cat([chunk @ A[k] for k, chunk in enumerate(grouped)])  # (E, hidden), sorted
        return torch.empty_like(msg).index_copy_(0, order, msg)  # back to edge order

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, aggr=mean"


class DirectedMPNNConv(nn.Module):
    """Chemprop's directed bond messages, recomputed from node states at every step.

    Chemprop keeps hidden states on directed bonds; here the depth's state lives on atoms (so
    the core's update rules apply unchanged), and each step derives the bond states from it:

    - bond state ``b_vw = W_b [h_v, e_vw]`` on each directed edge ``v -> w``;
    - message ``m_vw = sum_{k -> v} b_kv - b_wv``: what reaches ``v``, except what came back
      from ``w`` (chemprop's non-backtracking rule; the reverse of edge ``e`` is ``e ^ 1``);
    - atom update ``W_a [h_w, sum_{v -> w} m_vw]``.
    """

    def __init__(self, hidden: int, edge_dim: int):
        super().__init__()
        self.bond = nn.Linear(hidden + edge_dim, hidden)
        self.atom = nn.Linear(2 * hidden, hidden)

    def reset_parameters(self) -> None:
        self.bond.reset_parameters()
        self.atom.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        src, dst = edge_index  # (E,), (E,)
        b = torch.relu(self.bond(torch.cat([x[src], edge_attr], dim=-1)))  # (E, hidden)
        incoming = scatter(b, dst, dim=0, dim_size=x.size(0), reduce="sum")  # (N, hidden)
        rev = torch.arange(src.numel(), device=src.device) ^ 1
        m = incoming[src] - b[rev]  # (E, hidden): into v from all but w
        agg = scatter(m, dst, dim=0, dim_size=x.size(0), reduce="sum")  # (N, hidden)
        return self.atom(torch.cat([x, agg], dim=-1))


def make_conv(conv: str, hidden: int, edge_dim: int, heads: int = 4) -> nn.Module:
    if conv == "mpnn":
        return EdgeNetworkConv(hidden, edge_dim)
    if conv == "dmpnn":
        return DirectedMPNNConv(hidden, edge_dim)
    if conv == "gine":
        mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        return GINEConv(mlp, edge_dim=edge_dim, train_eps=True)
    if conv == "gat":
        if hidden % heads:
            raise ConfigError(
                f"task.model.hidden={hidden} must be divisible by task.model.heads={heads} for gat"
            )
        return GATv2Conv(hidden, hidden // heads, heads=heads, edge_dim=edge_dim)
    if conv == "gcn":
        return GCNConv(hidden, hidden)
    raise ValueError(f"unknown conv {conv!r}; valid convs: {', '.join(CONVS)}")


class GraphBlock(nn.Module):
    """``F(h) = dropout(act(norm(conv(h, edge_index, edge_attr))))``: a proposal, no skip.

    ``skip=True`` returns ``h + F(h)`` instead, as the paper author's GNN code does: the
    contractive Euler step ``(1 - dt) h + dt (h + F(h))`` then becomes ``h + dt F(h)``.
    """

    def __init__(self, conv: str, hidden: int, edge_dim: int, dropout: float = 0.1, heads: int = 4,
                 skip: bool = False):  # fmt: skip
        super().__init__()
        self.skip = skip
        self.conv_name = conv
        self.conv = make_conv(conv, hidden, edge_dim, heads)
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        if self.conv_name == "gcn":  # GCN has no edge features
            f = self.conv(h, edge_index)
        else:
            f = self.conv(h, edge_index, edge_attr)
        f = self.dropout(self.act(self.norm(f)))  # (N, hidden)
        return h + f if self.skip else f


class AttentiveReadout(nn.Module):
    """AttentiveFP's molecule-level readout ("MolAttFP"): attention from a super node + GRU.

    The molecule vector starts as ``relu(sum of atom states)``; each of ``timesteps`` rounds
    attends over the molecule's atoms (a GAT layer from every atom to its molecule) and
    refines the vector with a GRU cell, as in ``torch_geometric.nn.models.AttentiveFP``.
    """

    def __init__(self, hidden: int, timesteps: int = 2, dropout: float = 0.1):
        super().__init__()
        self.timesteps, self.dropout = timesteps, dropout
        self.mol_conv = GATConv(
            hidden, hidden, dropout=dropout, add_self_loops=False, negative_slope=0.01
        )
        self.mol_gru = nn.GRUCell(hidden, hidden)

    def reset_parameters(self) -> None:
        self.mol_conv.reset_parameters()
        self.mol_gru.reset_parameters()

    def forward(self, h: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        row = torch.arange(batch.size(0), device=batch.device)
        edge_index = torch.stack([row, batch], dim=0)  # atom -> its molecule
        out = global_add_pool(h, batch, size=num_graphs).relu()  # (B, hidden)
        for _ in range(self.timesteps):
            m = nn.functional.elu(self.mol_conv((h, out), edge_index))  # (B, hidden)
            m = nn.functional.dropout(m, p=self.dropout, training=self.training)
            out = self.mol_gru(m, out).relu()
        return out

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}"


def keep_nodes(keep: Tensor, ctx: dict) -> dict:
    """The block context of the subgraph of the ``keep`` nodes ``(N,)`` (whole molecules, so
    every kept edge has both ends kept); node ids renumbered to the kept rows' order."""
    edge_index = ctx["edge_index"]
    edges = keep[edge_index[0]]  # (E,)
    renumber = torch.cumsum(keep.long(), 0) - 1  # old node id -> new
    out = {**ctx, "edge_index": renumber[edge_index[:, edges]]}
    if ctx.get("edge_attr") is not None:
        out["edge_attr"] = ctx["edge_attr"][edges]
    return out


class MolGNN(nn.Module):
    """Atom encoder -> :class:`RecurrentDepth` of :class:`GraphBlock` -> readout -> MLP head.

    Args:
        atom_features, edge_features: input widths (from the featuriser).
        depth: the depth specification.
        conv: ``mpnn`` (edge network, the paper's MPNN), ``dmpnn``, ``gine``, ``gat``, ``gcn``.
        readout: ``attentive`` (AttentiveFP), ``mean`` or ``sum``.
        hidden: node state width.
        head: widths of the head's hidden layers (leaky ReLU between them).
        dropout: dropout in blocks, readout and head.
        descriptor_features: width of a per-molecule descriptor vector concatenated to the
            molecule vector before the head (0 = none).
        readout_timesteps, heads: attentive readout rounds; attention heads of ``gat``.
        block_skip: blocks return ``h + F(h)`` (the paper author's block) instead of ``F(h)``.
    """

    halts = ("state", "ponder")  # the halting criteria (depth.halt) this model supports

    def __init__(
        self,
        atom_features: int,
        edge_features: int,
        depth: DepthSpec,
        conv: str = "mpnn",
        readout: str = "attentive",
        hidden: int = 128,
        head: tuple[int, ...] = (64, 32),
        dropout: float = 0.1,
        descriptor_features: int = 0,
        readout_timesteps: int = 2,
        heads: int = 4,
        descriptors: bool = False,
        block_skip: bool = False,
    ):
        super().__init__()
        # task.model.* are the config keys of these arguments (the message names them).
        check_choice("task.model.conv", conv, CONVS)
        check_choice("task.model.readout", readout, READOUTS)
        check_int("task.model.hidden", hidden, 1, MAX_WIDTH)
        check_halt(depth.halt, self.halts)
        if descriptors and descriptor_features <= 0:
            raise ValueError("descriptors=true needs descriptor_features > 0 from the data module")
        self.conv, self.readout_name, self.hidden = conv, readout, hidden
        self.descriptor_features = descriptor_features
        self.encoder = nn.Linear(atom_features, hidden)
        self.depth = RecurrentDepth(
            lambda: GraphBlock(conv, hidden, edge_features, dropout, heads, block_skip),
            depth,
            hidden,
        )
        self.readout = (
            AttentiveReadout(hidden, readout_timesteps, dropout) if readout == "attentive" else None
        )
        widths = [hidden + descriptor_features, *head]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.LeakyReLU(), nn.Dropout(dropout)]
        self.head = nn.Sequential(*layers, nn.Linear(widths[-1], 1))

    def forward(self, data) -> Tensor:
        """Predictions ``(B, 1)`` for a PyG ``Batch`` with ``x, edge_index, edge_attr, batch``."""
        h = self.encoder(data.x)  # (N, hidden)
        h = self.depth(
            h,
            edge_index=data.edge_index,
            edge_attr=data.edge_attr,
            group=data.batch,  # halting stops a molecule as a whole
            select=keep_nodes,
        )  # (N, hidden)
        if self.readout is not None:
            g = self.readout(h, data.batch, data.num_graphs)  # (B, hidden)
        elif self.readout_name == "mean":
            g = global_mean_pool(h, data.batch, size=data.num_graphs)
        else:
            g = global_add_pool(h, data.batch, size=data.num_graphs)
        if self.descriptor_features:
            g = torch.cat([g, data.desc], dim=-1)  # (B, hidden + descriptor_features)
        return self.head(g)

    def extra_repr(self) -> str:
        return (
            f"conv={self.conv!r}, readout={self.readout_name!r}, hidden={self.hidden}, "
            f"descriptor_features={self.descriptor_features}"
        )
