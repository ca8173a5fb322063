"""The recurrent-depth core: knows no task, no Lightning and no Hydra."""

from score_exp.core.depth import RecurrentDepth
from score_exp.core.discretisation import Discretisation
from score_exp.core.integrators import INTEGRATORS, Integrator, get_integrator
from score_exp.core.spec import UPDATES, DepthSpec

__all__ = [
    "INTEGRATORS",
    "UPDATES",
    "DepthSpec",
    "Discretisation",
    "Integrator",
    "RecurrentDepth",
    "get_integrator",
]
