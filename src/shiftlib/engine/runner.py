"""Turns a step plan into tensors, runs the model in the step's mode, and returns logits of sampled rows."""

from __future__ import annotations

import torch

from shiftlib.cache import PagedKVCache
from shiftlib.engine.scheduler import StepPlan
from shiftlib.engine.sequence import Sequence
from shiftlib.modules.model import ShiftModel
from shiftlib.paged_attention import AttentionBatch


class Runner:
    def __init__(self, model, shift: ShiftModel, cache: PagedKVCache) -> None:
        self.model, self.shift, self.cache = model, shift, cache
        self.device = shift.mesh.device

    def inputs(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor, list[Sequence]]:
        """Host-side lists for the whole step, moved to the device in one go per tensor."""
        bs = self.cache.block_size
        tokens, positions, seq_idx, slots, rows, sampled = [], [], [], [], [], []
        query_start, context_lens = [0], []
        for b, (seq, n) in enumerate(plan.work):
            start = seq.num_cached
            tokens += seq.tokens[start : start + n]
            positions += range(start, start + n)
            seq_idx += [b] * n
            slots += [seq.blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
            query_start.append(query_start[-1] + n)
            context_lens.append(start + n)
            if start + n == seq.num_tokens:  # all known tokens are in: sample the next one
                rows.append(query_start[-1] - 1)
                sampled.append(seq)
        width = max(len(seq.blocks) for seq, _ in plan.work)
        tables = [seq.blocks + [0] * (width - len(seq.blocks)) for seq, _ in plan.work]

        def dev(x, dtype=torch.long) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype).to(self.device, non_blocking=True)

        pos = dev(positions)
        batch = AttentionBatch(
            seq_idx=dev(seq_idx),
            query_pos=pos,
            write_slots=dev(slots),
            block_tables=dev(tables, torch.int32),
            block_size=bs,
            context_lens=dev(context_lens, torch.int32),
            query_start=query_start,
            context_lens_host=context_lens,
            decode=all(n == 1 for _, n in plan.work),
        )
        return dev(tokens), pos, batch, dev(rows), sampled

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> tuple[torch.Tensor, list[Sequence]]:
        tokens, positions, batch, rows, sampled = self.inputs(plan)
        if not sampled:
            rows = rows.new_zeros(0)
        h = self.shift.hidden(tokens, positions, batch, plan.mode, rows, self.cache.layers, self.cache.trash_slot)
        return self.model.lm_head(h), sampled
