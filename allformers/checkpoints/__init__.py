"""Checkpoints: our format (io.py, files.py), the models that are not one Config (composite.py),
Hugging Face key tables per family (hf*.py), diffusers folders, GGUF, ONNX."""
from .io import LoadReport, load, save
from . import composite  # noqa: F401  (fills io.CONFIG_LOADERS: the image models, composites, LoRA adapters)

__all__ = ["LoadReport", "load", "save"]
