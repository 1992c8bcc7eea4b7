"""The modules that replace Hugging Face's: both modes' data paths live in these files."""

from shiftlib.modules.attention import ShiftAttention
from shiftlib.modules.embedding import VocabParallelEmbedding, VocabParallelHead
from shiftlib.modules.mlp import ShiftMLP
from shiftlib.modules.model import ShiftDecoderLayer, ShiftModel
from shiftlib.modules.norm import RMSNorm

__all__ = [
    "RMSNorm",
    "ShiftAttention",
    "ShiftDecoderLayer",
    "ShiftMLP",
    "ShiftModel",
    "VocabParallelEmbedding",
    "VocabParallelHead",
]
