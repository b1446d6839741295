"""Ahead-of-time compilation of the real train step for a TPU topology (`llada2_jax.aot`).

The abstract batch the step is compiled for is checked against the batches the real data pipelines
yield (no libtpu needed). The compile itself needs libtpu (`bash bench/aot_table.sh` installs it in a
throw-away venv); without it those tests are skipped with the reason.
"""
import dataclasses
import importlib.util
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llada2_jax import aot
from llada2_jax.configs import mini
from llada2_jax.data import corpora, pipeline, preference, sft
from llada2_jax.data.tokenizers import SentencePieceTokenizer
from llada2_jax.main import apply_smoke
from llada2_jax.training import mesh as mesh_lib
from llada2_jax.training.validate import resolve_config

SEQ_LEN, ROWS, BLOCK = 64, 2, 8


def _topology_or_skip(name: str):
    """The described devices of `name`, or a skip naming why libtpu cannot provide them."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (bash bench/aot_table.sh installs it in a throw-away venv)")
    topology = aot.resolve_topology(name)
    try:
        return topology, topology.describe().devices
    except Exception as e:  # a libtpu that does not match this jax, or cannot describe the slice
        pytest.skip(f"libtpu cannot describe {topology.libtpu_name}: {type(e).__name__}: {str(e)[:200]}")


def smoke_config(stage: str, **train):
    config = mini.get_config(stage)
    apply_smoke(config)
    with config.unlocked():
        config.train.update(train)
    return resolve_config(config)


# ------------------------------------------------ the abstract batch is what the pipelines yield
@pytest.fixture(scope="module")
def tok():
    docs = corpora.load_corpus("stdlib", max_bytes=60_000)
    return SentencePieceTokenizer.train(corpora.texts(docs), vocab_size=400)


def _pipeline_batch(kind: str, tok) -> dict:
    if kind == "wsd":
        docs = corpora.load_corpus("stdlib", max_bytes=20_000)
        ds = pipeline.pretrain_dataset(docs, tok, seq_len=SEQ_LEN, batch_size=ROWS, seed=0, align_to_block=BLOCK,
                                       num_epochs=1)
        return next(iter(ds))
    if kind == "sft":
        chats = [[{"role": "user", "content": f"what is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]
                 for i in range(8)]
        return next(iter(sft.sft_dataset(chats, tok, seq_len=SEQ_LEN, batch_size=ROWS, block_size=BLOCK,
                                         seed=0, num_epochs=1).dataset))
    pairs = [{"prompt": f"{i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(8)]
    batch = next(iter(preference.preference_dataset(pairs, tok, seq_len=SEQ_LEN, batch_size=ROWS,
                                                    block_size=BLOCK, seed=0).dataset))
    # what DPO.dataset adds for the trainer's token count
    return {**batch, "segment_ids": np.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]], -1)}


@pytest.mark.parametrize("kind", ["wsd", "sft", "dpo"])
def test_abstract_batch_matches_the_data_pipeline(kind, tok):
    config = smoke_config(kind)
    mesh = mesh_lib.make_mesh(dict(data=1), jax.devices()[:1])
    stage = aot.build_stage(config, mesh, "/nonexistent")
    got = aot.abstract_batch(stage, ROWS, SEQ_LEN, NamedSharding(mesh, P()))
    real = _pipeline_batch(kind, tok)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in got.items()} == \
           {k: (np.shape(v), np.asarray(v).dtype) for k, v in real.items()}


def test_unknown_topology_is_one_line_error():
    experiment = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "mini_wsd.py"
    out = subprocess.run([sys.executable, "-m", "llada2_jax.aot", f"--config={experiment}", "--topology=v9-1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("config error: --topology='v9-1': unknown TPU slice")


def test_topology_names_follow_cloud_counting():
    """v4/v5p accelerator types count TensorCores (2 per chip), v5e/v6e count chips."""
    for name, topo in aot.TOPOLOGIES.items():
        gen, count = name.split("-")
        dims = [int(n) for n in topo.libtpu_name.split(":")[1].split("x")]
        assert topo.chips == int(np.prod(dims))
        assert int(count) == topo.chips * (2 if gen in ("v4", "v5p") else 1)
    assert aot.resolve_topology("v5:4x8x8") is aot.TOPOLOGIES["v5p-512"]


# ------------------------------------------------ compiling (needs libtpu)
def test_tiny_moe_train_step_compiles_for_v5e():
    """The tiny Bailing MoE (mini's smoke sizes) WSD step, 4 data-parallel v5e chips, 2 micro-batches."""
    topology, devices = _topology_or_skip("v5e-4")
    config = smoke_config("wsd", grad_accum=2, batch_size=8)
    r = aot.compile_step(config, topology, "longest", devices)
    assert r.ok, r.error
    assert (r.stage, r.block_size, r.mesh["data"]) == ("wsd", config.data.seq_len, 4)  # the MDLM phase
    # megablox grouped matmuls of the routed experts were lowered as TPU kernels
    assert r.tpu_kernels > 0
    # the train state is an argument; TPU tiling can only pad it beyond the sharded shapes' bytes
    assert r.state_bytes <= r.compiled_state_bytes <= 4 * r.state_bytes + 2**20
    # the donated state comes back in place: outputs alias (almost) all of it
    assert r.alias_bytes >= 0.9 * r.state_bytes
    assert r.flops > 0 and 0 < r.total_bytes < r.hbm_bytes


def test_step_that_cannot_fit_is_reported_not_raised():
    """A batch far beyond a v5e chip's 16 GiB: the TPU compiler refuses it, the result says why."""
    topology, devices = _topology_or_skip("v5e-4")
    config = smoke_config("wsd", batch_size=4 * 4096)
    with config.unlocked():
        config.data.seq_len = 4096
        config.wsd.warmup_sizes = (32,)
        config.wsd.decay_min = 32
    r = aot.compile_step(config, dataclasses.replace(topology), "warmup_32", devices)
    assert not r.ok and "memory" in r.error.lower(), r.error
