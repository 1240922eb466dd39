"""Generation: KV-cached decoding, sampling, streaming, batched prompts, chat."""
from .generate import TextStream, chat, generate, generate_text, left_pad, process_logits

__all__ = ["generate", "generate_text", "chat", "left_pad", "process_logits", "TextStream"]
