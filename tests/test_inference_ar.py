"""AR baseline decoder: cached batched decoding against a no-cache full-forward loop."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada2_jax.inference import generate_ar
from llada2_jax.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
PROMPTS = [[3, 17, 9], [5, 9, 2, 7, 1, 3, 3, 8, 4, 11, 12], [40] * 6]
_CAUSAL = nnx.jit(lambda m, tokens: m(tokens))


@functools.lru_cache(maxsize=None)
def model() -> Transformer:
    m = Transformer(CFG, rngs=nnx.Rngs(1))
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        var = getattr(m.dense_layers, name)
        var.set_value(var[...] * 10)
    return m


def reference_greedy(prompt, max_new_tokens, eos_id):
    """Argmax of a full causal forward over the whole sequence, one token at a time."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        buf = np.zeros((1, CFG.max_position_embeddings), np.int32)
        buf[0, :len(seq)] = seq
        seq.append(int(np.argmax(_CAUSAL(model(), jnp.asarray(buf))[0, len(seq) - 1])))
        if seq[-1] == eos_id:
            break
    return seq[len(prompt):]


def test_greedy_batch_equals_reference_and_stops_at_eos():
    free = [reference_greedy(p, 12, eos_id=-1) for p in PROMPTS]
    eos = free[1][5]
    want = [reference_greedy(p, 12, eos) for p in PROMPTS]
    res = generate_ar(model(), PROMPTS, max_new_tokens=12, eos_id=eos)
    assert res.tokens == want
    assert want[1][-1] == eos and len(want[1]) <= 6
    assert res.row_forwards == [len(w) for w in want]  # prefill gives the first token, one forward per further token
    assert res.forwards == max(res.row_forwards)
    assert res.num_generated == sum(len(w) - (w[-1] == eos) for w in want)


def test_long_generation_crosses_cache_windows():
    """3 + 60 tokens: the cache grows through windows of 16, 24, 32, 48 and 64 slots."""
    res = generate_ar(model(), [[3, 17, 9]], max_new_tokens=60, eos_id=None)
    assert res.tokens == [reference_greedy([3, 17, 9], 60, eos_id=-1)]
    assert res.forwards == 60


def test_window_never_shrinks_when_the_longest_prompt_stops_first():
    """The 40-token row emits EOS as its first token (in the prefill); the short row runs on."""
    short = [5, 9, 2]
    short_free = reference_greedy(short, 20, eos_id=-1)
    long = next(p for p in ([k] * 40 for k in range(1, CFG.vocab_size))
                if reference_greedy(p, 1, eos_id=-1)[0] not in short_free)
    eos = reference_greedy(long, 1, eos_id=-1)[0]
    res = generate_ar(model(), [long, short], max_new_tokens=20, eos_id=eos)
    assert res.tokens == [[eos], short_free]
    assert res.row_forwards == [1, 20]


def test_sampling_reproducible_and_top_k_one_is_greedy():
    greedy = generate_ar(model(), PROMPTS, max_new_tokens=8, eos_id=None).tokens
    top1 = generate_ar(model(), PROMPTS, max_new_tokens=8, temperature=2.0, top_k=1, eos_id=None,
                       rng=jax.random.PRNGKey(1)).tokens
    assert top1 == greedy
    a = generate_ar(model(), PROMPTS, max_new_tokens=8, temperature=1.0, eos_id=None, rng=jax.random.PRNGKey(7))
    b = generate_ar(model(), PROMPTS, max_new_tokens=8, temperature=1.0, eos_id=None, rng=jax.random.PRNGKey(7))
    assert a.tokens == b.tokens and a.tokens != greedy
    assert a.tokens == [generate_ar(model(), [p], max_new_tokens=8, temperature=1.0, eos_id=None,
                                    rng=jax.random.PRNGKey(7)).tokens[0] for p in PROMPTS]
    keys = jax.random.split(jax.random.PRNGKey(7), len(PROMPTS))  # one key per prompt: rows equal single runs
    rows = generate_ar(model(), PROMPTS, max_new_tokens=8, temperature=1.0, eos_id=None, rng=keys).tokens
    assert rows == [generate_ar(model(), [p], max_new_tokens=8, temperature=1.0, eos_id=None,
                                rng=keys[i:i + 1]).tokens[0] for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("prompts,kw,match", [
    ([], {}, r"prompts"),
    ([[1], []], {}, r"prompts\[1\] is empty"),
    ([[1]], dict(max_new_tokens=0), r"max_new_tokens=0"),
    ([[1] * 10], dict(max_new_tokens=60), r"max_position_embeddings=64"),
    ([[1]], dict(eos_id=64), r"eos_id=64"),
    ([[1]], dict(top_k=0, temperature=1.0), r"top_k=0"),
])
def test_bad_input_raises(prompts, kw, match):
    args = dict(max_new_tokens=4, eos_id=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        generate_ar(model(), prompts, **args)
