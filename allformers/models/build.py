"""build_model: the one place that picks a model class from a config. It sits above every class it
can return (heads, pretraining, seq2seq, xlnet), so none of them imports another back."""
from __future__ import annotations

import torch.nn as nn

from ..config import Config
from .heads import TaskModel, lm_class
from .pretraining import PretrainingModel
from .seq2seq import Seq2SeqLM


def build_model(config: Config) -> nn.Module:
    """The right class for a config: a plain LM, an encoder-decoder, or a body with a task head."""
    if config.is_encoder_decoder:
        return Seq2SeqLM(config)
    if config.task == "pretraining":  # MLM + sentence-pair heads on one body
        return PretrainingModel(config)
    return lm_class(config)(config) if config.task == "lm" else TaskModel(config)
