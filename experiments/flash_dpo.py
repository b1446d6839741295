"""LLaDA2.0-flash: the DPO stage on a TPU pod (spec §6–§8), starting from the flash_cap run.

    python -m llada2_jax.main --config=experiments/flash_dpo.py --config.dry_run=True
    # real run, same command on every host of the 256-chip slice:
    python -m llada2_jax.main --config=experiments/flash_dpo.py --workdir=gs://.../flash_dpo \
        --config.distributed=True --config.init_from=gs://.../flash_cap --config.dpo.data=/data/dpo.jsonl

Model, runtime and mesh (fsdp 16 x expert 16) come from flash_wsd.py; see
posttrain_common.pod_posttrain_config for the hyper-parameters.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from flash_wsd import get_config as wsd_config  # noqa: E402
from posttrain_common import pod_posttrain_config  # noqa: E402


def get_config():
    return pod_posttrain_config("dpo", wsd_config())
