"""Shared by the decode reference loops: one dense, uncached forward over the whole canvas and the
float64 softmax of a block's positions, [MASK] excluded (the decoders never commit it)."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

dense_forward = nnx.jit(lambda m, tokens, allow: m(tokens, None, allow))


def block_probs(model, canvas: np.ndarray, allow: np.ndarray, positions: np.ndarray, mask_id: int) -> np.ndarray:
    """(len(positions), vocab) probabilities of the tokens at `positions` under the dense bool mask `allow`."""
    logits = np.asarray(dense_forward(model, jnp.asarray(canvas[None]), jnp.asarray(allow[None])))[0, positions]
    logits = logits.astype(np.float64)
    logits[:, mask_id] = -np.inf
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)
