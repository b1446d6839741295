"""Suite-wide hygiene.

Every compiled XLA CPU executable keeps a few memory mappings for its code. JAX caches them for
the life of the process, so one pytest process running the whole suite (eager interpret-mode
kernels compile thousands of small programs) climbed past Linux's default limit of 65530 mappings
(`vm.max_map_count`), and XLA then segfaulted while compiling. Dropping the caches after each
test module keeps the count at what a single module needs.
"""
import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
