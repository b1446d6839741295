"""The two limits of the block-diffusion layout (spec §12.2, §12.3) on tiny random Transformers.

L_B = 1: the clean half is an AR (causal) transformer over x_0, and a masked query at position i
sees exactly the clean prefix < i of its document. L_B = L: the noisy half of the 2L layout equals
the single-copy bidirectional (MDLM) forward on x_t.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada2_jax.diffusion import layout, losses, masks
from llada2_jax.model.config import ModelConfig
from llada2_jax.model.transformer import Transformer

VOCAB, MASK_ID, L = 48, 47, 8
CONFIGS = {
    "llama": ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK_ID),
    "bailing_moe_v2": ModelConfig(model_type="bailing_moe_v2", vocab_size=VOCAB, hidden_size=32,
                                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, partial_rotary_factor=0.5, qk_norm=True,
                                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                  num_shared_experts=1, first_k_dense_replace=1, score_function="sigmoid",
                                  n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                  use_expert_bias=True, mask_token_id=MASK_ID),
}


# jitted so that repeated calls with one shape compile once (eager dispatch is slow on CPU)
query_logits = nnx.jit(lambda m, b: losses.query_logits(m, b)[0])
hidden = nnx.jit(lambda m, tokens, pos, mask: m.forward(tokens, pos, mask, compute_logits=False).hidden)
full_logits = nnx.jit(lambda m, tokens, pos, mask: m(tokens, pos, mask))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return Transformer(CONFIGS[request.param], rngs=nnx.Rngs(0))


# positions restart at every document (0 on padding), as the data pipeline packs them
POSITIONS = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 0]], jnp.int32)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(rng.integers(0, MASK_ID, (2, L)), jnp.int32)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]], jnp.int32)
    eligible = seg > 0
    noise = jnp.asarray(rng.random((2, L)) < 0.5) | (jnp.arange(L) == 5)
    return x0, seg, eligible, noise


def _batch(x0, seg, eligible, noise, block_size, **kw):
    return layout.build_diffusion_batch(x0, seg, POSITIONS, eligible, noise,
                                        jnp.array([0.5, 0.7]), mask_id=MASK_ID, block_size=block_size,
                                        vocab_size=VOCAB, **kw)


def test_block_size_one_clean_half_is_causal_forward(model):
    x0, seg, eligible, noise = _data()
    b = _batch(x0, seg, eligible, noise, 1)
    two_copy = hidden(model, b.tokens, b.positions, b.mask)[:, L:]
    causal = hidden(model, x0, POSITIONS, masks.MaskSpec.causal(seg))
    np.testing.assert_allclose(np.asarray(two_copy), np.asarray(causal), rtol=1e-5, atol=1e-5)


def test_block_size_one_masked_query_sees_exactly_clean_prefix(model):
    x0, seg, eligible, noise = _data()
    b = _batch(x0, seg, eligible, noise, 1)
    dense = np.asarray(b.mask.dense())
    segn = np.asarray(seg)
    for row in range(2):
        for i in range(L):
            allowed = set(np.flatnonzero(dense[row, i]).tolist())
            prefix = {L + j for j in range(i) if segn[row, j] == segn[row, i]}
            assert allowed == {i} | prefix

    i = 5  # masked in both rows (see _data); doc 2 of row 0 spans 3..7
    logits = query_logits(model, b)
    later = x0.at[:, i:].set((x0[:, i:] + 1) % MASK_ID)  # its own answer and every later token change
    b_later = _batch(later, seg, eligible, noise, 1)
    logits_later = query_logits(model, b_later)
    np.testing.assert_allclose(np.asarray(logits_later[:, i]), np.asarray(logits[:, i]), rtol=1e-5, atol=1e-5)
    earlier = x0.at[:, i - 1].set((x0[:, i - 1] + 1) % MASK_ID)
    b_earlier = _batch(earlier, seg, eligible, noise & (jnp.arange(L) != i - 1), 1)
    logits_earlier = query_logits(model, b_earlier)
    assert np.abs(np.asarray(logits_earlier[:, i] - logits[:, i])).max() > 1e-4


def test_full_block_noisy_half_equals_single_copy_mdlm(model):
    x0, seg, eligible, noise = _data(1)
    single = _batch(x0, seg, eligible, noise, L)
    forced = _batch(x0, seg, eligible, noise, L, force_two_copy=True)
    assert single.tokens.shape == (2, L) and forced.tokens.shape == (2, 2 * L)
    logits_single = query_logits(model, single)
    logits_forced = query_logits(model, forced)
    np.testing.assert_allclose(np.asarray(logits_forced), np.asarray(logits_single), rtol=1e-5, atol=1e-5)
    # and both equal a plain bidirectional-within-document forward on x_t
    xt = jnp.where(noise & eligible, MASK_ID, x0)
    ref = full_logits(model, xt, POSITIONS, masks.mdlm_mask(seg))
    np.testing.assert_allclose(np.asarray(logits_single), np.asarray(ref), rtol=1e-5, atol=1e-5)
