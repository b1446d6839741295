"""lm-evaluation-harness model `llada2_jax`: score and decode a block-diffusion LM with `lm_eval`.

    python -m llada2_jax.evaluation.lm_harness --model llada2_jax \\
        --model_args workdir=workdirs/quick,stage=cap,mc_samples=32 --batch_size 8 --tasks llada2_tiny

(the same arguments as `lm-eval run`; this entry point registers the model first and adds the
bundled offline tasks in `lm_eval_tasks/` to `--include_path`). From Python, import this module
and pass `LLaDA2LM(...)` or `model="llada2_jax"` to `lm_eval.simple_evaluate`.

- `loglikelihood`: the Monte-Carlo ELBO of the continuation given the context, as LLaDA's
  evaluation does (`request_scoring.score_requests`, `mc_samples` samples per request, each
  request's noise fixed by `seed` and its tokens, so batching and order change no number).
- `loglikelihood_rolling`: the ELBO of the whole text, in windows of the model's length.
- `generate_until`: block threshold decoding (`inference.generate`) for at most `max_gen_toks`
  tokens, stopping at EOS; the text is cut before the first `until` string.

lm_eval is optional: nothing else in the package imports this module.
"""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp

try:
    import lm_eval.models  # noqa: F401  the built-in names; lm_eval adds them only to an empty registry
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry, register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("llada2_jax.evaluation.lm_harness needs lm-eval: pip install lm-eval==0.4.13 "
                      "(or pip install -e '.[dev]')") from e

from llada2_jax.evaluation import request_scoring
from llada2_jax.inference import generate

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def load_source(workdir=None, stage=None, hf=None, spec=None):
    """(model, tokenizer) from exactly one of a run workdir (+ stage), an HF dir or a `sources` spec."""
    from llada2_jax.interop import sources
    given = {k: v for k, v in dict(workdir=workdir, hf=hf, spec=spec).items() if v}
    if len(given) != 1:
        raise ValueError(f"model_args: give exactly one of workdir=, hf=, spec= (got {sorted(given) or 'none'})")
    if stage and not workdir:
        raise ValueError(f"model_args: stage={stage!r} needs workdir=")
    kind, value = next(iter(given.items()))
    if kind == "workdir":
        value = f"{value}@{stage}" if stage else value
    model, tokenizer = sources.load_model(value if kind == "spec" else f"{kind}:{value}")
    if tokenizer is None:
        raise ValueError(f"model_args {kind}={given[kind]!r}: no tokenizer saved beside the weights")
    return model, tokenizer


class LLaDA2LM(LM):
    """A block-diffusion LM as an lm_eval model (module docstring).

    Model args: one of workdir= (with optional stage=), hf= (an HF dir with a saved tokenizer) or
    spec= (any `interop.sources` spec, e.g. gguf:smollm2); block_size (ELBO layout and decoding),
    threshold, steps (decode steps per block, default block_size), mc_samples, batch_size, seed,
    max_gen_toks (default when a task gives none), max_length (default: the model's). lm_eval's
    `device` and `max_batch_size` are accepted and ignored (JAX uses its default device).
    A loaded `model` and `tokenizer` may be passed instead of a source.
    """

    def __init__(self, workdir: str | None = None, stage: str | None = None, hf: str | None = None,
                 spec: str | None = None, *, model=None, tokenizer=None, block_size: int = 32,
                 threshold: float = 0.95, steps: int | None = None, mc_samples: int = 32, batch_size=8,
                 seed: int = 0, max_gen_toks: int = 256, max_length: int | None = None,
                 device=None, max_batch_size=None):
        super().__init__()
        del device, max_batch_size
        if model is None:
            model, tokenizer = load_source(workdir, stage, hf, spec)
        elif tokenizer is None:
            raise ValueError("a model passed directly needs its tokenizer too")
        self.model, self.tokenizer = model, tokenizer
        self.block_size = _positive_int("block_size", block_size)
        self.mc_samples = _positive_int("mc_samples", mc_samples)
        if isinstance(batch_size, str) and batch_size.isdigit():  # lm-eval's --batch_size arrives as text
            batch_size = int(batch_size)
        self.batch_size = _positive_int("batch_size", batch_size)  # "auto" is not supported: say a number
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.steps = None if steps is None else _positive_int("steps", steps)
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold={threshold!r} must be in [0, 1]")
        self.threshold = float(threshold)
        self.seed = int(seed)
        limit = model.config.max_position_embeddings
        max_length = limit if max_length is None else _positive_int("max_length", max_length)
        if max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings={limit}")
        self.max_length = max_length // self.block_size * self.block_size
        if self.max_length < self.block_size:
            raise ValueError(f"block_size={self.block_size} exceeds max_length={max_length}")
        mask_id = model.config.mask_token_id
        self.mask_id = tokenizer.mask_id if mask_id is None else mask_id
        if self.mask_id is None or not 0 <= self.mask_id < model.config.vocab_size:
            raise ValueError(f"mask id {self.mask_id} is not in the model's vocabulary [0, {model.config.vocab_size}): "
                             "not a diffusion model (an AR checkpoint? convert it with "
                             "llada2_jax.interop.convert.add_mask_token)")

    # ------------------------------------------------------------------ tokens

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, split where the joint encoding splits.

        Trailing spaces of the context move to the continuation, and the continuation's ids are
        the joint encoding's beyond the context's, so tokens merged across the boundary are scored.
        """
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context) if context else []
        return context_ids, whole[len(context_ids):]

    def _score(self, pairs, desc: str, disable_tqdm: bool):
        from tqdm import tqdm
        bar = tqdm(total=len(pairs), desc=desc, disable=disable_tqdm)
        try:
            return request_scoring.score_requests(
                self.model, pairs, block_size=self.block_size, n_samples=self.mc_samples, seed=self.seed,
                mask_id=self.mask_id, batch_size=self.batch_size, max_length=self.max_length, progress=bar.update)
        finally:
            bar.close()

    # ------------------------------------------------------------------ lm_eval API

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [self.encode_pair(*req.args) for req in requests]
        for i, (req, (_, cont)) in enumerate(zip(requests, pairs)):
            if not cont:
                raise ValueError(f"loglikelihood request {i}: the continuation {req.args[1]!r} has no tokens")
        results = self._score(pairs, "llada2_jax loglikelihood", disable_tqdm)
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        pairs, owner = [], []
        for i, req in enumerate(requests):
            ids = self.tokenizer.encode(req.args[0])
            for ctx, start, end in request_scoring.rolling_windows(len(ids), self.max_length,
                                                                   self.max_length // 2):
                pairs.append((ids[ctx:start], ids[start:end]))
                owner.append(i)
        scores = self._score(pairs, "llada2_jax loglikelihood_rolling", disable_tqdm) if pairs else []
        totals = [0.0] * len(requests)
        for i, (elbo, _) in zip(owner, scores):
            totals[i] += elbo
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generation_settings(self, gen_kwargs: dict) -> dict:
        """until (list), gen_length and sampling knobs from a task's generation kwargs."""
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"generation kwargs {unknown} are not supported by llada2_jax (supported: {GEN_KWARGS})")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        return dict(until=until, gen_length=_positive_int("max_gen_toks", gen_kwargs.get("max_gen_toks",
                                                                                          self.max_gen_toks)),
                    temperature=temperature, top_k=gen_kwargs.get("top_k"), top_p=gen_kwargs.get("top_p"))

    def generate_until(self, requests, disable_tqdm: bool = False):
        from tqdm import tqdm
        settings = [self.generation_settings(dict(req.args[1])) for req in requests]
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(settings):
            groups.setdefault((s["gen_length"], s["temperature"], s["top_k"], s["top_p"]), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="llada2_jax generate_until", disable=disable_tqdm)
        for (gen_length, temperature, top_k, top_p), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # one compiled batch shape
                prompts = [self.prompt_ids(requests[i].args[0], gen_length) for i in padded]
                for i, text in zip(chunk, self._decode(prompts, gen_length, temperature, top_k, top_p)):
                    out[i] = cut_at_stops(text, settings[i]["until"])
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        return out

    def prompt_ids(self, context: str, gen_length: int) -> list[int]:
        """The context's ids, oldest tokens dropped so that prompt + gen_length fits the model."""
        room = self.model.config.max_position_embeddings - gen_length
        if room < 0:
            raise ValueError(f"max_gen_toks={gen_length} exceeds the model's max_position_embeddings="
                             f"{self.model.config.max_position_embeddings}")
        ids = self.tokenizer.encode(context) if context else []
        return ids[len(ids) - room:] if len(ids) > room else ids

    def _decode(self, prompts, gen_length, temperature, top_k, top_p) -> list[str]:
        keys = jnp.stack([request_scoring.request_key(self.seed, p, []) for p in prompts])
        res = generate(self.model, prompts, gen_length=gen_length, block_size=self.block_size,
                       threshold=self.threshold, steps=self.steps, temperature=temperature, top_k=top_k,
                       top_p=top_p, mask_id=self.mask_id, eos_id=self.tokenizer.eos_id, rng=keys)
        eos = self.tokenizer.eos_id
        return [self.tokenizer.decode(ids[:-1] if ids and ids[-1] == eos else ids) for ids in res.tokens]


if "llada2_jax" not in model_registry:  # `python -m` runs this file as __main__, then may import it again
    register_model("llada2_jax")(LLaDA2LM)


def cut_at_stops(text: str, until) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


def main(argv: list[str] | None = None) -> None:
    """`lm-eval` with this model registered and the bundled tasks on the include path."""
    from lm_eval.__main__ import cli_evaluate
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", TASKS_DIR]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
