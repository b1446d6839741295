"""Tile map: which (query tile, key tile) pairs of a MaskSpec are empty, full or partial.

Computed from per-tile summaries of the token features (min/max of block index per stream, min/max
of segment id, which streams occur), never from the dense mask. The classification is
conservative: a tile is EMPTY only if no element can be allowed, FULL only if every element is
provably allowed; everything else is PARTIAL (the kernel then evaluates `masks.allowed` per
element). All backends (XLA sparse path, Pallas GPU/TPU kernels) share it.

Sequences are padded to a multiple of the tile size with segment ids that match nothing
(queries PAD_Q_SEGMENT, keys PAD_K_SEGMENT), so padded rows see no key and padded keys are
seen by no query.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llada2_jax.core.masks import CLEAN, NOISY, MaskSpec

EMPTY, PARTIAL, FULL = 0, 1, 2
PAD_Q_SEGMENT, PAD_K_SEGMENT = -2, -1
_BIG = jnp.iinfo(jnp.int32).max // 2


def check_shapes(q, k, spec: MaskSpec) -> tuple[int, int, int, int, int, int]:
    """Validate q (B, T, Hq, D), k (B, S, Hkv, D) against the MaskSpec; return (B, T, Hq, D, S, Hkv)."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if spec.shape != (b, t, s):
        raise ValueError(f"MaskSpec shape {spec.shape} does not match q/k (B, T, S) = {(b, t, s)}")
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
    return b, t, hq, d, s, hkv


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_features(spec: MaskSpec, block_q: int, block_k: int) -> MaskSpec:
    """The spec with int32 features padded to whole tiles, (B, Tp) and (B, Sp): a MaskSpec again,
    so `dense()` gives the padded element mask (the reference the tests hold the tile map to)."""
    _, t, s = spec.shape
    tp, sp = round_up(t, block_q), round_up(s, block_k)

    def pad(x, length, value):
        x = jnp.asarray(x, jnp.int32)
        return jnp.pad(x, ((0, 0), (0, length - x.shape[-1])), constant_values=value)

    return MaskSpec(pad(spec.q_stream, tp, 0), pad(spec.q_block, tp, 0),
                    pad(spec.q_segment, tp, PAD_Q_SEGMENT),
                    pad(spec.k_stream, sp, 0), pad(spec.k_block, sp, 0),
                    pad(spec.k_segment, sp, PAD_K_SEGMENT), spec.rule)


@dataclasses.dataclass(frozen=True)
class _TileSummary:
    """Per tile (B, n): segment range; block range over all tokens and per stream; stream presence."""
    seg_min: jax.Array
    seg_max: jax.Array
    b_min: jax.Array
    b_max: jax.Array
    bs_min: tuple  # per stream (NOISY, CLEAN), _BIG when the stream is absent
    bs_max: tuple  # per stream, -_BIG when absent
    has: tuple     # per stream, bool


def _summarize(stream, block, segment, tile: int) -> _TileSummary:
    b, n = block.shape
    shape = (b, n // tile, tile)
    stream, block, segment = (x.reshape(shape) for x in (stream, block, segment))
    has, bs_min, bs_max = [], [], []
    for s in (NOISY, CLEAN):
        sel = stream == s
        has.append(sel.any(-1))
        bs_min.append(jnp.where(sel, block, _BIG).min(-1))
        bs_max.append(jnp.where(sel, block, -_BIG).max(-1))
    return _TileSummary(segment.min(-1), segment.max(-1), block.min(-1), block.max(-1),
                        tuple(bs_min), tuple(bs_max), tuple(has))


def classify(feats: MaskSpec, block_q: int, block_k: int) -> jax.Array:
    """int8 (B, Tp/block_q, Sp/block_k) of EMPTY / PARTIAL / FULL."""
    q = _summarize(feats.q_stream, feats.q_block, feats.q_segment, block_q)
    k = _summarize(feats.k_stream, feats.k_block, feats.k_segment, block_k)
    qx = lambda a: a[:, :, None]  # noqa: E731  (query tiles on axis 1, key tiles on axis 2)
    kx = lambda a: a[:, None, :]  # noqa: E731

    maybe_same_doc = (qx(q.seg_min) <= kx(k.seg_max)) & (kx(k.seg_min) <= qx(q.seg_max))
    surely_same_doc = ((qx(q.seg_min) == qx(q.seg_max)) & (kx(k.seg_min) == kx(k.seg_max))
                       & (qx(q.seg_min) == kx(k.seg_min)))
    rule = feats.rule
    if rule == "bidirectional":
        maybe, surely = maybe_same_doc, surely_same_doc
    elif rule in ("causal", "block_causal"):
        maybe = maybe_same_doc & (kx(k.b_min) <= qx(q.b_max))
        surely = surely_same_doc & (kx(k.b_max) <= qx(q.b_min))
    elif rule == "block_diffusion":
        qn, qc = qx(q.has[NOISY]), qx(q.has[CLEAN])
        kn, kc = kx(k.has[NOISY]), kx(k.has[CLEAN])
        qn_min, qn_max = qx(q.bs_min[NOISY]), qx(q.bs_max[NOISY])
        qc_min, qc_max = qx(q.bs_min[CLEAN]), qx(q.bs_max[CLEAN])
        kn_min, kn_max = kx(k.bs_min[NOISY]), kx(k.bs_max[NOISY])
        kc_min, kc_max = kx(k.bs_min[CLEAN]), kx(k.bs_max[CLEAN])
        maybe_diag = qn & kn & (qn_min <= kn_max) & (kn_min <= qn_max)
        maybe_offset = qn & kc & (kc_min < qn_max)
        maybe_clean = qc & kc & (kc_min <= qc_max)
        maybe = maybe_same_doc & (maybe_diag | maybe_offset | maybe_clean)
        # FULL: every stream pairing present in the tile must be allowed for all its elements
        diag_ok = ~(qn & kn) | ((qn_min == qn_max) & (kn_min == kn_max) & (qn_min == kn_min))
        offset_ok = ~(qn & kc) | (kc_max < qn_min)
        clean_to_noisy_ok = ~(qc & kn)  # M_BD/M_OBC/M_BC never let a clean query see noisy keys
        clean_ok = ~(qc & kc) | (kc_max <= qc_min)
        surely = surely_same_doc & diag_ok & offset_ok & clean_to_noisy_ok & clean_ok
    else:
        raise ValueError(f"unknown mask rule {rule!r}")
    return jnp.where(surely, FULL, jnp.where(maybe, PARTIAL, EMPTY)).astype(jnp.int8)


def tile_lists(classes: jax.Array):
    """Per row of tiles, the column indices ordered FULL first, then PARTIAL, then EMPTY.

    Returns (order int32 (..., n), n_full int32 (...), n_nonempty int32 (...)). Kernels loop over
    order[:n_full] without a mask and over order[n_full:n_nonempty] with the element mask.
    """
    rank = jnp.where(classes == FULL, 0, jnp.where(classes == PARTIAL, 1, 2))
    order = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
    n_full = (classes == FULL).sum(-1).astype(jnp.int32)
    n_nonempty = (classes != EMPTY).sum(-1).astype(jnp.int32)
    return order, n_full, n_nonempty
