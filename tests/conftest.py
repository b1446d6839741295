"""Suite-wide hygiene.

Every compiled XLA CPU executable keeps a few memory mappings for its code, and JAX caches
executables for the life of the process. One pytest process running the whole suite climbed past
Linux's default limit of 65530 mappings (`vm.max_map_count`; single modules peak near 47000),
and XLA then crashed while compiling. After any test that leaves the process above a third of
that limit, JAX's caches are dropped; below it, compiled programs are kept for the next test.
"""
import gc

import jax
import pytest

_MAPPINGS_BEFORE_CLEARING = 20_000


def _mapping_count() -> int:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no such limit to guard
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    yield
    if _mapping_count() > _MAPPINGS_BEFORE_CLEARING:
        jax.clear_caches()
        gc.collect()
