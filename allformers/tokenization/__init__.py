"""Tokenizers (character, byte-level BPE, GPT-2's, and GGUF-embedded ones) with chat templates."""
from .tokenizer import Tokenizer

__all__ = ["Tokenizer"]
