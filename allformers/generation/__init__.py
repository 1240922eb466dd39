"""Generation: KV-cached decoding, sampling, streaming, batched prompts, chat."""
from .generate import TextStream, generate, left_pad, process_logits
from .speculative import ModelDraft, NgramDraft, speculative_generate
from .text import chat, control_prefix, generate_text, trim_at_stop

__all__ = ["generate", "generate_text", "chat", "left_pad", "process_logits", "TextStream", "control_prefix",
           "trim_at_stop", "speculative_generate", "NgramDraft", "ModelDraft"]
