"""Built-in model shapes with random weights: ``tiny`` for CPU ranks, and 8B/70B shapes for GPU benchmarks.

No download: the weights are drawn from a seed, so every rank builds the same model.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

FAMILIES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}

_LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def tiny_config(family: str = "llama", **overrides) -> PretrainedConfig:
    """A two-layer model of each supported family, small enough for float64 on CPU ranks."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: choose one of {sorted(FAMILIES)}")
    fields = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=1024, rms_norm_eps=1e-5,
        tie_word_embeddings=family == "qwen3", initializer_range=0.1,
    )
    if family == "mistral":
        fields["sliding_window"] = 24  # short enough that the tests cross it
    fields.update(overrides)
    return FAMILIES[family](**fields)


PRESETS: dict[str, dict] = {
    "tiny": dict(family="llama"),
    "llama-8b": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                     rms_norm_eps=1e-5, rope_parameters=_LLAMA31_ROPE, tie_word_embeddings=False),
    # Llama-3.3-70B widths with 8 of its 80 layers: per-layer behaviour at 70B sizes on one GPU.
    "llama-70b-8l": dict(family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                         num_hidden_layers=8, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_parameters=_LLAMA31_ROPE,
                         tie_word_embeddings=False),
}


def preset_config(name: str) -> PretrainedConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    fields = dict(PRESETS[name])
    family = fields.pop("family")
    return tiny_config(family, **fields) if name == "tiny" else FAMILIES[family](**fields)


def random_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """A Hugging Face model with seeded random weights (the same on every rank)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()
