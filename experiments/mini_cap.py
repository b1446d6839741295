"""LLaDA2.0-mini: the CAP stage on a TPU pod (spec §6–§8), starting from the mini_sft run.

    python -m llada2_jax.main --config=experiments/mini_cap.py --config.dry_run=True
    # real run, same command on every host of the 256-chip slice:
    python -m llada2_jax.main --config=experiments/mini_cap.py --workdir=gs://.../mini_cap \
        --config.distributed=True --config.init_from=gs://.../mini_sft --config.cap.data=/data/cap.jsonl

Model, runtime and mesh (fsdp 16 x expert 16) come from mini_wsd.py; see
posttrain_common.pod_posttrain_config for the hyper-parameters.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from mini_wsd import get_config as wsd_config  # noqa: E402
from posttrain_common import pod_posttrain_config  # noqa: E402


def get_config():
    return pod_posttrain_config("cap", wsd_config())
