"""Explicit conversion steps that turn a pretrained AR checkpoint into a diffusion-ready model.

`add_mask_token` appends a `[MASK]` id to the vocabulary (AR checkpoints such as SmolLM2 have
none). The new embedding row (and lm_head column when untied) is the mean of the existing ones:
the mask logit then starts near the average logit, far below the log-partition function, so the
output distribution over real tokens is almost unchanged, and the input row is a plausible
"average token" rather than zeros. Its norm is still below a typical row's (spec §4): training
adds Gaussian noise at mask positions early in CPT to fix that (`embed_noise`).
"""
from __future__ import annotations

import jax.numpy as jnp

from llada2_jax.interop import params

MASK_TOKEN = "[MASK]"


def add_mask_token(model, tokenizer=None, *, pad_to_multiple: int | None = None,
                   mask_token: str = MASK_TOKEN):
    """Return (new_model, mask_id) with `mask_id = old vocab size` and `config.mask_token_id` set.

    tokenizer: optional `tokenizers.Tokenizer` whose vocabulary matches the model; `mask_token`
    is added to it in place as a special token and must land on `mask_id`.
    pad_to_multiple: optionally round the new vocabulary up (e.g. 128, for sharding the vocab
    axis); padded ids are never produced by the tokenizer and get the same mean row.
    """
    cfg = model.config
    if cfg.mask_token_id is not None:
        raise ValueError(f"model already has mask_token_id={cfg.mask_token_id}")
    if pad_to_multiple is not None and pad_to_multiple <= 0:
        raise ValueError(f"pad_to_multiple={pad_to_multiple} must be a positive integer")
    old_v = mask_id = cfg.vocab_size
    new_v = old_v + 1
    if pad_to_multiple:
        new_v = -(-new_v // pad_to_multiple) * pad_to_multiple
    if tokenizer is not None:
        _add_to_tokenizer(tokenizer, mask_token, mask_id)

    new = params.abstract_model(cfg.replace(vocab_size=new_v, mask_token_id=mask_id))
    old_slots, new_slots = params.slots(model), params.slots(new)
    for key, var in new_slots.items():
        value = old_slots[key].get_value()
        if key == (None, "embed"):
            value = _append_mean(value, axis=0, extra=new_v - old_v)
        elif key == (None, "lm_head"):
            value = _append_mean(value, axis=1, extra=new_v - old_v)
        var.set_value(value)
    return new, mask_id


def _append_mean(w, axis: int, extra: int):
    """Append `extra` copies of the mean slice along `axis` (computed in fp32)."""
    mean = jnp.mean(w.astype(jnp.float32), axis=axis, keepdims=True).astype(w.dtype)
    reps = [1] * w.ndim
    reps[axis] = extra
    return jnp.concatenate([w, jnp.tile(mean, reps)], axis=axis)


def _add_to_tokenizer(tokenizer, mask_token: str, mask_id: int):
    from tokenizers import AddedToken
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != mask_id:
        raise ValueError(f"tokenizer vocabulary size {size} differs from the model's vocab_size {mask_id}")
    if tokenizer.token_to_id(mask_token) is not None:
        raise ValueError(f"tokenizer already has {mask_token!r} (id {tokenizer.token_to_id(mask_token)})")
    tokenizer.add_special_tokens([AddedToken(mask_token, special=True, normalized=False)])
    got = tokenizer.token_to_id(mask_token)
    if got != mask_id:
        raise ValueError(f"tokenizer gave {mask_token!r} id {got}, expected {mask_id}")
