"""The building blocks every model in the zoo is made of."""
from .attention import ATTENTION_CLASSES, Attention, CrossKV, KVCache, register_attention
from .block import Block, BlockSpec, LayerScale, make_block
from .feedforward import GLU, MLP, build_feedforward
from .norms import build_norm
from .positions import LearnedPositions, Rotary, SinusoidalPositions, alibi_slopes, apply_rotary
from .relative import AlibiBias, T5RelativeBias, build_relative
from .relative_xl import RelativeXLAttention, XLPositions

__all__ = ["Attention", "ATTENTION_CLASSES", "register_attention", "KVCache", "CrossKV", "Block", "BlockSpec", "LayerScale", "make_block", "MLP", "GLU", "build_feedforward", "build_norm",
           "LearnedPositions", "SinusoidalPositions", "Rotary", "apply_rotary", "alibi_slopes", "AlibiBias",
           "T5RelativeBias", "build_relative", "RelativeXLAttention", "XLPositions"]
