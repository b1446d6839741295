"""Diffusion: dense mask references (the features live in core.masks), noising, batch layouts,
losses, schedules.

Import submodules explicitly (`from llada2_jax.diffusion import layout, losses`); this package
imports nothing heavy at import time (no optax/grain).
"""
