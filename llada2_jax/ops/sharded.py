"""Per-device backends on a multi-device mesh: `shard_map` around a kernel.

A `pallas_call` (and the data-dependent tile lists of "xla_sparse") is per-device: XLA cannot
partition it, so under a sharded jit it would gather q/k/v onto every device. Attention is
independent per batch row and per kv-head group, so each device can run the kernel on its own
rows and heads: batch over the batch axes (as the trainer lays out the data, `core.axes`),
heads over the head axis when both head counts divide, MaskSpec features like q's batch.
Sequence dimensions are never split.

The mesh comes from the context (`jax.set_mesh(mesh)` / `jax.sharding.use_abstract_mesh`) or,
failing that, from q's own sharding (arrays placed with a NamedSharding carry their mesh through
jit). Without a multi-device mesh, or inside a caller's shard_map, the kernel is called directly.
"""
from __future__ import annotations

import jax
from jax.sharding import AxisType, PartitionSpec as P

from llada2_jax.core import axes
from llada2_jax.core.masks import MaskSpec


def ambient_mesh(x=None):
    """The context mesh, else the mesh of x's sharding; None when there is no usable mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty and x is not None:
        sharding = getattr(getattr(x, "aval", None), "sharding", None) or getattr(x, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    if any(t == AxisType.Manual for t in mesh.axis_types):
        return None  # already inside a shard_map: the caller has split the data
    return mesh


def batch_axes(mesh, batch: int) -> tuple[str, ...]:
    """The mesh axes that split `batch` rows, by the trainer's rule, so its batches are not moved."""
    return axes.batch_axes(mesh.shape, batch)


def partition(mesh, batch: int, hq: int, hkv: int):
    """(batch axes, head axis or None) for this mesh and these sizes."""
    tensor = mesh.shape.get(axes.HEAD_AXIS, 1)
    head_axis = axes.HEAD_AXIS if tensor > 1 and hq % tensor == 0 and hkv % tensor == 0 else None
    return batch_axes(mesh, batch), head_axis


def attention(kernel, q, k, v, spec: MaskSpec, mesh=None):
    """`kernel(q, k, v, spec)` run per shard under the ambient mesh (or `mesh`) when there is one."""
    mesh = ambient_mesh(q) if mesh is None else mesh
    if mesh is None:
        return kernel(q, k, v, spec)
    # Even with nothing to split (all specs replicated) the shard_map stays: on TPU a Mosaic kernel
    # on a multi-device mesh only lowers inside one.
    rows, head_axis = partition(mesh, q.shape[0], q.shape[2], k.shape[2])
    b = rows or None
    qkv = P(b, None, head_axis, None)
    feat = P(b, None)
    spec_specs = MaskSpec(feat, feat, feat, feat, feat, feat, spec.rule)
    # check_vma=False: pallas_call outputs carry no varying-axes type; every output is replicated
    # over the axes its spec leaves out, because the inputs are.
    return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, spec_specs), out_specs=qkv,
                         check_vma=False)(q, k, v, spec)
