"""The recurrent-depth core: knows no task, no Lightning and no Hydra (nor anything else of
``score_exp``).

:class:`RecurrentDepth` (``depth.py``), configured by a :class:`DepthSpec` (``spec.py``), holds
its blocks and its *parts*: child modules built from the spec, always present, each the
identity (holding no parameter or buffer) when off, so the default is the plain chain bit for
bit and its state dict is its blocks'. Each part owns its parameters and buffers; the depth asks
the parts, and no part reaches into the depth or into another part:

============  ======================  ==========================================================
attribute     file                    what it owns / does
============  ======================  ==========================================================
step_size     ``step_size.py``        fixed ``dt``, or ``learn_dt``'s ``logit`` (sigmoid)
mixing        ``mixing.py``           ``connect="ancre"``: ``logits`` (or ``residual``)
growth        ``growth.py``           the active step count (``active_steps`` with a schedule)
injection     ``inject.py``           ``inject`` (``concat``: ``weight``) and ``init_state``
halting       ``ponder.py``           ``halt="ponder"``: PonderNet's ``head``; the criteria
step_count    ``step_count.py``       ``train_steps``: the count drawn per optimiser step
============  ======================  ==========================================================

**One loop.** Every step of every forward is taken by :func:`loop.integrate`: the mixing's
input, one integrator step (``integrators.py``: tiny step functions in a name registry, order
declared; our ``rk4`` is the classic one, torchdiffeq's is the 3/8 rule) of the update's field,
then the runner's *control* sees ``(h, h_next)``. ``backprop_steps`` lives in the loop, so every
runner honours it.

**Runners** (``runners.py``), chosen once per :class:`Discretisation` (``discretisation.py``:
the trained one, or :meth:`RecurrentDepth.discretised`'s) from the registry ``RUNNERS``, as
torchdeq chooses its solver: ``unroll``, ``halting`` (early exit, ``halting.py``), ``record``
(PonderNet's training forward, ``ponder.py``), ``fixed_point`` (Anderson, ``solver.py``) and
``replay`` (a recorded step's state, for PonderNet's loss).

**Step context.** A block is called ``F(h, **ctx)`` with the model's context (``edge_index``,
...). A block whose ``forward`` takes a keyword ``step`` also gets a :class:`StepContext`:
``index`` (the step; for the fixed point, the evaluation), ``stage`` (the integrator's
evaluation within the step, 0 .. evals_per_step - 1) and ``rows`` (the rows of the input still
running when halting has removed some; None: all). What a block keeps per (step, stage), a KV
cache say, is the block's business; the core knows nothing of it.

**Adding a part**: a child module in a file of its own, built from the spec in
``RecurrentDepth.__init__`` (identity when off, its parameters its own attributes), asked by
the depth where it acts (the loop, a runner, the discretisation); its spec fields and their
checks in ``spec.py``; if it renames state that old checkpoints hold, a line in ``migrate.py``.
A new way to run the steps is a runner: a function in ``runners.py``, its name in ``RUNNERS``,
and its rule in ``Discretisation.__post_init__``.
"""

from score_exp.core.depth import RecurrentDepth
from score_exp.core.discretisation import Discretisation
from score_exp.core.integrators import INTEGRATORS, Integrator, get_integrator
from score_exp.core.loop import StepContext
from score_exp.core.runners import RUNNERS
from score_exp.core.spec import UPDATES, DepthSpec

__all__ = [
    "INTEGRATORS",
    "RUNNERS",
    "UPDATES",
    "DepthSpec",
    "Discretisation",
    "Integrator",
    "RecurrentDepth",
    "StepContext",
    "get_integrator",
]
