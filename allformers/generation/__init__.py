"""Generation: KV-cached decoding, sampling, streaming, batched prompts, chat."""
from .generate import TextStream, chat, control_prefix, generate, generate_text, left_pad, process_logits
from .speculative import ModelDraft, NgramDraft, speculative_generate

__all__ = ["generate", "generate_text", "chat", "left_pad", "process_logits", "TextStream", "control_prefix",
           "speculative_generate", "NgramDraft", "ModelDraft"]
