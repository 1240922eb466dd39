"""Checkpoints: our safetensors format, Hugging Face folders (both ways) and GGUF import."""
from .io import LoadReport, load, save

__all__ = ["load", "save", "LoadReport"]
