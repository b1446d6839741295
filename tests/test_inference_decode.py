"""Block-wise threshold decoding: a plain-numpy reference of spec §9.1, exact expectations on a model
whose confidences are set through its weights, cache vs no cache, batching, train/infer
consistency, compilation count and bad input."""
import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada2_jax.diffusion import layout
from llada2_jax.inference import decode, generate
from llada2_jax.model import KVCache, ModelConfig, Transformer
from dense_decode_reference import block_probs, dense_forward

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
MASK, L = 63, 8
PROMPT = [5, 9, 2, 7, 1, 3, 3, 8, 4, 11, 12]  # one full block + a 3-token tail in the first decoded block
_FORWARD_AT = nnx.jit(lambda m, tokens, positions, mask, cache: m.forward(tokens, positions, mask, cache=cache))


@functools.lru_cache(maxsize=None)
def confident_model(seed: int) -> Transformer:
    """Random weights, attention/MLP scaled up (outputs vary with context) and lm_head x30 (confident)."""
    model = Transformer(CFG, rngs=nnx.Rngs(seed))
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        var = getattr(model.dense_layers, name)
        var.set_value(var[...] * 10)
    model.lm_head.set_value(model.lm_head[...] * 30)
    return model


def reference_decode(model, prompt, gen_length, threshold, steps, eos_id):
    """Spec §9.1 as a plain loop: full canvas with a dense block-causal mask at every step.

    Returns (tokens cut after EOS, forwards, blocks decoded, set of acceptance paths taken).
    """
    p = len(prompt)
    n_blocks = -(-(p + gen_length) // L)
    x = np.full(n_blocks * L, MASK)
    x[:p] = prompt
    base, extra = divmod(L, steps)
    quota = [base + (s < extra) for s in range(steps)]
    allow = (np.arange(x.size)[:, None] // L) >= (np.arange(x.size)[None] // L)
    forwards, blocks, paths = 0, 0, set()
    for k in range(p // L, n_blocks):
        blocks += 1
        pos = np.arange(k * L, (k + 1) * L)
        for s in range(steps):
            masked = (x[pos] == MASK) & (pos >= p)
            if not masked.any():
                break
            probs = block_probs(model, x, allow, pos, MASK)
            forwards += 1
            conf = np.where(masked, probs.max(-1), -np.inf)
            high = conf > threshold
            if high.sum() >= quota[s]:
                take, path = high, "threshold"
            else:
                take = np.zeros(L, bool)
                take[np.argsort(-conf, kind="stable")[:min(quota[s], masked.sum())]] = True
                path = "fallback"
            paths.add(path)
            x[pos[take]] = probs.argmax(-1)[take]
        if (x[p:min(p + gen_length, (k + 1) * L)] == eos_id).any():
            break
    out = [int(t) for t in x[p:p + gen_length]]
    if eos_id in out:
        out = out[:out.index(eos_id) + 1]
    return out, forwards, blocks, paths


def eos_in_second_block(model, prompt, gen_length, threshold, steps):
    """A token whose first appearance lies in the second decoded block, so EOS stops mid-way."""
    tokens, *_ = reference_decode(model, prompt, gen_length, threshold, steps, eos_id=-1)
    first_block = L - len(prompt) % L
    for i in range(first_block, first_block + L):
        if tokens[i] not in tokens[:i]:
            return tokens[i]
    raise AssertionError("no token first appears in the second block; pick another seed")


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("seed,threshold,steps", [(0, 0.9, L), (3, 0.6, 3), (1, 1.0, 5), (0, 0.0, L)])
def test_matches_reference_loop(seed, threshold, steps, fuse):
    model = confident_model(seed)
    eos = eos_in_second_block(model, PROMPT, 24, threshold, steps)
    want, ref_forwards, blocks, paths = reference_decode(model, PROMPT, 24, threshold, steps, eos)
    res = generate(model, [PROMPT], gen_length=24, block_size=L, threshold=threshold, steps=steps,
                   mask_id=MASK, eos_id=eos, fuse_refresh=fuse)
    assert res.tokens == [want]
    assert want[-1] == eos and len(want) < 24
    # + the prefill, + one refresh forward per finished block unless it rides on the next block's first
    assert res.forwards == ref_forwards + 1 + (0 if fuse else blocks - 1)
    assert res.num_generated == len(want) - 1
    if threshold == 0.9:
        assert paths == {"threshold", "fallback"}


@pytest.mark.parametrize("fuse", [True, False])
def test_cached_equals_uncached_and_accepts_several_per_step(fuse):
    model = confident_model(0)
    kw = dict(gen_length=13, block_size=L, threshold=0.7, mask_id=MASK, eos_id=62)
    cached = generate(model, [PROMPT], use_cache=True, fuse_refresh=fuse, **kw)
    uncached = generate(model, [PROMPT], use_cache=False, **kw)
    assert cached.tokens == uncached.tokens
    assert uncached.forwards < cached.num_generated  # some step committed more than one token
    # the prefill, + the refresh of block 1 (blocks 1, 2 decoded) unless fused into block 2's first step
    assert cached.forwards == uncached.forwards + 1 + (0 if fuse else 1)


@pytest.mark.parametrize("fuse", [True, False])
def test_cached_equals_uncached_across_cache_windows(fuse):
    """Canvas of 8 blocks: the cache grows through windows of 2, 4 and 8 blocks (rows start apart)."""
    model = confident_model(1)
    kw = dict(gen_length=45, block_size=L, threshold=0.8, mask_id=MASK, eos_id=MASK)  # never stops early
    prompts = [PROMPT, PROMPT[:3]]
    cached = generate(model, prompts, use_cache=True, fuse_refresh=fuse, **kw)
    uncached = generate(model, prompts, use_cache=False, **kw)
    assert cached.tokens == uncached.tokens
    assert [len(t) for t in cached.tokens] == [45, 45]


@pytest.mark.parametrize("impl", ["xla_sparse", "pallas"])
def test_kernel_attention_backends_decode_like_the_dense_reference(impl):
    """The decoder's block-causal MaskSpec (T = L_B queries over S cache slots) through the kernels."""
    base = confident_model(0)
    model = Transformer(dataclasses.replace(CFG, attention_impl=impl), rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(base))
    kw = dict(gen_length=13, block_size=L, threshold=0.7, mask_id=MASK, eos_id=62)
    prompts = [PROMPT, PROMPT[:3]]
    want = generate(base, prompts, **kw).tokens
    assert generate(model, prompts, **kw).tokens == want
    assert generate(model, prompts, use_cache=False, **kw).tokens == want


@pytest.mark.parametrize("greedy", [True, False])
def test_head_runs_only_on_masked_rows_and_matches_the_full_block(greedy):
    """_propose_masked (compaction + a head size per step) == propose on every row, at the needed rows."""
    model = confident_model(2)
    rng = np.random.default_rng(7)
    hidden = jnp.asarray(rng.normal(size=(4, L, CFG.hidden_size)), jnp.float32)
    need = np.zeros((4, L), bool)
    need[0] = True  # the full head size
    need[1, [1, 6]] = True  # two scattered rows
    need[2, rng.permutation(L)[:5]] = True  # five: the next size up
    # row 3: nothing needed (a refresh forward)
    knobs = decode._Knobs(None, None, jnp.float32(0.8), jnp.float32(0.9), jnp.int32(MASK), None,
                          jax.random.split(jax.random.PRNGKey(3), 4))
    plan = decode._Plan(block_size=L, prefill_len=0, window=0, cached=True, fuse_refresh=True, greedy=greedy,
                        top_k=None, use_top_p=not greedy)
    key_of = functools.partial(decode.sampling.position_keys, knobs.key, jnp.asarray([0, 3, 1, 2]))
    cand, conf = jax.jit(lambda h, n: decode._propose_masked(model, h, n, knobs, plan, key_of))(hidden, jnp.asarray(need))
    want_cand, want_conf = decode.sampling.propose(
        model.logits_from_hidden(hidden), key_of(jnp.broadcast_to(jnp.arange(L), (4, L))),
        temperature=knobs.temperature, greedy=greedy, top_p=None if greedy else knobs.top_p, exclude_id=MASK)
    np.testing.assert_array_equal(np.asarray(cand)[need], np.asarray(want_cand)[need])
    np.testing.assert_allclose(np.asarray(conf)[need], np.asarray(want_conf)[need], rtol=1e-5)
    assert np.all(np.isneginf(np.asarray(conf)[~need]))
    assert decode.head_sizes(32) == (0, 4, 8, 16, 24, 32) and decode.head_sizes(1) == (0, 1)


def test_kv_cache_grow_keeps_slots_and_refuses_to_shrink():
    cache = KVCache(jnp.arange(24.0).reshape(1, 1, 3, 2, 4), -jnp.arange(24.0).reshape(1, 1, 3, 2, 4))
    grown = cache.grow(5)
    assert grown.max_len == 5
    np.testing.assert_array_equal(grown.k[:, :, :3], cache.k)
    np.testing.assert_array_equal(grown.v[:, :, :3], cache.v)
    assert not np.any(grown.k[:, :, 3:]) and not np.any(grown.v[:, :, 3:])
    with pytest.raises(ValueError, match="shrink"):
        cache.grow(2)


def test_batch_equals_single_runs():
    model = confident_model(0)
    prompts = [PROMPT[:3], PROMPT, PROMPT + [7] * 9]  # 0, 1 and 2 full prompt blocks
    kw = dict(gen_length=24, block_size=L, threshold=0.9, mask_id=MASK, eos_id=62)
    batch = generate(model, prompts, **kw)
    singles = [generate(model, [p], **kw) for p in prompts]
    assert batch.tokens == [s.tokens[0] for s in singles]
    assert batch.row_forwards == [s.forwards for s in singles]
    # one shared prefill, then the slowest row's steps and refreshes
    assert batch.forwards == 1 + max(s.forwards - (len(p) >= L) for s, p in zip(singles, prompts))


def test_sampled_rows_equal_single_runs():
    model = confident_model(0)
    prompts = [PROMPT[:3], PROMPT, PROMPT + [7] * 9]
    kw = dict(gen_length=24, block_size=L, threshold=0.9, mask_id=MASK, eos_id=None, temperature=1.5, top_p=0.95)
    one = jax.random.PRNGKey(11)  # one key for the whole batch: each row equals its prompt run alone
    singles = [generate(model, [p], rng=one, **kw).tokens[0] for p in prompts]
    assert generate(model, prompts, rng=one, **kw).tokens == singles
    # a repeated prompt gets a fresh stream per repeat; its first occurrence still equals a single run
    repeated = generate(model, [PROMPT, PROMPT[:3], PROMPT], rng=one, **kw).tokens
    assert repeated[:2] == [singles[1], singles[0]] and repeated[2] != repeated[0]
    keys = jax.random.split(jax.random.PRNGKey(11), 3)
    batch = generate(model, prompts, rng=keys, **kw)
    assert batch.tokens == [generate(model, [p], rng=keys[i:i + 1], **kw).tokens[0] for i, p in enumerate(prompts)]
    typed = jax.random.split(jax.random.key(11), 3)  # new-style keys work the same way
    assert generate(model, prompts, rng=typed, **kw).tokens == [
        generate(model, [p], rng=typed[i:i + 1], **kw).tokens[0] for i, p in enumerate(prompts)]
    with pytest.raises(ValueError, match=r"rng has shape \(2, 2\).*3 prompts"):
        generate(model, prompts, rng=keys[:2], **kw)


def test_batch_rows_stop_independently():
    model = confident_model(0)
    prompts = [PROMPT[:3], PROMPT, PROMPT + [7] * 9]
    free = generate(model, prompts, gen_length=24, block_size=L, threshold=0.9, mask_id=MASK, eos_id=62)
    eos = free.tokens[1][6]  # a token of row 1's second decoded block
    stopped = generate(model, prompts, gen_length=24, block_size=L, threshold=0.9, mask_id=MASK, eos_id=eos)
    for row_free, row in zip(free.tokens, stopped.tokens):
        cut = row_free[:row_free.index(eos) + 1] if eos in row_free else row_free
        assert row == cut
    assert len(stopped.tokens[1]) <= 7 and min(stopped.row_forwards) < max(stopped.row_forwards)


def test_no_recompilation_across_prompts_thresholds_and_steps():
    model = confident_model(0)
    kw = dict(gen_length=24, block_size=L, mask_id=MASK, eos_id=62)
    generate(model, [PROMPT], threshold=0.9, **kw)
    before = decode._prefill._cache_size(), decode._decode_window._cache_size()
    generate(model, [PROMPT[::-1] + [1]], threshold=0.7, steps=3, **kw)  # same length buckets
    generate(confident_model(1), [PROMPT[:9]], threshold=0.95, **kw)  # other weights, same config
    assert (decode._prefill._cache_size(), decode._decode_window._cache_size()) == before


# ---- a model whose confidence at [MASK] inputs is set exactly through its weights ----

def constant_model(probs: dict[int, float]) -> Transformer:
    """Zero attention output and MLP: the logits at a position depend only on its input token.

    At [MASK] inputs the output distribution is `probs` (the rest of the mass spread evenly).
    """
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    model.dense_layers.wo.set_value(jnp.zeros_like(model.dense_layers.wo[...]))
    model.dense_layers.w_down.set_value(jnp.zeros_like(model.dense_layers.w_down[...]))
    embed = np.zeros((CFG.vocab_size, CFG.hidden_size), np.float32)
    embed[:, 1] = 1.0
    embed[MASK] = 0.0
    embed[MASK, 0] = 1.0
    model.embed.set_value(jnp.asarray(embed))
    rest = (1.0 - sum(probs.values())) / (CFG.vocab_size - len(probs))
    target = np.full(CFG.vocab_size, np.log(rest))
    for tok, p in probs.items():
        target[tok] = np.log(p)
    hidden = 1.0 / np.sqrt(1.0 / CFG.hidden_size + CFG.rms_norm_eps)  # RMSNorm of a one-hot embedding
    head = np.zeros((CFG.hidden_size, CFG.vocab_size), np.float32)
    head[0] = target / float(hidden)
    model.lm_head.set_value(jnp.asarray(head))
    return model


def test_constant_model_logits_are_as_set():
    model = constant_model({7: 0.6, 20: 0.1})
    allow = jnp.ones((1, 4, 4), bool)
    probs = jax.nn.softmax(dense_forward(model, jnp.asarray([[1, MASK, 2, MASK]]), allow)[0, 1])
    np.testing.assert_allclose(probs[jnp.asarray([7, 20])], [0.6, 0.1], rtol=1e-4)


# Prompt of 11 tokens, gen 24, L = 8: blocks 1 (5 masks), 2, 3, 4; 1 prefill and 3 refreshes.
@pytest.mark.parametrize("probs,threshold,steps,want_token,want_forwards", [
    ({7: 0.96}, 0.95, None, 7, 1 + 4 + 3),  # every mask above the threshold: one step per block
    ({7: 0.96}, 0.97, None, 7, 1 + (5 + 8 + 8 + 8) + 3),  # none above: one (most confident) per step
    ({7: 0.5}, 0.95, 3, 7, 1 + (2 + 3 + 3 + 3) + 3),  # quota 3, 3, 2 per step
    ({7: 0.5}, 0.95, 5, 7, 1 + (3 + 5 + 5 + 5) + 3),  # quota 2, 2, 2, 1, 1
    ({MASK: 0.9, 7: 0.096}, 0.95, None, 7, 1 + 4 + 3),  # [MASK] is the argmax: 7 has 0.96 without it
])
@pytest.mark.parametrize("fuse", [True, False])
def test_threshold_fallback_and_quota(probs, threshold, steps, want_token, want_forwards, fuse):
    model = constant_model(probs)
    res = generate(model, [PROMPT], gen_length=24, block_size=L, threshold=threshold, steps=steps,
                   mask_id=MASK, eos_id=62, fuse_refresh=fuse)
    want_forwards -= 3 if fuse else 0  # the 3 refreshes ride on the next blocks' first forwards
    assert res.tokens == [[want_token] * 24]
    assert res.forwards == want_forwards
    assert res.tpf == pytest.approx(24 / want_forwards)


def test_steps_clamped_to_gen_length_as_in_hf():
    # gen_length 4 < block 8: steps = 4, quota 2 per step; block 1 holds 5 masks -> 3 steps
    res = generate(constant_model({7: 0.5}), [PROMPT], gen_length=4, block_size=L, threshold=0.95,
                   mask_id=MASK, eos_id=62)
    assert res.tokens == [[7] * 4] and res.forwards == 1 + 3


def test_eos_stops_after_its_block():
    model = constant_model({62: 0.99})
    res = generate(model, [PROMPT, PROMPT[:2]], gen_length=24, block_size=L, threshold=0.95,
                   mask_id=MASK, eos_id=62)
    assert res.tokens == [[62], [62]]
    assert res.row_forwards == [2, 1]  # prefill + one step; no prefill for a 2-token prompt
    assert res.num_generated == 0


# ---- train / inference consistency (spec §12.4) ----

def test_training_layout_logits_equal_cached_decode_logits():
    model = confident_model(2)
    rng = np.random.default_rng(0)
    k, n_blocks = 2, 4
    x0 = rng.integers(0, MASK, (1, n_blocks * L))
    noise = np.zeros_like(x0, bool)
    noise[0, k * L + np.array([0, 3, 4, 7])] = True  # block k partly masked
    noise[0, (k + 1) * L:] = rng.random((n_blocks - k - 1) * L) < 0.5  # later blocks: irrelevant
    ones = np.ones_like(x0)
    batch = layout.build_diffusion_batch(x0, ones, None, ones.astype(bool), noise, np.ones(1), mask_id=MASK,
                                         block_size=L, vocab_size=CFG.vocab_size)
    train_logits = _FORWARD_AT(model, batch.tokens, batch.positions, batch.mask, None).logits[0, k * L:(k + 1) * L]

    xt = np.where(noise, MASK, x0)
    slots = n_blocks * L
    cache = KVCache.create(CFG, 1, slots)
    prefix = jnp.arange(k * L)[None]
    cache = _FORWARD_AT(model, jnp.asarray(x0[:, :k * L]), prefix, decode.slot_mask(prefix, slots, L), cache).cache
    block = jnp.arange(k * L, (k + 1) * L)[None]
    decode_logits = _FORWARD_AT(model, jnp.asarray(xt[:, k * L:(k + 1) * L]), block, decode.slot_mask(block, slots, L),
                                cache).logits[0]
    np.testing.assert_allclose(decode_logits, train_logits, atol=1e-5, rtol=1e-5)


# ---- bad input ----

@pytest.mark.parametrize("kw,match", [
    (dict(prompts=[]), r"prompts"),
    (dict(gen_length=0), r"gen_length=0"),
    (dict(gen_length=-3), r"gen_length=-3"),
    (dict(gen_length=120), r"max_position_embeddings=128"),
    (dict(threshold=1.5), r"threshold=1.5"),
    (dict(threshold=-0.1), r"threshold=-0.1"),
    (dict(mask_id=64), r"mask_id=64"),
    (dict(eos_id=-1), r"eos_id=-1"),
    (dict(prompts=[[1, 99]]), r"99"),
    (dict(prompts=[5, 6, 7]), r"prompts\[0\] must be a 1-D sequence.*\[ids\]"),
    (dict(prompts=[[[1, 2]]]), r"prompts\[0\] must be a 1-D sequence"),
    (dict(prompts=[[1.5, 2.0]]), r"integer token ids"),
    (dict(steps=0), r"steps=0"),
    (dict(temperature=-1.0), r"temperature=-1.0"),
    (dict(top_p=0.0, temperature=1.0), r"top_p=0.0"),
])
def test_bad_input_raises(kw, match):
    args = dict(prompts=[PROMPT], gen_length=8, block_size=L, threshold=0.9, mask_id=MASK, eos_id=62)
    args.update(kw)
    prompts = args.pop("prompts")
    with pytest.raises(ValueError, match=match):
        generate(confident_model(0), prompts, **args)


def test_mask_id_defaults_to_the_config_and_eos_none_never_stops():
    model = constant_model({62: 0.99})  # EOS is every position's argmax
    model.config = CFG.replace(mask_token_id=MASK)
    explicit = generate(model, [PROMPT], gen_length=8, block_size=L, mask_id=MASK, eos_id=62)
    default = generate(model, [PROMPT], gen_length=8, block_size=L, eos_id=62)
    assert default.tokens == explicit.tokens == [[62]]
    endless = generate(model, [PROMPT], gen_length=8, block_size=L, eos_id=None)
    assert endless.tokens == [[62] * 8]
    no_mask = Transformer(CFG, rngs=nnx.Rngs(0))  # CFG has no mask_token_id
    with pytest.raises(ValueError, match=r"no \[MASK\] token"):
        generate(no_mask, [PROMPT], gen_length=8, block_size=L, eos_id=62)


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = confident_model(0)
    kw = dict(gen_length=24, block_size=L, threshold=0.9, mask_id=MASK, eos_id=62)
    # top-k = 1 leaves one token with probability 1: every position passes any threshold < 1, as
    # in greedy decoding with threshold 0
    top1 = generate(model, [PROMPT], temperature=1.0, top_k=1, rng=jax.random.PRNGKey(3), **kw)
    assert top1.tokens == generate(model, [PROMPT], **{**kw, "threshold": 0.0}).tokens
    a = generate(model, [PROMPT], temperature=1.5, top_p=0.9, rng=jax.random.PRNGKey(5), **kw)
    b = generate(model, [PROMPT], temperature=1.5, top_p=0.9, rng=jax.random.PRNGKey(5), **kw)
    assert a.tokens == b.tokens and MASK not in a.tokens[0]
    # the cache changes no draw: keys come from (row, block, step, position), not the forward count
    uncached = generate(model, [PROMPT], temperature=1.5, top_p=0.9, rng=jax.random.PRNGKey(5), use_cache=False, **kw)
    assert uncached.tokens == a.tokens
    assert a.tokens != generate(model, [PROMPT], temperature=1.5, top_p=0.9, rng=jax.random.PRNGKey(6), **kw).tokens


_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, json
    from flax import nnx
    from llada2_jax.training import mesh as mesh_lib, sharding
    from llada2_jax.inference import generate
    from tests.test_inference_decode import confident_model, PROMPT, MASK, L
    model = confident_model(0)
    kw = dict(gen_length=24, block_size=L, threshold=0.9, mask_id=MASK, eos_id=62)
    plain = generate(model, [PROMPT, PROMPT[:5]], **kw).tokens
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    specs = sharding.named(sharding.state_specs(state, dict(mesh.shape)), mesh)
    model = nnx.merge(graphdef, nnx.State(jax.device_put(nnx.to_pure_dict(state), specs)))
    assert len(model.dense_layers.wq[...].sharding.device_set) == 8
    print(json.dumps(generate(model, [PROMPT, PROMPT[:5]], **kw).tokens == plain))
""")


def test_sharded_model_gives_the_same_tokens():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _SHARDED], cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "tests")]),
                              "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "true"
