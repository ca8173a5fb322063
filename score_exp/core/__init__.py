"""The recurrent-depth core: knows no task, no Lightning and no Hydra."""

from score_exp.core.depth import UPDATES, DepthSpec, RecurrentDepth
from score_exp.core.integrators import INTEGRATORS, Integrator, get_integrator

__all__ = ["INTEGRATORS", "UPDATES", "DepthSpec", "Integrator", "RecurrentDepth", "get_integrator"]
