"""Mixture-of-experts: routing (softmax or sigmoid group-limited), dropless dispatch, bias update.

Dispatch is dropless: every (token, expert) assignment is sorted by expert and multiplied with
`ops.grouped_matmul`; on a multi-device mesh this runs per shard under `shard_map` (the kernels
cannot be partitioned by XLA). `dense_experts` runs every expert on every token and is kept only
as a test oracle.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llada2_jax import ops
from llada2_jax.core.axes import logical_to_spec
from llada2_jax.ops import sharded


def route(config, x, router_w, expert_bias=None):
    """Select experts per token.

    x: (N, d); router_w: (d, E); expert_bias: (E,) or None (changes selection, never weights).
    Returns combine weights (N, k) fp32, expert ids (N, k) int32, and load (E,): the fraction of
    all N*k assignments that went to each expert.
    """
    logits = jnp.dot(x.astype(jnp.float32), router_w.astype(jnp.float32))
    if config.score_function == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
    choice = scores if expert_bias is None else scores + expert_bias.astype(jnp.float32)
    if config.n_group > 1:
        choice = _limit_groups(choice, config.n_group, config.topk_group)
    _, ids = jax.lax.top_k(choice, config.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * config.routed_scaling_factor
    load = jnp.zeros((config.num_experts,), jnp.float32).at[ids.reshape(-1)].add(1.0) / ids.size
    return weights, ids.astype(jnp.int32), load


def _expert_bias(config, p):
    return p["expert_bias"] if config.use_expert_bias else None


def _limit_groups(choice, n_group: int, topk_group: int):
    """Keep the topk_group groups with the best sum-of-top-2 scores; others become -inf."""
    n, e = choice.shape
    grouped = choice.reshape(n, n_group, e // n_group)
    group_score = jax.lax.top_k(grouped, min(2, e // n_group))[0].sum(-1)  # (N, G)
    _, keep = jax.lax.top_k(group_score, topk_group)
    keep_mask = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], keep].set(True)
    return jnp.where(keep_mask[:, :, None], grouped, -jnp.inf).reshape(n, e)


def routed_experts(config, x, weights, ids, e_gate, e_up, e_down):
    """Dropless sorted dispatch: x (N, d) -> (N, d) = sum_k w_k * expert_{id_k}(x)."""
    return _dispatch(config, x, weights, ids, e_gate, e_up, e_down).astype(x.dtype)


def routed_moe(config, p, x, batch: int):
    """`route` + `routed_experts` for the rows x (N, d) of a (batch, T) input. Returns (y, load).

    The grouped matmul kernels are per-device and XLA cannot partition them, so under a
    multi-device mesh (in context or on x's sharding) both run per shard (`_sharded_moe`).
    """
    mesh = sharded.ambient_mesh(x)
    if mesh is not None:
        return _sharded_moe(config, mesh, p, x, batch)
    weights, ids, load = route(config, x, p["router"], _expert_bias(config, p))
    return routed_experts(config, x, weights, ids, p["e_gate"], p["e_up"], p["e_down"]), load


def _dispatch(config, x, weights, ids, e_gate, e_up, e_down, first_expert=0):
    """fp32 (N, d): the part of the MoE output from experts [first_expert, first_expert + E_local).

    Assignments to other experts get the sentinel group E_local, sort past sum(group sizes), where
    the grouped matmul returns 0; with all experts local this is the plain dropless dispatch.
    """
    n, d = x.shape
    k = ids.shape[-1]
    e_local = e_gate.shape[0]
    local = ids.reshape(-1) - first_expert
    local = jnp.where((local >= 0) & (local < e_local), local, e_local)
    order = jnp.argsort(local, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))  # inverse of order
    xs = _sort_rows(x, order, rank, k)  # (N*k, d) rows grouped by expert
    sizes = jnp.bincount(local, length=e_local).astype(jnp.int32)  # the sentinel is not counted
    gmm = lambda a, w: ops.grouped_matmul(a, w.astype(x.dtype), sizes, impl=config.gmm_impl).astype(x.dtype)
    h = jax.nn.silu(gmm(xs, e_gate)) * gmm(xs, e_up)
    ys = gmm(h, e_down)
    y = _unsort_rows(ys, order, rank).reshape(n, k, d)
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights)


# The two permutations of the dispatch are row gathers both ways, forward and backward: the
# scatters that plain indexing differentiates into are slower on CPU (E 64, k 8, 512 tokens:
# MoE layer forward + backward 61 -> 58 ms).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sort_rows(x, order, rank, k: int):
    """x (N, d) -> (N*k, d): row i is x[order[i] // k] (assignment order[i] of token order[i] // k)."""
    return x[order // k]


def _sort_rows_fwd(x, order, rank, k):
    return x[order // k], rank


def _sort_rows_bwd(k, rank, g):
    return g[rank].reshape(g.shape[0] // k, k, -1).sum(1), None, None


_sort_rows.defvjp(_sort_rows_fwd, _sort_rows_bwd)


@jax.custom_vjp
def _unsort_rows(ys, order, rank):
    """Undo the sort: row j of the result is ys[rank[j]], i.e. assignment j back in token order."""
    return ys[rank]


def _unsort_rows_fwd(ys, order, rank):
    return ys[rank], order


def _unsort_rows_bwd(order, g):
    return g[order], None, None


_unsort_rows.defvjp(_unsort_rows_fwd, _unsort_rows_bwd)


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _sharded_moe(config, mesh, p, x, batch: int):
    """`routed_moe` under `shard_map`: every device routes and dispatches only its own rows.

    Rows are split over the batch axes exactly as the activations are (`sharded.batch_axes`), the
    weights as `core.axes.LOGICAL_RULES` lays them out (expert dim over "expert", d_model
    over "fsdp", the expert FFN width over "tensor"). Per layer, inside the shard_map:
      - d_model axes: router and expert weights are all-gathered (FSDP, one layer at a time under
        the layer scan), in the compute dtype;
      - expert axes that also split the rows (expert parallelism): the routed rows are
        all-gathered over them, each device runs its local experts on the group's rows (one source
        shard at a time), and the partial outputs are reduce-scattered back. Dropless with static
        shapes, and k times less traffic than an all_to_all of the N*k assignments padded for the
        worst case;
      - expert axes that do not split the rows, and the FFN-width axes: partial sums, psum.
    The expert load is summed from per-shard counts (exact, so bias updates match one device).
    """
    rows = sharded.batch_axes(mesh, batch)
    shape = dict(mesh.shape)
    spec = lambda name, names: logical_to_spec(names, p[name].shape, shape)  # noqa: E731
    specs = {"router": spec("router", ("embed", None)), "e_gate": spec("e_gate", ("expert", "embed", "mlp")),
             "e_up": spec("e_up", ("expert", "embed", "mlp")), "e_down": spec("e_down", ("expert", "mlp", "embed"))}
    ex_axes, d_axes, i_axes = map(_axes, specs["e_gate"])
    router_axes = _axes(specs["router"][0])
    if (ex_axes, i_axes, d_axes) != tuple(map(_axes, specs["e_down"])) or set(i_axes) & set(rows):
        raise ValueError(f"unsupported MoE weight layout {specs} for rows over {rows}")
    exchange = tuple(a for a in rows if a in ex_axes)  # expert parallel: rows meet the experts
    partial = tuple(a for a in ex_axes if a not in rows) + i_axes
    e_local = config.num_experts // math.prod(shape[a] for a in ex_axes)
    row_shards = math.prod(shape[a] for a in rows)
    bias = _expert_bias(config, p)

    def gather(a, axis, names=d_axes):
        return jax.lax.all_gather(a, names, axis=axis, tiled=True) if names else a

    def body(x, w):
        dt = x.dtype
        router = gather(w["router"], 0, router_axes)
        g, u = (gather(w[n].astype(dt), 1) for n in ("e_gate", "e_up"))
        dn = gather(w["e_down"].astype(dt), 2)
        weights, ids, _ = route(config, x, router, w.get("expert_bias"))
        counts = jnp.zeros((config.num_experts,), jnp.float32).at[ids.reshape(-1)].add(1.0)
        load = (jax.lax.psum(counts, rows) if rows else counts) / (ids.size * row_shards)
        first = jax.lax.axis_index(ex_axes) * e_local if ex_axes else 0
        if exchange:
            # (S, n, ...): the rows of the S shards of this expert group, dispatched one shard at a
            # time (rematerialized), so the padded buffers are n*k rows, not S*n*k.
            chunks = [jax.lax.all_gather(a, exchange, axis=0) for a in (x, weights, ids)]
            step = jax.checkpoint(lambda c: _dispatch(config, *c, g, u, dn, first))
            y = jax.lax.psum_scatter(jax.lax.map(step, chunks), exchange, scatter_dimension=0)
        else:
            y = _dispatch(config, x, weights, ids, g, u, dn, first)
        if partial:
            y = jax.lax.psum(y, partial)
        return y.astype(dt), load

    w = {n: p[n] for n in specs} | ({} if bias is None else {"expert_bias": bias})
    w_specs = specs | ({} if bias is None else {"expert_bias": P()})
    tok = P(rows or None, None)
    # check_vma=False: pallas_call outputs carry no varying-axes type. Outputs are replicated over
    # the axes their specs leave out, because of the psums and the gathered weights.
    return jax.shard_map(body, mesh=mesh, in_specs=(tok, w_specs), out_specs=(tok, P()),
                         check_vma=False)(x, w)


def dense_experts(config, x, weights, ids, e_gate, e_up, e_down):
    """Oracle: every expert on every token, combined with the same weights."""
    dt = x.dtype
    h = jax.nn.silu(jnp.einsum("nd,edi->eni", x, e_gate.astype(dt))) * jnp.einsum("nd,edi->eni", x, e_up.astype(dt))
    y = jnp.einsum("eni,eid->end", h, e_down.astype(dt))
    combine = jnp.zeros((x.shape[0], config.num_experts), jnp.float32).at[
        jnp.arange(x.shape[0])[:, None], ids].add(weights)
    return jnp.einsum("end,ne->nd", y.astype(jnp.float32), combine).astype(dt)


def moe_ffn(config, p, x):
    """The MoE feed-forward of one layer. p holds this layer's router/expert/shared params.

    x: (B, T, d). Returns (y (B, T, d), load (E,)).
    """
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    if config.moe_impl == "dense":
        weights, ids, load = route(config, flat, p["router"], _expert_bias(config, p))
        y = dense_experts(config, flat, weights, ids, p["e_gate"], p["e_up"], p["e_down"])
    else:
        y, load = routed_moe(config, p, flat, batch=b)
    if config.num_shared_experts:
        dt = x.dtype
        h = jax.nn.silu(flat @ p["s_gate"].astype(dt)) * (flat @ p["s_up"].astype(dt))
        y = y + h @ p["s_down"].astype(dt)
    return y.reshape(b, t, d), load


def update_expert_bias(bias, load, rate: float = 1e-3):
    """Aux-loss-free balancing (DeepSeek-V3 style): b += u * sign(mean(load) - load), per layer.

    bias, load: (..., E). Under-loaded experts get a higher selection bias.
    """
    return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load).astype(bias.dtype)
