"""Model classes: stacks of blocks with embeddings and heads."""
from .heads import TaskModel, build_model
from .lm import Cache, TransformerLM, build_block

__all__ = ["TransformerLM", "TaskModel", "build_model", "Cache", "build_block"]
