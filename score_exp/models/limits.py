"""Sane maxima of the sizes a model's config may ask for, checked before any weight is allocated.

A run folder's config.yaml is data: ``hidden: 10**9`` or ``block_size: 10**7`` would otherwise
allocate until the process is killed. The widest model trained here has 384 features, GPT-3's
12,288. (The depth's own maximum, ``MAX_STEPS``, is the core's: ``score_exp.core.spec``.)
"""

MAX_WIDTH = 65_536  # task.model.hidden, task.model.n_embd
MAX_SEQ_LEN = 65_536  # task.data.block_size (a GPT's context: positions and attention)
