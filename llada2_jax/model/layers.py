"""Stateless building blocks: RMSNorm, rotary embeddings (full, partial, linear, YaRN), SwiGLU."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def rms_norm(x, weight, eps: float):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back to x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


@jax.custom_vjp
def swiglu(x, w_gate, w_up, w_down):
    """down(silu(gate(x)) * up(x)), bias-free.

    The hand-written backward (below) is the same math as autodiff's; it exists for speed: it
    contracts the weight gradients over the flattened rows with `dot_general` instead of letting
    XLA transpose the activations first, which made the MLP backward ~15 % slower on the CPU
    (bench/train_step.py).
    """
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def _swiglu_forward(x, w_gate, w_up, w_down):
    gate, up = x @ w_gate, x @ w_up
    return (jax.nn.silu(gate) * up) @ w_down, (x, gate, up, w_gate, w_up, w_down)


def _rows_transposed_dot(a, b):
    """a^T @ b over all leading (row) axes: (..., m), (..., n) -> (m, n)."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return jax.lax.dot_general(a2, b2, (((0,), (0,)), ((), ())))


def _swiglu_backward(residuals, dy):
    x, gate, up, w_gate, w_up, w_down = residuals
    sig = jax.nn.sigmoid(gate)
    act = gate * sig  # silu(gate)
    dh = dy @ w_down.T
    d_gate = dh * up * (sig * (1 + gate * (1 - sig)))  # silu'(g) = s (1 + g (1 - s))
    d_up = dh * act
    dx = d_gate @ w_gate.T + d_up @ w_up.T
    return (dx, _rows_transposed_dot(x, d_gate), _rows_transposed_dot(x, d_up),
            _rows_transposed_dot(act * up, dy))


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


def rope_frequencies(config) -> tuple[jax.Array, float]:
    """Inverse frequencies (rotary_dim // 2,) and the attention (cos/sin) scale for the config."""
    dim = config.rotary_dim
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling_dict
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "yarn":
        return _yarn(scaling, dim, base, config.max_position_embeddings)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: linear, yarn")


def _yarn(scaling: dict, dim: int, base: float, max_positions: int):
    """YaRN: blend interpolated and extrapolated frequencies by a linear ramp over dimensions."""
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings") or max_positions
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def apply_rope(x, positions, inv_freq, attention_scale: float = 1.0):
    """Rotate-half RoPE on the first 2*len(inv_freq) dims of each head; the rest pass through.

    x: (B, T, H, D); positions: (B, T) int. cos/sin in fp32.
    """
    rot = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, rot/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, T, 1, rot)
    cos, sin = jnp.cos(angles) * attention_scale, jnp.sin(angles) * attention_scale
    xr = x[..., :rot].astype(jnp.float32)
    half = rot // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = (xr * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([out, x[..., rot:]], axis=-1) if rot < x.shape[-1] else out
