"""A training stage's data as a fixed number of shards, so the global batch does not depend on the process count.

The run's documents are split into S shards (`data.shards`; 0 = one per process when the stage first
starts). Shard s is the stage's own Grain pipeline over documents[s::S] (own seeded order, own
packing) yielding B/S rows a step, and the global batch of B rows is shard 0's rows, then shard 1's,
and so on. A process reads only the shards whose rows its devices hold, so with S = 2:
  2 processes x 4 devices   process 0 reads shard 0, process 1 reads shard 1
  1 process x 8 devices     the process reads shards 0 and 1
  1 device                  the same
and every layout trains on the same rows in the same order (the losses agree to rounding).

Checkpoints store the data state per shard, not per process: every shard's Grain iterator state,
gathered from the processes that read them, plus the global position (batches drawn so far). A
restore with another process count hands each process the saved states of the shards it now
reads, so training resumes at the same global position. S itself is kept from the checkpoint; a
resumed job needs a process count whose devices hold whole shards (S a multiple of the process
count on the usual process-major meshes).
"""
from __future__ import annotations

import json
from typing import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

STATE_VERSION = 1


class DataShardError(ValueError):
    """Shards that cannot tile the batch or the processes, or a saved data state that does not fit."""


def owned_rows(sharding, global_batch: int) -> list[int]:
    """Sorted global batch rows held by this process's devices under `sharding` (rows = axis 0)."""
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch, 1)).values():
        rows.update(range(*index[0].indices(global_batch)))
    return sorted(rows)


def local_shards(sharding, global_batch: int, num_shards: int) -> list[int]:
    """The shards this process reads: those whose rows its devices hold.

    Raises a DataShardError (naming `data.shards`) when a shard's rows would be split between processes.
    """
    check_shards(num_shards, global_batch)
    per_shard = global_batch // num_shards
    rows = owned_rows(sharding, global_batch)
    shards = sorted({r // per_shard for r in rows})
    covered = [r for s in shards for r in range(s * per_shard, (s + 1) * per_shard)]
    if covered != rows:
        raise DataShardError(
            f"data.shards={num_shards}: this process's devices hold {len(rows)} of the {global_batch} batch rows, "
            f"which is not a whole number of shards of {per_shard} rows; use a shard count that is a "
            f"multiple of the process count ({jax.process_count()})")
    return shards


def check_shards(num_shards: int, global_batch: int) -> None:
    if num_shards < 1:
        raise DataShardError(f"data.shards={num_shards} must be >= 1 (or 0: one per process)")
    if global_batch % num_shards:
        raise DataShardError(f"data.shards={num_shards} must divide train.batch_size={global_batch}")


class ShardedBatches:
    """Iterator of this process's rows of each global batch, read from its shards' pipelines.

    `make_shard(index, count, rows)` returns shard `index` of `count` as a batched Grain dataset of
    `rows` rows per batch. `__next__` gives the process-local rows (sorted global order), ready for
    `jax.make_array_from_process_local_data`.
    """

    def __init__(self, make_shard: Callable[[int, int, int], Iterable], *, num_shards: int, global_batch: int,
                 sharding):
        self.num_shards, self.global_batch = num_shards, global_batch
        self.shards = local_shards(sharding, global_batch, num_shards)
        rows = global_batch // num_shards
        self.datasets = {s: make_shard(s, num_shards, rows) for s in self.shards}
        self._iters = {s: iter(ds) for s, ds in self.datasets.items()}
        self.position = 0  # global batches drawn

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(self._iters[s]) for s in self.shards]
        self.position += 1
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    # ---------------- checkpoint state ----------------
    def local_state(self) -> dict:
        return {"version": STATE_VERSION, "num_shards": self.num_shards, "global_batch": self.global_batch,
                "position": self.position, "shards": {str(s): self._iters[s].get_state() for s in self.shards}}

    def global_state(self) -> dict:
        """Every shard's state, gathered from all processes (a collective: call it on every process)."""
        state = self.local_state()
        if jax.process_count() > 1:
            for other in _allgather_json(state):
                if other["position"] != state["position"]:
                    raise RuntimeError(f"data positions differ between processes: {other['position']} vs "
                                       f"{state['position']}")
                state["shards"].update(other["shards"])
        return state

    def restore(self, state: dict) -> None:
        """Continue from a `global_state()`, whatever process count wrote it."""
        if state.get("version") != STATE_VERSION:
            raise DataShardError(f"data state version {state.get('version')!r}; this code reads {STATE_VERSION}")
        for field, mine in (("num_shards", self.num_shards), ("global_batch", self.global_batch)):
            if state[field] != mine:
                raise DataShardError(f"the checkpoint's data was read as {field}={state[field]}, this run uses {mine} "
                                 "(keep train.batch_size; data.shards is taken from the checkpoint)")
        missing = [s for s in self.shards if str(s) not in state["shards"]]
        if missing:
            raise DataShardError(f"the checkpoint's data state lacks shards {missing}")
        for s in self.shards:
            self._iters[s].set_state(state["shards"][str(s)])
        self.position = int(state["position"])


def _allgather_json(obj) -> list:
    """`obj` of every process (JSON-serialisable), in process order."""
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes)]
