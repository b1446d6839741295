"""Export a trained run as a Hugging Face model directory.

    python -m llada2_jax.export --workdir=/tmp/tiny_wsd --out=/tmp/tiny_wsd_hf [--stage=wsd]

Writes into OUT:
  config.json + safetensors        the weights (sharded above --max_shard_mb, with an index), the
                                   family's HF architecture and `mask_token_id`
  generation_config.json           the block threshold decoding defaults (`interop.hf.save_generation_config`)
  tokenizer files                  the run's tokenizer for `AutoTokenizer` (`interop.hf_tokenizer_files`)
transformers loads OUT with `AutoModelForCausalLM` for the families it implements (Llama, Qwen2,
Qwen3, Qwen3-MoE); `llada2_jax.interop.hf.load_pretrained(OUT)` loads it back here.

Decoding defaults, first found wins: --block_size/--threshold; the run's `eval` stage record in
metrics.jsonl (the setting its samples were decoded with); the block size the exported stage last
trained at; `inference.generate`'s own defaults. A mistake prints one line and exits with code 2.
"""
from __future__ import annotations

import inspect
import os
import sys

from absl import flags

from llada2_jax import cli

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "a training run directory", flag_values=FLAGS)
flags.DEFINE_string("out", None, "the HF directory to write", flag_values=FLAGS)
flags.DEFINE_string("stage", None, "export the latest checkpoint of this stage instead of the run's output",
                    flag_values=FLAGS)
flags.DEFINE_integer("block_size", None, "decoding block size for generation_config.json (default: the run's)",
                     flag_values=FLAGS)
flags.DEFINE_float("threshold", None, "decoding confidence threshold in [0, 1] (default: the run's)",
                   flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the written weights", flag_values=FLAGS)
flags.DEFINE_integer("max_shard_mb", 2000, "largest safetensors shard in MB (bigger models get several)",
                     flag_values=FLAGS)
flags.DEFINE_boolean("overwrite", False, "write into a non-empty --out (replacing earlier weight files)",
                     flag_values=FLAGS)

EVAL_STAGE = "eval"  # `training.stages.final_eval`: logs the block size / threshold it decoded with
MERGED_DIR, MERGE_STAGE = "merged", "merge"


def library_defaults() -> dict:
    """`inference.generate`'s block_size and threshold defaults (the documented ones)."""
    from llada2_jax.inference.decode import generate
    params = inspect.signature(generate).parameters
    return {"block_size": params["block_size"].default, "threshold": params["threshold"].default}


def _output_stage(workdir: str, stage: str | None) -> str | None:
    """The stage whose records describe the exported weights."""
    if stage is not None:
        return stage
    from llada2_jax.workdir import read_final
    final = read_final(workdir) or {}
    name = os.path.basename(os.path.normpath(final.get("checkpoint_dir") or "")) or None
    return MERGE_STAGE if name == MERGED_DIR else name


def decoding_defaults(workdir: str, stage: str | None = None) -> dict:
    """{"block_size", "threshold", "source": where each came from} for the exported weights."""
    from llada2_jax.evaluation.plots import read_metrics
    records = read_metrics(workdir)
    found, source = {}, {}
    candidates = ([EVAL_STAGE] if stage is None else []) + [_output_stage(workdir, stage)]
    for name in candidates:
        for record in reversed(records):
            if record.get("stage") != name:
                continue
            for key in ("block_size", "threshold"):
                value = record.get(key)
                if key not in found and isinstance(value, (int, float)) and value > 0:
                    found[key], source[key] = value, f"metrics.jsonl stage {name!r}"
    for key, value in library_defaults().items():
        if key not in found:
            found[key], source[key] = value, "inference.generate default"
    return {"block_size": int(found["block_size"]), "threshold": float(found["threshold"]), "source": source}


def _prepare_out(out: str, overwrite: bool) -> None:
    if os.path.isfile(out):
        raise ValueError(f"--out={out!r} is a file; expected a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise ValueError(f"--out={out!r} is not empty (pass --overwrite to replace its weight files)")
        for name in os.listdir(out):  # stale shards of an earlier export would shadow the new index
            if name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json")):
                os.remove(os.path.join(out, name))


def export(workdir: str, out: str, *, stage: str | None = None, block_size: int | None = None,
           threshold: float | None = None, dtype: str = "float32", max_shard_bytes: int = 2000 * 10**6,
           overwrite: bool = False) -> dict:
    """Write the run's weights, configs and tokenizer into `out`; returns what was written."""
    from llada2_jax import workdir as wd
    from llada2_jax.interop import hf, hf_tokenizer_files
    if block_size is not None and block_size < 1:
        raise ValueError(f"--block_size={block_size} must be >= 1")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold={threshold} must be in [0, 1]")
    model = wd.load_model(workdir, stage, param_dtype=dtype, dtype=dtype)  # checks the workdir first
    _prepare_out(out, overwrite)
    defaults = decoding_defaults(workdir, stage)
    if block_size is not None:
        defaults["block_size"], defaults["source"]["block_size"] = block_size, "--block_size"
    if threshold is not None:
        defaults["threshold"], defaults["source"]["threshold"] = threshold, "--threshold"
    hf.save_pretrained(model, out, max_shard_bytes=max_shard_bytes)
    generation = hf.save_generation_config(out, model.config, block_size=defaults["block_size"],
                                           threshold=defaults["threshold"])
    tokenizer_dir = os.path.join(workdir, wd.TOKENIZER_DIR)
    tokenizer = None
    if os.path.isdir(tokenizer_dir):
        tokenizer = hf_tokenizer_files.save_tokenizer_files(
            tokenizer_dir, out, model_max_length=model.config.max_position_embeddings)
    return {"out": out, "architecture": model.config.to_hf_config()["architectures"][0],
            "generation": generation, "source": defaults["source"], "tokenizer": tokenizer is not None,
            "files": sorted(os.listdir(out))}


def _body(f) -> int:
    cli.require_workdir(f, ("workdir", "out"))
    if f.max_shard_mb < 1:
        raise ValueError(f"--max_shard_mb={f.max_shard_mb} must be >= 1")
    result = export(f.workdir, f.out, stage=f.stage, block_size=f.block_size, threshold=f.threshold,
                    dtype=f.dtype, max_shard_bytes=f.max_shard_mb * 10**6, overwrite=f.overwrite)
    g, src = result["generation"], result["source"]
    print(f"[export] {result['architecture']} -> {result['out']}: block_size={g['block_size']} "
          f"({src['block_size']}), threshold={g['threshold']} ({src['threshold']}), "
          f"mask_token_id={g['mask_token_id']}, tokenizer={'yes' if result['tokenizer'] else 'none in the run'}",
          flush=True)
    print("[export] files: " + ", ".join(result["files"]), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run("export", __doc__, FLAGS, argv, _body)


if __name__ == "__main__":
    sys.exit(main())
