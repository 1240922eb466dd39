"""Model classes: stacks of blocks with embeddings and heads."""
from .heads import TaskModel, build_model
from .lm import Cache, TransformerLM, build_block
from .pretraining import Pretraining, PretrainingModel, pretraining_loss  # noqa: F401  (BERT MLM+NSP, ALBERT MLM+SOP)
from .seq2seq import Seq2SeqLM

__all__ = ["TransformerLM", "Seq2SeqLM", "TaskModel", "build_model", "Cache", "build_block"]
