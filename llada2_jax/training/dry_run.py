"""Plan a run without allocating: parameter counts and per-device bytes under the configured mesh.

Everything comes from abstract shapes (`nnx.eval_shape`, `jax.eval_shape`) and the sharding rules
applied to the mesh *shape*, so a 256-chip pod plan can be printed on a laptop.
"""
from __future__ import annotations

import math

import jax
from flax import nnx

from llada2_jax import workdir as wd
from llada2_jax.model.config import ModelConfig
from llada2_jax.training import mesh as mesh_lib
from llada2_jax.training import model_source as ms
from llada2_jax.training import sharding as shd
from llada2_jax.training.state import decay_mask, make_optimizer

GiB = 2**30


def parameter_counts(config: ModelConfig) -> dict:
    """Total parameters and those active per token (routed experts count k/E of their weights)."""
    model = wd.abstract_model(config)
    params = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(params)
    total = routed = 0
    for path, var in flat:
        n = math.prod(var.shape)
        total += n
        if path[-1] in ("e_gate", "e_up", "e_down"):
            routed += n
    active = total - routed
    if config.is_moe:
        active += routed * config.num_experts_per_tok / config.num_experts
    return {"total": total, "active": int(active), "routed_experts": routed}


def _model_config(config) -> ModelConfig:
    """The architecture from `model.arch` (source=init) or from the source's own header/config."""
    kind, _ = ms.parse_source(config.model.source)
    if kind != "init":
        return ms.open_source(config.model.source, {}, dict(config.model.runtime)).config
    arch = dict(config.model.arch, **dict(config.model.runtime))
    if not arch.get("vocab_size"):
        arch["vocab_size"] = config.tokenizer.vocab_size
    return ModelConfig(**arch)


def plan(config, num_devices: int) -> dict:
    """Counts and per-device bytes for the run config's model, optimizer and mesh."""
    mesh_shape = mesh_lib.resolve_mesh_shape(dict(config.mesh), num_devices)
    model_config = _model_config(config)
    layout = ms.ModelLayout.build(model_config, mesh_shape)
    opt = config.optimizer
    tx = make_optimizer(1e-3, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                        grad_clip=opt.grad_clip, mask=decay_mask(layout.param_vars))
    opt_state = jax.eval_shape(tx.init, layout.abstract_params)
    opt_specs = shd.optimizer_specs(tx, opt_state, layout.param_specs)
    param_bytes = shd.per_device_bytes(layout.abstract_params, layout.param_specs, mesh_shape)
    buffer_bytes = shd.per_device_bytes(layout.abstract_buffers, layout.buffer_specs, mesh_shape)
    opt_bytes = shd.per_device_bytes(opt_state, opt_specs, mesh_shape)
    return {"mesh": mesh_shape, "devices": num_devices, **parameter_counts(model_config),
            "param_bytes": param_bytes + buffer_bytes, "optimizer_bytes": opt_bytes,
            "total_bytes": param_bytes + buffer_bytes + opt_bytes}


def report(p: dict) -> str:
    mesh = " x ".join(f"{a}={n}" for a, n in p["mesh"].items())
    return "\n".join([
        f"[dry_run] mesh {mesh} ({p['devices']} devices)",
        f"[dry_run] parameters: total {p['total'] / 1e9:.3f}B, active per token {p['active'] / 1e9:.3f}B "
        f"(routed experts {p['routed_experts'] / 1e9:.3f}B)",
        f"[dry_run] per device: params {p['param_bytes'] / GiB:.3f} GiB + optimizer state "
        f"{p['optimizer_bytes'] / GiB:.3f} GiB = {p['total_bytes'] / GiB:.3f} GiB (activations not included)",
    ])
