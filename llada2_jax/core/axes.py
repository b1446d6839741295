"""Logical axis names → mesh axes: the one rules table every layer shards by.

Every model parameter carries `axes=(logical names...)` metadata. `LOGICAL_RULES` lists, per
logical name, the mesh axes it may be split over, in order of preference. A dimension takes the
longest prefix of its candidate axes that (a) no other dimension of the same array already uses
and (b) divides the dimension evenly, so small or odd dimensions (e.g. 4 KV heads on 8-way
tensor parallelism) quietly stay replicated instead of failing.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from jax.sharding import PartitionSpec as P

# Batch rows are split over every axis that does not shard the model's compute dimensions:
# the expert axis doubles as data parallelism outside the MoE layers.
BATCH_AXES = ("data", "fsdp", "expert")

# Attention heads (and the MLP width) are split over this axis.
HEAD_AXIS = "tensor"

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp", "expert"),  # d_model: ZeRO-3 style; expert weights already use `expert`
    "vocab": (HEAD_AXIS,),
    "heads": (HEAD_AXIS,),
    "kv_heads": (HEAD_AXIS,),
    "mlp": (HEAD_AXIS,),
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


def batch_axes(mesh_shape: Mapping[str, int], batch: int) -> tuple[str, ...]:
    """The mesh axes that split `batch` rows: the longest prefix of BATCH_AXES (present in the
    mesh) whose size product divides it."""
    present = [a for a in BATCH_AXES if a in mesh_shape]
    for i in range(len(present), 0, -1):
        if batch % math.prod(mesh_shape[a] for a in present[:i]) == 0:
            return tuple(present[:i])
    return ()
