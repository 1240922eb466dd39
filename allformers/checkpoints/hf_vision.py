"""Key tables for the Hugging Face vision towers, both ways: CLIPVisionModel, SiglipVisionModel, Dinov2Model,
all onto one allformers ViT (models/vit.py), plus the small driver that runs a table over a state dict
(also used by hf_clip.py for CLIP and SigLIP with their text towers).

Our keys are relative to the ViT; a row's "{}" is the layer index. HF's on-disk names are used (Dinov2's
attention.attention.query ..., which transformers 5 renames in memory)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from .maps import Packed, activation_from_hf, activation_to_hf, pair, packed, same, separate_qkv, unsqueezed

# ---------------------------------------------------------------------- the driver
def _expand(rows, n_layers: int):
    """Rows with "{}" once per layer -> (row, our keys, HF keys)."""
    for row in rows:
        ours = row.ours if isinstance(row, Packed) else (row.ours,)
        layers = range(n_layers) if "{}" in ours[0] else [None]
        for i in layers:
            fill = (lambda t: t.format(i)) if i is not None else (lambda t: t)
            yield row, [fill(k) for k in ours], [fill(k) for k in row.hf]


def import_state(hf_state: dict, rows, spec, n_layers: int, prefix: str = "") -> tuple[dict, set]:
    """HF tensors -> ours (keys prefixed with `prefix`), and the HF keys used. `spec` sizes the split rows."""
    ours, used = {}, set()
    for row, ok, hk in _expand(rows, n_layers):
        if not all(k in hf_state for k in hk):
            continue  # reported as missing when the state is loaded
        ts = [hf_state[k] for k in hk]
        out = row.to_ours(ts, spec) if isinstance(row, Packed) else [row.to_ours(ts, spec)]
        ours.update({prefix + k: t.contiguous() for k, t in zip(ok, out)})
        used.update(hk)
    return ours, used


def export_state(state: dict, rows, spec, n_layers: int, prefix: str = "") -> dict:
    """Our tensors (keys prefixed with `prefix`) -> HF's."""
    out = {}
    for row, ok, hk in _expand(rows, n_layers):
        if not all(prefix + k in state for k in ok):
            continue
        ts = [state[prefix + k] for k in ok]
        hf = row.to_hf(ts, spec) if isinstance(row, Packed) else row.to_hf(ts[0], spec)
        out.update({k: t.contiguous() for k, t in zip(hk, hf)})
    return out


def check_leftover(hf_state: dict, used: set, source: str, ignore=("position_ids",)):
    left = sorted(k for k in hf_state if k not in used and not any(k.endswith(s) for s in ignore))
    if left:
        shown = ", ".join(left[:6]) + (f" ... (+{len(left) - 6})" if len(left) > 6 else "")
        raise CheckpointError(f"{source}: {len(left)} tensor(s) unknown to the allformers model: {shown}")


def write_hf_folder(path, state: dict, hf_config: dict, tokenizer=None) -> Path:
    """model.safetensors + config.json (+ the tokenizer's files), written atomically: every composite HF saver's end."""
    from safetensors.torch import save_file

    from .files import CONFIG_FILE, atomic_folder_write

    def write(tmp: Path):
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)

    atomic_folder_write(Path(path), write)
    return Path(path)


def strip_prefix(hf_state: dict, prefix: str) -> dict:
    """Older transformers saved towers under "vision_model." / "text_model."; newer ones without."""
    if prefix and all(k.startswith(prefix) for k in hf_state):
        return {k[len(prefix):]: v for k, v in hf_state.items()}
    return hf_state


# ---------------------------------------------------------------------- layer tables
def clip_layer_rows(p: str = "encoder.layers.{}.") -> list:
    """CLIPEncoderLayer / SiglipEncoderLayer (vision and text alike) -> our pre-norm Block."""
    return [*separate_qkv("blocks.{}.attn.qkv", p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"),
            *pair("blocks.{}.attn.proj", p + "self_attn.out_proj"), *pair("blocks.{}.norm1", p + "layer_norm1"),
            *pair("blocks.{}.norm2", p + "layer_norm2"), *pair("blocks.{}.mlp.fc", p + "mlp.fc1"),
            *pair("blocks.{}.mlp.proj", p + "mlp.fc2")]


def _dinov2_layer_rows(p: str = "encoder.layer.{}.") -> list:
    a = p + "attention."
    return [*separate_qkv("blocks.{}.attn.qkv", a + "attention.query", a + "attention.key", a + "attention.value"),
            *pair("blocks.{}.attn.proj", a + "output.dense"), *pair("blocks.{}.norm1", p + "norm1"),
            *pair("blocks.{}.norm2", p + "norm2"), same("blocks.{}.ls1.gamma", p + "layer_scale1.lambda1"),
            same("blocks.{}.ls2.gamma", p + "layer_scale2.lambda1"), *pair("blocks.{}.mlp.fc", p + "mlp.fc1"),
            *pair("blocks.{}.mlp.proj", p + "mlp.fc2")]


def _map_head_rows(p: str = "head.") -> list:
    """SiglipMultiheadAttentionPoolingHead: a probe, torch's MultiheadAttention (packed in_proj), LN + MLP."""
    def sizes(spec):
        return [spec.dim, 2 * spec.dim]

    return [same("pool.probe", p + "probe"),
            packed(("pool.attn.q.weight", "pool.attn.kv.weight"), p + "attention.in_proj_weight", sizes),
            packed(("pool.attn.q.bias", "pool.attn.kv.bias"), p + "attention.in_proj_bias", sizes),
            *pair("pool.attn.proj", p + "attention.out_proj"), *pair("pool.norm", p + "layernorm"),
            *pair("pool.mlp.fc", p + "mlp.fc1"), *pair("pool.mlp.proj", p + "mlp.fc2")]


def vision_rows(model_type: str, config) -> list:
    """Our ViT keys <- the HF tower's, for a ViTConfig laid out as `model_type`."""
    if model_type == "clip_vision_model":
        return [unsqueezed("cls", "embeddings.class_embedding", 1), same("patch.weight", "embeddings.patch_embedding.weight"),
                unsqueezed("pos", "embeddings.position_embedding.weight", 2), *pair("pre_norm", "pre_layrnorm"),
                *clip_layer_rows(), *pair("norm", "post_layernorm")]
    if model_type == "siglip_vision_model":
        return [*pair("patch", "embeddings.patch_embedding"), unsqueezed("pos", "embeddings.position_embedding.weight", 2),
                *clip_layer_rows(), *pair("norm", "post_layernorm"),
                *(_map_head_rows() if config.pooling == "map" else [])]
    if model_type == "dinov2":
        return [same("cls", "embeddings.cls_token"), *pair("patch", "embeddings.patch_embeddings.projection"),
                same("pos", "embeddings.position_embeddings"),
                *([same("mask_token", "embeddings.mask_token")] if config.mask_token else []),
                *_dinov2_layer_rows(), *pair("norm", "layernorm")]
    raise CheckpointError(f"no vision key table for model_type {model_type!r}; known: {list(ARCHITECTURES)}")


ARCHITECTURES = {"clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel",
                 "dinov2": "Dinov2Model"}


# ---------------------------------------------------------------------- configs both ways
def vit_config_from_hf(hf: dict):
    """A CLIPVisionConfig / SiglipVisionConfig / Dinov2Config dict -> ViTConfig."""
    from ..models.vit import ViTConfig

    mt = hf.get("model_type")
    common = dict(image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
                  channels=hf.get("num_channels", 3), width=hf["hidden_size"], depth=hf["num_hidden_layers"],
                  heads=hf["num_attention_heads"], activation=activation_from_hf(hf.get("hidden_act", "gelu")),
                  norm_eps=hf.get("layer_norm_eps", 1e-5),
                  name=hf.get("_name_or_path", "") or mt, description=f"imported from a Hugging Face {ARCHITECTURES.get(mt, mt)}")
    if mt == "clip_vision_model":
        return ViTConfig(**common, intermediate_size=hf["intermediate_size"], patch_bias=False, pre_norm=True,
                         final_norm="pooled")
    if mt == "siglip_vision_model":
        return ViTConfig(**common, intermediate_size=hf["intermediate_size"], class_token=False,
                         pooling="map" if hf.get("vision_use_head", True) else "none")
    if mt == "dinov2":
        if hf.get("use_swiglu_ffn"):
            raise CheckpointError("Dinov2 with use_swiglu_ffn=True (the giant model) is not supported yet")
        return ViTConfig(**common, intermediate_size=int(hf["hidden_size"] * hf.get("mlp_ratio", 4)),
                         attn_bias=hf.get("qkv_bias", True), layer_scale=hf.get("layerscale_value", 1.0),
                         interpolate_positions=True, mask_token=hf.get("use_mask_token", True))
    raise CheckpointError(f"model_type {mt!r} is not a vision tower allformers reads; known: {list(ARCHITECTURES)}")


def hf_layout(c) -> str:
    """Which HF vision tower holds this ViTConfig exactly (or a CheckpointError saying why none does)."""
    base = c.position == "learned" and not c.conv_stem and c.attn_bias
    if base and c.class_token and c.pre_norm and c.final_norm == "pooled" and c.pooling == "cls" and not c.patch_bias \
            and c.layer_scale is None and not c.interpolate_positions and not c.mask_token:
        return "clip_vision_model"
    if base and not c.class_token and not c.pre_norm and c.final_norm == "tokens" and c.pooling in ("map", "none") \
            and c.patch_bias and c.layer_scale is None and not c.interpolate_positions and not c.mask_token:
        return "siglip_vision_model"
    if base and c.class_token and not c.pre_norm and c.final_norm == "tokens" and c.pooling == "cls" and c.patch_bias \
            and c.layer_scale is not None and c.interpolate_positions and c.activation in ("gelu", "relu", "silu"):
        return "dinov2"
    raise CheckpointError(f"ViT {c.name!r} (class_token={c.class_token}, pre_norm={c.pre_norm}, final_norm={c.final_norm}, "
                          f"pooling={c.pooling}, layer_scale={c.layer_scale}, patch_bias={c.patch_bias}) has the layout "
                          f"of no Hugging Face vision tower (CLIPVisionModel, SiglipVisionModel, Dinov2Model); "
                          f"save it with format='allformers'")


def vit_config_to_hf(c, model_type: str) -> dict:
    d = dict(hidden_size=c.width, intermediate_size=c.intermediate_size, num_hidden_layers=c.depth,
             num_attention_heads=c.heads, image_size=c.image_size, patch_size=c.patch_size, num_channels=c.channels,
             hidden_act=activation_to_hf(c.activation, "gelu_pytorch_tanh"), layer_norm_eps=c.norm_eps, attention_dropout=0.0)
    if model_type == "siglip_vision_model":
        d["vision_use_head"] = c.pooling == "map"
    if model_type == "dinov2":
        if c.intermediate_size % c.width:
            raise CheckpointError(f"Dinov2 sizes its MLP as mlp_ratio * hidden_size; intermediate_size="
                                  f"{c.intermediate_size} is not a multiple of width={c.width}")
        del d["intermediate_size"], d["attention_dropout"]
        d.update(mlp_ratio=c.intermediate_size // c.width, layerscale_value=c.layer_scale, qkv_bias=c.attn_bias,
                 use_mask_token=c.mask_token, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {"model_type": model_type, **d}


# ---------------------------------------------------------------------- folders
def load_hf_vision(path, hf: dict):
    """A Hugging Face CLIPVisionModel / SiglipVisionModel / Dinov2Model folder -> (ViT, LoadReport)."""
    from .hf import read_hf_weights
    from .files import load_state_dict_into
    from ..models.vit import ViT

    path = Path(path)
    config = vit_config_from_hf(hf)
    model = ViT(config)
    hf_state = strip_prefix(read_hf_weights(path), "vision_model.")
    mt = hf["model_type"]
    ours, used = import_state(hf_state, vision_rows(mt, config), config.block_spec(), config.depth)
    check_leftover(hf_state, used, str(path))
    return model, load_state_dict_into(model, ours, str(path))


def save_hf_vision(model, path) -> Path:
    """Write the ViT as the Hugging Face vision tower with its layout (transformers' AutoModel loads it)."""
    from safetensors.torch import save_file

    from .files import CONFIG_FILE, contiguous_state, atomic_folder_write

    c = model.config
    mt = hf_layout(c)
    state = export_state(contiguous_state(model.state_dict()), vision_rows(mt, c), c.block_spec(), c.depth)
    hf = {**vit_config_to_hf(c, mt), "architectures": [ARCHITECTURES[mt]], "dtype": "float32"}

    def write(tmp: Path):
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2))

    atomic_folder_write(Path(path), write)
    return Path(path)
