"""Block-sparse flash attention for TPU as a Pallas Mosaic kernel (interpret mode on CPU).

Same contract as `gpu.attention`: q (B, T, Hq, D), k/v (B, S, Hkv, D), GQA, mask from a MaskSpec,
online softmax with fp32 accumulators, rows with no allowed key give 0 (log-sum-exp +inf).

Grid (batch, kv head, step). The steps of a batch row are its non-empty (query tile, key tile)
pairs from the shared tile map, grouped by query tile (FULL first, then PARTIAL), flattened into
one packed int32 list passed by scalar prefetch. The BlockSpec index maps read that list, so the
pipeline DMAs only listed tiles: EMPTY tiles are never loaded nor computed. Why a flat list and not
a (query tile, max tiles) grid: padding steps cost ~0.35 us each on TPU, and with traced features
the per-row maximum is not known, so a 2-D grid would pay for nq * nk steps.
  * A query tile with no non-empty key tile gets one no-op step, so its output (0) is written.
  * Steps past the end of the list repeat the last pair with kind EMPTY: same block indices, so the
    pipeline issues no DMA and the kernel does nothing.
  * Each step handles all g query heads of its kv head: K/V are loaded once per GQA group and the
    element mask (PARTIAL tiles only) is evaluated once per tile pair.
Static list length: exact when the MaskSpec features are concrete; traced (jit, as in training):
the tile count of the canonical single-document layout plus one tile per row, with a `lax.cond`
that reruns with the full nq * nk list when a batch needs more -- results are always exact.

Backward (custom_vjp): a dQ kernel on the same lists and a dK/dV kernel on the column lists (per
key tile, its non-empty query tiles), both accumulating in VMEM scratch; dK/dV sum the GQA group
in-kernel. Residuals: output and log-sum-exp.

TPU layout ((8, 128) tiling): q/k/v are viewed as (B, T, H * Dp), Dp = head dim padded to a
multiple of 128, so one head is a lane-aligned block without any transpose. Row statistics (m, l,
lse, delta) are lane-replicated (..., 128); query features lane-replicated (B, F, Tp, 128), key
features sublane-replicated (B, F, 8, Sp), so the (bq, bk) element mask needs only aligned
broadcasts. Compiled, block sizes must be multiples of 128; interpret mode also accepts multiples
of 8 (<= 128) so the CPU tests can use many small tiles.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import tilemap
from kernels_pallas.block_sparse_attention.common import KernelConfig
from llada2_jax.core.masks import MaskSpec, allowed

LANES, SUBLANES = 128, 8
DEFAULT_BLOCK = 256  # [I] not measured on TPU; tunable per call
# packed step: outer tile << 17 | inner tile << 2 | kind (tilemap.EMPTY / PARTIAL / FULL)
_KIND_BITS, _INNER_BITS = 2, 15
_OUTER_SHIFT = _KIND_BITS + _INNER_BITS
_MAX_TILES = 1 << 14
# features each rule reads (the others are passed as 0); fewer features = less VMEM traffic
_FEATURES = {"bidirectional": ("segment",), "causal": ("block", "segment"),
             "block_causal": ("block", "segment"), "block_diffusion": ("stream", "block", "segment")}


@dataclasses.dataclass(frozen=True)
class _Config(KernelConfig):
    group: int       # query heads per kv head
    head_dim: int    # padded to a multiple of 128
    row_steps: int   # static list lengths (forward / dQ, dK/dV) ...
    col_steps: int
    full_steps: int  # ... and the always-sufficient fallback length (nq * nk)
    checked: bool    # traced features: check the count at run time, fall back if over
    interpret: bool


def attention(q, k, v, spec: MaskSpec, *, scale: float | None = None, interpret: bool = False,
              block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK):
    """q (B, T, Hq, D), k/v (B, S, Hkv, D) -> (B, T, Hq, D) in q's dtype."""
    b, t, hq, d, s, hkv = tilemap.check_shapes(q, k, spec)
    align = SUBLANES if interpret else LANES
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < align or blk % align or (blk > LANES and blk % LANES):
            raise ValueError(f"{name}={blk} must be a multiple of {align}"
                             + (" (and of 128 above 128)" if interpret else " on TPU"))
    scale = d ** -0.5 if scale is None else scale
    bq, bk = min(block_q, tilemap.round_up(t, align)), min(block_k, tilemap.round_up(s, align))
    feats = tilemap.pad_features(spec, bq, bk)
    classes = tilemap.classify(feats, bq, bk)
    nq, nk = classes.shape[1:]
    if max(nq, nk) >= _MAX_TILES:
        raise ValueError(f"too many tiles ({nq} x {nk}); use larger blocks")
    rows, cols = _steps(classes), _steps(jnp.swapaxes(classes, 1, 2))
    exact = _concrete_max(rows[1]), _concrete_max(cols[1])
    if exact[0] is not None and exact[1] is not None:
        row_steps, col_steps, checked = exact[0], exact[1], False
    else:
        row_steps, col_steps = _traced_budgets(spec.rule, t, s, bq, bk)
        checked = True

    names = _FEATURES[spec.rule]
    tp, sp = nq * bq, nk * bk
    qf = jnp.stack([getattr(feats, "q_" + n) for n in names], 1)  # (B, F, Tp)
    kf = jnp.stack([getattr(feats, "k_" + n) for n in names], 1)  # (B, F, Sp)
    aux = dict(rows=rows, cols=cols,
               qf=jnp.broadcast_to(qf[..., None], qf.shape + (LANES,)),
               kf=jnp.broadcast_to(kf[:, :, None, :], (b, len(names), SUBLANES, sp)))
    dp = tilemap.round_up(d, LANES)

    def flat(x, n):  # (B, n0, H, D) -> (B, n, H * Dp), zero padded
        x = jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - d)))
        return x.reshape(b, n, -1)

    cfg = _Config(spec.rule, float(scale), bq, bk, hq // hkv, dp, max(row_steps, 1), max(col_steps, 1),
                  nq * nk, checked, bool(interpret))
    out = _flash(cfg, flat(q, tp), flat(k, sp), flat(v, sp), aux)
    return out.reshape(b, tp, hq, dp)[:, :t, :, :d]


# ---------------------------------------------------------------- step lists
def _steps(classes):
    """Packed step list (B, n * m) and its used length (B,) from tile classes (B, n, m).

    Row i owns max(n_nonempty_i, 1) consecutive steps; past the total, steps repeat the last
    (row, column) with kind EMPTY so that nothing is loaded or computed.
    """
    b, n, m = classes.shape
    order, n_full, n_any = tilemap.tile_lists(classes)
    count = jnp.maximum(n_any, 1)
    end = jnp.cumsum(count, axis=-1)
    start = end - count
    p = jnp.arange(n * m, dtype=jnp.int32)
    row = jnp.minimum(jax.vmap(lambda e: jnp.searchsorted(e, p, side="right"))(end), n - 1)
    take = lambda x, idx: jnp.take_along_axis(x, idx, axis=1)  # noqa: E731
    local = p[None] - take(start, row)
    na, nf = take(n_any, row), take(n_full, row)
    col = take(order.reshape(b, n * m), row * m + jnp.minimum(local, jnp.maximum(na - 1, 0)))
    kind = jnp.where(local < nf, tilemap.FULL, jnp.where(local < na, tilemap.PARTIAL, tilemap.EMPTY))
    packed = (row << _OUTER_SHIFT) | (col << _KIND_BITS) | kind
    return packed.astype(jnp.int32), end[:, -1]


def _concrete_max(total) -> int | None:
    try:
        return int(np.asarray(total).max())
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _traced_budgets(rule: str, t: int, s: int, bq: int, bk: int) -> tuple[int, int]:
    """Step budgets for traced features: canonical single-document layout + one step per row."""
    nq, nk = -(-t // bq), -(-s // bk)
    full = nq * nk
    if rule == "bidirectional" or t != s:
        return full, full
    seg = np.ones((1, t), np.int32)
    block_size = max(bq, bk)
    with jax.ensure_compile_time_eval():
        if rule == "causal":
            spec = MaskSpec.causal(seg)
        elif rule == "block_causal":
            spec = MaskSpec.block_causal(seg, block_size)
        elif t % 2 == 0 and (t // 2) % block_size == 0:
            spec = MaskSpec.block_diffusion(seg[:, : t // 2], block_size)
        else:
            return full, full
        canonical = tilemap.classify(tilemap.pad_features(spec, bq, bk), bq, bk)
        count = int(np.sum(np.asarray(canonical) != tilemap.EMPTY))
    return min(full, count + nq), min(full, count + nk)


def _budgeted(run, total, steps: int, full: int, checked: bool):
    """run(n) with the static budget n; if it may be too small, check and fall back to `full`."""
    if not checked or steps >= full:
        return run(min(steps, full))
    return jax.lax.cond(total.max() <= steps, lambda: run(steps), lambda: run(full))


def _outer(n):
    return lambda b, p, st: st[b * n + p] >> _OUTER_SHIFT


def _inner(n):
    return lambda b, p, st: (st[b * n + p] >> _KIND_BITS) & ((1 << _INNER_BITS) - 1)


def _position(steps_ref):
    """(first step of this row's run, last step of it, kind of this step)."""
    b, p, n = pl.program_id(0), pl.program_id(2), pl.num_programs(2)
    code = steps_ref[b * n + p]
    prev = steps_ref[b * n + jnp.maximum(p - 1, 0)]
    nxt = steps_ref[b * n + jnp.minimum(p + 1, n - 1)]
    row = code >> _OUTER_SHIFT
    first = (p == 0) | ((prev >> _OUTER_SHIFT) != row)
    last = (p == n - 1) | ((nxt >> _OUTER_SHIFT) != row)
    return first, last, code & ((1 << _KIND_BITS) - 1)


# ---------------------------------------------------------------- in-kernel helpers
def _lanes(x, n: int):
    """Lane-replicated (rows, 128) -> (rows, n)."""
    if n == LANES:
        return x
    return x[:, :n] if n < LANES else jnp.tile(x, (1, n // LANES))


def _tile_mask(cfg: _Config, qf_ref, kf_ref):
    names = _FEATURES[cfg.rule]
    qd = {name: _lanes(qf_ref[c], cfg.block_k) for c, name in enumerate(names)}  # (bq, bk)
    kd = {name: kf_ref[c, :1, :] for c, name in enumerate(names)}  # (1, bk)
    return allowed(cfg.rule, qd.get("stream", 0), qd.get("block", 0), qd["segment"],
                   kd.get("stream", 0), kd.get("block", 0), kd["segment"])


def _precision(a):
    return jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def _dot(a, b):
    return jax.lax.dot(a, b, precision=_precision(a), preferred_element_type=jnp.float32)


def _dot_nt(a, b):  # a @ b.T without materializing the transpose
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a),
                               preferred_element_type=jnp.float32)


def _scores(cfg: _Config, q, k, mask):
    s = _dot_nt(q, k) * cfg.scale
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _zero(*refs):
    for ref in refs:
        ref[...] = jnp.zeros(ref.shape, jnp.float32)


def _heads(cfg: _Config):
    """(r, lane slice of query head r) for the g query heads of this step's kv head."""
    return [(r, slice(r * cfg.head_dim, (r + 1) * cfg.head_dim)) for r in range(cfg.group)]


def _visits(cfg: _Config, kind, qf_ref, kf_ref, k_ref, v_ref, visit):
    """Call visit(r, heads, k, v, mask) per query head r: FULL tiles without the element mask
    (mask None), PARTIAL with it, EMPTY (padding/no-op) not at all. K/V and the mask are read
    once per step for the whole GQA group."""
    def visit_tile(masked):
        k, v = k_ref[...], v_ref[...]
        mask = _tile_mask(cfg, qf_ref, kf_ref) if masked else None
        for r, heads in _heads(cfg):
            visit(r, heads, k, v, mask)

    pl.when(kind == tilemap.FULL)(lambda: visit_tile(False))
    pl.when(kind == tilemap.PARTIAL)(lambda: visit_tile(True))


# ---------------------------------------------------------------- pallas_call plumbing
def _block_specs(cfg: _Config, nf: int, qt, kt):
    """BlockSpecs for the tile lookups qt, kt: the two feature inputs (a list), then q-like
    (B, Tp, Hq * Dp), k/v-like (B, Sp, Hkv * Dp) and row-statistics (B, Hq, Tp, 128) arrays."""
    g, dp, bq, bk = cfg.group, cfg.head_dim, cfg.block_q, cfg.block_k
    features = [
        pl.BlockSpec((None, nf, bq, LANES), lambda b_, h, p, st: (b_, 0, qt(b_, p, st), 0)),
        pl.BlockSpec((None, nf, SUBLANES, bk), lambda b_, h, p, st: (b_, 0, 0, kt(b_, p, st))),
    ]
    q_spec = pl.BlockSpec((None, bq, g * dp), lambda b_, h, p, st: (b_, qt(b_, p, st), h))
    kv_spec = pl.BlockSpec((None, bk, dp), lambda b_, h, p, st: (b_, kt(b_, p, st), h))
    stat_spec = pl.BlockSpec((None, g, bq, LANES), lambda b_, h, p, st: (b_, h, qt(b_, p, st), 0))
    return features, q_spec, kv_spec, stat_spec


def _call(cfg: _Config, kernel, steps, n: int, hkv: int, in_specs, out_specs, scratch, out_shape,
          *operands):
    """pallas_call on the grid (batch, kv head, step) with the first n steps of each row prefetched."""
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=(steps.shape[0], hkv, n),
                                             in_specs=in_specs, out_specs=out_specs,
                                             scratch_shapes=scratch)
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    return pl.pallas_call(functools.partial(kernel, cfg=cfg), grid_spec=grid_spec, out_shape=out_shape,
                          compiler_params=params, interpret=cfg.interpret,
                          )(steps[:, :n].reshape(-1), *operands)


# ---------------------------------------------------------------- forward
def _fwd_kernel(steps_ref, qf_ref, kf_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                *, cfg: _Config):
    first, last, kind = _position(steps_ref)
    dp = cfg.head_dim

    @pl.when(first)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        _zero(l_sc, acc_sc)

    def visit(r, heads, k, v, mask):
        s = _scores(cfg, q_ref[:, heads], k, mask)
        m_prev = m_sc[r]
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s - _lanes(m_safe, cfg.block_k))
        corr = jnp.exp(m_prev - m_safe)
        m_sc[r] = m_next
        l_sc[r] = corr * l_sc[r] + p.sum(axis=1, keepdims=True)
        acc_sc[:, heads] = acc_sc[:, heads] * _lanes(corr, dp) + _dot(p.astype(v.dtype), v)

    _visits(cfg, kind, qf_ref, kf_ref, k_ref, v_ref, visit)

    @pl.when(last)
    def _finish():
        for r, heads in _heads(cfg):
            l = l_sc[r]
            seen = l > 0
            l_safe = jnp.where(seen, l, 1.0)
            o_ref[:, heads] = (acc_sc[:, heads] / _lanes(l_safe, dp)).astype(o_ref.dtype)
            lse_ref[r] = jnp.where(seen, m_sc[r] + jnp.log(l_safe), jnp.inf)


def _forward(cfg: _Config, q, k, v, aux):
    b, tp, _ = q.shape
    hkv = k.shape[2] // cfg.head_dim
    g, dp, bq = cfg.group, cfg.head_dim, cfg.block_q
    steps, total = aux["rows"]

    def run(n):
        features, q_spec, kv_spec, stat_spec = _block_specs(cfg, aux["qf"].shape[1], _outer(n), _inner(n))
        scratch = [pltpu.VMEM((g, bq, LANES), jnp.float32), pltpu.VMEM((g, bq, LANES), jnp.float32),
                   pltpu.VMEM((bq, g * dp), jnp.float32)]
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                     jax.ShapeDtypeStruct((b, hkv * g, tp, LANES), jnp.float32)]
        return _call(cfg, _fwd_kernel, steps, n, hkv, [*features, q_spec, kv_spec, kv_spec],
                     [q_spec, stat_spec], scratch, out_shape, aux["qf"], aux["kf"], q, k, v)

    return _budgeted(run, total, cfg.row_steps, cfg.full_steps, cfg.checked)


# ---------------------------------------------------------------- backward
def _dq_kernel(steps_ref, qf_ref, kf_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               acc_sc, *, cfg: _Config):
    first, last, kind = _position(steps_ref)
    pl.when(first)(lambda: _zero(acc_sc))

    def visit(r, heads, k, v, mask):
        s = _scores(cfg, q_ref[:, heads], k, mask)
        p = jnp.exp(s - _lanes(lse_ref[r], cfg.block_k))
        ds = p * (_dot_nt(do_ref[:, heads], v) - _lanes(delta_ref[r], cfg.block_k))
        acc_sc[:, heads] += _dot(ds.astype(k.dtype), k)

    _visits(cfg, kind, qf_ref, kf_ref, k_ref, v_ref, visit)

    @pl.when(last)
    def _finish():
        dq_ref[...] = (acc_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(steps_ref, qf_ref, kf_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, cfg: _Config):
    first, last, kind = _position(steps_ref)
    pl.when(first)(lambda: _zero(dk_sc, dv_sc))

    def visit(r, heads, k, v, mask):
        q, do = q_ref[:, heads], do_ref[:, heads]
        s = _scores(cfg, q, k, mask)
        p = jnp.exp(s - _lanes(lse_ref[r], cfg.block_k))
        dv_sc[...] += _dot(p.T.astype(do.dtype), do)  # transpose in fp32, then cast
        ds = p * (_dot_nt(do, v) - _lanes(delta_ref[r], cfg.block_k))
        dk_sc[...] += _dot(ds.T.astype(q.dtype), q)

    _visits(cfg, kind, qf_ref, kf_ref, k_ref, v_ref, visit)

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward(cfg: _Config, q, k, v, aux, o, lse, do):
    b, tp, _ = q.shape
    hkv = k.shape[2] // cfg.head_dim
    g, dp, bq, bk = cfg.group, cfg.head_dim, cfg.block_q, cfg.block_k
    hq = hkv * g
    heads = lambda x: x.reshape(b, tp, hq, dp).astype(jnp.float32)  # noqa: E731
    delta = jnp.einsum("bthd,bthd->bht", heads(o), heads(do))
    lanes = lambda x: jnp.broadcast_to(x[..., None], x.shape + (LANES,))  # noqa: E731
    operands = (aux["qf"], aux["kf"], q, k, v, do, lanes(lse), lanes(delta))

    def specs(qt, kt):
        """(q / dq spec, k / v / dk / dv spec, input specs) for the tile lookups qt, kt."""
        features, q_spec, kv_spec, stat_spec = _block_specs(cfg, aux["qf"].shape[1], qt, kt)
        return q_spec, kv_spec, [*features, q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec]

    def run_dq(n):
        q_spec, _, in_specs = specs(_outer(n), _inner(n))
        return _call(cfg, _dq_kernel, aux["rows"][0], n, hkv, in_specs, q_spec,
                     [pltpu.VMEM((bq, g * dp), jnp.float32)], jax.ShapeDtypeStruct(q.shape, q.dtype),
                     *operands)

    def run_dkv(n):
        _, kv_spec, in_specs = specs(_inner(n), _outer(n))  # column lists: outer = key tile, inner = query tile
        return _call(cfg, _dkv_kernel, aux["cols"][0], n, hkv, in_specs, [kv_spec, kv_spec],
                     [pltpu.VMEM((bk, dp), jnp.float32), pltpu.VMEM((bk, dp), jnp.float32)],
                     [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                     *operands)

    dq = _budgeted(run_dq, aux["rows"][1], cfg.row_steps, cfg.full_steps, cfg.checked)
    dk, dv = _budgeted(run_dkv, aux["cols"][1], cfg.col_steps, cfg.full_steps, cfg.checked)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, aux):
    return _forward(cfg, q, k, v, aux)[0]


def _flash_fwd(cfg, q, k, v, aux):
    o, lse = _forward(cfg, q, k, v, aux)
    return o, (q, k, v, aux, o, lse[..., 0])  # keep lse compact; re-broadcast in backward


def _flash_bwd(cfg, res, do):
    q, k, v, aux, o, lse = res
    dq, dk, dv = _backward(cfg, q, k, v, aux, o, lse, do)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
