"""The 2-D (tp, sp) mesh, the collectives of both modes, and where each attention head lives.

Chunk rule (DESIGN.md): the rank at mesh coordinate (t, s) owns head chunk ``c = t * sp + s`` of ``P = tp * sp``
chunks in *both* modes. That single rule is what lets one paged KV cache serve TP and SP steps alike.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

MESH_DIMS = ("tp", "sp")


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


DIST_TIMEOUT_S = 600.0


def ensure_process_group(device_type: str, timeout_s: float = DIST_TIMEOUT_S) -> None:
    """Join torchrun's process group, or make a one-rank group for a plain ``python`` run.

    A finite timeout bounds how long a rank waits for a frozen peer (a dead one is noticed at once: its sockets
    close), so a failure elsewhere never leaves this rank hanging forever. A group made here is torn down by
    :func:`shutdown` at exit.
    """
    global _owns_group
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if device_type == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    _owns_group = True
    _watch_for_failure()


# Teardown. A gloo worker thread drops its reference to a collective's tensors only after the collective has
# completed, and that last decref takes the GIL. If the interpreter is already finalizing when it does, the thread
# exits inside C++ and the process dies with SIGABRT ("terminate called without an active exception") after its
# work is done. So before the interpreter shuts down, every group shiftlib used is drained: a barrier (which
# carries no tensors, and waits with the GIL released) queued behind the last collective of each group.
_owns_group = False
_groups: dict[str, None] = {}  # groups to drain, by name, in the order meshes made them (the same on every rank)
_failed = False


def _watch_for_failure() -> None:
    """Skip the drain after an uncaught exception: peers may be gone, and a barrier would wait for them."""
    previous = sys.excepthook

    def hook(*exc_info) -> None:
        global _failed
        _failed = True
        previous(*exc_info)

    sys.excepthook = hook
    atexit.register(shutdown)


def drain_at_exit(group: dist.ProcessGroup) -> None:
    """Have :func:`shutdown` drain ``group`` too: a group made outside the mesh (the server's control group)."""
    _groups.setdefault(group.group_name)


def shutdown() -> None:
    """Finish this process's distributed work in order; called at exit for a group shiftlib made.

    Drains every process group shiftlib ran collectives on (so no worker thread still holds a tensor when the
    interpreter shuts down), then destroys the process group if :func:`init_mesh` created it; a group the caller
    made is left to the caller. Every rank must call it (it synchronizes); it is a no-op when there is no group,
    and after an uncaught exception only the local teardown runs.
    """
    global _owns_group
    if not dist.is_initialized():
        return
    if not _failed:
        for name in [dist.group.WORLD.group_name, *_groups]:
            group = dist.distributed_c10d._resolve_process_group(name)
            devices = [torch.cuda.current_device()] if dist.get_backend(group) == "nccl" else None
            for _ in range(2):  # gloo runs two workers per group: one barrier each
                dist.barrier(group=group, device_ids=devices)
    _groups.clear()
    if _owns_group:
        _owns_group = False
        dist.destroy_process_group()


def init_mesh(tp: int, sp: int, device_type: str | None = None, timeout_s: float | None = None) -> DeviceMesh:
    """Build the 2-D ``("tp", "sp")`` mesh over the default process group.

    ``sp`` is the inner dimension, so the global rank of mesh coordinate (t, s) is ``t * sp + s``: the head
    chunk it owns. Under torchrun the process group is created from the environment; in a plain single
    process a one-rank group is made, so ``init_mesh(1, 1)`` works anywhere.

    Args:
        tp: tensor-parallel size of SP mode (weights are sharded ``tp`` ways).
        sp: Ulysses sequence-parallel size (tokens are split ``sp`` ways in SP mode).
        device_type: ``"cuda"`` or ``"cpu"``; defaults to CUDA when available.
        timeout_s: how long a rank waits in a collective for a peer before it raises (when the process group is
            created here; default 600): bounds the wait on a frozen peer.

    Returns:
        A ``DeviceMesh`` of shape ``(tp, sp)`` with dims named ``"tp"`` and ``"sp"``.

    Raises:
        ValueError: ``tp`` or ``sp`` is not positive, or ``tp * sp`` differs from the world size.

    Example:
        >>> mesh = shiftlib.init_mesh(tp=2, sp=2)   # under torchrun --nproc-per-node 4
    """
    if tp < 1 or sp < 1:
        raise ValueError(f"tp and sp must be positive integers, got tp={tp}, sp={sp}")
    device_type = device_type or _default_device_type()
    ensure_process_group(device_type, timeout_s or DIST_TIMEOUT_S)
    world = dist.get_world_size()
    if tp * sp != world:
        raise ValueError(
            f"mesh tp={tp} x sp={sp} = {tp * sp} ranks does not match the world size {world}: "
            f"launch with `torchrun --nproc-per-node {tp * sp}` or choose tp * sp = {world}"
        )
    return init_device_mesh(device_type, (tp, sp), mesh_dim_names=MESH_DIMS)


# The functional collective ops themselves, each followed by its wait: what torch.compile traces and a CUDA graph
# captures. Not the Python wrappers of torch.distributed._functional_collectives: their AsyncCollectiveTensor keeps
# the process group alive past destroy_process_group(), until interpreter shutdown, where a gloo worker thread that
# still holds the last step's tensors needs the GIL and the process aborts ("terminate called without an active
# exception", about one run in ten on loaded CPUs).
_c10d = torch.ops._c10d_functional


def _all_reduce(x: torch.Tensor, op: str, group: str) -> torch.Tensor:
    return _c10d.wait_tensor(_c10d.all_reduce(x, op, group))


@dataclass(frozen=True)
class ShiftMesh:
    """This rank's place on the mesh and the three groups the two modes talk over.

    Collectives are functional (traceable by ``torch.compile``, capturable in CUDA graphs) and skipped
    outright on groups of one rank.
    """

    tp: int
    sp: int
    t: int
    s: int
    tp_group: str | None
    sp_group: str | None
    all_group: str | None
    # Position in ``all_group`` of each chunk's rank, in chunk order; None where position == chunk. A device
    # tensor made once, so a captured CUDA graph never copies it from the host.
    chunk_order: torch.Tensor | None
    device: torch.device
    device_mesh: DeviceMesh = field(compare=False, repr=False)

    @property
    def world(self) -> int:
        return self.tp * self.sp

    @property
    def chunk(self) -> int:
        return self.t * self.sp + self.s

    @classmethod
    def from_device_mesh(cls, mesh: DeviceMesh) -> ShiftMesh:
        if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
            raise ValueError(
                f"expected a 2-D DeviceMesh with dims named {MESH_DIMS}, got dims {mesh.mesh_dim_names} "
                f"of shape {tuple(mesh.shape)}: build it with shiftlib.init_mesh(tp, sp)"
            )
        tp, sp = mesh.shape
        t, s = mesh.get_coordinate()
        # mesh.mesh[t, s] is the global rank of chunk t * sp + s. Members of a process group are ordered by global
        # rank, so chunk c's rank sits at position (number of mesh ranks below its global rank).
        ranks = mesh.mesh.flatten()
        position = ranks.argsort().argsort()
        chunk_order = None if torch.equal(position, torch.arange(tp * sp)) else position

        def name(dim: str | None) -> str | None:
            if dim is None:
                return None if tp * sp == 1 else mesh._flatten("shift_all").get_group().group_name
            return mesh.get_group(dim).group_name if mesh.size(MESH_DIMS.index(dim)) > 1 else None

        device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
        if chunk_order is not None:
            chunk_order = chunk_order.to(device)
        groups = name("tp"), name("sp"), name(None)
        for group in (groups[2], groups[0], groups[1]):  # the same order of kinds on every rank, for shutdown()
            if group is not None:
                _groups.setdefault(group)
        return cls(tp, sp, t, s, *groups, chunk_order, device, mesh)

    def param(self, local: torch.Tensor, shard_dim: int | None) -> torch.nn.Parameter:
        """Wrap a rank's local shard as a DTensor parameter: sharded over ``tp`` on ``shard_dim`` (or
        replicated), always replicated over ``sp``. The DTensor aliases ``local``, which the hot path uses."""
        placements = [Replicate() if shard_dim is None else Shard(shard_dim), Replicate()]
        dt = DTensor.from_local(local, self.device_mesh, placements, run_check=False)
        return torch.nn.Parameter(dt, requires_grad=False)

    def all_reduce(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Sum partial results of a row-parallel layer: over ``tp`` in SP mode, over all ranks in TP mode."""
        group = self.all_group if mode == "tp" else self.tp_group
        return x if group is None else _all_reduce(x, "sum", group)

    def reduce_all(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """``op`` ("min", "max", "sum") over every rank of the mesh: how ranks agree on one value."""
        return x if self.all_group is None else _all_reduce(x, op, self.all_group)

    def sum_over_sp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.sp_group is None else _all_reduce(x, "sum", self.sp_group)

    def all_to_all_sp(self, x: torch.Tensor) -> torch.Tensor:
        """Exchange equal slices of dim 0 between the ``sp`` ranks (dim 0 indexes destination, then source)."""
        if self.sp_group is None:
            return x
        splits = [x.shape[0] // self.sp] * self.sp
        return _c10d.wait_tensor(_c10d.all_to_all_single(x.contiguous(), splits, splits, self.sp_group))

    def gather_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather each rank's chunk along the last dim, in chunk order (not group-rank order)."""
        if self.all_group is None:
            return x
        parts = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), self.world, self.all_group))
        parts = parts.view(self.world, *x.shape)
        if self.chunk_order is not None:
            parts = parts[self.chunk_order]
        return parts.movedim(0, -2).flatten(-2)


@dataclass(frozen=True)
class HeadMap:
    """Which query and key/value heads belong to which head chunk.

    Chunk ``c`` holds query heads ``[c*H/P, (c+1)*H/P)``. With ``K >= P`` KV heads it holds KV heads
    ``[c*K/P, (c+1)*K/P)``; with ``K < P`` the KV head ``c*K//P`` is replicated to every chunk that uses it.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    world: int

    def __post_init__(self) -> None:
        H, K, P = self.num_heads, self.num_kv_heads, self.world
        if H % P:
            raise ValueError(
                f"num_attention_heads={H} is not divisible by tp*sp={P}: every rank needs the same number of "
                f"query heads; choose tp*sp among the divisors of {H}"
            )
        if H % K:
            raise ValueError(f"num_attention_heads={H} is not a multiple of num_key_value_heads={K}")
        if (K >= P and K % P) or (K < P and P % K):
            raise ValueError(
                f"num_key_value_heads={K} and tp*sp={P} do not divide one another: each rank needs whole KV "
                f"heads (K % P == 0) or an exact share of a replicated one (P % K == 0)"
            )

    @classmethod
    def from_config(cls, config, world: int) -> HeadMap:
        """The head map of a Hugging Face config on ``world`` ranks (``head_dim`` defaults to hidden / heads)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_attention_heads, config.num_key_value_heads, head_dim, world)

    @property
    def q_per_chunk(self) -> int:
        return self.num_heads // self.world

    @property
    def kv_per_chunk(self) -> int:
        return max(self.num_kv_heads // self.world, 1)

    def kv_heads(self, chunk: int) -> range:
        first = chunk * self.num_kv_heads // self.world
        return range(first, first + self.kv_per_chunk)

    def q_heads(self, chunk: int) -> range:
        return range(chunk * self.q_per_chunk, (chunk + 1) * self.q_per_chunk)
