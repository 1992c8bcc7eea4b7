"""Where weights come from: a function from a Hugging Face parameter name to something sliceable.

An in-memory ``nn.Module`` parameter and a safetensors lazy slice both answer ``x[a:b]`` and ``x[:, a:b]``, so
every module takes its shard with the same few lines whichever the source, and a rank never materializes a
tensor it does not own.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Source = Callable[[str], Any]


def rows(src: Any, start: int, stop: int) -> torch.Tensor:
    return torch.as_tensor(src[start:stop])


def cols(src: Any, start: int, stop: int) -> torch.Tensor:
    return torch.as_tensor(src[:, start:stop])


def whole(src: Any) -> torch.Tensor:
    return torch.as_tensor(src[:])
