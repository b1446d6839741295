"""`inference.trace_decode` (the step-by-step decoder the notebook draws) against `generate`."""
import numpy as np
import pytest
from test_inference_decode import MASK, PROMPT, confident_model

from llada2_jax.inference import generate
from llada2_jax.inference.trace import trace_decode


@pytest.mark.parametrize("seed,threshold,steps,eos", [(0, 0.9, None, None), (1, 0.5, 4, 0), (2, 0.0, 2, 9)])
def test_trace_matches_generate(seed, threshold, steps, eos):
    model = confident_model(seed)
    kw = dict(gen_length=21, block_size=8, threshold=threshold, steps=steps, mask_id=MASK, eos_id=eos)
    trace = trace_decode(model, PROMPT, **kw)
    uncached = generate(model, [PROMPT], use_cache=False, **kw)  # cached == uncached: test_inference_decode
    assert trace.tokens == uncached.tokens[0]
    if eos is not None:  # these seeds produce the EOS id early, so the stop path is exercised
        assert trace.tokens[-1] == eos and len(trace.tokens) < 21
    assert trace.forwards == uncached.forwards  # one recorded step per forward of the uncached path
    order = trace.commit_step()
    p = len(PROMPT)
    assert (order[:p] == -1).all() and (order[p:p + len(trace.tokens)] >= 0).all()
    committed = sorted(pos for s in trace.steps for pos in s.positions)
    assert committed == list(range(p, p + len(committed)))  # whole blocks, none twice
    assert len(committed) >= len(trace.tokens)
    for s in trace.steps:  # each step commits within its block, at least one token, the recorded ids
        assert s.positions and all(pos // 8 == s.block for pos in s.positions)
        assert [trace.canvas[pos] for pos in s.positions] == s.tokens
    assert np.all(np.diff([s.block for s in trace.steps]) >= 0)


def test_trace_rejects_bad_input():
    with pytest.raises(ValueError, match="gen_length"):
        trace_decode(confident_model(0), PROMPT, gen_length=0, mask_id=MASK, eos_id=None)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        trace_decode(confident_model(0), PROMPT, gen_length=1000, mask_id=MASK, eos_id=None)
