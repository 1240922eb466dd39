"""The building blocks every model in the zoo is made of."""
from .attention import Attention, KVCache
from .block import Block
from .feedforward import GLU, MLP, build_feedforward
from .norms import build_norm
from .positions import LearnedPositions, Rotary, SinusoidalPositions, alibi_bias, alibi_slopes, apply_rotary

__all__ = ["Attention", "KVCache", "Block", "MLP", "GLU", "build_feedforward", "build_norm",
           "LearnedPositions", "SinusoidalPositions", "Rotary", "apply_rotary", "alibi_slopes", "alibi_bias"]
