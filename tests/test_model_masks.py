"""The model under the three mask forms: string, dense bool array, MaskSpec with documents."""
import jax.numpy as jnp
import numpy as np
import pytest

from llada2_jax.diffusion.masks import MaskSpec
from llada2_jax.model.config import ModelConfig
from llada2_jax.model.transformer import Transformer

CONFIGS = {
    "qwen3_gqa": ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             qk_norm=True),
    "bailing_moe": ModelConfig(model_type="bailing_moe_v2", vocab_size=64, hidden_size=32,
                               intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
                               qk_norm=True, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=8, num_shared_experts=1, first_k_dense_replace=1,
                               score_function="sigmoid", n_group=2, topk_group=1, norm_topk_prob=True,
                               routed_scaling_factor=2.5, use_expert_bias=True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return Transformer(CONFIGS[request.param])


def test_dense_tril_equals_causal_string(model):
    b, t = 2, 10
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (b, t)))
    dense = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    np.testing.assert_allclose(np.asarray(model(tokens, mask=dense)), np.asarray(model(tokens, mask="causal")),
                               rtol=1e-6, atol=1e-6)


def test_packed_documents_equal_separate_forwards(model):
    """Causal MaskSpec with segment ids + per-document positions == each document alone."""
    lengths = [4, 6, 3]
    pad = 3
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 64, n) for n in lengths]
    tokens = np.concatenate(docs + [np.zeros(pad, int)])[None]
    segment = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad, int)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.arange(pad)])[None]
    packed = np.asarray(model(jnp.asarray(tokens), positions=jnp.asarray(positions),
                              mask=MaskSpec.causal(jnp.asarray(segment))))
    # each document alone, one per row (right padding cannot reach earlier rows under a causal mask)
    alone = np.zeros((len(docs), max(lengths)), int)
    for i, doc in enumerate(docs):
        alone[i, :len(doc)] = doc
    alone = np.asarray(model(jnp.asarray(alone)))
    start = 0
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(packed[0, start:start + n], alone[i, :n], rtol=1e-5, atol=1e-5)
        start += n
    # without the document mask the second document would see the first: the check can fail
    leaky = np.asarray(model(jnp.asarray(tokens), positions=jnp.asarray(positions), mask="causal"))
    assert not np.allclose(leaky[:, lengths[0]:sum(lengths[:2])], packed[:, lengths[0]:sum(lengths[:2])], atol=1e-4)
