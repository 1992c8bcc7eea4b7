"""Turns a step plan into tensors, runs the model in the step's mode, and returns logits of sampled rows.

On GPU, decode steps replay CUDA graphs, one per (mode, batch bucket, block-table width), captured before
serving starts (:meth:`Runner.capture`): inputs are copied into static buffers, and padding rows write to the
cache's trash slot and attend to nothing. SP-mode buckets are multiples of ``sp``, so no step pads again inside
a graph. Mixed and prefill steps run eagerly unless ``max_mixed_tokens`` is set: then those up to that size
replay graphs per (mode, token bucket), in which the decode kernel takes the step's decodes and the varlen
prefill kernel the other sequences, both over a fixed number of sequence slots
(:func:`shiftlib.paged_attention.attend`); :func:`mixed_graph_tokens` picks the size. On CPU the same static
paths run without capture when asked for, which is how the tests check the graphs' padding and buffers.
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np
import torch

from shiftlib.cache import PagedKVCache
from shiftlib.engine.scheduler import StepPlan
from shiftlib.engine.sequence import Sequence
from shiftlib.modules.model import ShiftModel
from shiftlib.paged_attention import AttentionBatch

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
MIXED_STEP = 128  # token buckets of mixed-step graphs: multiples of this (and 16, 32, 64 below it)


def mixed_graph_tokens(world: int, max_num_tokens: int, asked: int | None = None) -> int:
    """The largest mixed step that replays a graph: ``asked``, within the budget; by default, as follows.

    An eager step costs ~0.6 ms of host time per layer (the compiled pieces' guards and wrappers,
    :mod:`shiftlib.modules.fused`), whatever its size. On one H200 at P = 1 (8B shape, 32 layers) a step over
    1,024 tokens has more GPU work than that, and it runs at the power cap: the graphs' lack of idle time slowed
    the kernels (2,048 tokens: 53.8 ms as a graph, 43.4 eager). Each rank at P > 1 holds a shard of the GEMMs
    but all the launches: its 1/8 slice took 36.4 ms eager for a 2,048-token step against 8.2 as a graph (4,096:
    38.4 against 14.9), so there every step of the budget replays one."""
    return min(max_num_tokens, asked if asked is not None else max_num_tokens if world > 1 else 1024)


class Runner:
    def __init__(self, model, shift: ShiftModel, cache: PagedKVCache, max_context: int, cuda_graphs: bool,
                 max_graph_batch: int, max_mixed_tokens: int = 0, max_num_seqs: int = 0) -> None:
        self.model, self.shift, self.cache = model, shift, cache
        self.device = shift.mesh.device
        self.graphs: dict[tuple[str, int, int], _Graph] = {}  # by (mode, batch bucket, block-table width)
        self.mixed: dict[tuple[str, int], _Graph] = {}  # by (mode, token bucket)
        self.use_graphs, self.graph_rows = cuda_graphs, None  # graph_rows: the largest step that replays a graph
        if self.use_graphs:
            sp = shift.mesh.sp
            n = max(b for b in GRAPH_BUCKETS if b <= max(max_graph_batch, 1))
            self.buckets = sorted({x for b in GRAPH_BUCKETS if b <= n for x in (b, -(-b // sp) * sp)})
            self.graph_rows = self.buckets[-1]
            self.mixed_seqs = max_num_seqs if max_mixed_tokens and _fixed_shapes_supported(shift, cache) else 0
            steps = (16, 32, 64, *range(MIXED_STEP, max_mixed_tokens + MIXED_STEP, MIXED_STEP)) * bool(self.mixed_seqs)
            self.mixed_buckets = sorted({-(-b // sp) * sp for b in steps[: bisect_left(steps, max_mixed_tokens) + 1]})
            rows, seqs = max([self.graph_rows, *self.mixed_buckets]), max(self.graph_rows, self.mixed_seqs)
            width = -(-min(max_context, cache.capacity_tokens) // cache.block_size)
            long, int32 = dict(dtype=torch.long, device=self.device), dict(dtype=torch.int32, device=self.device)
            self.static = dict(
                tokens=torch.zeros(rows, **long),
                positions=torch.zeros(rows, **long),
                write_slots=torch.full((rows,), cache.trash_slot, **long),
                block_tables=torch.zeros(seqs, width, **int32),
                context_lens=torch.zeros(seqs, **int32),
                decode_lens=torch.zeros(self.mixed_seqs, **int32),
                prefill_start=torch.zeros(self.mixed_seqs + 1, **int32),
                sampled=torch.zeros(self.mixed_seqs, **long),
                logits=torch.empty(self.mixed_seqs, model.config.vocab_size, dtype=shift.norm._w.dtype,
                                   device=self.device),
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
            block_tables_host=tables,
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
        """Capture, before serving, every graph that a step picks with ``pick_mode``, so no step waits for one (a
        later mode or threshold change captures what it lacks on first use). Largest first: the smaller graphs
        reuse the larger ones' memory in the shared pool."""
        keys, mixed = set(), set()
        for n in range(1, self.buckets[-1] + 1):
            mode, bucket, _ = self._key(pick_mode(n), n, 1)
            keys |= {(mode, bucket, w) for w in self.widths[bucket]}
        for n in range(2, (self.mixed_buckets or [0])[-1] + 1):
            mixed.add(self._mixed_key(pick_mode(n), n))
        for key in sorted(mixed, key=lambda k: -k[1]):
            self.mixed[key] = self._capture_mixed(*key)
        for key in sorted(keys, key=lambda k: (-k[1], k)):
            self.graphs[key] = self._capture(*key)

    def _mixed_key(self, mode: str, n: int) -> tuple[str, int]:
        return mode, next(b for b in self.mixed_buckets if b >= n and (mode == "tp" or b % self.shift.mesh.sp == 0))

    @torch.inference_mode()
    def run(self, plan: StepPlan, previous: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Sequence]]:
        """The logits of the step's sampled rows, and the request of each row; ``previous``: the tokens of the step
        in flight, if any."""
        tokens, positions, batch, rows, sampled = self.inputs(plan, previous)
        n = tokens.shape[0]
        if self.use_graphs and batch.decode and n <= self.buckets[-1]:
            key = self._key(plan.mode, n, batch.block_tables.shape[1])
            return self._replay(key, tokens, batch)[:n], sampled
        fits = self.use_graphs and n <= (self.mixed_buckets or [0])[-1]
        if fits and len(batch.context_lens_host) <= self.mixed_seqs:
            return self._replay_mixed(self._mixed_key(plan.mode, n), tokens, batch, rows)[: len(sampled)], sampled
        return self._forward(tokens, positions, batch, plan.mode, rows), sampled

    def _fill(self, bucket: int, tokens: torch.Tensor, batch: AttentionBatch) -> None:
        """The step's rows into the static buffers; the rows up to ``bucket`` are padding."""
        n, s = tokens.shape[0], self.static
        s["tokens"][:n].copy_(tokens)
        s["positions"][:n].copy_(batch.query_pos)
        s["write_slots"][:n].copy_(batch.write_slots)
        s["write_slots"][n:bucket].fill_(self.cache.trash_slot)
        b, width = batch.block_tables.shape
        s["context_lens"][:b].copy_(batch.context_lens)
        s["block_tables"][:b, :width].copy_(batch.block_tables)

    def _replay(self, key: tuple[str, int, int], tokens: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        self._fill(key[1], tokens, batch)
        self.static["context_lens"][tokens.shape[0] : key[1]].zero_()
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        return self.graphs[key].replay()

    def _replay_mixed(self, key: tuple[str, int], tokens: torch.Tensor, batch: AttentionBatch, rows: torch.Tensor
                      ) -> torch.Tensor:
        """Sequences past the step's are empty; the decode lengths are those of the step's leading decodes, and
        the prefill kernel's query offsets give those decodes no rows."""
        s, b, nd = self.static, len(batch.context_lens_host), batch.num_decodes
        self._fill(key[1], tokens, batch)
        s["context_lens"][b : self.mixed_seqs].zero_()
        index = torch.arange(self.mixed_seqs + 1, device=self.device)
        s["prefill_start"].copy_(batch.query_start_device[index.clamp(nd, b)])
        s["decode_lens"].copy_(torch.where(index[:-1] < nd, s["context_lens"][: self.mixed_seqs], 0))
        s["sampled"][: rows.shape[0]].copy_(rows)
        s["sampled"][rows.shape[0] :].zero_()
        if key not in self.mixed:
            self.mixed[key] = self._capture_mixed(*key)
        return self.mixed[key].replay()

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
        return self._graph(lambda: self._forward(*args))

    def _capture_mixed(self, mode: str, bucket: int) -> _Graph:
        """Every sequence slot of the buffers, the first ``min(sequences, bucket)`` of them as decode rows; the
        logits land in one buffer that all mixed graphs share (a graph's own would stay allocated)."""
        s, seqs = self.static, self.mixed_seqs
        decodes = min(seqs, bucket)
        batch = AttentionBatch(
            query_pos=s["positions"][:bucket],
            write_slots=s["write_slots"][:bucket],
            block_tables=s["block_tables"][:seqs],
            block_size=self.cache.block_size,
            context_lens=s["context_lens"][:seqs],
            query_start=[],
            context_lens_host=[],
            decode_lens=s["decode_lens"][:decodes],
            prefill_start=s["prefill_start"],
        )
        args = (s["tokens"][:bucket], s["positions"][:bucket], batch, mode, s["sampled"])
        return self._graph(lambda: s["logits"].copy_(self._forward(*args)))

    def _graph(self, step) -> _Graph:
        if self.device.type != "cuda":
            return _Graph(step)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            step()  # warm-up: lazy inits and kernel autotuning happen outside the graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()
        return _Graph(step, graph, logits)


def _fixed_shapes_supported(shift: ShiftModel, cache: PagedKVCache) -> bool:
    """Mixed steps get graphs where both attention kernels take fixed shapes: on GPU, the Triton prefill kernel
    must take the cache's dtype, head size and block size; on CPU the PyTorch twins take anything."""
    if cache.data.device.type != "cuda":
        return True
    from shiftlib.triton_prefill import supports

    return supports(cache.data[0, 0, :1], cache.block_size)


class _Graph:
    """A captured step; ``step`` reads static tensors (kept alive by it: the graph holds their addresses).

    Without a CUDA graph (CPU) ``replay`` runs the same step on the same static buffers.
    """

    def __init__(self, step, graph: torch.cuda.CUDAGraph | None = None, logits: torch.Tensor | None = None) -> None:
        self.step, self.graph, self.logits = step, graph, logits
        self.replays = 0

    def replay(self) -> torch.Tensor:
        self.replays += 1
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.logits
