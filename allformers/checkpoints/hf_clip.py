"""Key tables for Hugging Face's CLIP and SigLIP, both ways: CLIPModel and SiglipModel (both towers, the
projections, logit_scale / logit_bias) and the text towers alone (CLIPTextModel, SiglipTextModel); the image
towers' tables are in hf_vision.py. Our keys: TextTower (body = a TransformerLM) and CLIP (text, vision,
text_projection, visual_projection, logit_scale, logit_bias)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..config import Config
from ..errors import CheckpointError
from .hf_vision import (check_leftover, clip_layer_rows,
                        export_state, hf_layout, import_state, strip_prefix, vision_rows, vit_config_from_hf,
                        vit_config_to_hf)
from .maps import EXPORTABLE_ACTIVATIONS, Packed, Row, activation_from_hf, activation_to_hf, pair, same

ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel", "clip_text_model": "CLIPTextModel",
                 "siglip_text_model": "SiglipTextModel"}
LEGACY_EOS = 2  # a CLIP text config with eos_token_id 2 pools at the highest id (transformers' legacy rule)


def prefixed(rows, ours: str, hf: str) -> list:
    """The same rows with our keys under `ours` and HF's under `hf` (a tower inside a two-tower model)."""
    out = []
    for r in rows:
        if isinstance(r, Packed):
            out.append(replace(r, ours=tuple(ours + k for k in r.ours), hf=tuple(hf + k for k in r.hf)))
        else:
            out.append(replace(r, ours=ours + r.ours, hf=tuple(hf + k for k in r.hf)))
    return out


def scalar(ours: str, hf: str, hf_shape: tuple):
    """logit_scale / logit_bias: a 0-dim parameter of ours, () in CLIPModel and (1,) in SiglipModel."""
    return Row(ours, (hf,), lambda ts, c: ts[0].reshape(()), lambda t, c: [t.reshape(hf_shape)])


def text_rows(head: bool) -> list:
    rows = [same("body.wte.weight", "embeddings.token_embedding.weight"),
            same("body.wpe.weight", "embeddings.position_embedding.weight"),
            *prefixed(clip_layer_rows(), "body.", ""), *pair("body.norm", "final_layer_norm")]
    return rows + (pair("head", "head") if head else [])


# ---------------------------------------------------------------------- configs both ways
def text_config_from_hf(hf: dict, siglip: bool):
    from ..models.clip import TextTowerConfig

    act = activation_from_hf(hf.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"))
    lm = Config(name=hf.get("_name_or_path", "") or hf.get("model_type", ""), vocab_size=hf["vocab_size"],
                block_size=hf.get("max_position_embeddings", 64 if siglip else 77), n_layer=hf["num_hidden_layers"],
                n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                causal=not siglip, position="learned", activation=act,
                norm_eps=hf.get("layer_norm_eps", 1e-6 if siglip else 1e-5), lm_head=False,
                family="encoder" if siglip else "decoder")
    eos = hf.get("eos_token_id", 1 if siglip else 49407)
    if siglip:
        return TextTowerConfig(lm, pooling="last", eos_token_id=eos if 0 <= eos < lm.vocab_size else 0,
                               head_size=hf.get("projection_size", hf["hidden_size"]))
    if eos == LEGACY_EOS:
        return TextTowerConfig(lm, pooling="argmax", eos_token_id=eos)
    return TextTowerConfig(lm, pooling="eos", eos_token_id=eos)


def text_config_to_hf(t, siglip: bool) -> dict:
    lm = t.lm
    d = dict(vocab_size=lm.vocab_size, max_position_embeddings=lm.block_size, num_hidden_layers=lm.n_layer,
             num_attention_heads=lm.n_head, hidden_size=lm.n_embd, intermediate_size=lm.intermediate_size,
             hidden_act=activation_to_hf(lm.activation, "gelu_pytorch_tanh"), layer_norm_eps=lm.norm_eps, attention_dropout=0.0,
             eos_token_id=LEGACY_EOS if t.pooling == "argmax" else t.eos_token_id)
    if siglip:
        d["projection_size"] = t.head_size
    return {"model_type": "siglip_text_model" if siglip else "clip_text_model", **d}


def text_layout(t) -> str:
    lm = t.lm
    ok = (lm.position == "learned" and lm.norm_placement == "pre" and lm.final_norm and lm.norm_class == "LayerNorm"
          and lm.mlp_class == "MLP" and lm.attn_bias and lm.mlp_bias and lm.n_kv_head == lm.n_head
          and lm.head_dim * lm.n_head == lm.n_embd and lm.activation in EXPORTABLE_ACTIVATIONS and not lm.parallel_residual
          and not lm.type_vocab_size and lm.embedding_size == lm.n_embd and not lm.embedding_norm
          and lm.attn_scale in (None, lm.head_dim ** -0.5) and lm.attention_class == "Attention")
    if ok and lm.causal and t.pooling in ("eos", "argmax") and t.head_size is None:
        return "clip_text_model"
    if ok and not lm.causal and t.pooling == "last" and t.head_size is not None:
        return "siglip_text_model"
    raise CheckpointError(f"text tower ({'causal' if lm.causal else 'bidirectional'}, pooling={t.pooling}, "
                          f"head_size={t.head_size}, position={lm.position}, norm={lm.norm_class}) has the layout of "
                          f"neither CLIPTextModel nor SiglipTextModel; save it with format='allformers'")


def clip_config_from_hf(hf: dict):
    from ..models.clip import CLIPConfig

    siglip = hf["model_type"] == "siglip"
    text = text_config_from_hf(hf.get("text_config") or {}, siglip)
    vision = vit_config_from_hf({"model_type": f"{hf['model_type']}_vision_model", **(hf.get("vision_config") or {})})
    name = hf.get("_name_or_path", "") or hf["model_type"]
    if siglip:
        return CLIPConfig(text, vision, name=name, projection_dim=None, loss="sigmoid", logit_scale_init=0.0,
                          logit_bias_init=0.0, description="imported from a Hugging Face SiglipModel")
    return CLIPConfig(text, vision, name=name, projection_dim=hf.get("projection_dim", 512),
                      logit_scale_init=hf.get("logit_scale_init_value", 2.6592),
                      description="imported from a Hugging Face CLIPModel")


def clip_layout(c) -> str:
    t, v = text_layout(c.text), hf_layout(c.vision)
    if t == "clip_text_model" and v == "clip_vision_model" and c.projection_dim and c.loss == "softmax" \
            and c.logit_bias_init is None:
        return "clip"
    if t == "siglip_text_model" and v == "siglip_vision_model" and c.projection_dim is None and c.loss == "sigmoid" \
            and c.logit_bias_init is not None and c.vision.pooling == "map":
        return "siglip"
    raise CheckpointError(f"{c.name or 'this model'}: a {t} text tower with a {v} image tower, projection_dim="
                          f"{c.projection_dim}, loss={c.loss}, logit bias {'on' if c.logit_bias_init is not None else 'off'}: "
                          f"neither CLIPModel nor SiglipModel has that layout; save it with format='allformers'")


# ---------------------------------------------------------------------- state dicts
def _clip_parts(c, model_type: str):
    """(rows, sizing spec, layers) per tower, for CLIPModel / SiglipModel."""
    siglip = model_type == "siglip"
    vis_type = f"{model_type}_vision_model"
    parts = [(prefixed(text_rows(siglip), "text.", "text_model."), c.text.lm, c.text.lm.n_layer),
             (prefixed(vision_rows(vis_type, c.vision), "vision.", "vision_model."), c.vision.block_spec(), c.vision.depth)]
    if siglip:
        top = [scalar("logit_scale", "logit_scale", (1,)), scalar("logit_bias", "logit_bias", (1,))]
    else:
        top = [same("text_projection.weight", "text_projection.weight"),
               same("visual_projection.weight", "visual_projection.weight"), scalar("logit_scale", "logit_scale", ())]
    return parts + [(top, None, 1)]


def load_hf_clip(path, hf: dict):
    """A Hugging Face CLIPModel / SiglipModel / CLIPTextModel / SiglipTextModel folder -> (model, LoadReport)."""
    from ..models.clip import CLIP, TextTower
    from .hf import read_hf_weights
    from .files import load_state_dict_into

    path, mt = Path(path), hf["model_type"]
    state = read_hf_weights(path)
    if mt in ("clip_text_model", "siglip_text_model"):
        config = text_config_from_hf(hf, mt == "siglip_text_model")
        model = TextTower(config)
        state = strip_prefix(state, "text_model.")
        parts = [(text_rows(config.head_size is not None), config.lm, config.lm.n_layer)]
    else:
        config = clip_config_from_hf(hf)
        model = CLIP(config)
        parts = _clip_parts(config, mt)
    ours, used = {}, set()
    for rows, spec, n in parts:
        o, u = import_state(state, rows, spec, n)
        ours.update(o)
        used |= u
    check_leftover(state, used, str(path))
    report = load_state_dict_into(model, ours, str(path))
    return model, report


def save_hf_clip(model, path, tokenizer=None) -> Path:
    """Write a CLIP / SigLIP (or a text tower alone) as the Hugging Face class with its layout."""
    from safetensors.torch import save_file

    from ..models.clip import TextTower
    from .files import CONFIG_FILE, contiguous_state, atomic_folder_write

    c = model.config
    state = contiguous_state(model.state_dict())
    if isinstance(model, TextTower):
        mt = text_layout(c)
        hf = text_config_to_hf(c, mt == "siglip_text_model")
        parts = [(text_rows(c.head_size is not None), c.lm, c.lm.n_layer)]
    else:
        mt = clip_layout(c)
        siglip = mt == "siglip"
        hf = {"model_type": mt, "text_config": text_config_to_hf(c.text, siglip),
              "vision_config": vit_config_to_hf(c.vision, f"{mt}_vision_model")}
        if not siglip:
            hf.update(projection_dim=c.projection_dim, logit_scale_init_value=c.logit_scale_init)
        parts = _clip_parts(c, mt)
    out = {}
    for rows, spec, n in parts:
        out.update(export_state(state, rows, spec, n))
    hf.update(architectures=[ARCHITECTURES[mt]], dtype="float32")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)

    def write(tmp: Path):
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)

    atomic_folder_write(Path(path), write)
    return Path(path)

