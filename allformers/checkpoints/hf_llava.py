"""Key table for Hugging Face's LlavaForConditionalGeneration, both ways, onto VisionLanguageLM (models/vlm.py):
the vision tower (CLIPVisionModel or SiglipVisionModel: hf_vision.py's rows under "vision_tower."), the
multi-modal projector (linear_1, activation, linear_2) and the language model (any family of the decoder tables;
LLaMA is LLaVA's) under "language_model.", in the names transformers writes to disk. Checkpoints of older
transformers that keep the tower under "vision_tower.vision_model." load too."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .hf_blip2 import lm_config_from_hf, lm_config_to_hf
from .hf_clip import prefixed
from .hf_vision import (check_leftover, export_state, hf_layout, import_state, vision_rows, vit_config_from_hf,
                        vit_config_to_hf, write_hf_folder)
from .maps import activation_from_hf, activation_to_hf, pair, same

LM, TOWER = "language_model.", "vision_tower."


def _parts(c, model_type: str) -> list:
    proj = [*pair("projector.linear_1", "multi_modal_projector.linear_1")] if c.projector_bias else \
        [same("projector.linear_1.weight", "multi_modal_projector.linear_1.weight")]
    if c.projector == "mlp":
        proj += pair("projector.linear_2", "multi_modal_projector.linear_2") if c.projector_bias else \
            [same("projector.linear_2.weight", "multi_modal_projector.linear_2.weight")]
    return [(prefixed(vision_rows(model_type, c.vision), "vision.", TOWER), c.vision.block_spec(), c.vision.depth),
            (proj, None, 1)]


def llava_config_from_hf(hf: dict):
    from ..models.vlm import VLMConfig

    vc = {"model_type": "clip_vision_model", **(hf.get("vision_config") or {})}
    if vc["model_type"] not in ("clip_vision_model", "siglip_vision_model"):
        raise CheckpointError(f"a LLaVA vision tower of model_type {vc['model_type']!r} is not supported; "
                              f"supported: clip_vision_model, siglip_vision_model")
    act = activation_from_hf(hf.get("projector_hidden_act", "gelu"), "projector_hidden_act")
    layer = hf.get("vision_feature_layer", -2)
    return VLMConfig(lm_config_from_hf(hf.get("text_config") or {"model_type": "llama"}), vit_config_from_hf(vc),
                     name=hf.get("_name_or_path", "") or "llava",
                     description="imported from a Hugging Face LlavaForConditionalGeneration",
                     image_token_id=hf.get("image_token_index", 32000), projector="mlp", projector_activation=act,
                     projector_bias=hf.get("multimodal_projector_bias", True),
                     vision_feature_layer=list(layer) if isinstance(layer, (list, tuple)) else layer,
                     vision_feature_select=hf.get("vision_feature_select_strategy", "default"))


def _on_disk(state: dict) -> dict:
    """transformers' older layout keeps the tower's own prefix: vision_tower.vision_model.* -> vision_tower.*."""
    old = TOWER + "vision_model."
    return {(TOWER + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}


def load_hf_llava(path, hf: dict):
    """A Hugging Face LlavaForConditionalGeneration folder -> (VisionLanguageLM, LoadReport)."""
    from ..models.vlm import VisionLanguageLM
    from .hf import _family, hf_to_ours, read_hf_weights
    from .files import load_state_dict_into

    path = Path(path)
    arch = (hf.get("architectures") or ["LlavaForConditionalGeneration"])[0]
    if arch != "LlavaForConditionalGeneration":
        raise CheckpointError(f"{path}: {arch} is not supported; LLaVA folders load as LlavaForConditionalGeneration")
    config = llava_config_from_hf(hf)
    model = VisionLanguageLM(config)
    state = _on_disk(read_hf_weights(path))
    tower = (hf.get("vision_config") or {}).get("model_type", "clip_vision_model")
    ours, used = {}, set()
    for rows, spec, n in _parts(config, tower):
        o, u = import_state(state, rows, spec, n)
        ours.update(o)
        used |= u
    lm_state = {k[len(LM):]: v for k, v in state.items() if k.startswith(LM)}
    lm_ours, leftover = hf_to_ours(lm_state, config.text, _family(hf["text_config"]["model_type"]))
    ours.update({"lm." + k: v for k, v in lm_ours.items()})
    used |= {LM + k for k in lm_state if k not in leftover}
    check_leftover(state, used, str(path))
    return model, load_state_dict_into(model, ours, str(path))


def save_hf_llava(model, path, tokenizer=None) -> Path:
    """Write a VisionLanguageLM as LlavaForConditionalGeneration (a CLIP or SigLIP tower, the 2-layer projector)."""
    from .hf import ours_to_hf
    from .files import contiguous_state

    c = model.config
    if c.projector != "mlp":
        raise CheckpointError(f"LLaVA's projector is Linear-activation-Linear; this model's is {c.projector!r}: "
                              f"save format='allformers'")
    if None in c.feature_layers:
        raise CheckpointError("LLaVA reads a hidden state of its tower (vision_feature_layer an int), not the tower's "
                              "normed output (None); save format='allformers'")
    tower = hf_layout(c.vision)
    family, text = lm_config_to_hf(c.text)
    state = contiguous_state(model.state_dict())
    out = {}
    for rows, spec, n in _parts(c, tower):
        out.update(export_state(state, rows, spec, n))
    lm_hf = ours_to_hf({k[3:]: v for k, v in state.items() if k.startswith("lm.")}, c.text, family)
    if c.text.tie_embeddings and family.tied_hf_key:
        lm_hf.pop(family.tied_hf_key, None)
    out.update({LM + k: v for k, v in lm_hf.items()})
    layer = c.vision_feature_layer
    hf = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "dtype": "float32",
          "vision_config": vit_config_to_hf(c.vision, tower), "text_config": text,
          "image_token_index": c.image_token_id, "image_seq_length": c.image_seq_length,
          "projector_hidden_act": activation_to_hf(c.projector_activation, "gelu_pytorch_tanh"),
          "multimodal_projector_bias": c.projector_bias,
          "vision_feature_layer": list(layer) if isinstance(layer, (list, tuple)) else layer,
          "vision_feature_select_strategy": c.vision_feature_select, "tie_word_embeddings": c.text.tie_embeddings}
    return write_hf_folder(path, out, hf, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None))
