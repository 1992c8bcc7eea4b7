"""Shared by the tests: the reference models and what Hugging Face itself answers."""

from __future__ import annotations

import copy

import torch

import shiftlib
from shiftlib.presets import FAMILIES, random_model, tiny_config

ALL_FAMILIES = tuple(FAMILIES)
SHAPES = {1: [(1, 1)], 2: [(1, 2), (2, 1)], 4: [(4, 1), (2, 2), (1, 4)]}
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


_references: dict = {}


def reference(family: str, dtype: torch.dtype = torch.float64, **overrides):
    """The unparallelized Hugging Face model (same seed on every rank); never modified: copy before use."""
    key = (family, dtype, repr(sorted(overrides.items())))
    if key not in _references:
        _references[key] = random_model(tiny_config(family, eos_token_id=None, **overrides), dtype)
    return _references[key]


def parallel(family: str, tp: int, sp: int, dtype: torch.dtype = torch.float64, mesh=None, threshold: int = 256, **overrides):
    mesh = mesh if mesh is not None else shiftlib.init_mesh(tp, sp, "cpu")
    return shiftlib.parallelize(copy.deepcopy(reference(family, dtype, **overrides)), mesh, threshold)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def prompts(lengths, seed: int = 0, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


_greedy: dict = {}


def hf_greedy(family: str, prompt: list[int], max_new_tokens: int, **overrides) -> list[int]:
    key = (family, tuple(prompt), max_new_tokens, repr(sorted(overrides.items())))
    if key not in _greedy:
        model = reference(family, **overrides)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
        _greedy[key] = out[0, len(prompt):].tolist()
    return _greedy[key]
