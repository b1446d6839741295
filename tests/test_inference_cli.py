"""`python -m llada2_jax.generate`: loads a run's final weights and tokenizer and prints the completion."""
import json

from test_inference_decode import CFG, MASK, constant_model
from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers

from llada2_jax import generate as cli
from llada2_jax.data.tokenizers import HFTokenizer, load_tokenizer
from llada2_jax import workdir as model_source
from llada2_jax.training.checkpoint import Checkpointer
from llada2_jax.workdir import split_model

WORDS = ["<pad>", "<eos>", "[UNK]"] + [f"w{i}" for i in range(3, MASK)] + ["[MASK]"]


def write_run(workdir, model):
    """A finished run as the trainer leaves it: model config, final.json, checkpoint, tokenizer."""
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    HFTokenizer(raw, eos_token="<eos>", pad_token="<pad>", mask_token="[MASK]").save(str(workdir / "tokenizer"))
    model_source.save_model_config(str(workdir), model.config)
    ckpt = Checkpointer(str(workdir / "final_ckpt"), keep=1, async_save=False)
    _, params, buffers = split_model(model)
    ckpt.save_model(3, params, buffers, {"stage": "merge"})
    ckpt.wait()
    ckpt.close()
    model_source.write_final(str(workdir), ["merge"], str(workdir / "final_ckpt"), 3)


def test_cli_prints_completion_and_stats(tmp_path, capsys):
    write_run(tmp_path, constant_model({7: 0.99}))
    assert cli.main(["--workdir", str(tmp_path), "--prompt", "w5 w9 w11", "--gen_length", "12",
                     "--block_size", "8"]) == 0
    out, err = capsys.readouterr()
    tok = load_tokenizer(str(tmp_path / "tokenizer"))
    prompt = len(cli.prompt_ids(tok, "w5 w9 w11", raw=False))
    assert tok.has_chat_template and prompt > 3
    assert out.strip() == tok.decode([7] * 12)
    # one step per block (0.99 > 0.95), a prefill when the prompt has a full block; the cache refresh
    # of each completed block rides on the next block's first forward
    blocks = -(-(prompt + 12) // 8) - prompt // 8
    forwards = (prompt >= 8) + blocks
    assert f"forwards={forwards}," in err and f"TPF={12 / forwards:.2f}" in err
    assert json.loads((tmp_path / "model_config.json").read_text())["vocab_size"] == CFG.vocab_size


def test_generate_loads_without_training_code(tmp_path):
    """`generate` reads a workdir through `llada2_jax.workdir`: no training module is ever imported."""
    import subprocess
    import sys
    write_run(tmp_path, constant_model({7: 0.99}))
    code = ("import sys; from llada2_jax import generate; "
            f"code = generate.main(['--workdir={tmp_path}', '--prompt=w5 w9', '--gen_length=8', '--block_size=8']); "
            "loaded = sorted(m for m in sys.modules if m.startswith('llada2_jax.training')); "
            "print('TRAINING', loaded, code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"}).stdout
    assert "TRAINING [] 0" in out, out
