"""The recurrent-depth core: knows no task, no Lightning and no Hydra.

:class:`RecurrentDepth` (``depth.py``) is the loop, configured by a :class:`DepthSpec`
(``spec.py``); each step is an integrator step (``integrators.py``). Everything optional is a
small part in a file of its own, off by default (the plain chain, bit for bit):

* input mixing (``mixing.py``): ``connect="ancre"``, step ``j`` starts from a learned softmax
  mixture of ``h_0 .. h_j`` instead of ``h_j`` alone;
* step size (``step_size.py``): fixed, or ``learn_dt`` (a sigmoid of a learned logit);
* observers (``observers.py``): trace diagnostics;
* growth (``growth.py``): ``set_steps`` / ``refine`` for incremental-in-depth training;
* discretisation (``discretisation.py``): :meth:`RecurrentDepth.discretised` re-discretises a
  trained depth at evaluation (steps, dt, integrator, halting), the one mechanism every model
  honours without any change of its own;
* depth as a dial: ``inject``/``init_state`` (``inject.py``, the :class:`~inject.Injection`
  part), random step counts in training (``step_count.py``), truncated backprop
  (``backprop_steps``, in the loop), halting that removes finished samples at inference
  (``halting.py``: the one halting path, each criterion defined once) and the fixed-point
  solver (``solver.py``);
* learned halting (``ponder.py``, ``halt="ponder"``, PonderNet): the ``halting_head`` part
  (``nn.Identity`` for the other criteria) and a training objective of its own.
"""

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
