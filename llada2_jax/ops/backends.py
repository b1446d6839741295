"""The backend table: (op, platform, impl) -> the function that runs it, in one place.

`ops.attention` and `ops.grouped_matmul` look their backend up here, and the model config
validates its `attention_impl` / `gmm_impl` against `impls(op)`. "auto" resolves per platform
through `AUTO`. Attention backends take (q, k, v, spec: MaskSpec, scale, interpret); the ones in
`PER_DEVICE` cannot be partitioned by XLA and run under `ops.sharded` on a multi-device mesh.
Kernel modules are imported on first call, so the "xla" reference runs without them.
`interpret=None` means Pallas interpret mode exactly when the platform is the CPU.
"""
from __future__ import annotations

from typing import Callable

import jax

PLATFORMS = ("cpu", "gpu", "tpu")


def platform() -> str:
    return jax.default_backend()


# ---------------------------------------------------------------- attention backends
def _dense_attention(q, k, v, spec, *, scale, interpret):
    from llada2_jax.ops.reference import xla_attention
    return xla_attention(q, k, v, spec.dense(), scale=scale)


def _xla_sparse_attention(q, k, v, spec, *, scale, interpret):
    from llada2_jax.ops import xla_sparse
    return xla_sparse.attention(q, k, v, spec, scale=scale)


def _triton_attention(q, k, v, spec, *, scale, interpret):
    from kernels_pallas.block_sparse_attention import gpu
    return gpu.attention(q, k, v, spec, scale=scale, interpret=interpret)


def _mosaic_attention(q, k, v, spec, *, scale, interpret):
    from kernels_pallas.block_sparse_attention import tpu
    return tpu.attention(q, k, v, spec, scale=scale, interpret=interpret)


# ---------------------------------------------------------------- grouped-matmul backends
def _ragged_dot(x, w, group_sizes, *, interpret, preferred_element_type):
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=preferred_element_type)


def _xla_tiled_gmm(x, w, group_sizes, *, interpret, preferred_element_type):
    from llada2_jax.ops import xla_tiled
    return xla_tiled.grouped_matmul(x, w, group_sizes, preferred_element_type=preferred_element_type)


def _triton_gmm(x, w, group_sizes, *, interpret, preferred_element_type):
    from kernels_pallas.grouped_matmul import gpu
    return gpu.grouped_matmul(x, w, group_sizes, interpret=interpret, preferred_element_type=preferred_element_type)


def _megablox_gmm(x, w, group_sizes, *, interpret, preferred_element_type):
    if interpret:  # interpret mode on a TPU host runs the same portable kernel as on the CPU
        return _triton_gmm(x, w, group_sizes, interpret=True, preferred_element_type=preferred_element_type)
    from kernels_pallas.grouped_matmul import tpu
    return tpu.grouped_matmul(x, w, group_sizes, preferred_element_type=preferred_element_type)


def _everywhere(op: str, impl: str, fn: Callable) -> dict:
    return {(op, p, impl): fn for p in PLATFORMS}


TABLE: dict[tuple[str, str, str], Callable] = {
    **_everywhere("attention", "xla", _dense_attention),
    **_everywhere("attention", "xla_sparse", _xla_sparse_attention),
    ("attention", "cpu", "pallas"): _triton_attention,  # interpret mode
    ("attention", "gpu", "pallas"): _triton_attention,
    ("attention", "tpu", "pallas"): _mosaic_attention,
    **_everywhere("grouped_matmul", "xla", _ragged_dot),
    **_everywhere("grouped_matmul", "xla_tiled", _xla_tiled_gmm),
    ("grouped_matmul", "cpu", "pallas"): _triton_gmm,  # interpret mode
    ("grouped_matmul", "gpu", "pallas"): _triton_gmm,
    ("grouped_matmul", "tpu", "pallas"): _megablox_gmm,
}

# "auto" per (op, platform). CPU: the XLA paths (ragged_dot is slower than dense on CPU, and the
# Pallas kernels only run in interpret mode there). ops.attention keeps "auto" on the dense
# reference for masks other than block_diffusion, whose empty tiles are too few to pay for a kernel.
AUTO: dict[tuple[str, str], str] = {
    ("attention", "cpu"): "xla_sparse", ("attention", "gpu"): "pallas", ("attention", "tpu"): "pallas",
    ("grouped_matmul", "cpu"): "xla_tiled", ("grouped_matmul", "gpu"): "pallas",
    ("grouped_matmul", "tpu"): "pallas",
}

PER_DEVICE = {("attention", "xla_sparse"), ("attention", "pallas")}


def impls(op: str) -> tuple[str, ...]:
    """The impl names `op` accepts, "auto" first."""
    names = dict.fromkeys(impl for o, _, impl in TABLE if o == op)
    if not names:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted({o for o, _, _ in TABLE})}")
    return ("auto", *names)


def check(op: str, impl: str) -> None:
    if impl not in impls(op):
        raise ValueError(f"unknown {op} impl {impl!r}; expected one of: {', '.join(impls(op))}")


def resolve(op: str, impl: str) -> str:
    """The concrete impl name on this platform ("auto" resolved); ValueError for an unknown one."""
    check(op, impl)
    if impl != "auto":
        return impl
    where = platform()
    if (op, where) not in AUTO:
        raise ValueError(f"{op} impl 'auto' has no choice for platform {where!r}; name an impl")
    return AUTO[(op, where)]


def per_device(op: str, impl: str) -> bool:
    """Whether the backend must run per shard (XLA cannot partition it)."""
    return (op, resolve(op, impl)) in PER_DEVICE


def lookup(op: str, impl: str, interpret: bool | None = None) -> Callable:
    """The backend function of `op` / `impl` on this platform, with `interpret` bound."""
    where = platform()
    impl = resolve(op, impl)
    if (op, where, impl) not in TABLE:
        raise ValueError(f"{op} impl {impl!r} has no backend on platform {where!r}")
    fn = TABLE[(op, where, impl)]
    interpret = where == "cpu" if interpret is None else bool(interpret)
    return lambda *args, **kw: fn(*args, interpret=interpret, **kw)
