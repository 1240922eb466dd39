"""Model classes: stacks of blocks with embeddings and heads."""
from .build import build_model
from .heads import BaseModelOutput, TaskModel, sentence_embedding
from .lm import Cache, TransformerLM, build_block
from .lora import (LoRAConfig, LoRAError, LoRALinear, apply_lora, load_lora_state_dict, lora_disabled,
                   lora_parameters, lora_state_dict, merge_lora)
from .pretraining import Pretraining, PretrainingModel, pretraining_loss  # noqa: F401  (BERT MLM+NSP, ALBERT MLM+SOP)
from .seq2seq import Seq2SeqLM
from .xlnet import TransformerXL, XLMemory

__all__ = ["TransformerLM", "TransformerXL", "XLMemory", "Seq2SeqLM", "TaskModel", "BaseModelOutput", "sentence_embedding", "build_model", "Cache", "build_block", "LoRAConfig", "LoRAError", "LoRALinear",
           "apply_lora", "lora_parameters", "lora_disabled", "merge_lora", "lora_state_dict", "load_lora_state_dict"]
