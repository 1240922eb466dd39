"""Model classes: stacks of blocks with embeddings and heads."""
from .lm import Cache, TransformerLM, build_block

__all__ = ["TransformerLM", "Cache", "build_block"]
