"""PyG's AttentiveFP (Xiong et al., 2020) as a reference model: a field-standard peer, no depth.

The network is ``torch_geometric.nn.models.AttentiveFP`` itself, not a rewrite; this module only
adapts its call to the project's model contract (``model(depth=..., **data.model_kwargs())``,
``forward(batch) -> (B, 1)``), so it trains through the same LightningModule, splits, seeds and
early stopping as the depth variants. Its input widths come from the project's featurisation
(:mod:`score_exp.data.graphs`: the 39 atom and 10 bond features of the AttentiveFP paper, as
PyG's ``examples/attentive_fp.py`` computes them).
"""

from __future__ import annotations

from torch import Tensor, nn

from score_exp.core import DepthSpec
from score_exp.errors import ConfigError, check_int, check_number


class AttentiveFPReference(nn.Module):
    """PyG's ``AttentiveFP`` predicting one value per molecule; the depth spec is not used.

    ``reference`` names the model in ``results.json``: the report shows such a run as a reference
    row beside the depth variants, never as one of them.

    Args:
        atom_features, edge_features: input widths (from the featuriser).
        depth: accepted for the model contract and ignored: AttentiveFP has its own
            ``num_layers`` and ``num_timesteps``.
        hidden_channels, num_layers, num_timesteps, dropout: AttentiveFP's arguments.
        descriptor_features: must be 0 (AttentiveFP takes no descriptor vector).
    """

    reference = "attentivefp"

    def __init__(
        self,
        atom_features: int,
        edge_features: int,
        depth: DepthSpec | None = None,
        hidden_channels: int = 200,
        num_layers: int = 2,
        num_timesteps: int = 2,
        dropout: float = 0.2,
        descriptor_features: int = 0,
    ):
        super().__init__()
        from torch_geometric.nn.models import AttentiveFP

        # task.model.* are the config keys of these arguments (the message names them).
        check_int("task.model.hidden_channels", hidden_channels, 1)
        check_int("task.model.num_layers", num_layers, 1)
        check_int("task.model.num_timesteps", num_timesteps, 1)
        check_number("task.model.dropout", dropout, strict=False)
        if descriptor_features:
            raise ConfigError("task/model=attentivefp takes no descriptors: set task.data.descriptors=false")  # fmt: skip
        self.net = AttentiveFP(
            in_channels=atom_features,
            hidden_channels=hidden_channels,
            out_channels=1,
            edge_dim=edge_features,
            num_layers=num_layers,
            num_timesteps=num_timesteps,
            dropout=dropout,
        )

    def forward(self, data) -> Tensor:
        """Predictions ``(B, 1)`` for a PyG ``Batch`` with ``x, edge_index, edge_attr, batch``."""
        return self.net(data.x, data.edge_index, data.edge_attr, data.batch)
