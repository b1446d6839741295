"""Token-editing decode (LLaDA2.1 M2T + T2T, spec §9.9): a plain-loop reference of the rule on the dense
full canvas, cached vs uncached, batch vs single runs, per-row counts, `edit_threshold=None` as the
M2T-only decoder, presets and bad input."""
import functools

import numpy as np
import pytest
from flax import nnx

from llada2_jax.inference import decode, generate
from llada2_jax.model import ModelConfig, Transformer
from dense_decode_reference import block_probs

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
MASK, L = 63, 8
PROMPT = [5, 9, 2, 7, 1, 3, 3, 8, 4, 11, 12]  # one full block + a 3-token tail in the first decoded block


@functools.lru_cache(maxsize=None)
def context_model(seed: int, head_scale: float) -> Transformer:
    """Random weights with attention/MLP scaled up, so a position's argmax moves as its block fills in."""
    model = Transformer(CFG, rngs=nnx.Rngs(seed))
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        var = getattr(model.dense_layers, name)
        var.set_value(var[...] * 10)
    model.lm_head.set_value(model.lm_head[...] * head_scale)
    return model


def reference_edit_decode(model, prompt, gen_length, threshold, edit_threshold, max_post_steps, eos_id):
    """The M2T + T2T rule as a plain loop over the whole canvas, dense block-causal mask, no cache.

    Per forward over block k (v = argmax without [MASK], c = its probability): M2T commits every mask
    with c > threshold, else the most confident mask; T2T (edit_threshold not None) replaces every
    committed generated token of the block with v where v differs and c > edit_threshold. A forward
    on a mask-free block is a post step; the block ends once mask-free after a post step without an
    edit or after max_post_steps post steps. Returns (tokens cut after EOS, forwards, blocks, edits).
    """
    p = len(prompt)
    n_blocks = -(-(p + gen_length) // L)
    x = np.full(n_blocks * L, MASK)
    x[:p] = prompt
    allow = (np.arange(x.size)[:, None] // L) >= (np.arange(x.size)[None] // L)
    forwards = blocks = edits = 0
    for k in range(p // L, n_blocks):
        blocks += 1
        pos = np.arange(k * L, (k + 1) * L)
        generated = pos >= p
        post = 0
        while True:
            masked = (x[pos] == MASK) & generated
            probs = block_probs(model, x, allow, pos, MASK)
            forwards += 1
            v, c = probs.argmax(-1), probs.max(-1)
            take = masked & (c > threshold)
            if masked.any() and not take.any():
                take[np.argmax(np.where(masked, c, -np.inf))] = True
            edit = np.zeros(L, bool)
            if edit_threshold is not None:
                edit = generated & ~masked & (v != x[pos]) & (c > edit_threshold)
                edits += int((edit & (pos < p + gen_length)).sum())
            x[pos[take | edit]] = v[take | edit]
            if not masked.any():
                post += 1
            if ((x[pos] == MASK) & generated).any():
                continue
            if edit_threshold is None or post >= max_post_steps or (not masked.any() and not edit.any()):
                break
        if (x[p:min(p + gen_length, (k + 1) * L)] == eos_id).any():
            break
    out = [int(t) for t in x[p:p + gen_length]]
    if eos_id in out:
        out = out[:out.index(eos_id) + 1]
    return out, forwards, blocks, edits


CASES = [  # (seed, head scale, threshold, edit_threshold, max_post_steps); lm_head x30: confident, edits often
    (0, 30.0, 0.5, 0.0, 16),  # the speed preset
    (1, 30.0, 0.7, 0.5, 16),  # the quality preset
    (2, 10.0, 0.9, 0.2, 2),   # the post-step budget binds
    (1, 30.0, 0.9, 0.9, 4),   # few edits: blocks end on a post step without an edit
    (0, 30.0, 0.5, 0.0, 0),   # edits only while masks remain
]


@pytest.mark.parametrize("case,fuse", [(0, True), (1, False), (2, True), (3, False), (4, True)])
def test_matches_reference_loop(case, fuse):
    seed, scale, threshold, edit_threshold, max_post = CASES[case]
    model = context_model(seed, scale)
    want, ref_forwards, blocks, ref_edits = reference_edit_decode(model, PROMPT, 24, threshold, edit_threshold,
                                                                  max_post, eos_id=-1)
    res = generate(model, [PROMPT], gen_length=24, block_size=L, threshold=threshold, mask_id=MASK, eos_id=None,
                   fuse_refresh=fuse, edit_threshold=edit_threshold, max_post_steps=max_post)
    assert res.tokens == [want]
    assert res.row_edits == [ref_edits] and ref_edits > 0  # every case edits
    # + the prefill, + one refresh forward per finished block unless it rides on the next block's first
    assert res.forwards == ref_forwards + 1 + (0 if fuse else blocks - 1)
    assert res.row_generated == [24] and res.row_tpf == [pytest.approx(24 / res.forwards)]


def test_none_is_the_m2t_decoder():
    """edit_threshold=None: the reference without T2T, and the editing path with no possible edit."""
    model = context_model(0, 30.0)
    kw = dict(gen_length=24, block_size=L, threshold=0.8, mask_id=MASK)
    want, forwards, _, _ = reference_edit_decode(model, PROMPT, 24, 0.8, None, 0, eos_id=-1)
    plain = generate(model, [PROMPT], eos_id=None, **kw)
    never = generate(model, [PROMPT], eos_id=None, edit_threshold=1.0, max_post_steps=0, **kw)
    assert plain.tokens == never.tokens == [want]
    assert plain.forwards == never.forwards == forwards + 1
    assert plain.row_edits == never.row_edits == [0]


def eos_in_second_block(model, prompt, threshold, edit_threshold):
    """A token whose first appearance in the final output lies in the second decoded block."""
    tokens, *_ = reference_edit_decode(model, prompt, 24, threshold, edit_threshold, 16, eos_id=-1)
    first_block = L - len(prompt) % L
    for i in range(first_block, first_block + L):
        if tokens[i] not in tokens[:i]:
            return tokens[i]
    raise AssertionError("no token first appears in the second block; pick another seed")


def test_batch_equals_single_runs_and_cached_equals_uncached():
    """Rows of different prompt lengths start in different blocks; the cache grows from 3 to 6 blocks."""
    model = context_model(2, 30.0)
    prompts = [PROMPT, PROMPT[:3], [7] * 16]
    eos = eos_in_second_block(model, PROMPT, 0.7, 0.3)
    kw = dict(gen_length=24, block_size=L, mask_id=MASK, eos_id=eos, threshold=0.7, edit_threshold=0.3)
    batch = generate(model, prompts, **kw)
    uncached = generate(model, prompts, use_cache=False, **kw)
    singles = [generate(model, [p], **kw) for p in prompts]
    assert batch.tokens == uncached.tokens == [s.tokens[0] for s in singles]
    assert batch.row_edits == uncached.row_edits == [s.row_edits[0] for s in singles]
    assert batch.row_forwards == [s.forwards for s in singles]
    assert batch.row_generated == [s.num_generated for s in singles]
    assert batch.row_tpf == [pytest.approx(s.tpf) for s in singles]
    for row, prompt in zip(batch.tokens, prompts):  # each row against the reference, EOS stop included
        assert row == reference_edit_decode(model, prompt, 24, 0.7, 0.3, 16, eos_id=eos)[0]
    assert min(batch.row_edits) > 0
    assert batch.tokens[0][-1] == eos and len(batch.tokens[0]) < 24


def test_presets_set_both_thresholds():
    model = context_model(0, 30.0)
    kw = dict(gen_length=24, block_size=L, mask_id=MASK, eos_id=None)
    assert generate(model, [PROMPT], preset="speed", threshold=0.99, **kw).tokens == \
        generate(model, [PROMPT], threshold=0.5, edit_threshold=0.0, **kw).tokens
    assert decode.preset_settings("quality") == dict(threshold=0.7, edit_threshold=0.5)
    assert decode.preset_settings("speed") == dict(threshold=0.5, edit_threshold=0.0)


@pytest.mark.parametrize("kw,match", [
    (dict(edit_threshold=1.5), "edit_threshold=1.5 must be in"),
    (dict(edit_threshold=-0.1), "edit_threshold=-0.1 must be in"),
    (dict(edit_threshold=0.5, max_post_steps=-1), "max_post_steps=-1 must be"),
    (dict(preset="fast"), "preset='fast'; expected one of"),
])
def test_bad_editing_input_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        generate(context_model(0, 30.0), [PROMPT], gen_length=8, block_size=L, mask_id=MASK, eos_id=None, **kw)


@pytest.mark.parametrize("flags_,edits", [(["--edit_threshold", "0.5"], False), (["--preset", "speed"], True)])
def test_cli_editing_flags(tmp_path, capsys, flags_, edits):
    """A constant model: masks become 7 (p 0.99); at a committed token every id has p = 1/63, token 0 wins.

    τ_edit 0.5: one post step without an edit ends each block. Speed (τ_edit 0): the first post step
    edits every generated token to 0, the second edits nothing."""
    from test_inference_cli import write_run
    from test_inference_decode import constant_model

    from llada2_jax import generate as cli
    from llada2_jax.data.tokenizers import load_tokenizer
    write_run(tmp_path, constant_model({7: 0.99}))
    assert cli.main(["--workdir", str(tmp_path), "--prompt", "w5 w9 w11", "--gen_length", "12", "--block_size", "8",
                     *flags_]) == 0
    out, err = capsys.readouterr()
    tok = load_tokenizer(str(tmp_path / "tokenizer"))
    prompt = len(cli.prompt_ids(tok, "w5 w9 w11", raw=False))
    assert out.strip() == tok.decode([0 if edits else 7] * 12)
    blocks = -(-(prompt + 12) // 8) - prompt // 8
    forwards = (prompt >= 8) + (3 if edits else 2) * blocks
    assert f"forwards={forwards}," in err and f"edits={12 if edits else 0}" in err


@pytest.mark.parametrize("flags_,match", [(["--edit_threshold", "2"], "--edit_threshold=2.0 must be in [0, 1]"),
                                          (["--max_post_steps", "-1"], "--max_post_steps=-1 must be >= 0"),
                                          (["--preset", "fast"], "--preset='fast'; expected quality or speed")])
def test_cli_bad_editing_flags(tmp_path, capsys, flags_, match):
    from llada2_jax import generate as cli
    assert cli.main(["--workdir", str(tmp_path), "--prompt", "w5", *flags_]) == 2
    assert match in capsys.readouterr().err
