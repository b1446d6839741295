"""The train state as plain pytrees: trainable params, buffers, optimizer state and counters.

The model is split once (`workdir.split_model`) into a static graphdef and two pure dicts:
`params` (every `nnx.Param`, what the optimizer updates) and `buffers` (every other variable,
e.g. the MoE `ExpertBias`, updated by its own rule). Inside a jitted step `workdir.merge_model`
rebuilds a module from them, so the step is a pure function of arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: dict
    buffers: dict
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer steps taken in this stage (skipped ones included)
    nonfinite: jax.Array  # int32: total skipped (non-finite) updates
    streak: jax.Array  # int32: consecutive skipped updates ending at `step`


def decay_mask(param_vars: nnx.State) -> dict:
    """Weight decay on matrices only: a parameter decays when it has ≥ 2 axes besides `layers`.

    Norm scales and biases (one non-layer axis) are left alone, as is customary for AdamW.
    """
    def matrix(v):
        axes = v.get_metadata().get("axes") or (None,) * v.ndim
        return sum(a != "layers" for a in axes) >= 2

    return nnx.to_pure_dict(jax.tree.map(matrix, param_vars, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def make_optimizer(schedule, *, b1: float, b2: float, eps: float, weight_decay: float,
                   grad_clip: float, mask) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decoupled weight decay on `mask`)."""
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask))
    return optax.chain(*parts)


def init_state(params: dict, buffers: dict, tx: optax.GradientTransformation) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(params, buffers, tx.init(params), zero, zero, zero)
