"""Wall-clock timing shared by the GPU checks: compile once, then the median of `reps` calls."""
from __future__ import annotations

import time

import jax
import numpy as np


def median_ms(fn, *args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))
