"""Plain ``nn.Module`` models: encoder -> :class:`~score_exp.core.RecurrentDepth` -> head."""

from score_exp.models.mlp import MLPBlock, RecurrentMLP

__all__ = ["MLPBlock", "RecurrentMLP"]
