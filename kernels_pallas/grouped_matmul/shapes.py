"""Argument checks shared by every grouped-matmul backend."""
from __future__ import annotations


def check_shapes(x, w, group_sizes) -> tuple[int, int, int, int]:
    """Validate (M, K) x (E, K, N) with group_sizes (E,); return (M, K, E, N)."""
    m, kdim = x.shape
    e, kw, n = w.shape
    if kw != kdim:
        raise ValueError(f"x has K={kdim} but w has K={kw}")
    if group_sizes.shape != (e,):
        raise ValueError(f"group_sizes shape {group_sizes.shape} != (num_groups,) = {(e,)}")
    return m, kdim, e, n
