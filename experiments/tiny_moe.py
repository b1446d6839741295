"""A tiny MoE WSD run on an fsdp=4 x expert=2 mesh: the pod job's shape, on one CPU machine.

Two processes x 4 CPU devices (see `bench/multiprocess_cpu.sh` and the README's pod section):

    JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<0|1> \
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    python -m llada2_jax.main --config=experiments/tiny_moe.py --config.distributed=True --workdir=/tmp/tiny_moe

Defined in `llada2_jax/configs/tiny_moe.py`.
"""
from llada2_jax.configs.tiny_moe import get_config  # noqa: F401
