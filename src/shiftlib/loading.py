"""``from_pretrained``: a local Hugging Face directory straight into the mesh, each rank reading only its slices.

The model is built on the meta device (no weights), then :func:`shiftlib.plan.build` asks for each shard by
Hugging Face parameter name. Those requests are answered from the safetensors files with positioned reads
into the shard's own buffer: a rank's host memory is its shard plus one tensor slice in flight.

Why not ``safe_open(...).get_slice(name)``: in safetensors 0.8 a slice is a view of the file's memory map, and
a column slice (``o_proj``, ``down_proj``) faults in the pages of the whole tensor, so every rank's resident
memory grows by most of the checkpoint while it loads. Reading the bytes ourselves keeps it at the shard.

Every check that can fail on bad input (directory, config, architecture, dtype, shard files, tensor names and
shapes, tokenizer) runs before the first collective, and the ranks then agree: if any rank failed, all of them
raise, so no rank is left waiting in a collective for one that gave up.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from shiftlib.mesh import HeadMap
from shiftlib.plan import build, check_architecture

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# The dtypes of the safetensors format (https://github.com/huggingface/safetensors, "format").
STORED_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

# What a model may compute in, by the names people write.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# -- dtype -------------------------------------------------------------------------------------------------


def resolve_dtype(value: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Turn ``value`` (a name like ``"bf16"``, a ``torch.dtype``, or ``None`` for float32) into a dtype that
    runs on ``device``.

    Raises:
        ValueError: an unknown name, a dtype shiftlib does not compute in, or one the device cannot run.
    """
    if value is None:
        dtype = torch.float32
    elif isinstance(value, torch.dtype):
        dtype = value
    else:
        key = str(value).removeprefix("torch.").lower()
        if key not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {value!r}: use one of float32, bfloat16, float16, float64")
        dtype = DTYPE_NAMES[key]
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported: shiftlib computes in float32, bfloat16, float16 or float64")
    problem = None
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        problem = "this GPU has no bfloat16 support"
    else:
        try:
            probe = torch.ones(2, 2, dtype=dtype, device=device)
            (probe @ probe).sum().item()
        except RuntimeError as e:  # e.g. a dtype without matmul kernels on this device
            problem = str(e).splitlines()[0]
    if problem:
        raise ValueError(f"dtype {dtype} is not supported on device {device} ({problem}): choose another dtype, "
                         f"e.g. float16 or float32")
    return dtype


# -- safetensors, read by position -------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    """A tensor inside a safetensors file, read on demand: ``t[a:b]``, ``t[:, a:b]`` and ``t[:]`` read only
    those elements, into a fresh tensor (no memory map)."""

    file: SafetensorsFile
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of element 0 in the file

    def __getitem__(self, index) -> torch.Tensor:
        rows, cols = index if isinstance(index, tuple) else (index, slice(None))
        if not self.shape:
            return self.file.read(self.offset, torch.empty((), dtype=self.dtype))
        r0, r1 = _bounds(rows, self.shape[0], self.name)
        row_elems = math.prod(self.shape[1:])
        if len(self.shape) == 1 or cols == slice(None):
            out = torch.empty((r1 - r0, *self.shape[1:]), dtype=self.dtype)
            return self.file.read(self.offset + r0 * row_elems * out.element_size(), out)
        if len(self.shape) != 2:
            raise ValueError(f"column slices need a 2-D tensor; {self.name} has shape {self.shape}")
        c0, c1 = _bounds(cols, self.shape[1], self.name)
        out = torch.empty((r1 - r0, c1 - c0), dtype=self.dtype)
        size = out.element_size()
        for i in range(r1 - r0):  # one read per row: exactly the bytes of the slice, nothing in between
            self.file.read(self.offset + ((r0 + i) * row_elems + c0) * size, out[i])
        return out


def _bounds(index, length: int, name: str) -> tuple[int, int]:
    if not isinstance(index, slice) or index.step not in (None, 1):
        raise ValueError(f"{name}: only contiguous slices can be read, got {index!r}")
    start, stop, _ = index.indices(length)
    return start, max(start, stop)


class SafetensorsFile:
    """One shard: its header parsed and checked against the file size once; data read with positioned reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        self._f = open(path, "rb", buffering=0)
        try:
            self.tensors = self._parse(size)
        except BaseException:
            self._f.close()
            raise

    def _corrupt(self, why: str) -> ValueError:
        return ValueError(f"corrupt or truncated checkpoint shard {self.path}: {why}; re-download it or re-save "
                          f"the model with save_pretrained")

    def _parse(self, size: int) -> dict[str, StoredTensor]:
        head = self._f.read(8)
        if len(head) < 8:
            raise self._corrupt(f"the file has {size} bytes, fewer than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise self._corrupt(f"the header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(self._f.read(n))
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise self._corrupt(f"the header is not valid JSON ({e})") from None
        data_start, data_size = 8 + n, size - 8 - n
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = STORED_DTYPES[info["dtype"]]
                shape = tuple(int(x) for x in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"bad header entry for {name!r}: {info!r}") from None
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if begin < 0 or end - begin != nbytes:
                raise self._corrupt(f"tensor {name!r} of shape {shape} spans bytes [{begin}, {end}), not {nbytes}")
            if end > data_size:
                raise self._corrupt(f"tensor {name!r} ends at data byte {end} but the file holds only {data_size}")
            tensors[name] = StoredTensor(self, name, dtype, shape, data_start + begin)
        return tensors

    def read(self, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous tensor ``out`` with the bytes at ``offset``."""
        if out.numel() == 0:
            return out
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        self._f.seek(offset)
        done = 0
        while done < len(view):
            n = self._f.readinto(view[done:])
            if not n:
                raise self._corrupt(f"it ended at byte {offset + done} while reading (did it change while loading?)")
            done += n
        return out

    def close(self) -> None:
        self._f.close()


class Checkpoint:
    """The safetensors files of a model directory (one file, or the shards of an index), all headers checked."""

    def __init__(self, directory: Path) -> None:
        index, single = directory / INDEX_FILE, directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"corrupt index {index}: expected JSON with a 'weight_map' of tensor name -> shard "
                                 f"file ({e!r}); re-save the model with save_pretrained") from None
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise FileNotFoundError(f"checkpoint shard {directory / missing[0]} is missing ({len(missing)} of "
                                        f"{len(names)} shards named in {index.name} are): copy or download all shards")
        elif single.is_file():
            weight_map, names = None, [SINGLE_FILE]
        else:
            other = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
            hint = (f"; found {other[0]}: shiftlib reads only safetensors, re-save with "
                    f"model.save_pretrained(dir, safe_serialization=True)") if other else ""
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}")
        self.files: list[SafetensorsFile] = []
        try:
            for n in names:
                self.files.append(SafetensorsFile(directory / n))
        except BaseException:
            self.close()
            raise
        self.tensors = {name: t for f in self.files for name, t in f.tensors.items()}
        self.index_path = index if weight_map is not None else None
        self.weight_map = weight_map

    def get(self, name: str) -> StoredTensor:
        if name not in self.tensors:
            listed = self.weight_map.get(name) if self.weight_map else None
            where = f" (the index names {listed}, which lacks it)" if listed else ""
            raise ValueError(f"tensor {name!r} is missing from the checkpoint{where}: the checkpoint does not match "
                             f"its config.json; re-save the model with save_pretrained")
        return self.tensors[name]

    def close(self) -> None:
        for f in self.files:
            f.close()


# -- from_pretrained ---------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    directory: Path
    model: nn.Module
    dtype: torch.dtype
    checkpoint: Checkpoint
    names: list[str]
    tokenizer: object | None


def _read_config(directory: Path):
    from transformers import AutoConfig

    if not directory.exists():
        raise FileNotFoundError(f"model directory {directory} does not exist: pass a local Hugging Face model "
                                f"directory (config.json + safetensors weights)")
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: pass the model directory that holds config.json")
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}: pass the directory a Hugging Face model was "
                                f"saved to (model.save_pretrained(dir) writes config.json)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): fix or re-save it") from None
    archs = raw.get("architectures") if isinstance(raw, dict) else None
    if not archs:
        raise ValueError(f"{path} names no architecture: add e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    try:
        check_architecture(archs[0])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    quantization = raw.get("quantization_config")
    if quantization:  # e.g. FP8 weights with scales: copying them into a float dtype would be silently wrong
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise ValueError(f"{path} has a quantization_config, quant_method {method!r}"
                         f": quantized checkpoints are not supported, use a float16/bfloat16/float32 one")
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"transformers cannot read {path}: {str(e).splitlines()[0]}") from None


def _load_tokenizer(directory: Path):
    if not any((directory / n).is_file() for n in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad tokenizer file, reported with its cause
        raise ValueError(f"the tokenizer in {directory} cannot be loaded ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}): fix or remove its tokenizer files") from None


def _prepare(directory: Path, mesh: DeviceMesh, dtype: str | torch.dtype | None) -> _Prepared:
    """Every check that can fail on bad input, with no collective: each rank reaches the same verdict."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = _read_config(directory)
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = resolve_dtype(dtype, device)
    HeadMap.from_config(config, mesh.size())  # head counts the mesh cannot split fail here, before any weight
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    checkpoint = Checkpoint(directory)
    try:
        for name, shape in expected.items():
            stored = checkpoint.get(name)
            if stored.shape != shape:
                raise ValueError(f"tensor {name!r} has shape {stored.shape} in {stored.file.path} but config.json "
                                 f"implies {shape}: the checkpoint and its config.json disagree")
            if stored.dtype not in COMPUTE_DTYPES:
                raise ValueError(f"tensor {name!r} in {stored.file.path} is {stored.dtype}: quantized checkpoints "
                                 f"are not supported, use a float16/bfloat16/float32 one")
        tokenizer = _load_tokenizer(directory)
    except BaseException:
        checkpoint.close()
        raise
    return _Prepared(directory, model, dtype, checkpoint, list(expected), tokenizer)


def _agree(error: Exception | None) -> None:
    """Raise on every rank if any rank failed (the first failing rank's error), so all ranks stop together."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        if error is not None:
            raise error
        return
    verdicts: list[tuple[int, str, str] | None] = [None] * world
    mine = None if error is None else (dist.get_rank(), type(error).__name__, str(error))
    dist.all_gather_object(verdicts, mine)
    failed = [v for v in verdicts if v is not None]
    if not failed:
        return
    if error is not None:
        raise error
    rank, kind, message = failed[0]
    raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(f"rank {rank}: {message}")


def from_pretrained(
    path: str | os.PathLike,
    mesh: DeviceMesh,
    dtype: str | torch.dtype | None = None,
    threshold: int = 256,
) -> nn.Module:
    """Load a local Hugging Face checkpoint directly into a ``(tp, sp)`` mesh, ready for :func:`shiftlib.generate`.

    The model is built on the meta device; each rank then reads only the slices of the safetensors files its
    shard needs (one open file per shard, positioned reads, no memory map), so its peak host memory is about its
    own shard plus one slice in flight. Tied embeddings (no ``lm_head.weight`` in the checkpoint) share one
    tensor. A progress bar shows on rank 0. The tokenizer of the directory, if any, becomes ``model.tokenizer``
    (``None`` otherwise), so ``generate`` accepts strings and can return text. Every rank must call it.

    Args:
        path: a directory with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``
            plus its shards (what ``save_pretrained`` writes).
        mesh: from :func:`shiftlib.init_mesh`.
        dtype: ``"bfloat16"``/``"bf16"``, ``"float16"``, ``"float32"``, ``"float64"`` or a ``torch.dtype``;
            default the checkpoint's (``dtype``/``torch_dtype`` in config.json), else float32.
        threshold: steps of at most this many tokens run in TP mode, larger ones in SP mode.

    Returns:
        The parallelized ``...ForCausalLM`` (as :func:`shiftlib.parallelize` returns), in eval mode, with
        ``model.tokenizer`` set.

    Raises:
        FileNotFoundError: missing directory, ``config.json``, or shard file.
        ValueError: unsupported architecture; unknown dtype or one the device cannot run; corrupt or truncated
            shard; a tensor missing or of the wrong shape; head counts or sizes the mesh does not divide; a
            tokenizer that does not load. If any rank fails, every rank raises.

    Example:
        >>> mesh = shiftlib.init_mesh(tp=2, sp=1)   # under torchrun --nproc-per-node 2
        >>> model = shiftlib.from_pretrained("/models/Llama-3.1-8B-Instruct", mesh, dtype="bfloat16")
        >>> shiftlib.generate(model, ["The capital of France is"], return_text=True)
    """
    from tqdm.auto import tqdm

    directory = Path(path).expanduser()
    prepared, error = None, None
    try:
        prepared = _prepare(directory, mesh, dtype)
    except (ValueError, FileNotFoundError) as e:
        error = e
    try:
        _agree(error)
    except BaseException:
        if prepared is not None:
            prepared.checkpoint.close()
        raise
    model, checkpoint = prepared.model, prepared.checkpoint
    rank = dist.get_rank() if dist.is_initialized() else 0
    bar = tqdm(total=len(prepared.names), desc=f"loading {directory.name}", unit="tensor", disable=rank != 0)
    seen: set[str] = set()

    def get(name: str) -> StoredTensor:
        if name not in seen:
            seen.add(name)
            bar.update(1)
        return checkpoint.get(name)

    try:
        with torch.device(mesh.device_type if mesh.device_type != "cuda" else torch.cuda.current_device()):
            rotary = type(model.model.rotary_emb)(config=model.config)  # buffers computed, not loaded
        build(model, mesh, threshold, get, prepared.dtype, rotary)
    finally:
        bar.close()
        checkpoint.close()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if _is_meta(t)]
    if left:
        raise RuntimeError(f"shiftlib left {left[:3]} unloaded on the meta device: this is a bug, please report it")
    model.eval()
    model.tokenizer = prepared.tokenizer
    return model


def _is_meta(t: torch.Tensor) -> bool:
    local = getattr(t, "_local_tensor", t)
    return local.is_meta


# -- what a rank holds -------------------------------------------------------------------------------------


def parameter_bytes_per_rank(config, tp: int, sp: int, dtype: torch.dtype) -> int:
    """Bytes of parameters one rank holds after loading (every rank holds the same amount).

    Weights are sharded ``tp`` ways and replicated over ``sp``; with fewer KV heads than ranks each rank also
    stores the replicated KV head its query heads use, so this counts that too.

    Args:
        config: the model's Hugging Face config.
        tp, sp: the mesh.
        dtype: the dtype the model is loaded in.

    Returns:
        The byte count (norms and biases included).

    Raises:
        ValueError: head counts the mesh does not divide.

    Example:
        >>> parameter_bytes_per_rank(AutoConfig.from_pretrained(path), tp=2, sp=2, dtype=torch.bfloat16)
    """
    P, D, V, I = tp * sp, config.hidden_size, config.vocab_size, config.intermediate_size
    heads = HeadMap.from_config(config, P)
    d = heads.head_dim
    qkv_rows = sp * (heads.q_per_chunk + 2 * heads.kv_per_chunk) * d
    attn = qkv_rows * D + sp * heads.q_per_chunk * d * D
    if getattr(config, "attention_bias", False) or config.model_type == "qwen2":
        attn += qkv_rows
    if getattr(config, "attention_bias", False):
        attn += D
    if config.model_type == "qwen3":
        attn += 2 * d
    mlp = 3 * sp * (I // P) * D + (2 * sp * (I // P) + D if getattr(config, "mlp_bias", False) else 0)
    layer = attn + mlp + 2 * D
    vocab = (V // tp) * D * (1 if config.tie_word_embeddings else 2)
    elements = vocab + config.num_hidden_layers * layer + D
    return elements * torch.empty((), dtype=dtype).element_size()
