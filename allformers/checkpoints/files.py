"""The pieces of our checkpoint format every reader and writer shares: the file names, the
LoadReport, copying a state dict in with every shape checked, safetensors in and out, config.json
read with its errors named. Nothing here dispatches on a format (io.py does), so every format module
(hf.py, gguf.py, diffusers.py, composite.py ...) imports this one and none of them imports io.py back."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import Config, read_config_file
from ..errors import CheckpointError, ConfigError
from .atomic import atomic_folder_write, fault  # noqa: F401  (atomic_folder_write: used by every saver)

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"


@dataclass
class LoadReport:
    source: str
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)  # expected by the model, absent from the file
    unexpected: list = field(default_factory=list)  # in the file, unknown to the model
    initialised: list = field(default_factory=list)  # missing keys we filled with fresh init

    def __str__(self):
        parts = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("newly initialised", self.initialised)):
            if keys:
                shown = ", ".join(keys[:6]) + (f" ... (+{len(keys) - 6})" if len(keys) > 6 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        return "; ".join(parts)


def load_state_dict_into(model: torch.nn.Module, state: dict, source: str, strict: bool = True,
                         allow_init: tuple = ()) -> LoadReport:
    """Copy `state` into `model`, checking every shape first so a mismatch names the tensor
    and both shapes instead of failing deep inside torch."""
    own = model.state_dict()
    report = LoadReport(source=source)
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} tensor(s) do not fit the config: " + "; ".join(bad[:5])
            + " — the checkpoint was made for a different config (check config.json: n_embd, n_layer, "
              "vocab_size, n_kv_head ...)")
    ints = [f"{k} ({v.dtype})" for k, v in state.items()
            if k in own and own[k].is_floating_point() and not (v.is_floating_point() or v.is_complex())]
    if ints:
        raise CheckpointError(
            f"{source}: {len(ints)} weight tensor(s) are stored as integers ({', '.join(ints[:3])}), which would load "
            f"as wrong floats; the checkpoint was saved with an integer dtype — re-save it from the original "
            f"model with a float dtype")
    report.unexpected = sorted(k for k in state if k not in own)
    # A tensor shared by several names (tied or ALBERT-shared layers) is stored once: any name will do.
    by_storage = {}
    for k, v in own.items():
        by_storage.setdefault((v.untyped_storage().data_ptr(), tuple(v.shape)), []).append(k)
    present = {k for names in by_storage.values() if any(n in state for n in names) for k in names}
    absent = sorted(k for k in own if k not in present)
    # a missing key the caller expects (a new task head) keeps its fresh init and is reported as such
    report.initialised = [k for k in absent if any(k.endswith(s) for s in allow_init)]
    report.missing = [k for k in absent if k not in report.initialised]
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"{source} does not match the model: {report}")
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))
                report.loaded.append(k)
    return report


def contiguous_state(state: dict) -> dict:
    """safetensors refuses shared or strided storage; tied weights are written once."""
    out, seen = {}, {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.shape == out[seen[ptr]].shape:
            continue  # tied to an earlier tensor (e.g. lm_head = wte): the config records the tie
        seen.setdefault(ptr, k)
        out[k] = v.detach().contiguous().cpu()
    return out


def check_dtype(dtype, what: str = "save") -> None:
    """Weights are floats: an integer dtype truncates them (int8 zeroes almost every weight)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(f"{what}(dtype={dtype}) cannot hold the weights (an integer or non-float dtype truncates "
                              f"them); use torch.float32, torch.float16 or torch.bfloat16")


def cast_state(state: dict, dtype: Optional[torch.dtype]) -> dict:
    check_dtype(dtype)
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}


def read_config_json(file: Path) -> dict:
    """A checkpoint's config.json as a dict; junk, empty, truncated or non-object files are refused
    here, before anything else reads them."""
    try:
        return read_config_file(file)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def read_safetensors(file: Path) -> dict:
    """Read a safetensors file, turning truncation or a wrong format into a CheckpointError."""
    file = Path(file)
    if not file.exists():
        raise CheckpointError(f"{file} does not exist")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({e}); it may be truncated or of another "
            f"format — re-save it, or convert it with `allformers convert`") from None


def read_config(path: Path, config_cls=Config):
    """A folder's config.json as `config_cls`; bad JSON or bad fields become a CheckpointError naming the file."""
    raw = read_config_json(Path(path) / CONFIG_FILE)
    try:
        return config_cls.from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE}: {e}") from None


def write_folder(path, state: dict, config, tokenizer=None, dtype: Optional[torch.dtype] = None,
                 overwrite: bool = False) -> Path:
    """The one writer of an allformers folder: model.safetensors (tied tensors once, cast to dtype),
    config.json (`config.to_json`), tokenizer.json when given, all at once (checkpoints/atomic.py)."""
    state = cast_state(contiguous_state(state), dtype)

    def write(tmp: Path):
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "library": "allformers"})
        fault("mid-write")
        config.to_json(tmp / CONFIG_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp)

    return atomic_folder_write(path, write, overwrite=overwrite)
