"""Move tensors between a checkpoint (HF names) and our `Transformer`, driven by `mapping` tables.

Used by every importer (safetensors, GGUF) and by the exporter. A model is built abstractly
(`nnx.eval_shape`, no allocation) and each parameter is set exactly once from the checkpoint; any
parameter left unset is an error, so a gap in a table cannot go unnoticed.
"""
from __future__ import annotations

import logging
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada2_jax.interop.mapping import EXPERT, MODEL, Rule, family_rules
from llada2_jax.model.config import ModelConfig
from llada2_jax.model.transformer import Transformer

STACKS = ("dense_layers", "moe_layers")
# Parameters a family may lack in its checkpoint; they start at zero (Qwen3-MoE has no expert bias).
_ZERO_IF_UNMAPPED = ("expert_bias",)
log = logging.getLogger(__name__)


class TensorSource(Protocol):
    """A checkpoint seen as named tensors (HF names)."""

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of `name`, None when the checkpoint has no such tensor."""

    def get(self, name: str):
        """The tensor as an array (numpy or jax)."""

    def names(self) -> set[str]:
        ...


def abstract_model(config: ModelConfig) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def slots(model) -> dict[tuple[str | None, str], nnx.Variable]:
    """Our parameters keyed by (stack name or None for top level, parameter name)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Variable):
            continue
        key = (path[0], path[-1]) if path[0] in STACKS else (None, path[-1])
        if key in out:
            raise ValueError(f"two parameters map to {key}: the Transformer layout is ambiguous")
        out[key] = node
    return out


def _layer_offset(config: ModelConfig, stack: str | None) -> int:
    return config.num_dense_layers if stack == "moe_layers" else 0


def _bindings(config: ModelConfig, table: dict):
    """Yield (rule, stack) for every rule whose parameters our model has."""
    for rule in family_rules(config):
        stacks = (None,) if rule.scope == MODEL else STACKS
        for stack in stacks:
            present = [(stack, n) in table for n in rule.ours]
            if all(present):
                yield rule, stack
            elif any(present):
                raise ValueError(f"{rule.hf}: our model has only some of {rule.ours} in {stack}")


def _items(config: ModelConfig, rule: Rule, stack, shape):
    """(HF name, index into our stacked parameter) for each tensor the rule covers."""
    if rule.scope == MODEL:
        yield rule.hf, ()
        return
    off = _layer_offset(config, stack)
    for j in range(shape[0]):
        if rule.scope == EXPERT:
            for e in range(shape[1]):
                yield rule.hf.format(i=off + j, e=e), (j, e)
        else:
            yield rule.hf.format(i=off + j), (j,)


def load_into(config: ModelConfig, source: TensorSource, dtype, where: str) -> Transformer:
    """Build a Transformer for `config` with every parameter read from `source`.

    `where` names the checkpoint in error messages. Raises ValueError for a missing tensor or a
    wrong shape (naming the tensor, the expected and the found shape).
    """
    model = abstract_model(config)
    table = slots(model)
    filled, used = set(), set()
    for rule, stack in _bindings(config, table):
        vars_ = [table[(stack, n)] for n in rule.ours]
        full_shapes = [v.get_value().shape for v in vars_]
        lead = 0 if rule.scope == MODEL else (1 if rule.scope != EXPERT else 2)
        item_structs = [jax.ShapeDtypeStruct(s[lead:], jnp.float32) for s in full_shapes]
        expected = tuple(jax.eval_shape(rule.to_hf, *item_structs).shape)
        parts = [[] for _ in rule.ours]
        for name, _ in _items(config, rule, stack, full_shapes[0]):
            found = source.shape(name)
            if found is None:
                raise ValueError(f"tensor {name!r} (expected shape {expected}) is missing from {where}")
            if tuple(found) != expected:
                raise ValueError(f"tensor {name!r} in {where}: expected shape {expected}, found {tuple(found)}")
            for acc, arr in zip(parts, rule.to_ours(source.get(name))):
                acc.append(np.asarray(arr))
            used.add(name)
        for var, acc, shape in zip(vars_, parts, full_shapes):
            var.set_value(jnp.asarray(np.stack(acc).reshape(shape) if lead else acc[0], dtype=dtype))
        filled.update((stack, n) for n in rule.ours)
    _finish(table, filled, config, dtype)
    unused = sorted(source.names() - used)
    if unused:
        log.warning("%d tensors in %s are not used by %s: %s", len(unused), where, config.model_type,
                    ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))
    return model


def _finish(table, filled, config, dtype):
    for key, var in table.items():
        if key in filled:
            continue
        if key[1] in _ZERO_IF_UNMAPPED:
            var.set_value(jnp.zeros(var.get_value().shape, dtype=var.get_value().dtype))
            continue
        raise ValueError(f"parameter {'.'.join(k for k in key if k)} has no HF tensor in the "
                         f"{config.model_type} mapping table")


def export(model) -> dict[str, np.ndarray]:
    """Our parameters as HF-named arrays (the inverse of `load_into`)."""
    config = model.config
    table = slots(model)
    out, done = {}, set()
    for rule, stack in _bindings(config, table):
        values = [np.asarray(table[(stack, n)].get_value()) for n in rule.ours]
        for name, idx in _items(config, rule, stack, values[0].shape):
            out[name] = np.ascontiguousarray(np.asarray(rule.to_hf(*(v[idx] for v in values))))
        done.update((stack, n) for n in rule.ours)
    missing = [k for k in table if k not in done and k[1] not in _ZERO_IF_UNMAPPED]
    if missing:
        raise ValueError(f"parameters {missing} have no HF tensor in the {config.model_type} mapping table")
    return out
