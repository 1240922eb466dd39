"""Our own checkpoint format (a folder with config.json + model.safetensors [+ tokenizer.json])
and the `load` / `save` entry points that also dispatch to Hugging Face folders and GGUF files.

Every load returns (or prints) a LoadReport: which keys were loaded, missing, unexpected and
newly initialised, so a silent half-load is impossible."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import Config
from ..errors import CheckpointError, ConfigError

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


# ---------------------------------------------------------------------- atomic writes
def atomic_folder_write(path: Path, write_into) -> None:
    """Write a whole folder into a temporary sibling, then swap it in: a crash or a full disk
    mid-save leaves the previous checkpoint untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_into(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _contiguous(state: dict) -> dict:
    """safetensors refuses shared or strided storage; tied weights are written once."""
    out, seen = {}, {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.shape == out[seen[ptr]].shape:
            continue  # tied to an earlier tensor (e.g. lm_head = wte): the config records the tie
        seen.setdefault(ptr, k)
        out[k] = v.detach().contiguous().cpu()
    return out


# ---------------------------------------------------------------------- our format
def save(model, path, format: str = "allformers", tokenizer=None, dtype: Optional[torch.dtype] = None):
    """Save `model` (and optionally its tokenizer) as an allformers folder or a Hugging Face folder."""
    if format == "hf":
        from .hf import save_hf

        return save_hf(model, path, tokenizer=tokenizer)
    if format != "allformers":
        raise CheckpointError(f"unknown format {format!r}; use 'allformers' or 'hf'")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    state = _contiguous(model.state_dict())
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    def write(tmp: Path):
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "library": "allformers"})
        model.config.to_json(tmp / CONFIG_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp)

    atomic_folder_write(Path(path), write)
    return Path(path)


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


# Models whose config is not a plain Config name their class in config.json ("config_class");
# their module provides the loader. Values are "module:function" so nothing is imported early.
CONFIG_LOADERS = {"ErnieConfig": "allformers.models.ernie:load_ernie",
                  "LoRAAdapter": "allformers.models.lora:load_adapter",  # adapters + the path of their base
                  "MultimodalConfig": "allformers.models.multimodal:load_multimodal",
                  "UNetConfig": "allformers.models.unet:load_unet",
                  "AutoencoderConfig": "allformers.models.autoencoders:load_autoencoder",
                  "ViTConfig": "allformers.models.vit:load_vit"}


def read_config(path: Path, config_cls=Config):
    """A folder's config.json as `config_cls`; bad JSON or bad fields become a CheckpointError naming the file."""
    try:
        return config_cls.from_json(Path(path) / CONFIG_FILE)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE} is not valid JSON: {e}") from None
    except ConfigError as e:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE}: {e}") from None


def load_saved_config_model(path: Path, config_cls, build):
    """Rebuild a model whose config is a SavedConfig from save()'s folder (config.json + model.safetensors);
    `build(config)` makes the empty model."""
    path = Path(path)
    model = build(read_config(path, config_cls))
    model.load_report = load_state_dict_into(model, read_safetensors(path / WEIGHTS_FILE), str(path))
    return model.eval()


def load_allformers(path: Path, map_location="cpu"):
    from ..models import build_model

    path = Path(path)
    special = _special_loader(path / CONFIG_FILE)
    if special is not None:
        model = special(path)
        return model.to(map_location), getattr(model, "load_report", LoadReport(source=str(path)))
    config = read_config(path, Config)
    state = read_safetensors(path / WEIGHTS_FILE)
    model = build_model(config)
    report = load_state_dict_into(model, state, str(path))
    return model.to(map_location), report


def _special_loader(config_file: Path):
    import importlib

    try:
        name = json.loads(config_file.read_text()).get("config_class")
    except (json.JSONDecodeError, OSError):
        return None  # reported properly by the plain path
    if name is None:
        return None
    if name not in CONFIG_LOADERS:
        raise CheckpointError(f"{config_file}: config_class {name!r} is unknown; known: {sorted(CONFIG_LOADERS)}")
    module, fn = CONFIG_LOADERS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def load(path, *, verbose: bool = False, return_report: bool = False, dtype: Optional[torch.dtype] = None):
    """Load a model from an allformers folder, a Hugging Face (transformers or diffusers) folder or a `.gguf` file.

    The model's tokenizer, when the source has one, is attached as `model.tokenizer`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass an allformers folder, a Hugging Face folder or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import load_gguf

        model, report = load_gguf(path)
    elif path.is_dir() and (path / CONFIG_FILE).exists():
        raw = json.loads((path / CONFIG_FILE).read_text())
        if "_class_name" in raw:  # a diffusers folder (UNet2DConditionModel, AutoencoderKL, VQModel)
            from .diffusers import load_diffusers

            model, report = load_diffusers(path)
        elif "model_type" in raw:  # Hugging Face folders always name their model_type
            from .hf import load_hf

            model, report = load_hf(path)
        else:
            model, report = load_allformers(path)
        if (path / TOKENIZER_FILE).exists():
            from ..tokenization import Tokenizer

            model.tokenizer = Tokenizer.from_file(path / TOKENIZER_FILE)
    else:
        raise CheckpointError(
            f"{path} is neither a .gguf file nor a folder with {CONFIG_FILE}; "
            f"pass an allformers folder, a Hugging Face folder or a .gguf file")
    if dtype is not None:
        model = model.to(dtype)
    if verbose:
        print(report)
    model.load_report = report
    model.eval()
    return (model, report) if return_report else model
