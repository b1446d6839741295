"""Experiment presets: one module per model size, each with `get_config(stage)`.

`tiny`, `smollm2`, `mini` and `flash` build the ConfigDict of each stage they define (`wsd`, then
the post-training stages `sft`, `cap`, `dpo`) on `base.base_config()`. They live in the package,
not in `experiments/`, so that the thin files there (`--config=experiments/mini_sft.py`, or
`--config=experiments/mini.py:sft`) import them from any working directory without path edits.
This package imports nothing else from `llada2_jax`.
"""
