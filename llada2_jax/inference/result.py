"""The result of a generation call and the input checks both decoders share."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Generated ids per prompt and the cost of producing them.

    tokens: per prompt, the generated ids cut after the first EOS (the EOS itself is kept as the
      last id when one was produced; nothing of the prompt is included).
    forwards: model calls made for the whole batch (prefill and cache refreshes included).
    row_forwards: per prompt, the model calls in which that row was still being decoded — what the
      prompt would have used if run alone.
    num_generated: generated tokens over all rows, EOS excluded (the TPF / TPS numerator).
    wall_time: seconds for the call, host transfers included (compilation too on a first call).
    row_generated: per prompt, its generated tokens, EOS excluded (empty if the decoder does not say).
    row_edits: per prompt, the token-to-token replacements made inside its generated span (block
      decoder; all 0 without token editing; empty if the decoder does not say).
    """
    tokens: list[list[int]]
    forwards: int
    row_forwards: list[int]
    num_generated: int
    wall_time: float
    row_generated: list[int] = dataclasses.field(default_factory=list)
    row_edits: list[int] = dataclasses.field(default_factory=list)

    @property
    def tpf(self) -> float:
        """Tokens per forward of one request: generated tokens / that request's forwards (summed over rows)."""
        return self.num_generated / max(sum(self.row_forwards), 1)

    @property
    def row_tpf(self) -> list[float]:
        """Tokens per forward of each prompt alone: row_generated / row_forwards."""
        return [n / max(f, 1) for n, f in zip(self.row_generated, self.row_forwards)]

    @property
    def tokens_per_sec(self) -> float:
        return self.num_generated / self.wall_time if self.wall_time > 0 else float("inf")


def cut_after_eos(ids: np.ndarray, eos_id: int | None) -> tuple[list[int], int]:
    """(ids up to and including the first EOS, number of ids before that EOS)."""
    ids = [int(t) for t in ids]
    if eos_id is not None and eos_id in ids:
        n = ids.index(eos_id)
        return ids[:n + 1], n
    return ids, len(ids)


def check_token_id(name: str, token_id, vocab_size: int) -> None:
    if not isinstance(token_id, (int, np.integer)) or not 0 <= token_id < vocab_size:
        raise ValueError(f"{name}={token_id!r} is outside the vocabulary [0, {vocab_size})")


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, *, allow_empty: bool) -> list[np.ndarray]:
    """Each prompt as an int32 array; ValueError naming the prompt for empty lists or bad ids."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {prompts!r}")
    out = []
    for i, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.ndim != 1:
            hint = " (pass a single prompt as [ids])" if arr.ndim == 0 else ""
            raise ValueError(f"prompts[{i}] must be a 1-D sequence of token ids, got {arr.ndim}-D {p!r:.60}{hint}")
        if arr.size == 0 and not allow_empty:
            raise ValueError(f"prompts[{i}] is empty")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"prompts[{i}] must hold integer token ids, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        if bad.size:
            raise ValueError(f"prompts[{i}] holds token id {int(bad[0])} outside the vocabulary [0, {vocab_size})")
        out.append(arr.astype(np.int32))
    return out


def check_sampling(temperature, top_k, top_p) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None)")


def bucket(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 1.5 * 2^k) that is >= n.

    Few distinct shapes (few compilations) while wasting at most a third of the length.
    """
    power = 1 << max(n - 1, 0).bit_length()
    return power * 3 // 4 if power >= 4 and power * 3 // 4 >= n else power
