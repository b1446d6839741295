"""The stages a run chains (`config.stages`), one module each, listed in one table.

  ar_pretrain, wsd   pretrain.py    corpus stages: next-token pretraining, the WSD conversion
  sft, cap           sft.py         block-diffusion SFT, + the CAP entropy term
  dpo                dpo.py         diffusion DPO against a frozen reference
  merge              merge.py       top-k checkpoint merge (no training)
  ar_sft             sft.py         the AR twin: next-token SFT on the same chats, from model.source
  eval               final_eval.py  held-out NELBO and samples of the run's output (no training)
  compare            compare.py     AR-vs-dLLM accuracy / tokens-per-forward table (no training)
A new stage is a module here and a row in `STAGES`; config files import nothing to use one.
A training stage subclasses `TrainStage`; a stage that only scores (merge, eval) is built with
the training stage whose evaluation it uses (`scorer_name(cfg)`) and implements `run()`.
"""
from __future__ import annotations

from llada2_jax.training.stages.base import StageData, TrainStage
from llada2_jax.training.stages.compare import Compare
from llada2_jax.training.stages.dpo import DPO
from llada2_jax.training.stages.final_eval import FinalEval
from llada2_jax.training.stages.merge import Merge
from llada2_jax.training.stages.pretrain import WSD, ARPretrain
from llada2_jax.training.stages.sft import ARSFT, CAP, SFT

STAGES: dict[str, type] = {
    "ar_pretrain": ARPretrain,
    "wsd": WSD,
    "sft": SFT,
    "cap": CAP,
    "dpo": DPO,
    "merge": Merge,
    "ar_sft": ARSFT,
    "eval": FinalEval,
    "compare": Compare,
}


def get_stage(name: str) -> type:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r} in config.stages; known: {sorted(STAGES)}")
    return STAGES[name]


__all__ = ["STAGES", "StageData", "TrainStage", "get_stage"]
