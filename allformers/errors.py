"""Errors users see. Each one names the problem and, where possible, the fix."""
import difflib


class AllformersError(Exception):
    """Base class: catching this catches every error allformers raises on purpose."""


class ConfigError(AllformersError, ValueError):
    """A config value is wrong, or two switches do not go together."""


class UnknownModelError(AllformersError, KeyError):
    def __init__(self, name, known):
        close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        msg = f"unknown model name {name!r}.{hint} Run `allformers zoo` to list every named config."
        super().__init__(msg)
        self.msg = msg

    def __str__(self):  # KeyError quotes its message; keep it readable
        return self.msg


class CheckpointError(AllformersError, ValueError):
    """A checkpoint is missing, truncated, of an unknown format or does not fit the config."""


class ContextLengthError(AllformersError, ValueError):
    """A prompt (plus the tokens to generate) does not fit the model's context."""


class InputError(AllformersError, ValueError):
    """An input is out of range: token ids, a prompt the tokenizer cannot encode, a generation setting."""


class OutputError(AllformersError, ValueError):
    """An output folder or file cannot be written (a file in the way, read-only, the input itself)."""


class QuantizationError(AllformersError, ValueError):
    """A model, layer or device that int8 quantization does not support (allformers/models/int8.py)."""
