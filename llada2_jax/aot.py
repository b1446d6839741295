"""Ahead-of-time compile a run's real train step for a TPU topology, on a machine without a TPU.

    python -m llada2_jax.aot --config=experiments/flash_wsd.py --topology=v5p-512
    python -m llada2_jax.aot --config=experiments/mini_dpo.py --topology=v5e-256 \
        --config.model.runtime.remat_policy=full --config.train.grad_accum=2

With libtpu installed, JAX can describe a TPU slice (`jax.experimental.topologies`) and compile for
its devices without the hardware. This builds the run's mesh on those devices, the training stage
and its `Trainer` exactly as `training.run.make_trainer` does (stage objective, optimizer,
shardings, remat policy, donation), and lowers and compiles the jitted train step on abstract
inputs (`jax.ShapeDtypeStruct`s carrying their shardings), so no weight is ever allocated. The
compiled executable's memory analysis gives the per-chip bytes (XLA:TPU also refuses to compile a
step that does not fit the chip's HBM); its cost analysis the FLOPs per step.

The repo picks its TPU kernels (Pallas attention, megablox grouped matmul) from
`jax.default_backend()`, which is "cpu" here; it answers "tpu" while the step is traced, so the same
kernels as on the pod are compiled. No `jax.set_mesh`: the step finds its mesh on the argument
shardings, as the trainer's jit does, and eager work done while tracing stays on the CPU.

Topology names are Cloud TPU accelerator types (`v5p-512` = 256 v5p chips: v4/v5p names count
TensorCores, two per chip; v5e/v6e names count chips) or libtpu's own (`v5:4x8x8`). Config fields
are overridden as in `llada2_jax.main` (`--config.train.batch_size=...`); `--config.smoke=True`
applies the experiment's smoke sizes. Exit status 0 when the step compiled, 1 when it did not (out
of memory included), 2 for a mistake on the command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import sys
import tempfile
import time
from unittest import mock

from absl import app, flags

from llada2_jax import main as main_lib  # the --config / --workdir flags and their parsing

GiB = 2**30

_TOPOLOGY = flags.DEFINE_string("topology", "v5p-512", "TPU slice to compile for (see llada2_jax.aot.TOPOLOGIES, "
                                "or a libtpu name such as v5e:2x2)")
_JSON_OUT = flags.DEFINE_string("json_out", "", "also write the measurements to this JSON file")
_SEGMENT = flags.DEFINE_string("segment", "longest", "which step of the stage: 'longest' (the largest block "
                               "size) or a segment name (e.g. warmup_32, decay_2048)")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as libtpu describes it, and the HBM of one of its chips."""
    name: str
    libtpu_name: str
    chips: int
    hbm_gib: float
    chip_config: str = "default"
    host_bounds: tuple = (2, 2, 1)
    wrap: tuple = (False, False, False)

    def describe(self):
        # compile-only: no need for libtpu's one-process-per-host lock (another compile may hold it)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        from jax.experimental import topologies
        return topologies.get_topology_desc(topology_name=self.libtpu_name, platform="tpu",
                                            chip_config_name=self.chip_config,
                                            chips_per_host_bounds=self.host_bounds, wrap=self.wrap)


# Per-chip HBM from the Cloud TPU system pages (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB).
_HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}


def _slices() -> dict[str, Topology]:
    out = {}
    for gen, libtpu_gen, shapes in (("v5e", "v5e", ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
                                    ("v6e", "v6e", ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"))):
        for shape in shapes:
            chips = math.prod(int(n) for n in shape.split("x"))
            wrap = (chips >= 256, chips >= 128, False)
            out[f"{gen}-{chips}"] = Topology(f"{gen}-{chips}", f"{libtpu_gen}:{shape}", chips, _HBM_GIB[gen],
                                             wrap=wrap)
    for gen, libtpu_gen, shapes in (("v4", "v4", ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8")),
                                    ("v5p", "v5", ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8"))):
        for shape in shapes:
            chips = math.prod(int(n) for n in shape.split("x"))
            wrap = (True, True, True) if chips >= 64 else (False, False, False)
            out[f"{gen}-{2 * chips}"] = Topology(f"{gen}-{2 * chips}", f"{libtpu_gen}:{shape}", chips,
                                                 _HBM_GIB[gen], chip_config="megacore", wrap=wrap)
    return out


TOPOLOGIES = _slices()


def resolve_topology(name: str) -> Topology:
    """A known accelerator type, or a libtpu topology name (`v5e:2x2`, `v5:2x2x1`) with default settings."""
    if name in TOPOLOGIES:
        return TOPOLOGIES[name]
    for topo in TOPOLOGIES.values():
        if topo.libtpu_name == name:
            return topo
    raise ValueError(f"--topology={name!r}: unknown TPU slice; known: {', '.join(TOPOLOGIES)} "
                     f"(or their libtpu names, e.g. v5e:2x2, v5:4x8x8)")


@contextlib.contextmanager
def tpu_backend():
    """Make the repo's kernel dispatch (`jax.default_backend()`) answer "tpu" while tracing."""
    import jax
    with mock.patch.object(jax, "default_backend", lambda: "tpu"):
        yield


# ------------------------------------------------------------------ the stage and its inputs
def training_stage_name(config) -> str:
    """The first training stage of `config.stages` (merge / eval do not train)."""
    from llada2_jax.training import stages as stages_lib
    from llada2_jax.training.run import stage_names
    for name in stage_names(config):
        cls = stages_lib.get_stage(name)
        if issubclass(cls, stages_lib.TrainStage):
            return name
    raise ValueError(f"stages={config.stages!r} has no training stage to compile")


def build_stage(config, mesh, workdir: str, name: str | None = None):
    """The training stage `name` as `training.run.Run.context` builds it, without tokenizer or data.

    The architecture comes from the config alone (`model.source=init` with `model.arch`, as the
    pod configs ship, or a source's header); nothing is read from a corpus and no weight is made.
    """
    from llada2_jax.training import dry_run
    from llada2_jax.training import model_source as ms
    from llada2_jax.training.context import RunData, RunPaths, StageContext
    from llada2_jax.training.run import stage_names, train_settings
    from llada2_jax.training.stages import get_stage

    name = name or training_stage_name(config)
    model_config = dry_run._model_config(config)
    if model_config.mask_token_id is None:  # a tokenizer would add it (smoke sizes); any id compiles the same
        model_config = dataclasses.replace(model_config, mask_token_id=model_config.vocab_size - 1)
    layout = ms.ModelLayout.build(model_config, dict(mesh.shape), config.train.frozen_layers)
    data = RunData(tokenizer=None, documents=None, gym_chats=None, corpora=str(config.data.corpora),
                   seq_len=config.data.seq_len, align_to_block=config.data.align_to_block,
                   batch_size=config.train.batch_size, eval_batch_size=config.train.eval_batch_size,
                   eval_batches=config.train.eval_batches)

    def no_weights():
        raise RuntimeError("the AOT compile never builds weights")

    ctx = StageContext(name=name, cfg=config[name], seed=config.seed, order=tuple(stage_names(config)),
                       model_config=model_config, mesh=mesh, layout=layout, data=data, paths=RunPaths(workdir),
                       settings=dataclasses.replace(train_settings(config), async_checkpoints=False),
                       optimizer=dict(config.optimizer), logger=None, init_weights=no_weights, init_workdir=None)
    return get_stage(name)(ctx)


def abstract_batch(stage, batch_size: int, seq_len: int, sharding) -> dict:
    """One global training batch as the stage's data pipeline yields it, abstract and sharded.

    Corpus, SFT and CAP rows carry `pipeline.BATCH_KEYS`; DPO rows a chosen and a rejected side
    (`data.preference`) plus both sides' segment ids side by side (what the trainer counts tokens of).
    """
    import jax
    import jax.numpy as jnp
    from llada2_jax.data import pipeline, preference
    from llada2_jax.training.stages.dpo import DPO

    dtypes = {"tokens": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32, "loss_mask": jnp.bool_}
    assert set(dtypes) == set(pipeline.BATCH_KEYS)

    def sds(width, dtype):
        return jax.ShapeDtypeStruct((batch_size, width), dtype, sharding=sharding)

    if isinstance(stage, DPO):
        batch = {f"{side}_{k}": sds(seq_len, dt) for side in preference.SIDES for k, dt in dtypes.items()}
        batch["segment_ids"] = sds(2 * seq_len, jnp.int32)
        return batch
    return {k: sds(seq_len, dt) for k, dt in dtypes.items()}


def pick_segment(stage, which: str):
    segments = stage.segments()
    if which == "longest":
        return max(segments, key=lambda s: s.block_size)  # the first of the largest block size
    for seg in segments:
        if seg.name == which:
            return seg
    raise ValueError(f"--segment={which!r}: the stage {stage.name!r} has segments "
                     f"{', '.join(s.name for s in segments)} (or 'longest')")


def abstract_state(trainer):
    """The train state as abstract arrays carrying the trainer's shardings."""
    import jax
    from llada2_jax.training.state import init_state
    shapes = jax.eval_shape(lambda p, b: init_state(p, b, trainer.tx), *trainer.abstract_weights)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, trainer.shardings)


def shard_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree (the largest shard, i.e. an even split rounded up)."""
    import jax
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def model_flops(stage, batch_size: int, seq_len: int, block_size: int) -> float:
    """Matmul FLOPs of one training step over the whole slice (2 per multiply-add).

    Each row is the `[x_t ; x_0]` sequence of 2L tokens: projections, dense MLP / router + k routed +
    shared experts per token; attention over the (q, k) pairs the block-diffusion mask allows
    (L*b + L^2 of 4L^2: x_t sees its own block and earlier clean blocks, x_0 is block-causal); the
    head on the L noisy rows (an upper bound: the loss skips rows without a target). Backward = 2 x
    forward; remat recomputation is not counted. SFT/CAP with complementary masking feed 2B rows;
    DPO feeds chosen + rejected rows to the policy (fwd + bwd) and to the frozen reference (fwd).
    XLA's cost analysis cannot give this: it counts each loop body (the layer scan) once.
    """
    from llada2_jax.training.stages.dpo import DPO
    mc = stage.ctx.model_config
    d, hd, layers = mc.hidden_size, mc.resolved_head_dim, mc.num_hidden_layers
    proj = d * hd * (2 * mc.num_attention_heads + 2 * mc.num_key_value_heads)
    moe_layers = layers - mc.num_dense_layers if mc.is_moe else 0
    moe = d * mc.num_experts + 3 * d * mc.moe_intermediate_size * (mc.num_experts_per_tok + mc.num_shared_experts) \
        if mc.is_moe else 0
    per_token = layers * proj + (layers - moe_layers) * 3 * d * mc.intermediate_size + moe_layers * moe
    allowed = seq_len * block_size + seq_len * seq_len
    row = 2 * (2 * seq_len * per_token + 2 * allowed * mc.num_attention_heads * hd * layers
               + seq_len * d * mc.vocab_size)
    dpo = isinstance(stage, DPO)
    rows = batch_size * (2 if dpo or stage.cfg.get("complementary", False) else 1)
    return (3 + (1 if dpo else 0)) * rows * row


# ------------------------------------------------------------------ compile and measure
@dataclasses.dataclass
class AotResult:
    topology: Topology
    device_kind: str
    mesh: dict
    stage: str
    segment: str
    block_size: int
    batch_size: int
    seq_len: int
    grad_accum: int
    remat_policy: str
    lower_s: float = 0.0
    compile_s: float = 0.0
    error: str = ""  # empty when the step compiled
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    flops: float = 0.0  # XLA's cost analysis of one chip's program (loop bodies counted once)
    model_flops: float = 0.0  # `model_flops` of the step, whole slice
    tpu_kernels: int = 0
    state_bytes: int = 0  # the abstract train state's per-device bytes (from the shardings)
    batch_bytes: int = 0
    estimate_bytes: int = 0  # dry_run's params + optimizer (+ the DPO reference)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["topology"] = dataclasses.asdict(self.topology)
        out.update(total_bytes=self.total_bytes, hbm_bytes=self.hbm_bytes,
                   compiled_state_bytes=self.compiled_state_bytes,
                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return out

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def total_bytes(self) -> int:
        """What the step holds at its peak: inputs, outputs not aliased onto donated inputs, temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def hbm_bytes(self) -> int:
        return int(self.topology.hbm_gib * GiB)

    @property
    def compiled_state_bytes(self) -> int:
        """Params + buffers + optimizer state per chip as the executable lays out its arguments."""
        return self.argument_bytes - self.batch_bytes


def estimate_bytes(config, num_devices: int, stage) -> int:
    """`dry_run.plan`'s params + optimizer bytes; DPO adds its frozen reference (one more params copy)."""
    from llada2_jax.training import dry_run
    from llada2_jax.training.stages.dpo import DPO
    plan = dry_run.plan(config, num_devices)
    return plan["total_bytes"] + (plan["param_bytes"] if isinstance(stage, DPO) else 0)


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    hbm = [ln for ln in lines if "hbm" in ln.lower() or "memory" in ln.lower()]
    return f"{type(e).__name__}: {(hbm or lines or [''])[0][:400]}"


def compile_step(config, topology: Topology, segment: str = "longest", devices=None) -> AotResult:
    """Lower and compile `config`'s train step for `topology` (or for `devices`, already described)."""
    import jax
    from llada2_jax.training import mesh as mesh_lib
    from llada2_jax.training import sharding as shd
    from llada2_jax.training.run import make_trainer

    devices = list(topology.describe().devices if devices is None else devices)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    with tempfile.TemporaryDirectory(prefix="llada2_aot_") as workdir:
        stage = build_stage(config, mesh, workdir)
        seg = pick_segment(stage, segment)
        trainer = make_trainer(stage)  # the real step: objective, optimizer, shardings, remat, donation
        trainer.checkpointer.close()
        result = AotResult(topology=topology, device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
                           stage=stage.name, segment=seg.name, block_size=seg.block_size,
                           batch_size=config.train.batch_size, seq_len=config.data.seq_len,
                           grad_accum=config.train.grad_accum,
                           remat_policy=str(config.model.runtime.get("remat_policy", "none")),
                           estimate_bytes=estimate_bytes(config, len(devices), stage))
        result.model_flops = model_flops(stage, config.train.batch_size, config.data.seq_len, seg.block_size)
        batch = abstract_batch(stage, config.train.batch_size, config.data.seq_len,
                               jax.sharding.NamedSharding(mesh, shd.batch_spec()))
        state = abstract_state(trainer)
        key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: stage.ctx.rng).dtype,
                                   sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        result.state_bytes, result.batch_bytes = shard_bytes(state), shard_bytes(batch) + shard_bytes(key)
        step = trainer._step_for(seg)
        t0 = time.perf_counter()
        try:
            with tpu_backend():
                lowered = step.lower(state, batch, key)
            result.lower_s = time.perf_counter() - t0
            print(f"[aot] lowered in {result.lower_s:.1f}s; compiling for {len(devices)} x "
                  f"{result.device_kind}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            compiled = lowered.compile()
            result.compile_s = time.perf_counter() - t0
        except Exception as e:  # out of HBM, or a lowering the TPU compiler rejects
            result.compile_s = time.perf_counter() - t0 - result.lower_s
            result.error = _first_line(e)
            return result
    mem = compiled.memory_analysis()
    result.argument_bytes = int(mem.argument_size_in_bytes)
    result.output_bytes = int(mem.output_size_in_bytes)
    result.alias_bytes = int(mem.alias_size_in_bytes)
    result.temp_bytes = int(mem.temp_size_in_bytes)
    result.code_bytes = int(mem.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result.flops = float((cost or {}).get("flops", 0.0))
    result.tpu_kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    return result


def human_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def report(r: AotResult) -> str:
    g = human_bytes
    mesh = " x ".join(f"{a}={n}" for a, n in r.mesh.items())
    head = [f"[aot] {r.topology.name} ({r.topology.libtpu_name}): {r.topology.chips} x {r.device_kind}, "
            f"HBM {r.topology.hbm_gib:g} GiB per chip; mesh {mesh}",
            f"[aot] stage {r.stage!r}, segment {r.segment!r} (block {r.block_size}); global batch {r.batch_size} "
            f"rows x {r.seq_len} tokens, grad_accum {r.grad_accum}, remat {r.remat_policy}"]
    if not r.ok:
        return "\n".join(head + [f"[aot] did not compile (lower {r.lower_s:.1f}s, compile {r.compile_s:.1f}s): "
                                 f"{r.error}"])
    diff = (r.compiled_state_bytes - r.estimate_bytes) / max(r.estimate_bytes, 1)
    return "\n".join(head + [
        f"[aot] per chip: arguments {g(r.argument_bytes)} + outputs {g(r.output_bytes)} - aliased "
        f"{g(r.alias_bytes)} + temporaries {g(r.temp_bytes)} + code {g(r.code_bytes)} = {g(r.total_bytes)} "
        f"({100 * r.total_bytes / r.hbm_bytes:.1f} % of {r.topology.hbm_gib:g} GiB HBM)",
        f"[aot] params + optimizer per chip: compiled {g(r.compiled_state_bytes)} vs dry-run estimate "
        f"{g(r.estimate_bytes)} ({100 * diff:+.1f} %)",
        f"[aot] model FLOPs per step: {r.model_flops:.3e} ({r.model_flops / r.topology.chips:.3e} per chip); "
        f"XLA cost analysis of one chip's program: {r.flops:.3e} (each loop body once; Pallas kernels only "
        f"by their declared cost); {r.tpu_kernels} TPU kernel calls",
        f"[aot] lower {r.lower_s:.1f}s, compile {r.compile_s:.1f}s",
    ])


def main(argv) -> int:
    del argv
    config = flags.FLAGS.config
    from ml_collections import config_flags
    from llada2_jax.training.validate import resolve_config, validate_config
    try:
        topology = resolve_topology(_TOPOLOGY.value)
        if config.smoke:
            main_lib.apply_smoke(config, keep=set(config_flags.get_override_values(flags.FLAGS["config"])))
        config = resolve_config(config)
        validate_config(config, topology.chips)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        devices = topology.describe().devices
    except Exception as e:  # no libtpu, or it cannot describe this slice
        print(f"aot: cannot describe TPU topology {topology.libtpu_name!r} (is libtpu installed?): "
              f"{_first_line(e)}", file=sys.stderr, flush=True)
        return 1
    try:
        result = compile_step(config, topology, _SEGMENT.value, devices)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    print(report(result), flush=True)
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(result.to_json(), f, indent=1)
    return 0 if result.ok else 1


def entry() -> None:
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=main_lib.parse_flags)


if __name__ == "__main__":
    entry()
