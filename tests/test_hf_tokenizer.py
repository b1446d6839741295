"""HF checkpoint tokenizers (`tokenizer.json` / sentencepiece `tokenizer.model` + tokenizer_config.json)
against `transformers.AutoTokenizer` on the same directory, and the `[MASK]` id policy."""
import io
import json

import pytest

from llada2_jax.data import corpora
from llada2_jax.data.checkpoint_tokenizer import CheckpointSentencePieceTokenizer, load_checkpoint_tokenizer
from llada2_jax.data.chat_jinja import JinjaChatTemplate
from llada2_jax.data.tokenizers import MASK_TOKEN, HFTokenizer, load_tokenizer

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a test assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3 style: BOS variable, header ids, trimmed content, no newline after the end of turn.
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
          "+ '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_0|>"]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " leading space\n"},
     {"role": "assistant", "content": "def f(x):\n    return x  # ok"}, {"role": "user", "content": "Thanks"}],
]


@pytest.fixture(scope="module")
def texts():
    docs = corpora.load_corpus("stdlib", max_documents=30, max_bytes=150_000)
    return [d.text for d in docs]


def build_bpe(texts, vocab_size=800):
    """A byte-level BPE tokenizer.json trained here (like SmolLM2's / Qwen's)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def write_checkpoint_dir(path, raw, *, template, eos="<|im_end|>", model_vocab=None, extra=None):
    path.mkdir(parents=True, exist_ok=True)
    raw.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": "<|endoftext|>",
              "bos_token": "<|begin_of_text|>", "chat_template": template, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": {str(raw.token_to_id(t)): {"content": t, "special": True} for t in SPECIALS},
              **(extra or {})}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if model_vocab is not None:
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": model_vocab}))
    return path


@pytest.fixture(scope="module")
def bpe(texts):
    return build_bpe(texts)


def auto_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def hf_chat_ids(ref, messages, add_generation_prompt):
    out = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def prefix_property(tok, chat):
    """The prompt (with generation prompt) is a prefix of the whole chat: the SFT boundary is exact."""
    last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
    chat = chat[:last + 1]
    prompt = tok.apply_chat_template(chat[:-1], add_generation_prompt=True)
    full = tok.apply_chat_template(chat)
    assert full[:len(prompt)] == prompt
    content = tok.encode(chat[-1]["content"].strip())
    assert full[len(prompt):len(prompt) + len(content)] == content


@pytest.mark.torch
@pytest.mark.parametrize("template", [CHATML, LLAMA3])
def test_tokenizer_json_matches_transformers(tmp_path, bpe, texts, template):
    eos = "<|im_end|>" if template is CHATML else "<|eot_id|>"
    d = write_checkpoint_dir(tmp_path / "ckpt", bpe, template=template, eos=eos)
    ours, ref = load_tokenizer(str(d)), auto_tokenizer(d)
    assert isinstance(ours, HFTokenizer) and isinstance(ours.chat_template, JinjaChatTemplate)
    for text in texts[:10] + ["x <|im_end|> y", "héllo wörld 😀\t\n"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.eos_id == ref.convert_tokens_to_ids(eos) and ours.pad_id == ref.pad_token_id
    for chat in CHATS:
        # prompts (no assistant reply yet) are one segment: transformers' ids exactly
        first_reply = next(i for i, m in enumerate(chat) if m["role"] == "assistant")
        for gen in (False, True):
            prompt = chat[:first_reply]
            assert ours.apply_chat_template(prompt, add_generation_prompt=gen) == hf_chat_ids(ref, prompt, gen)
        # whole chats: the same text; the same ids where the reply boundaries are token boundaries
        # for transformers too (ChatML: a newline before, <|im_end|> after each reply)
        for gen in (False, True):
            got, want = ours.apply_chat_template(chat, add_generation_prompt=gen), hf_chat_ids(ref, chat, gen)
            assert ours.decode(got) == ref.decode(want, skip_special_tokens=True)
            if template is CHATML:
                assert got == want
        prefix_property(ours, chat)


@pytest.mark.slow  # ~25 s: the 49k-token vocabulary built twice
@pytest.mark.torch
def test_smollm2_tokenizer_from_the_wheel_matches_transformers(tmp_path, texts):
    from llada2_jax.interop.gguf import load_gguf_tokenizer
    gg = load_gguf_tokenizer()
    d = tmp_path / "smollm2"
    d.mkdir()
    gg.tokenizer.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        # PreTrainedTokenizerFast runs tokenizer.json as it is; transformers 5's GPT2Tokenizer class
        # rebuilds the pipeline from vocab + merges and drops SmolLM2's digit splitting
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": gg.chat_template,
        "clean_up_tokenization_spaces": False}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 49152}))
    ours, ref = load_tokenizer(str(d)), auto_tokenizer(d)
    for text in texts[:8]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    for chat in CHATS:
        for gen in (False, True):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == hf_chat_ids(ref, chat, gen)
        prefix_property(ours, chat)
    # no mask token in SmolLM2: a new one at 49152, the row the conversion appends
    assert ours.mask_id == 49152 and ours.vocab_size == 49153
    # the project's own SmolLM2 tokenizer (hand-written ChatML template) gives the same chat ids
    from llada2_jax.interop.sources import smollm2_tokenizer
    own = smollm2_tokenizer()
    for chat in CHATS:
        assert own.apply_chat_template(chat, add_generation_prompt=True) == \
            ours.apply_chat_template(chat, add_generation_prompt=True)


def test_save_and_load_round_trip(tmp_path, bpe, texts):
    d = write_checkpoint_dir(tmp_path / "ckpt", bpe, template=LLAMA3, eos="<|eot_id|>")
    tok = load_tokenizer(str(d))
    tok.save(str(tmp_path / "saved"))
    back = load_tokenizer(str(tmp_path / "saved"))
    assert back.fingerprint() == tok.fingerprint() and back.encode(texts[0]) == tok.encode(texts[0])
    assert back.apply_chat_template(CHATS[1], True) == tok.apply_chat_template(CHATS[1], True)


@pytest.mark.parametrize("case", ["existing", "config_name", "reserved", "padded_row", "appended_row",
                                  "converted", "no_room"])
def test_mask_policy(tmp_path, bpe, case):
    import tokenizers
    raw = tokenizers.Tokenizer.from_str(bpe.to_str())
    size = raw.get_vocab_size(with_added_tokens=True)
    extra, model_vocab, specials = {}, size + 64, SPECIALS
    if case == "existing":
        raw.add_special_tokens([tokenizers.AddedToken("<|mask|>", special=True)])
    elif case == "config_name":
        extra = {"mask_token": "<|reserved_special_token_0|>"}
    elif case == "reserved":
        pass
    else:
        specials = [t for t in SPECIALS if "reserved" not in t]
    if case == "appended_row":
        model_vocab = size
    if case == "no_room":
        model_vocab = size - 1
    d = write_checkpoint_dir(tmp_path / case, raw, template=CHATML, model_vocab=model_vocab, extra=extra)
    if case != "reserved" and case != "config_name":  # drop the reserved token from added_tokens_decoder
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items()
                                       if v["content"] in specials}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if case == "converted":
        (d / "config.json").write_text(json.dumps({"vocab_size": size + 64, "mask_token_id": 7}))
    if case == "no_room":
        with pytest.raises(ValueError, match=r"no reusable mask token .* no embedding row"):
            load_checkpoint_tokenizer(str(d))
        return
    tok = load_checkpoint_tokenizer(str(d))
    expected = {"existing": raw.token_to_id("<|mask|>"),
                "config_name": raw.token_to_id("<|reserved_special_token_0|>"),
                "reserved": raw.token_to_id("<|reserved_special_token_0|>"),
                "padded_row": size, "appended_row": size, "converted": 7}[case]
    assert tok.mask_id == expected
    assert tok.mask_id < model_vocab or case == "appended_row"
    if case in ("padded_row", "appended_row"):
        assert tok.encode(MASK_TOKEN) == [size] and tok.vocab_size == size + 1


def train_sentencepiece(texts, vocab_size=700):
    """A Llama-style sentencepiece model: <unk> <s> </s>, byte fallback, dummy prefix, no normalization."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        split_digits=True, max_sentence_length=1 << 20, minloglevel=2, num_threads=2)
    return model.getvalue()


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, texts):
    d = tmp_path_factory.mktemp("sp")
    (d / "tokenizer.model").write_bytes(train_sentencepiece(texts))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False,
        "chat_template": "{% for m in messages %}{{ '[' + m['role'] + ']\n' + m['content'] + eos_token + '\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '[assistant]\n' }}{% endif %}"}))
    return d


def test_sentencepiece_model_against_the_sentencepiece_processor(sp_dir, texts):
    import sentencepiece as spm
    tok = load_tokenizer(str(sp_dir))
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert isinstance(tok, CheckpointSentencePieceTokenizer)
    assert (tok.eos_id, tok.pad_id) == (sp.eos_id(), sp.eos_id()) and tok.mask_id == sp.get_piece_size()
    for text in texts[:5]:
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    # special strings in the text become their ids; the pieces around them are encoded separately
    assert tok.encode("ab</s>cd[MASK]") == sp.encode("ab") + [sp.eos_id()] + sp.encode("cd") + [tok.mask_id]
    saved = tok.__class__
    tok.save(str(sp_dir.parent / "saved_sp"))
    back = load_tokenizer(str(sp_dir.parent / "saved_sp"))
    assert isinstance(back, saved) and back.fingerprint() == tok.fingerprint()


@pytest.mark.torch
def test_sentencepiece_model_matches_transformers(sp_dir, texts):
    ours, ref = load_tokenizer(str(sp_dir)), auto_tokenizer(sp_dir)
    checked = 0
    # Texts that start with whitespace are left out: there transformers 5's conversion of a
    # sentencepiece model disagrees with sentencepiece itself (" lead": "▁le" vs "▁▁le"); we follow
    # sentencepiece (test_sentencepiece_model_against_the_sentencepiece_processor).
    for text in texts[:6] + ["Hello world", "x</s>y", "two  spaces  "]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text[:60]
        checked += 1
    for chat in CHATS:
        first_reply = next(i for i, m in enumerate(chat) if m["role"] == "assistant")
        prompt = chat[:first_reply]
        assert ours.apply_chat_template(prompt, add_generation_prompt=True) == hf_chat_ids(ref, prompt, True)
        # a reply is encoded on its own, so sentencepiece's dummy prefix starts it with "▁" (as
        # `encode(reply)` in the SFT data does): the same words, one more space per reply
        got = ours.apply_chat_template(chat, add_generation_prompt=True)
        assert ours.decode(got).split() == ref.decode(hf_chat_ids(ref, chat, True), skip_special_tokens=True).split()
        prefix_property(ours, chat)
    assert checked == 9


def test_clear_errors(tmp_path, bpe):
    d = write_checkpoint_dir(tmp_path / "noeos", bpe, template=CHATML)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no eos_token"):
        load_tokenizer(str(d))
    rewriting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    d = write_checkpoint_dir(tmp_path / "rewrite", bpe, template=rewriting)
    with pytest.raises(ValueError, match="rewriting earlier turns"):
        load_tokenizer(str(d)).apply_chat_template(CHATS[0])
    with pytest.raises(FileNotFoundError, match="no HF tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_jinja_segments_cut_only_at_replies():
    t = JinjaChatTemplate(LLAMA3, (("bos_token", "<B>"),))
    for chat in CHATS:
        segments = t.segments(chat, add_generation_prompt=True)
        assert "".join(segments) == t.render(chat, add_generation_prompt=True)
        replies = [m["content"].strip() for m in chat if m["role"] == "assistant"]
        assert segments[1::2] == replies and len(segments) == 2 * len(replies) + 1
    assert t.segments(CHATS[0][:1], add_generation_prompt=True) == [t.render(CHATS[0][:1], True)]


@pytest.mark.parametrize("spare_rows,reserved", [(64, True), (64, False), (0, False)])
def test_hf_source_uses_the_checkpoint_tokenizer(tmp_path, bpe, spare_rows, reserved):
    """`model.source=hf:DIR` + `tokenizer.kind=hf`: the run's tokenizer is DIR's own, and the model's
    mask id is the tokenizer's (a reserved token, an unused padded row, or the row the conversion
    appends)."""
    from flax import nnx
    from llada2_jax.configs.base import base_config
    from llada2_jax.interop import hf, sources
    from llada2_jax.model.config import ModelConfig
    from llada2_jax.model.transformer import Transformer
    from llada2_jax.training import model_source, validate
    size = bpe.get_vocab_size(with_added_tokens=True)
    d = tmp_path / "ckpt"
    cfg = ModelConfig(model_type="llama", vocab_size=size + spare_rows, hidden_size=16, intermediate_size=24,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    hf.save_pretrained(Transformer(cfg, rngs=nnx.Rngs(0)), d)
    write_checkpoint_dir(d, bpe, template=CHATML)
    if not reserved:
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc["added_tokens_decoder"] = {k: v for k, v in tc["added_tokens_decoder"].items()
                                      if "reserved" not in v["content"]}
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
    config = base_config()
    config.model.source, config.tokenizer.kind = f"hf:{d}", "hf"
    resolved = validate.resolve_config(config)
    assert (resolved.tokenizer.kind, resolved.tokenizer.path) == ("dir", str(d))
    tok = load_tokenizer(resolved.tokenizer.path)
    assert tok.mask_id == (bpe.token_to_id("<|reserved_special_token_0|>") if reserved else size)
    assert tok.encode("<|im_end|>") == [bpe.token_to_id("<|im_end|>")]
    src = model_source.open_source(resolved.model.source, {}, {}, tok)
    assert src.config.mask_token_id == tok.mask_id
    assert src.config.vocab_size == size + max(spare_rows, 1)  # a row appended only when none was free
    model, eval_tok = sources.load_model(f"hf:{d}")
    assert eval_tok.fingerprint() == tok.fingerprint()
