"""Multi-controller start-up: one process per host joins the job before any JAX work.

`initialize()` (what `--config.distributed=True` calls) reads the job layout from the environment:
  JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator service (every process gives the same)
  JAX_NUM_PROCESSES        how many processes the job has
  JAX_PROCESS_ID           this process's index, 0 .. JAX_NUM_PROCESSES-1
With none of them set, JAX detects the cluster itself (Cloud TPU pods, SLURM, Open MPI,
Kubernetes). On CPU the cross-process collectives go through gloo, so a pod-shaped job can be tried
on one machine: N processes on localhost, each with `--xla_force_host_platform_device_count`.
"""
from __future__ import annotations

import os

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _int_env(name: str, environ) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def job_layout(environ=None) -> dict:
    """The `jax.distributed.initialize` arguments the environment gives ({} = let JAX detect the cluster).

    Raises a ValueError naming the variable when the layout is incomplete or inconsistent.
    """
    environ = os.environ if environ is None else environ
    address = environ.get(ENV_ADDRESS, "").strip()
    count, index = _int_env(ENV_COUNT, environ), _int_env(ENV_ID, environ)
    if not address and count is None and index is None:
        return {}
    missing = [name for name, v in ((ENV_ADDRESS, address), (ENV_COUNT, count), (ENV_ID, index)) if v in ("", None)]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set: a job started by hand needs all of {ENV_ADDRESS}, "
                         f"{ENV_COUNT} and {ENV_ID} (or none, to let JAX detect the cluster)")
    if ":" not in address:
        raise ValueError(f"{ENV_ADDRESS}={address!r} must be host:port (e.g. localhost:12355)")
    if count < 1:
        raise ValueError(f"{ENV_COUNT}={count} must be >= 1")
    if not 0 <= index < count:
        raise ValueError(f"{ENV_ID}={index} must be in [0, {ENV_COUNT}={count})")
    return dict(coordinator_address=address, num_processes=count, process_id=index)


def initialize(environ=None) -> None:
    """Join the job (`jax.distributed.initialize`) with the environment's layout; CPU collectives via gloo.

    Must run before anything touches a JAX backend (device lists, arrays, jit).
    """
    import jax
    layout = job_layout(environ)
    # cross-process collectives between CPU devices (only the CPU client reads this setting)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**layout)


def describe() -> str:
    """One line: this process, the job's processes and devices (printed at start-up)."""
    import jax
    return (f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
            f"{jax.device_count()} {jax.devices()[0].platform} devices")
