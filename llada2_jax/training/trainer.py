"""The one training loop: jitted sharded steps, metrics, evaluation, checkpoints, graceful stop.

A stage (see `training.stages`) supplies what differs between AR pretraining, each WSD phase,
SFT, ...: its `segments()` (runs of steps sharing one compiled step function, e.g. one per block
size), `loss(segment, model, batch, rng, step)`, `evaluate(segment, model, batch, rng)` and its
data. Everything else lives here, once; `Evaluator` is the held-out half, which merge and the
final evaluation use without a trainer.

Determinism: the step RNG is `fold_in(base_key, step)` and the Grain iterator state is saved with
the weights, so a run killed at any point and restarted from its last checkpoint replays exactly
the same steps.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from llada2_jax.model.moe import update_expert_bias
from llada2_jax.training import sharding as shd
from llada2_jax.training.checkpoint import Checkpointer
from llada2_jax.training.metrics import MetricsLogger, Progress
from llada2_jax.training.state import TrainState, init_state
from llada2_jax.workdir import merge_model


@dataclasses.dataclass(frozen=True)
class Segment:
    """Consecutive steps that share one compiled step (a WSD phase, or a whole AR stage)."""
    name: str
    steps: int
    block_size: int  # 0 when the stage has no block structure (AR)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    batch_size: int
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at segment ends
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_nonfinite_streak: int = 10
    stop_after_steps: int = 0  # >0: checkpoint and stop (Preempted) after this many steps of one invocation
    frozen_layers: int = 0  # bottom layers neither gradient nor optimizer touches (`training.freeze`)
    async_checkpoints: bool = True


class Preempted(Exception):
    """Raised after a SIGTERM once the checkpoint is safely on disk (the caller exits 0)."""


class NonFiniteLoss(RuntimeError):
    pass


class _StopFlag:
    """SIGTERM sets a flag; the loop saves and stops at the next step boundary."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.raised
        return bool(multihost_utils.process_allgather(np.array(self.raised)).any())


def _mean_over_micro(tree):
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def _load_balance(expert_load):
    """max / mean expert load per MoE layer, averaged over layers (1.0 = perfectly balanced)."""
    return jnp.mean(jnp.max(expert_load, -1) / jnp.maximum(jnp.mean(expert_load, -1), 1e-9))


def device_batch(host_batch: dict, sharding) -> dict:
    """Host arrays (this process's rows) -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in host_batch.items()}


class Evaluator:
    """A stage's held-out metrics: one jitted evaluation per block size, the same noise every call."""

    def __init__(self, stage, mesh, graphdef, weight_shardings: tuple, base_key):
        self.stage, self.graphdef, self.base_key = stage, graphdef, base_key
        self._weight_shardings = weight_shardings
        self._batch_sharding = NamedSharding(mesh, shd.batch_spec())
        self._replicated = NamedSharding(mesh, P())
        self._compiled: dict[int, Any] = {}

    def _eval_fn(self, segment: Segment):
        stage, graphdef = self.stage, self.graphdef

        def eval_fn(params, buffers, batch, key):
            return stage.evaluate(segment, merge_model(graphdef, params, buffers), batch, key)

        return jax.jit(eval_fn, in_shardings=(*self._weight_shardings, self._batch_sharding, self._replicated),
                       out_shardings=self._replicated)

    def __call__(self, params, buffers, segment: Segment, heldout: list) -> dict:
        """Held-out metrics averaged over the fixed held-out batches."""
        if segment.block_size not in self._compiled:  # warm-up and stable at L share one function
            self._compiled[segment.block_size] = self._eval_fn(segment)
        fn = self._compiled[segment.block_size]
        eval_key = jax.random.fold_in(self.base_key, 0x5EED)
        sums: dict[str, float] = {}
        for i, batch in enumerate(heldout):
            out = jax.device_get(fn(params, buffers, device_batch(batch, self._batch_sharding),
                                    jax.random.fold_in(eval_key, i)))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return self.stage.summarize_eval(sums)


class Trainer:
    """Runs one training stage to completion (or until SIGTERM)."""

    def __init__(self, *, stage, mesh, graphdef, shardings: TrainState, tx: optax.GradientTransformation,
                 schedule: Callable, settings: TrainSettings, checkpointer: Checkpointer,
                 logger: MetricsLogger, base_key, init_weights: Callable[[], tuple[dict, dict]],
                 abstract_weights: tuple[dict, dict]):
        self.stage, self.mesh, self.graphdef = stage, mesh, graphdef
        self.shardings, self.tx, self.schedule, self.settings = shardings, tx, schedule, settings
        self.checkpointer, self.logger = checkpointer, logger
        self.base_key = base_key
        self.init_weights, self.abstract_weights = init_weights, abstract_weights
        self.segments = stage.segments()
        self.total_steps = sum(s.steps for s in self.segments)
        self._steps: dict[int, Any] = {}  # compiled per block size
        self.evaluate = Evaluator(stage, mesh, graphdef, (shardings.params, shardings.buffers), base_key)
        divisor = shd.batch_divisor(dict(mesh.shape))
        if settings.batch_size % (divisor * settings.grad_accum):
            raise ValueError(f"train.batch_size={settings.batch_size} must be a multiple of "
                             f"grad_accum={settings.grad_accum} x batch-sharding devices={divisor}")
        self._batch_sharding = NamedSharding(mesh, shd.batch_spec())
        self._replicated = NamedSharding(mesh, P())

    # ---------------- jitted functions ----------------
    def _micro_batches(self, batch):
        """(B, ...) -> (accum, B/accum, ...) such that every micro-batch spans all data shards."""
        accum = self.settings.grad_accum

        def split(x):
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
            spec = P(None, shd.BATCH_AXES, *([None] * (x.ndim - 2)))
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

        return jax.tree.map(split, batch)

    def _train_step_fn(self, segment: Segment):
        stage, graphdef, tx, schedule = self.stage, self.graphdef, self.tx, self.schedule
        accum, bias_rate = self.settings.grad_accum, stage.expert_bias_rate

        def step_fn(state: TrainState, batch, base_key):
            rng = jax.random.fold_in(base_key, state.step)

            def loss_fn(params, micro, key):
                model = merge_model(graphdef, params, state.buffers)
                return stage.loss(segment, model, micro, key, state.step)

            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

            def body(grad_sum, xs):
                micro, i = xs
                (loss, metrics), grads = grad_fn(state.params, micro, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

            if accum == 1:  # no accumulation buffer: no params-sized zeros and adds (same key as micro-batch 0)
                (loss, metrics), grads = grad_fn(state.params, batch, jax.random.fold_in(rng, 0))
            else:
                zeros = jax.tree.map(jnp.zeros_like, state.params)
                grad_sum, (losses, metrics) = jax.lax.scan(
                    body, zeros, (self._micro_batches(batch), jnp.arange(accum)))
                grads = jax.tree.map(lambda g: g / accum, grad_sum)
                loss = jnp.mean(losses)
                metrics = _mean_over_micro(metrics)
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            keep = lambda new, old: jnp.where(finite, new, old)
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
            buffers = state.buffers
            load = metrics.pop("expert_load", None)
            out = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                   "lr": schedule(state.step - state.nonfinite)}
            if load is not None:
                out["moe_max_over_mean_load"] = _load_balance(load)
                if bias_rate and "expert_bias" in buffers.get("moe_layers", {}):
                    bias = buffers["moe_layers"]["expert_bias"]
                    new_bias = keep(update_expert_bias(bias, load, bias_rate), bias)
                    buffers = {**buffers, "moe_layers": {**buffers["moe_layers"], "expert_bias": new_bias}}
            out.update(metrics)
            bad = (~finite).astype(jnp.int32)
            new_state = TrainState(params, buffers, opt_state, state.step + 1, state.nonfinite + bad,
                                   (state.streak + bad) * bad)
            out["streak"] = new_state.streak
            return new_state, out

        return jax.jit(step_fn, in_shardings=(self.shardings, self._batch_sharding, self._replicated),
                       out_shardings=(self.shardings, self._replicated), donate_argnums=(0,))

    def _step_for(self, segment: Segment):
        """One compiled step per block size (e.g. warm-up and stable at L share it)."""
        if segment.block_size not in self._steps:
            self._steps[segment.block_size] = self._train_step_fn(segment)
        return self._steps[segment.block_size]

    # ---------------- helpers ----------------

    def segment_at(self, step: int) -> tuple[int, Segment]:
        end = 0
        for i, seg in enumerate(self.segments):
            end += seg.steps
            if step < end:
                return i, seg
        return len(self.segments) - 1, self.segments[-1]

    def _segment_end(self, index: int) -> int:
        return sum(s.steps for s in self.segments[:index + 1])

    def _meta(self, state_step: int) -> dict:
        _, seg = self.segment_at(max(state_step - 1, 0))
        return {"stage": self.stage.name, "step": state_step, "phase": seg.name,
                "block_size": seg.block_size, "total_steps": self.total_steps,
                "base_key": np.asarray(jax.random.key_data(self.base_key)).tolist()}

    def _save(self, state: TrainState, data_iterator) -> None:
        step = int(state.step)
        if step != self.checkpointer.latest_step():
            self.checkpointer.save(step, state, self._meta(step), data_iterator)

    # ---------------- the loop ----------------
    def initial_state(self, data_iterator) -> TrainState:
        """Resume from the latest checkpoint of this stage, or start from `init_weights()`."""
        latest = self.checkpointer.latest_step()
        if latest is None:
            params, buffers = self.init_weights()
            make = jax.jit(lambda p, b: init_state(p, b, self.tx), out_shardings=self.shardings)
            return make(params, buffers)
        target = jax.eval_shape(lambda p, b: init_state(p, b, self.tx), *self.abstract_weights)
        state, _ = self.checkpointer.restore(latest, target, self.shardings, data_iterator)
        return state

    def fit(self, data_iterator, heldout: list) -> TrainState:
        """Train until `total_steps`; returns the final state. Raises Preempted after SIGTERM."""
        state = self.initial_state(data_iterator)
        start = int(state.step)
        st = self.settings
        progress = Progress(self.total_steps, start, self.stage.name)
        window_start, window_tokens, window = time.perf_counter(), 0, []
        pending = None  # previous step's outputs, read one step late to keep dispatch asynchronous
        try:
            with _StopFlag() as stop:
                for step in range(start, self.total_steps):
                    index, segment = self.segment_at(step)
                    if heldout and step == self._segment_end(index) - segment.steps:
                        self._log_eval(state, segment, heldout, step, prefix="eval_start_")
                    host_batch = next(data_iterator)
                    window_tokens += int(np.sum(host_batch["segment_ids"] > 0))
                    fn = self._step_for(segment)
                    state, out = fn(state, device_batch(host_batch, self._batch_sharding), self.base_key)
                    if pending is not None:
                        self._check_finite(pending)
                    pending = out
                    window.append(out)
                    done = step + 1
                    progress.update(1)
                    segment_end = done == self._segment_end(index)
                    if done % st.log_every == 0 or segment_end:
                        outs = jax.device_get(window)
                        elapsed = time.perf_counter() - window_start
                        record = {"step": done, "stage": self.stage.name, "phase": segment.name,
                                  "block_size": segment.block_size,
                                  "tokens_per_sec": window_tokens * jax.process_count() / max(elapsed, 1e-9),
                                  "window_tokens": window_tokens * jax.process_count(),
                                  "window_seconds": elapsed, "nonfinite_skipped": int(state.nonfinite)}
                        record.update({k: np.mean([o[k] for o in outs]) for k in outs[0]
                                       if k not in ("finite", "streak")})
                        self.logger.write(record)
                        progress.update(0, loss=record["loss"], phase=segment.name)
                        window_start, window_tokens, window = time.perf_counter(), 0, []
                    if (st.eval_every and done % st.eval_every == 0) or segment_end:
                        if heldout:
                            self._log_eval(state, segment, heldout, done, prefix="eval_")
                    if done % st.checkpoint_every == 0 or segment_end:
                        self._save(state, data_iterator)
                    time_up = st.stop_after_steps and done - start >= st.stop_after_steps and done < self.total_steps
                    if stop.any_process() or time_up:
                        self._save(state, data_iterator)
                        self.checkpointer.wait()
                        why = "SIGTERM" if stop.raised else f"train.stop_after_steps={st.stop_after_steps}"
                        raise Preempted(f"{why}: saved step {done} of stage {self.stage.name!r}")
                if pending is not None:
                    self._check_finite(pending)
        finally:
            progress.close()
            self.checkpointer.wait()
        return state

    def _log_eval(self, state, segment: Segment, heldout: list, step: int, prefix: str) -> None:
        """Held-out metrics with fixed noise; logged at each segment's start and end (and every
        `eval_every` steps) so a phase's progress is measured at one block size, free of batch noise."""
        ev = self.evaluate(state.params, state.buffers, segment, heldout)
        self.logger.write({"step": step, "stage": self.stage.name, "phase": segment.name,
                           "block_size": segment.block_size, **{f"{prefix}{k}": v for k, v in ev.items()}})

    def _check_finite(self, out) -> None:
        streak = int(jax.device_get(out["streak"]))
        if streak >= self.settings.max_nonfinite_streak:
            raise NonFiniteLoss(
                f"stage {self.stage.name!r}: {streak} consecutive steps had a non-finite loss or "
                f"gradient (their updates were skipped); aborting (train.max_nonfinite_streak="
                f"{self.settings.max_nonfinite_streak}). Lower the learning rate or check the data.")
