"""Logical axis names → mesh axes: one rules table, shardings for params, optimizer and batches.

Every model parameter carries `axes=(logical names...)` metadata. `LOGICAL_RULES` lists, per
logical name, the mesh axes it may be split over, in order of preference. A dimension takes the
longest prefix of its candidate axes that (a) no other dimension of the same array already uses
and (b) divides the dimension evenly, so small or odd dimensions (e.g. 4 KV heads on 8-way
tensor parallelism) quietly stay replicated instead of failing.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

# Batch rows are split over every axis that does not shard the model's compute dimensions:
# the expert axis doubles as data parallelism outside the MoE layers.
BATCH_AXES = ("data", "fsdp", "expert")

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp", "expert"),  # d_model: ZeRO-3 style; expert weights already use `expert`
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "expert": ("expert",),
    "head_dim": (),
    "layers": (),
    "norm": (),
}


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int],
                    mesh_shape: Mapping[str, int], rules: Mapping[str, Sequence[str]] = LOGICAL_RULES) -> P:
    """The PartitionSpec of one array from its logical axis names (None / missing → replicated)."""
    if axes is None:
        return P()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match the array rank of shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        chosen: list[str] = []
        for axis in rules[name]:
            size = mesh_shape.get(axis, 1)
            if axis in used or dim % (math.prod(mesh_shape.get(a, 1) for a in chosen) * size):
                break
            chosen.append(axis)
        chosen = [a for a in chosen if mesh_shape.get(a, 1) > 1]
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


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
