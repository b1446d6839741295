"""The device mesh from the config: axes (data, fsdp, expert, tensor), -1 fills the rest.

`resolve_mesh_shape` is pure arithmetic on a device count, so a dry run can plan a 256-chip pod
on a laptop; `make_mesh` builds the real `jax.sharding.Mesh` over the visible devices.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax

MESH_AXES = ("data", "fsdp", "expert", "tensor")  # outermost (slowest links) to innermost


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Axis sizes with at most one -1 filled so the product equals `num_devices`.

    `sizes` is the config's `mesh` section (a missing axis counts as 1). Raises a ValueError that
    names the `mesh.<axis>` field when the sizes cannot tile the devices.
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh has unknown axes {sorted(unknown)}; valid axes: {MESH_AXES}")
    shape = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    for a, n in shape.items():
        if n == 0 or n < -1:
            raise ValueError(f"mesh.{a}={n}: an axis size must be a positive integer or -1 (fill)")
    fill = [a for a, n in shape.items() if n == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
    fixed = math.prod(n for n in shape.values() if n != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(
                f"mesh.{fill[0]}=-1 cannot fill {num_devices} devices: the other axes multiply to "
                f"{fixed}, which does not divide {num_devices}")
        shape[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh {' x '.join(f'{a}={n}' for a, n in shape.items())} has {fixed} devices but "
            f"{num_devices} are available; set one of mesh.data/fsdp/expert/tensor to -1 to fill")
    return shape


def make_mesh(sizes: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
    """A Mesh with Auto axis types over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(tuple(shape.values()), MESH_AXES, axis_types=auto, devices=devices)
    except NotImplementedError:  # an axis spans parts of torus axes (fsdp 16 on a v5p 4x8x8 slice)
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(tuple(shape.values()), devices, allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)
