"""Saving and loading every model whose config is not one plain `Config`: the image models, the
composites (CLIP, BLIP-2, LLaVA-style VLMs, text to image, ERNIE, Multimodal-CoT) and LoRA adapter
folders. All of it is here, in one place, so the models never reach into the file format.

Such a folder's config.json names its class ("config_class", written by config.SavedConfig, which
is also the one way nested configs are serialised). Most models need nothing more than their
config and weights: SAVED_MODELS says which config class reads the JSON and what builds the empty
model. The two that need more (a pretrained base that is not stored) have their own functions.
This module fills io.py's CONFIG_LOADERS (checkpoints/__init__.py imports it), so io.py, which
`load` dispatches from, never imports it back."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from safetensors.torch import save_file

from ..errors import CheckpointError, ConfigError
from .files import (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, LoadReport, atomic_folder_write, contiguous_state,
                    load_state_dict_into, read_config, read_config_json, read_safetensors, write_folder)
from .int8 import load_int8
from .io import CONFIG_LOADERS, load, load_reporting

# config_class -> "module:ConfigClass:builder": the builder makes the empty model from the config.
# Strings, so a model's module is imported only when one of its folders is loaded.
SAVED_MODELS = {"ErnieConfig": "allformers.models.ernie:ErnieConfig:ErnieModel",
                "UNetConfig": "allformers.models.unet:UNetConfig:UNet",
                "AutoencoderConfig": "allformers.models.autoencoders:AutoencoderConfig:build_autoencoder",
                "ViTConfig": "allformers.models.vit:ViTConfig:ViT",
                "CLIPConfig": "allformers.models.clip:CLIPConfig:CLIP",  # CLIP and SigLIP
                "CoCaConfig": "allformers.models.coca:CoCaConfig:CoCa",
                "TextTowerConfig": "allformers.models.clip:TextTowerConfig:TextTower",
                "DALLEConfig": "allformers.models.dalle:DALLEConfig:DALLE",
                "TextToImageConfig": "allformers.models.text_to_image:TextToImageConfig:TextToImage",
                "JudgeConfig": "allformers.models.shapes_judge:JudgeConfig:ShapesJudge",
                "BLIP2Config": "allformers.models.blip2:BLIP2Config:BLIP2",
                "VLMConfig": "allformers.models.vlm:VLMConfig:VisionLanguageLM",
                "FlamingoConfig": "allformers.models.flamingo:FlamingoConfig:Flamingo"}
ADAPTER_FILE = "adapter.safetensors"


def _saved_classes(name: str):
    module, config_cls, builder = SAVED_MODELS[name].split(":")
    module = importlib.import_module(module)
    return getattr(module, config_cls), getattr(module, builder)


def load_saved(path):
    """Rebuild a model of SAVED_MODELS from its folder (config.json + model.safetensors [+ tokenizer.json])."""
    path = Path(path)
    config_cls, build = _saved_classes(_config_class(path))
    model = build(read_config(path, config_cls))
    model.load_report = load_state_dict_into(model, read_safetensors(path / WEIGHTS_FILE), str(path))
    _attach_tokenizer(model, path)
    return model.eval()


def _config_class(path: Path) -> str:
    name = read_config_json(path / CONFIG_FILE).get("config_class")
    if name not in SAVED_MODELS:
        raise CheckpointError(f"{path / CONFIG_FILE}: config_class {name!r} is not one of {sorted(SAVED_MODELS)}")
    return name


def _attach_tokenizer(model, path: Path) -> None:
    if (path / TOKENIZER_FILE).exists():
        from ..tokenization import Tokenizer

        model.tokenizer = Tokenizer.from_file(path / TOKENIZER_FILE)


# ---------------------------------------------------------------------- Multimodal-CoT
def save_multimodal(model, path, tokenizer=None) -> Path:
    """An allformers folder (config.json naming config_class, model.safetensors, tokenizer.json). With
    config.base set (a pretrained LM such as SmolLM2), only the weights that differ from it are stored:
    the vision encoder, the projection and the LoRA adapters."""
    state = model.state_dict()
    if model.config.base:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in keep}
    write_folder(Path(path), state, model.config, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None))
    return Path(path)


def load_multimodal(path):
    """Rebuild a MultimodalSeq2Seq / MultimodalDecoderLM from save_multimodal's folder (the base LM,
    when named, is loaded first and its LoRA adapters re-applied)."""
    from ..models.multimodal import MultimodalConfig, MultimodalDecoderLM, MultimodalSeq2Seq

    path = Path(path)
    config = read_config(path, MultimodalConfig)
    state = read_safetensors(path / WEIGHTS_FILE)
    if config.text.is_encoder_decoder:
        model = MultimodalSeq2Seq(config)
        report = load_state_dict_into(model, state, str(path))
    else:
        lm = None
        if config.base:
            lm = load_reporting(config.base)
            if getattr(lm, "config", None) is None or lm.config.n_embd != config.text.n_embd:
                raise CheckpointError(f"{path}: base model {config.base} does not match the stored text config")
        model = MultimodalDecoderLM(config, lm=lm)
        if config.lora:
            from ..models.lora import LoRAConfig, apply_lora

            apply_lora(model.lm, LoRAConfig(**{**config.lora, "targets": tuple(config.lora["targets"])}))
        if config.base:
            own = model.state_dict()
            missing = [k for k in state if k not in own]
            if missing:
                raise CheckpointError(f"{path}: {len(missing)} stored tensor(s) unknown to the model: {missing[:5]}")
            model.load_state_dict(state, strict=False)
            report = LoadReport(source=str(path), loaded=sorted(state))
        else:
            report = load_state_dict_into(model, state, str(path))
    _attach_tokenizer(model, path)
    model.load_report = report
    return model.eval()


# ---------------------------------------------------------------------- LoRA adapter folders
def save_adapter(model, path, cfg, base: str, tokenizer=None) -> Path:
    """Write a small folder: the adapters, the LoRA config and the path of the base model they
    sit on (config.json, config_class "LoRAAdapter"), plus the tokenizer. `allformers.load(path)`
    loads the base, applies LoRA and puts the adapters in: chat and generate work on it as is."""
    import dataclasses

    from ..models.lora import LoRAError, lora_state_dict

    state = contiguous_state(lora_state_dict(model))
    if not state:
        raise LoRAError("the model has no LoRA adapters to save")
    meta = {"config_class": "LoRAAdapter", "base": str(base), "lora": dataclasses.asdict(cfg)}

    def write(tmp: Path):
        save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "library": "allformers"})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)

    atomic_folder_write(Path(path), write)
    return Path(path)


def load_adapter(path, map_location="cpu"):
    """Read a folder written by save_adapter: the base model with the adapters applied."""
    from ..models.lora import LoRAConfig, apply_lora, load_lora_state_dict

    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    base = Path(meta.get("base", ""))
    if not base.exists():
        raise CheckpointError(f"{path} holds LoRA adapters for the base model {str(base)!r}, which does not exist "
                              f"here; put the base there (or edit 'base' in {path / CONFIG_FILE})")
    model = load(base)
    try:
        cfg = LoRAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["lora"].items()})
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: the LoRA settings do not read back ({e})") from None
    apply_lora(model, cfg)
    state = read_safetensors(path / ADAPTER_FILE)
    load_lora_state_dict(model, state)
    model.load_report = LoadReport(source=str(path), loaded=sorted(state))
    return model.to(map_location).eval()


CONFIG_LOADERS.update({name: load_saved for name in SAVED_MODELS}, LoRAAdapter=load_adapter,
                      MultimodalConfig=load_multimodal, Int8Config=load_int8)  # int8 folders: checkpoints/int8.py
