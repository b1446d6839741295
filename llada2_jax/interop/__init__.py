"""Checkpoint interop: `hf` (safetensors load/save), `gguf` (llama.cpp import + tokenizer),
`convert` (AR -> diffusion conversion steps such as adding `[MASK]`). Tables live in `mapping`."""
