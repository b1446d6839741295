"""Orbax checkpoints: model, optimizer, counters, RNG and the Grain iterator state saved together.

One step directory holds the items
  model   {"params", "buffers"}               (what merging and `workdir:` loading read)
  train   {"opt_state", "step", "nonfinite", "streak"}
  meta    JSON: stage, phase, base RNG key data, anything the stage wants to record
  data_shards  JSON: the training data's state per data shard and its global position
               (`training.data_shards`; independent of the process count)
  data    (other iterators) the Grain iterator state, one JSON file per process (grain's handler)
Restoring reads into abstract targets that carry shardings, so every host loads only its pieces,
whatever mesh or process count wrote them: a checkpoint of a 2-process fsdp x expert run restores
onto 1 process x 8 devices in another mesh shape, or onto one device. Before reading, the saved
tensors' shapes are checked against the model's, so a checkpoint of another model fails with one
line naming the tensor (`CheckpointMismatch`).
The `model` item's format is `llada2_jax.workdir`'s (what `generate` and evaluation load).
"""
from __future__ import annotations

import os

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp
from etils import epath

from llada2_jax import workdir as wd
from llada2_jax.training.data_shards import ShardedBatches
from llada2_jax.training.state import TrainState

DATA_SHARDS_ITEM = "data_shards"


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model (another architecture, another model): one line."""


def _flat_shapes(tree) -> dict[str, tuple]:
    """{"params/a/b": shape} of a tree of arrays, ShapeDtypeStructs or Orbax array metadata."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path):
            tuple(leaf.shape) for path, leaf in flat}


def check_model_item(item_dir: str, target: dict) -> None:
    """Raise CheckpointMismatch naming the first tensor whose presence or shape differs from `target`.

    `item_dir` is a step's `model` item directory; `target` its restore target {"params", "buffers"}.
    """
    saved = _flat_shapes(ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir)).tree)
    wanted = _flat_shapes(target)
    where = os.path.dirname(item_dir)
    for name, shape in wanted.items():
        if name not in saved:
            raise CheckpointMismatch(f"checkpoint {where}: tensor {name} of this model is not in the checkpoint "
                                     "(a checkpoint of another model?)")
        if saved[name] != shape:
            raise CheckpointMismatch(f"checkpoint {where}: tensor {name} has shape {saved[name]} there but "
                                     f"{shape} in this model (a checkpoint of another architecture?)")
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise CheckpointMismatch(f"checkpoint {where}: tensor {extra[0]} (and {len(extra) - 1} more) is not part "
                                 "of this model (a checkpoint of another model?)")


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
        if isinstance(data_iterator, ShardedBatches):
            items[DATA_SHARDS_ITEM] = ocp.args.JsonSave(data_iterator.global_state())  # every process takes part
        elif data_iterator is not None:
            items["data"] = grain_ckpt.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _item_dir(self, step: int, item: str) -> str:
        return os.path.join(self.directory, str(step), item)

    def data_state(self, step: int) -> dict | None:
        """The `data_shards` state saved at `step` (None when that checkpoint has none)."""
        if not os.path.isdir(self._item_dir(step, DATA_SHARDS_ITEM)):
            return None
        out = self.manager.restore(step, args=ocp.args.Composite(**{DATA_SHARDS_ITEM: ocp.args.JsonRestore()}))
        return out[DATA_SHARDS_ITEM]

    def restore(self, step: int, target: TrainState, shardings: TrainState, data_iterator=None):
        """(TrainState, meta); `data_iterator` is restored in place when given."""
        model_t = wd.weights_target(target.params, target.buffers, (shardings.params, shardings.buffers))
        train_t = wd.abstract_like(
            {"opt_state": target.opt_state, "step": target.step, "nonfinite": target.nonfinite,
             "streak": target.streak},
            {"opt_state": shardings.opt_state, "step": shardings.step, "nonfinite": shardings.nonfinite,
             "streak": shardings.streak})
        check_model_item(self._item_dir(step, wd.MODEL_ITEM), model_t)
        items = dict(model=ocp.args.StandardRestore(model_t), train=ocp.args.StandardRestore(train_t),
                     meta=ocp.args.JsonRestore())
        sharded_data = isinstance(data_iterator, ShardedBatches)
        if sharded_data:
            if not os.path.isdir(self._item_dir(step, DATA_SHARDS_ITEM)):
                raise CheckpointMismatch(f"checkpoint {self._item_dir(step, '')}: no {DATA_SHARDS_ITEM} item "
                                         "(written by an older version); restart the stage")
            items[DATA_SHARDS_ITEM] = ocp.args.JsonRestore()
        elif data_iterator is not None:
            items["data"] = grain_ckpt.CheckpointRestore(data_iterator)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:  # e.g. an optimizer state of another shape: Orbax's message, on one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointMismatch(f"checkpoint {self._item_dir(step, '')}: {first}") from e
        if sharded_data:
            data_iterator.restore(out[DATA_SHARDS_ITEM])
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
        check_model_item(self._item_dir(step, wd.MODEL_ITEM), wd.weights_target(params, buffers))
        return wd.restore_weights(self.manager, step, params, buffers, shardings)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
