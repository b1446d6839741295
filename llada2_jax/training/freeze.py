"""Fine-tune only the top of a model: the optimizer half of `Transformer.freeze_bottom`.

`freeze_bottom(n)` stops gradients below layer n, so their gradients are zero; AdamW would still
move those weights through weight decay. `keep_bottom_layers(n, num_dense)` zeroes the updates
of the frozen layers (the first n of the global layer order: the dense stack, then the MoE
stack), weight decay included. Embedding, final norm and head stay trainable.
"""
from __future__ import annotations

import jax
import optax

STACKS = ("dense_layers", "moe_layers")


def _frozen_rows(path, n: int, num_dense: int) -> int:
    """How many leading layers of the stacked leaf at `path` are frozen (0 outside the stacks)."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if "dense_layers" in names:
        return min(n, num_dense)
    if "moe_layers" in names:
        return max(n - num_dense, 0)
    return 0


def keep_bottom_layers(n: int, num_dense: int) -> optax.GradientTransformation:
    """Zero every update of the bottom `n` layers (chain it after the optimizer)."""

    def update(updates, state, params=None):
        del params

        def zero(path, u):
            rows = _frozen_rows(path, n, num_dense)
            return u.at[:rows].set(0) if rows else u

        return jax.tree_util.tree_map_with_path(zero, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
