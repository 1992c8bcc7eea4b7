"""The peer a PyTorch user would otherwise pick: Hugging Face ``generate`` on the same model and the same GPUs.

``generate`` batches statically: a closed loop of ``c`` clients becomes batches of ``c`` prompts, each batch
starting when the last one ends. On several ranks the model is loaded with ``tp_plan="auto"`` (Hugging Face's
own tensor parallelism); that needs a checkpoint on disk, so rank 0 saves the seeded random model first.
"""

from __future__ import annotations

import shutil
import tempfile

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from shiftlib.bench.driver import Clock
from shiftlib.bench.metrics import RequestRecord, StepRecord
from shiftlib.bench.workloads import Load
from shiftlib.presets import random_model


def load_hf_model(config, dtype: torch.dtype, device: torch.device, seed: int) -> tuple[torch.nn.Module, str]:
    """The unparallelized model on one rank; with tensor parallelism (``tp_plan="auto"``) over all ranks.

    Returns the model and a note saying how it runs (the record carries it). If Hugging Face's tensor
    parallelism fails for this model or machine, every rank runs its own copy and the note says why.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return random_model(config, dtype, device, seed), "1 GPU" if device.type == "cuda" else "1 CPU rank"
    path = [tempfile.mkdtemp(prefix="shiftlib-bench-hf-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    try:
        if dist.get_rank() == 0:
            model = random_model(config, dtype, device, seed)
            model.save_pretrained(path[0])
            del model
        dist.barrier()
        try:
            model = AutoModelForCausalLM.from_pretrained(path[0], tp_plan="auto", dtype=dtype)
            return model.eval(), f"tp_plan='auto' over {world} ranks"
        except Exception as e:  # noqa: BLE001 -- any failure of the peer's TP is a finding, not a crash
            note = f"tp_plan='auto' failed ({type(e).__name__}: {str(e)[:200]}); each rank ran its own copy on 1 device"
            return random_model(config, dtype, device, seed), note
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(path[0], ignore_errors=True)


class _Stamps(LogitsProcessor):
    """Called once per generated token, after the forward that produced its logits: when each token was ready."""

    def __init__(self, clock: Clock, sync: bool) -> None:
        self.clock, self.sync, self.times = clock, sync, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(self.clock.local())
        return scores


@torch.inference_mode()
def run_hf(model, load: Load, clock: Clock, on_finish=lambda: None) -> tuple[list[RequestRecord], list[StepRecord]]:
    """Batches of ``load.concurrency`` prompts of one length through ``generate``, one after another."""
    if load.concurrency is None:
        raise ValueError(
            f"the Hugging Face peer runs closed-loop loads only, not {load.workload!r}: generate has no "
            f"continuous batching to admit requests as they arrive"
        )
    device = next(model.parameters()).device
    records, steps = [], []
    clock.start()
    for first in range(0, len(load.requests), load.concurrency):
        batch = load.requests[first : first + load.concurrency]
        lengths = {(len(r.prompt), r.output_len) for r in batch}
        if len(lengths) != 1:
            raise ValueError("the Hugging Face peer needs one prompt and output length per batch (no padding)")
        ((n_in, n_out),) = lengths
        ids = torch.tensor([r.prompt for r in batch], device=device)
        stamps = _Stamps(clock, device.type == "cuda")
        start = clock.local()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n_out,
            min_new_tokens=n_out,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([stamps]),
        )
        times = stamps.times
        if len(times) != n_out:
            raise RuntimeError(f"generate produced {len(times)} tokens, asked for {n_out}")
        for _ in batch:
            records.append(RequestRecord(start, n_in, n_out, times[0], times[-1]))
            on_finish()
        prev = start
        for i, t in enumerate(times):
            steps.append(StepRecord(t, "hf", len(batch) * (n_in if i == 0 else 1), len(batch), t - prev, 0))
            prev = t
    return records, steps
