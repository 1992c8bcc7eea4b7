"""Turns a step plan into tensors, runs the model in the step's mode, and returns logits of sampled rows.

Decode steps on GPU replay CUDA graphs, one per (mode, batch bucket, block-table width): inputs are copied into
static buffers, padding rows write to the cache's trash slot and attend to nothing, and SP-mode buckets are
multiples of ``sp`` so no step pads again inside the graph. Prefill and mixed steps run eagerly (their shapes
vary, and their GEMMs are large enough that launch overhead does not matter). On CPU the same static path runs
without capture when asked for, which is how the tests check the graphs' padding and buffers.
"""

from __future__ import annotations

import numpy as np
import torch

from shiftlib.cache import PagedKVCache
from shiftlib.engine.scheduler import StepPlan
from shiftlib.engine.sequence import Sequence
from shiftlib.modules.model import ShiftModel
from shiftlib.paged_attention import AttentionBatch

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class Runner:
    def __init__(self, model, shift: ShiftModel, cache: PagedKVCache, max_context: int, cuda_graphs: bool, max_graph_batch: int) -> None:
        self.model, self.shift, self.cache = model, shift, cache
        self.device = shift.mesh.device
        self.graphs: dict[tuple[str, int, int], _Graph] = {}  # by (mode, batch bucket, block-table width)
        self.use_graphs = cuda_graphs
        if self.use_graphs:
            n = max(b for b in GRAPH_BUCKETS if b <= max(max_graph_batch, 1))
            self.buckets = sorted({-(-b // shift.mesh.sp) * shift.mesh.sp for b in GRAPH_BUCKETS if b <= n} | {b for b in GRAPH_BUCKETS if b <= n})
            width = -(-min(max_context, cache.capacity_tokens) // cache.block_size)
            long = dict(dtype=torch.long, device=self.device)
            self.static = dict(
                tokens=torch.zeros(self.buckets[-1], **long),
                positions=torch.zeros(self.buckets[-1], **long),
                write_slots=torch.full((self.buckets[-1],), cache.trash_slot, **long),
                block_tables=torch.zeros(self.buckets[-1], width, dtype=torch.int32, device=self.device),
                context_lens=torch.zeros(self.buckets[-1], dtype=torch.int32, device=self.device),
            )
            self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None

    def inputs(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor, list[Sequence]]:
        """Host-side lists for the whole step, moved to the device in one go per tensor."""
        bs = self.cache.block_size
        tokens, positions, slots, rows, sampled = [], [], [], [], []
        query_start, context_lens = [0], []
        tables = np.zeros((len(plan.work), max(len(seq.blocks) for seq, _ in plan.work)), dtype=np.int32)
        for b, (seq, n) in enumerate(plan.work):
            tables[b, : len(seq.blocks)] = seq.blocks
            start = seq.num_cached
            tokens += seq.token_slice(start, start + n)
            positions += range(start, start + n)
            slots += [seq.blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
            query_start.append(query_start[-1] + n)
            context_lens.append(start + n)
            if start + n == seq.num_tokens:  # all known tokens are in: sample the next one
                rows.append(query_start[-1] - 1)
                sampled.append(seq)

        def dev(x, dtype=torch.long) -> torch.Tensor:
            return torch.as_tensor(x, dtype=dtype).to(self.device, non_blocking=True)

        pos = dev(positions)
        batch = AttentionBatch(
            query_pos=pos,
            write_slots=dev(slots),
            block_tables=dev(tables, torch.int32),
            block_size=bs,
            context_lens=dev(context_lens, torch.int32),
            query_start=query_start,
            context_lens_host=context_lens,
            decode=all(n == 1 for _, n in plan.work),
            num_decodes=next((b for b, (_, n) in enumerate(plan.work) if n > 1), len(plan.work)),
        )
        return dev(tokens), pos, batch, dev(rows), sampled

    def _forward(self, tokens, positions, batch: AttentionBatch, mode: str, rows) -> torch.Tensor:
        h = self.shift.hidden(tokens, positions, batch, mode, rows, self.cache.layers, self.cache.trash_slot)
        return self.model.lm_head(h)

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> tuple[torch.Tensor, list[Sequence]]:
        tokens, positions, batch, rows, sampled = self.inputs(plan)
        n = tokens.shape[0]
        if self.use_graphs and batch.decode and n <= self.buckets[-1]:
            bucket = next(b for b in self.buckets if b >= n and (plan.mode == "tp" or b % self.shift.mesh.sp == 0))
            width = max(16, 1 << (batch.block_tables.shape[1] - 1).bit_length())  # the kernel's splits follow it
            return self._replay(plan.mode, bucket, min(width, self.static["block_tables"].shape[1]), tokens, batch)[:n], sampled
        return self._forward(tokens, positions, batch, plan.mode, rows), sampled

    def _replay(self, mode: str, bucket: int, width: int, tokens: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        n, s = tokens.shape[0], self.static
        s["tokens"][:n].copy_(tokens)
        s["positions"][:n].copy_(batch.query_pos)
        s["write_slots"][:n].copy_(batch.write_slots)
        s["write_slots"][n:bucket].fill_(self.cache.trash_slot)
        s["context_lens"][:n].copy_(batch.context_lens)
        s["context_lens"][n:bucket].zero_()
        s["block_tables"][:n, : batch.block_tables.shape[1]].copy_(batch.block_tables)
        key = (mode, bucket, width)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        return self.graphs[key].replay()

    def _capture(self, mode: str, bucket: int, width: int) -> _Graph:
        s = self.static
        batch = AttentionBatch(
            query_pos=s["positions"][:bucket],
            write_slots=s["write_slots"][:bucket],
            block_tables=s["block_tables"][:bucket, :width],
            block_size=self.cache.block_size,
            context_lens=s["context_lens"][:bucket],
            query_start=list(range(bucket + 1)),
            context_lens_host=[1] * bucket,
            decode=True,
        )
        rows = torch.arange(bucket, device=self.device)
        args = (s["tokens"][:bucket], s["positions"][:bucket], batch, mode, rows)
        if self.device.type != "cuda":
            return _Graph(self, args)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(*args)  # warm-up: lazy inits and kernel autotuning happen outside the graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(*args)
        return _Graph(self, args, graph, logits)


class _Graph:
    """A captured decode step and the static tensors it reads (kept alive: the graph holds their addresses).

    Without a CUDA graph (CPU) ``replay`` runs the same forward on the same static buffers.
    """

    def __init__(self, runner: Runner, args: tuple, graph: torch.cuda.CUDAGraph | None = None, logits: torch.Tensor | None = None) -> None:
        self.runner, self.args, self.graph, self.logits = runner, args, graph, logits

    def replay(self) -> torch.Tensor:
        if self.graph is None:
            return self.runner._forward(*self.args)
        self.graph.replay()
        return self.logits
