"""The `dpo` stage (spec §8): diffusion DPO against a frozen copy of the starting model.

The frozen reference lives in the train state's *buffers*: the trained module is a
`PolicyAndReference` whose `reference` variables are `FrozenWeight`s (not `nnx.Param`), so the
optimizer never sees them, they carry the same logical axes (hence the same sharding) as the
policy, and they are checkpointed with the state (a resumed run keeps the same reference). The
one training loop runs unchanged; only the layout it is given differs. When the stage ends, the
policy alone is saved as a plain model checkpoint (`checkpoints/dpo_policy/`), which becomes the
run's output, so `workdir:` sources and evaluation read it like any other stage's output.

Config section `config.dpo`: data ("gsm8k" = the synthetic GSM8K pairs of `data.preference`, or a
`{"prompt", "chosen", "rejected"}` jsonl path), heldout_size, steps, beta, block_size, t_min,
t_max (the band of t for the single-sample ELBO), lr (fallback), lr_from_init (start at the last
`lr` logged by the `model.source` workdir, i.e. the SFT/CAP stage's final rate), lr_min,
warmup_ratio, lr_schedule, eval_samples (unused by DPO's eval: one fixed noise sample per pair).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada2_jax.data import preference
from llada2_jax.model.transformer import Transformer
from llada2_jax.training import model_source as ms
from llada2_jax.training import objectives
from llada2_jax.training import sharding as shd
from llada2_jax.training.checkpoint import Checkpointer
from llada2_jax.training.stages.base import StageData, shard_or_process
from llada2_jax.training.stages.sft import GSM8K, PostTrainStage, check_noise

POLICY_DIR = "dpo_policy"


class FrozenWeight(nnx.Variable):
    """A weight of the DPO reference model: a buffer, never touched by the optimizer."""


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def frozen_copy(model: nnx.Module) -> nnx.Module:
    """The same module with every variable retyped as `FrozenWeight` (metadata such as axes kept)."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda v: FrozenWeight(v.get_value(), **v.get_metadata()), state, is_leaf=_is_variable)
    return nnx.merge(graphdef, state)


class PolicyAndReference(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs | None = None):
        self.policy = Transformer(config, rngs=rngs or nnx.Rngs(0))
        self.reference = frozen_copy(Transformer(config, rngs=rngs or nnx.Rngs(0)))


def pair_layout(config, mesh_shape: dict) -> ms.ModelLayout:
    """Graphdef, abstract weights and shardings of `PolicyAndReference` (abstract, no allocation)."""
    graphdef, params, buffers = nnx.split(nnx.eval_shape(lambda: PolicyAndReference(config)), nnx.Param, ...)
    return ms.ModelLayout(config, graphdef, params, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers),
                          shd.state_specs(params, mesh_shape), shd.state_specs(buffers, mesh_shape))


def _merge_dicts(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def pair_weights(params: dict, buffers: dict, layout: ms.ModelLayout) -> tuple[dict, dict]:
    """(params, buffers) of `PolicyAndReference` from a plain model's: the reference is a fresh copy.

    The copy matters: the step donates the train state, so the reference must not alias the policy.
    """
    reference = jax.tree.map(jnp.copy, _merge_dicts(params, buffers))
    pair_buffers = {"reference": reference}
    if jax.tree.leaves(buffers):
        pair_buffers["policy"] = buffers
    pair_params = {"policy": params}
    for name, got, want in (("params", pair_params, layout.abstract_params),
                            ("buffers", pair_buffers, layout.abstract_buffers)):
        if jax.tree.structure(got) != jax.tree.structure(want):
            raise ValueError(f"DPO {name}: the starting weights do not match the policy/reference layout")
    return pair_params, pair_buffers


def split_policy(params: dict, buffers: dict) -> tuple[dict, dict]:
    """The plain model's (params, buffers) out of the pair's."""
    return params["policy"], buffers.get("policy", {})


class DPO(PostTrainStage):

    @classmethod
    def validate(cls, config, name) -> None:
        super().validate(config, name)
        check_noise(config, name, complementary=False, beta=config[name].beta)

    def peak_lr(self) -> float:
        """The previous stage's final rate (spec §8) when logged and positive, else `dpo.lr`."""
        source = self.ctx.init_workdir
        lr = objectives.final_lr(source) if self.cfg.lr_from_init and source else None
        return lr if lr else self.cfg.lr

    # ---------------- data ----------------
    def pairs(self, split: str) -> list[dict]:
        cfg = self.cfg
        if cfg.data == GSM8K:
            return preference.gsm8k_preference_pairs(cfg.get("data_path") or None, split=split,
                                                     heldout_size=cfg.heldout_size, seed=self.ctx.seed)
        return self.split_records(preference.read_preference_pairs(cfg.data), split, "pair")

    def dataset(self, split, batch_size, seed, num_epochs, shard=None):
        data = self.ctx.data
        out = preference.preference_dataset(
            self.pairs(split), data.tokenizer, seq_len=data.seq_len, batch_size=batch_size,
            block_size=self.cfg.block_size, seed=seed, num_epochs=num_epochs, **shard_or_process(shard))
        # The trainer counts tokens per second from `segment_ids`: give it both sides' ids.
        ds = out.dataset.map(lambda b: {**b, "segment_ids": np.concatenate(
            [b["chosen_segment_ids"], b["rejected_segment_ids"]], axis=-1)})
        return StageData(ds, {"num_pairs": out.num_pairs, "num_dropped": out.num_dropped})

    # ---------------- objective ----------------
    def loss(self, segment, model, batch, rng, step):
        noise = self.noise(segment, complementary=False, beta=self.cfg.beta)
        loss, metrics = objectives.dpo_loss(model.policy, model.reference, batch, rng, noise)
        return loss, {k: v for k, v in metrics.items() if k != "loss"}

    def evaluate(self, segment, model, batch, rng):
        """Held-out DPO loss, reward margin and accuracy (fixed noise per batch)."""
        noise = self.noise(segment, complementary=False, beta=self.cfg.beta)
        _, m = objectives.dpo_loss(model.policy, model.reference, batch, rng, noise)
        n = jnp.asarray(batch["chosen_tokens"].shape[0], jnp.float32)
        return {"pairs": n, **{k: m[k] * n for k in ("loss", "reward_margin", "reward_accuracy", "elbo_margin")}}

    def summarize_eval(self, sums):
        n = max(sums.pop("pairs"), 1.0)
        return {f"dpo_{k}": v / n for k, v in sums.items()}

    # ---------------- the policy/reference pair ----------------
    def model_layout(self) -> ms.ModelLayout:
        return pair_layout(self.ctx.model_config, dict(self.ctx.mesh.shape))

    def initial_weights(self) -> tuple[dict, dict]:
        # eager (not jitted), so the copy really is a second buffer with the same sharding
        return pair_weights(*self.ctx.init_weights(), self.model_layout())

    def save_output(self, state) -> tuple[str, int]:
        """Save the policy alone as a plain model checkpoint: the run's output."""
        step = int(state.step)
        params, buffers = split_policy(state.params, state.buffers)
        directory = os.path.join(self.ctx.paths.workdir, "checkpoints", POLICY_DIR)
        out = Checkpointer(directory, keep=1, async_save=False)
        out.save_model(step, params, buffers, {"stage": self.name, "step": step})
        out.wait()
        out.close()
        return directory, step
