"""allformers: the transformer family from one set of composable blocks."""
from .checkpoints import load, save
from .config import Config
from .errors import (AllformersError, CheckpointError, ConfigError, ContextLengthError, InputError, OutputError,
                     UnknownModelError)
from .models import TransformerLM
from . import zoo  # noqa: F401  (fills the named-config registry)

__version__ = "0.1.0"
__all__ = ["Config", "TransformerLM", "load", "save", "AllformersError", "CheckpointError", "ConfigError",
           "ContextLengthError", "InputError", "OutputError", "UnknownModelError", "__version__"]
