"""Turns a step plan into tensors, runs the model in the step's mode, and returns logits of sampled rows.

Decode steps on GPU replay CUDA graphs, one per (mode, batch bucket, block-table width), captured before serving
starts (:meth:`Runner.capture`): inputs are copied into static buffers, padding rows write to the cache's trash
slot and attend to nothing, and SP-mode buckets are multiples of ``sp`` so no step pads again inside the graph. Prefill and mixed steps run eagerly (their shapes
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
        self.use_graphs, self.graph_rows = cuda_graphs, None  # graph_rows: the largest step that replays a graph
        if self.use_graphs:
            n = max(b for b in GRAPH_BUCKETS if b <= max(max_graph_batch, 1))
            self.buckets = sorted({-(-b // shift.mesh.sp) * shift.mesh.sp for b in GRAPH_BUCKETS if b <= n} | {b for b in GRAPH_BUCKETS if b <= n})
            self.graph_rows = self.buckets[-1]
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
            self.widths = {b: self._split_widths(b) for b in self.buckets}

    def inputs(self, plan: StepPlan, previous: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor, list[Sequence]]:
        """Host-side lists for the whole step, moved to the device in one transfer from pinned memory.

        A request with a draft of k tokens runs them after its pending token as k + 1 decode rows of their own
        (one query each over the same blocks), so verification takes the decode kernel and its CUDA graphs;
        all k + 1 rows are sampled, and the request is listed once per row. A token still on the device (the
        step in flight sampled it: :mod:`shiftlib.engine.inflight`) is taken from ``previous``, that step's tokens.
        """
        bs = self.cache.block_size
        tokens, positions, slots, rows, sampled, fill_at, fill_from = [], [], [], [], [], [], []
        query_start, context_lens, tables = [0], [], []
        for seq, n in plan.work:
            start, k = seq.num_cached, len(seq.draft)
            known = seq.token_slice(start, start + n - k)
            if len(known) < n - k:
                fill_at.append(len(tokens) + len(known))
                fill_from.append(seq.inflight_row)
                known.append(0)
            tokens += known + seq.draft
            positions += range(start, start + n)
            slots += [seq.blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
            for end in range(start + 1, start + n + 1) if k else (start + n,):
                query_start.append(query_start[-1] + (1 if k else n))
                context_lens.append(end)
                tables.append(seq.blocks)
            if start + n - k == seq.num_tokens:  # all known tokens are in: sample the next one (and verify)
                rows += range(query_start[-1] - 1 - k, query_start[-1])
                sampled += [seq] * (k + 1)
        block_tables = np.zeros((len(tables), max(map(len, tables))), dtype=np.int64)
        for b, blocks in enumerate(tables):
            block_tables[b, : len(blocks)] = blocks
        parts = [tokens, positions, slots, context_lens, rows, fill_at, fill_from]
        flat = torch.from_numpy(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts] + [block_tables.ravel()]))
        flat = (flat.pin_memory() if self.device.type == "cuda" else flat).to(self.device, non_blocking=True)
        tok, pos, slot, lens, row, at, src, table = flat.split([len(p) for p in parts] + [block_tables.size])
        if fill_at:
            tok = tok.index_copy(0, at, previous[src])
        batch = AttentionBatch(
            query_pos=pos,
            write_slots=slot,
            block_tables=table.view(block_tables.shape).int(),
            block_size=bs,
            context_lens=lens.int(),
            query_start=query_start,
            context_lens_host=context_lens,
            decode=len(tables) == len(tokens),
            num_decodes=next((b for b in range(len(tables)) if query_start[b + 1] - query_start[b] > 1), len(tables)),
        )
        return tok, pos, batch, row, sampled

    def _forward(self, tokens, positions, batch: AttentionBatch, mode: str, rows) -> torch.Tensor:
        h = self.shift.hidden(tokens, positions, batch, mode, rows, self.cache.layers, self.cache.trash_slot)
        return self.model.lm_head(h)

    def _key(self, mode: str, n: int, table_width: int) -> tuple[str, int, int]:
        """The graph of a decode step of ``n`` rows: the smallest bucket that fits (SP mode: a multiple of ``sp``)
        and the narrowest captured block-table width that holds ``table_width`` blocks."""
        bucket = next(b for b in self.buckets if b >= n and (mode == "tp" or b % self.shift.mesh.sp == 0))
        return mode, bucket, next(w for w in self.widths[bucket] if w >= table_width)

    def _split_widths(self, bucket: int) -> list[int]:
        """Block-table widths worth a graph of their own: the decode kernel's split count follows the width
        (at small batch), so each run of widths with one split count gets one graph, at its widest."""
        from shiftlib.triton_decode import default_config, num_splits, _sm_count

        full = self.static["block_tables"].shape[1]
        data, bs = self.cache.data, self.cache.block_size
        cfg, sm = default_config(data[0, 0, :1]), _sm_count(self.device)
        windows = {layer.self_attn.window for layer in self.shift.layers}
        splits = {w: tuple(num_splits(bucket, data.shape[3], w, bs, win, cfg, sm) for win in windows)
                  for w in sorted({min(1 << i, full) for i in range(4, full.bit_length() + 1)} | {full})}
        return [w for w, next_w in zip(splits, list(splits)[1:] + [None]) if next_w is None or splits[next_w] != splits[w]]

    def capture(self, pick_mode) -> None:
        """Capture, before serving, every graph that a decode batch picks with ``pick_mode``, so no step waits
        for one (a later mode or threshold change captures what it lacks on first use)."""
        keys = set()
        for n in range(1, self.buckets[-1] + 1):
            mode, bucket, _ = self._key(pick_mode(n), n, 1)
            keys |= {(mode, bucket, w) for w in self.widths[bucket]}
        for key in sorted(keys):
            self.graphs[key] = self._capture(*key)

    @torch.inference_mode()
    def run(self, plan: StepPlan, previous: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Sequence]]:
        """The logits of the step's sampled rows, and the request of each row; ``previous``: the tokens of the step
        in flight, if any."""
        tokens, positions, batch, rows, sampled = self.inputs(plan, previous)
        n = tokens.shape[0]
        if self.use_graphs and batch.decode and n <= self.buckets[-1]:
            key = self._key(plan.mode, n, batch.block_tables.shape[1])
            return self._replay(key, tokens, batch)[:n], sampled
        return self._forward(tokens, positions, batch, plan.mode, rows), sampled

    def _replay(self, key: tuple[str, int, int], tokens: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        n, s, bucket = tokens.shape[0], self.static, key[1]
        s["tokens"][:n].copy_(tokens)
        s["positions"][:n].copy_(batch.query_pos)
        s["write_slots"][:n].copy_(batch.write_slots)
        s["write_slots"][n:bucket].fill_(self.cache.trash_slot)
        s["context_lens"][:n].copy_(batch.context_lens)
        s["context_lens"][n:bucket].zero_()
        s["block_tables"][:n, : batch.block_tables.shape[1]].copy_(batch.block_tables)
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
        self.replays = 0

    def replay(self) -> torch.Tensor:
        self.replays += 1
        if self.graph is None:
            return self.runner._forward(*self.args)
        self.graph.replay()
        return self.logits
