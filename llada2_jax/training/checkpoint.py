"""Orbax checkpoints: model, optimizer, counters, RNG and the Grain iterator state saved together.

One step directory holds the items
  model   {"params", "buffers"}               (what merging and `workdir:` loading read)
  train   {"opt_state", "step", "nonfinite", "streak"}
  meta    JSON: stage, phase, base RNG key data, anything the stage wants to record
  data    the Grain iterator state (grain's own Orbax handler: one JSON file per process)
Restoring reads into abstract targets that carry shardings, so every host loads only its shards.
The `model` item's format is `llada2_jax.workdir`'s (what `generate` and evaluation load).
"""
from __future__ import annotations

import os

import grain.checkpoint as grain_ckpt
import orbax.checkpoint as ocp

from llada2_jax import workdir as wd
from llada2_jax.training.state import TrainState


class Checkpointer:
    """A CheckpointManager keeping the last `keep` steps of one stage under `directory`."""

    def __init__(self, directory: str, keep: int, *, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict, data_iterator=None) -> None:
        items = dict(
            model=wd.save_weights_arg(state.params, state.buffers),
            train=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step,
                                         "nonfinite": state.nonfinite, "streak": state.streak}),
            meta=ocp.args.JsonSave(meta),
        )
        if data_iterator is not None:
            items["data"] = grain_ckpt.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, target: TrainState, shardings: TrainState, data_iterator=None):
        """(TrainState, meta); `data_iterator` is restored in place when given."""
        model_t = wd.weights_target(target.params, target.buffers, (shardings.params, shardings.buffers))
        train_t = wd.abstract_like(
            {"opt_state": target.opt_state, "step": target.step, "nonfinite": target.nonfinite,
             "streak": target.streak},
            {"opt_state": shardings.opt_state, "step": shardings.step, "nonfinite": shardings.nonfinite,
             "streak": shardings.streak})
        items = dict(model=ocp.args.StandardRestore(model_t), train=ocp.args.StandardRestore(train_t),
                     meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain_ckpt.CheckpointRestore(data_iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        model, train = out["model"], out["train"]
        state = TrainState(model["params"], model["buffers"], train["opt_state"], train["step"],
                           train["nonfinite"], train["streak"])
        return state, out["meta"]

    def save_model(self, step: int, params: dict, buffers: dict, meta: dict) -> None:
        """A model-only checkpoint (e.g. the merged model)."""
        self.manager.save(step, args=ocp.args.Composite(
            model=wd.save_weights_arg(params, buffers),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore_model(self, step: int, params, buffers, shardings=None):
        """(params, buffers) of `step` into the structure of the given (abstract) trees."""
        return wd.restore_weights(self.manager, step, params, buffers, shardings)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
