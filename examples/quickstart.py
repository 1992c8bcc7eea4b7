"""Shift Parallelism on CPU ranks with a tiny built-in model: no GPU, no download.

    torchrun --nproc-per-node 4 examples/quickstart.py

Parallelizes a seeded two-layer Llama over a 2 x 2 (tp, sp) mesh, checks its logits against the
unparallelized Hugging Face model in both modes, then generates with a threshold that makes the engine switch
between SP-mode prefills and TP-mode decodes.
"""

import copy
import os

import torch

import shiftlib
from shiftlib.presets import random_model, tiny_config


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = 2 if world % 2 == 0 else 1
    mesh = shiftlib.init_mesh(tp=tp, sp=world // tp, device_type="cpu")
    reference = random_model(tiny_config("llama"), torch.float64)
    model = shiftlib.parallelize(copy.deepcopy(reference), mesh, threshold=8)
    rank0 = torch.distributed.get_rank() == 0

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    want = reference(input_ids=ids).logits
    for m in ("tp", "sp"):
        with shiftlib.mode(model, m):
            err = ((model(input_ids=ids).logits - want).abs().max() / want.abs().max()).item()
        if rank0:
            print(f"mesh tp={tp} x sp={world // tp}, {m} mode: relative logits error vs Hugging Face {err:.1e}")

    prompts = [ids[0].tolist(), ids[1, :5].tolist(), [7, 8, 9]]
    engine = shiftlib.Engine(model, num_blocks=64)
    outputs = engine.generate(prompts, shiftlib.SamplingParams(max_new_tokens=12))
    if rank0:
        modes = "".join(s.mode[0].upper() if s.mode == "sp" else "t" for s in engine.stats)
        print(f"steps by mode (S = SP, t = TP; threshold 8 tokens): {modes}")
        for p, o in zip(prompts, outputs):
            print(f"prompt {p[:6]}{'...' if len(p) > 6 else ''} -> {o}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
