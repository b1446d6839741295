"""Block-size curriculum (WSD, spec §3.1) and learning-rate schedules.

API
  Phase(name, block_size, steps)                   one stage of constant (static) block size
  wsd_ladder(seq_len, warmup_sizes=(1, 4, 32, 64), decay_min=32, *, steps_per_warmup,
             stable_steps, steps_per_decay)       -> list[Phase]
  lr_schedule(kind, peak, warmup_steps, total_steps, end_value=0.0) -> optax schedule

The ladder for seq_len L: warm-up 1 → 4 → 32 → 64 → L (each `steps_per_warmup`), stable at L
(`stable_steps`), then decay by halving L/2, L/4, ... down to `decay_min` (each `steps_per_decay`).
E.g. L = 256: 1, 4, 32, 64, 256 | 256 | 128, 64, 32. The block size is a Python int per phase, so
the trainer recompiles its step function only when the phase changes.
"""
from __future__ import annotations

import dataclasses

LR_KINDS = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    block_size: int
    steps: int

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"phase {self.name!r}: block_size={self.block_size} must be >= 1")
        if self.steps < 0:
            raise ValueError(f"phase {self.name!r}: steps={self.steps} must be >= 0")


def _check_divides(what: str, size: int, seq_len: int) -> None:
    if size < 1 or seq_len % size:
        raise ValueError(f"{what}={size} does not divide seq_len={seq_len}: every block size of the "
                         f"ladder must be a positive divisor of the sequence length")


def wsd_ladder(seq_len: int, warmup_sizes=(1, 4, 32, 64), decay_min: int = 32, *, steps_per_warmup: int,
               stable_steps: int, steps_per_decay: int) -> list[Phase]:
    """The WSD block-size ladder; phases with 0 steps are left out."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    for size in warmup_sizes:
        _check_divides("warmup block size", size, seq_len)
    if list(warmup_sizes) != sorted(set(warmup_sizes)):
        raise ValueError(f"warmup_sizes={tuple(warmup_sizes)} must be strictly increasing")
    _check_divides("decay_min", decay_min, seq_len)
    ratio = seq_len // decay_min
    if ratio & (ratio - 1):
        raise ValueError(f"decay_min={decay_min}: seq_len={seq_len} must be decay_min times a power of two "
                         f"so that halving reaches it")
    phases = [Phase(f"warmup_{s}", s, steps_per_warmup) for s in warmup_sizes if s != seq_len]
    phases.append(Phase(f"warmup_{seq_len}", seq_len, steps_per_warmup))
    phases.append(Phase(f"stable_{seq_len}", seq_len, stable_steps))
    size = seq_len // 2
    while size >= decay_min:
        phases.append(Phase(f"decay_{size}", size, steps_per_decay))
        size //= 2
    return [p for p in phases if p.steps > 0]


def lr_schedule(kind: str, peak: float, warmup_steps: int, total_steps: int, end_value: float = 0.0):
    """Linear warm-up from 0 to `peak`, then constant or cosine decay to `end_value` at `total_steps`."""
    import optax  # local: keeps `import llada2_jax.diffusion` free of optimizer dependencies

    if kind not in LR_KINDS:
        raise ValueError(f"lr schedule kind={kind!r}; expected one of {LR_KINDS}")
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps={warmup_steps} <= total_steps={total_steps}")
    if kind == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps),
                                     optax.constant_schedule(peak)], [warmup_steps])
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, 1), end_value)
