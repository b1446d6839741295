"""What the GPU and TPU block-sparse attention kernels share besides the tile map (`tilemap`)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static settings of one attention call; each backend extends it with its own fields.

    Frozen, so hashable: it is the custom_vjp's non-differentiable argument.
    """
    rule: str
    scale: float
    block_q: int
    block_k: int
