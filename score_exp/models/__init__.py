"""Plain ``nn.Module`` models: encoder -> :class:`~score_exp.core.RecurrentDepth` -> head."""

from score_exp.models.gpt import GPT, Block
from score_exp.models.mlp import MLPBlock, RecurrentMLP

__all__ = ["GPT", "Block", "MLPBlock", "RecurrentMLP"]
