"""Shardings for params, optimizer state and batches, from the logical axis names on every parameter.

The names and the rules table that maps them onto mesh axes live in `llada2_jax.core.axes`
(re-exported here); this module applies them to whole NNX states and optax states.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llada2_jax.core.axes import BATCH_AXES, LOGICAL_RULES, logical_to_spec

__all__ = ["BATCH_AXES", "LOGICAL_RULES", "batch_divisor", "batch_spec", "logical_to_spec", "named",
           "optimizer_specs", "per_device_bytes", "state_specs"]


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_specs(state: nnx.State, mesh_shape: Mapping[str, int]) -> dict:
    """Pure-dict tree (same structure as `nnx.to_pure_dict(state)`) of PartitionSpecs."""
    specs = jax.tree.map(
        lambda v: logical_to_spec(v.get_metadata().get("axes"), v.shape, mesh_shape),
        state, is_leaf=_is_variable)
    return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def named(specs, mesh: jax.sharding.Mesh):
    """PartitionSpec tree → NamedSharding tree on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def optimizer_specs(tx: optax.GradientTransformation, abstract_opt_state, param_specs):
    """Moments follow their parameter's spec; counters and other scalars are replicated."""
    return optax.tree_map_params(
        tx, lambda _, spec: spec, abstract_opt_state, param_specs,
        transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))


def batch_spec(ndim: int = 2) -> P:
    """Rows over BATCH_AXES, every other dimension replicated."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_divisor(mesh_shape: Mapping[str, int]) -> int:
    """The batch size must be a multiple of this (product of BATCH_AXES sizes)."""
    return math.prod(mesh_shape.get(a, 1) for a in BATCH_AXES)


def per_device_bytes(abstract_tree, spec_tree, mesh_shape: Mapping[str, int]) -> int:
    """Bytes one device holds for `abstract_tree` (ShapeDtypeStruct leaves) under `spec_tree`."""
    leaves = jax.tree.leaves(abstract_tree)
    specs = jax.tree.leaves(spec_tree, is_leaf=lambda x: isinstance(x, P))
    if len(leaves) != len(specs):
        raise ValueError(f"{len(leaves)} arrays but {len(specs)} partition specs")
    total = 0
    for leaf, spec in zip(leaves, specs):
        local = list(leaf.shape)
        for i, entry in enumerate(spec):
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            local[i] = -(-local[i] // math.prod(mesh_shape.get(a, 1) for a in names))
        total += math.prod(local) * np.dtype(leaf.dtype).itemsize
    return total
