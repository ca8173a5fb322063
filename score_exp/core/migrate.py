"""State-dict keys of checkpoints made before the depth's parts were child modules.

Until the parts owned their parameters, the depth held them itself (``dt_logit``,
``connect_logits``, ...); a checkpoint made then still loads: :meth:`RecurrentDepth.
_load_from_state_dict` renames its keys with :func:`migrate_keys` before loading. Tested against
state dicts made by that code (``tests/data/legacy_depth_states.json``).
"""

from __future__ import annotations

# old key (after the depth's prefix) -> new key; an entry ending in "." renames a prefix.
RENAMED: dict[str, str] = {
    "dt_logit": "step_size.logit",
    "connect_logits": "mixing.logits",
    "connect_residual": "mixing.residual",
    "active_steps": "growth.active_steps",
    "inject_weight": "injection.weight",  # before the Injection part
    "halting_head.": "halting.head.",
}


def migrate_keys(state_dict: dict, prefix: str) -> None:
    """Rename, in place, the old keys of the depth at ``prefix`` in ``state_dict``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        for old, new in RENAMED.items():
            if rest == old or (old.endswith(".") and rest.startswith(old)):
                state_dict[prefix + new + rest[len(old) :]] = state_dict.pop(key)
                break
