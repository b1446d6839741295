"""Block-size curriculum (WSD, spec §3.1) and learning-rate schedules.

API
  Phase(name, block_size, steps)                   one stage of constant (static) block size
  tokens_to_steps(tokens, tokens_per_step)         ceil(tokens / tokens_per_step)
  wsd_ladder(seq_len, warmup_sizes=(1, 4, 32, 64), decay_min=32, *, steps_per_warmup,
             stable_steps, steps_per_decay)       -> list[Phase]
  phase_at(phases, step)                           -> (index, Phase) active at a global step
  phase_start(phases, index)                       first global step of a phase
  lr_schedule(kind, peak, warmup_steps, total_steps, end_value=0.0) -> optax schedule

The ladder for seq_len L: warm-up 1 → 4 → 32 → 64 → L (each `steps_per_warmup`), stable at L
(`stable_steps`), then decay by halving L/2, L/4, ... down to `decay_min` (each `steps_per_decay`).
E.g. L = 256: 1, 4, 32, 64, 256 | 256 | 128, 64, 32. The block size is a Python int per phase, so
the trainer recompiles its step function only when the phase changes.
"""
from __future__ import annotations

import bisect
import dataclasses
import math

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


def tokens_to_steps(tokens: int, tokens_per_step: int) -> int:
    """Number of optimizer steps that consume `tokens` (rounded up)."""
    if tokens_per_step <= 0:
        raise ValueError(f"tokens_per_step={tokens_per_step} must be > 0")
    if tokens < 0:
        raise ValueError(f"tokens={tokens} must be >= 0")
    return math.ceil(tokens / tokens_per_step)


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


def phase_start(phases, index: int) -> int:
    return sum(p.steps for p in phases[:index])


def phase_at(phases, step: int) -> tuple[int, Phase]:
    """(index, phase) that is active at global `step` (0-based); steps past the end stay in the last phase."""
    if not phases:
        raise ValueError("phase_at needs at least one phase")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    ends, total = [], 0
    for p in phases:
        total += p.steps
        ends.append(total)
    index = min(bisect.bisect_right(ends, step), len(phases) - 1)
    return index, phases[index]


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
