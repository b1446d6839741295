"""Pallas kernels: block-sparse attention and grouped matmul for TPU (Mosaic) and GPU (Triton).

Also the helpers they share: the tile map of a MaskSpec (`tilemap`) and the grouped-matmul shape
checks. Every kernel runs per device and in interpret mode on CPU. The package imports nothing from
llada2_jax except the `llada2_jax.core` leaf, so the GPU check runs it with a bare jax install.
The XLA backends (dense reference, tile-skipping `xla_sparse`, `xla_tiled` grouped matmul) live in
`llada2_jax.ops`, which chooses among all backends through one table (`ops.backends`).
"""
