"""The real SmolLM2-135M-Instruct GGUF: dequantized weights + rebuilt tokenizer give a working LM.

Slow (loads 135M parameters, ~30 s on 2 cores). The cheap tokenizer/permutation checks are not slow.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada2_jax.interop import gguf as gguf_io

PARAGRAPH = (
    "The river flows slowly through the old town, past the market square and the church. In the "
    "morning, farmers bring fresh bread, cheese and vegetables to sell, and children walk to school "
    "along the narrow streets. Most people here have lived in the same houses for many years, and "
    "they know each other well."
)


@pytest.fixture(scope="module")
def smollm2_path():
    pytest.importorskip("gguf")
    try:
        return gguf_io.smollm2_gguf_path()
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return gguf_io.load_gguf_tokenizer(smollm2_path)


def test_unpermute_qk_inverts_llama_cpp_permutation():
    """llama.cpp permutes rows as reshape(H, 2, D/2, in).swapaxes(1, 2); we must undo exactly that."""
    n_head, hd, d_in = 3, 8, 5
    w = np.random.default_rng(0).normal(size=(n_head * hd, d_in))
    permuted = w.reshape(n_head, 2, hd // 2, d_in).swapaxes(1, 2).reshape(n_head * hd, d_in)
    np.testing.assert_array_equal(gguf_io.unpermute_qk(permuted, n_head), w)


def test_tokenizer_specials_digits_and_round_trip(tok):
    t = tok.tokenizer
    assert t.get_vocab_size(with_added_tokens=True) == 49152 and tok.eos_id == 2
    assert tok.special_ids["<|endoftext|>"] == 0 and tok.special_ids["<|im_start|>"] == 1
    assert len(tok.special_ids) == 17
    enc = t.encode("<|im_start|>user\nIn 2024 we ate 12 apples.<|im_end|>")
    assert enc.ids[0] == 1 and enc.ids[-1] == 2  # specials are single ids; no BOS added
    assert [s for s in enc.tokens if s.isdigit()] == ["2", "0", "2", "4", "1", "2"]  # digits split
    text = "def f(x):\n    return x * 3.14  # ünïcode ✓"
    assert t.decode(t.encode(text).ids) == text


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return gguf_io.load_gguf(smollm2_path)


def _jit_logits(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, tokens: nnx.merge(graphdef, s)(tokens)), state


@pytest.mark.slow
def test_perplexity_of_english_paragraph(smollm2, tok):
    ids = np.array(tok.tokenizer.encode(PARAGRAPH).ids)
    logits = smollm2(jnp.asarray(ids[None]))[0, :-1]
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), ids[1:, None], -1).mean()
    ppl = float(np.exp(nll))
    shuffled = np.random.default_rng(0).permutation(ids)
    logits_s = smollm2(jnp.asarray(shuffled[None]))[0, :-1]
    ppl_s = float(np.exp(-np.take_along_axis(np.asarray(jax.nn.log_softmax(logits_s, -1)),
                                             shuffled[1:, None], -1).mean()))
    print(f"SmolLM2 perplexity: paragraph {ppl:.2f}, shuffled {ppl_s:.1f}")
    assert ppl < 40 and ppl_s > 10 * ppl


@pytest.mark.slow
def test_greedy_chat_answer_mentions_paris(smollm2, tok):
    jinja2 = pytest.importorskip("jinja2")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = jinja2.Template(tok.chat_template).render(messages=messages, add_generation_prompt=True)
    ids = tok.tokenizer.encode(prompt).ids
    width = len(ids) + 12
    forward, state = _jit_logits(smollm2)
    for _ in range(12):  # causal mask: right padding does not change earlier logits
        buf = np.full((1, width), tok.eos_id, np.int32)
        buf[0, :len(ids)] = ids
        nxt = int(np.argmax(np.asarray(forward(state, jnp.asarray(buf)))[0, len(ids) - 1]))
        if nxt == tok.eos_id:
            break
        ids.append(nxt)
    answer = tok.tokenizer.decode(ids[len(tok.tokenizer.encode(prompt).ids):])
    print(f"SmolLM2 answer: {answer!r}")
    assert "Paris" in answer
