"""Key tables for Hugging Face's BLIP-2, both ways: Blip2ForConditionalGeneration and Blip2Model (vision tower,
query tokens, Q-Former, language_projection, the language model), Blip2ForImageTextRetrieval (stage 1: the Q-Former's
text embeddings, vision / text projections and the ITM head, no LM), and the parts alone: Blip2QFormerModel and
Blip2VisionModel. Our keys: BLIP2 (vision, query_tokens, qformer, text_embeddings, vision_projection,
text_projection, itm_head, language_projection, lm), QFormer and ViT.

The language model is any family of the decoder / T5 tables (OPT is HF's default): its rows run under
"language_model." through hf.py's driver. What HF's classes do not hold: our learned ITC temperature and the
Q-Former's ITG head (HF's checkpoints drop BLIP-2's captioning head); a model with them, or with both stage-1
heads and a language model, is refused by the export (save format='allformers', or without_stage1())."""
from __future__ import annotations

from pathlib import Path

import torch

from ..blocks import BlockSpec
from ..config import Config
from ..errors import CheckpointError
from .hf_clip import prefixed
from .hf_vision import check_leftover, export_state, import_state, write_hf_folder
from .maps import EXPORTABLE_ACTIVATIONS, activation_from_hf, activation_to_hf, concat, pair, same, separate_qkv

ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2Model", "Blip2ForImageTextRetrieval")
LM = "language_model."
TEMPERATURE = "allformers_itc_temperature"  # our learned ITC temperature, which HF's classes do not have


# ---------------------------------------------------------------------- rows
def vision_rows() -> list:
    """Blip2VisionModel -> our ViT: fused qkv (HF stores q, zero k and v biases as one), post-LN over every token."""
    p = "encoder.layers.{}."
    return [same("cls", "embeddings.class_embedding"), *pair("patch", "embeddings.patch_embedding"),
            same("pos", "embeddings.position_embedding"), *pair("blocks.{}.attn.qkv", p + "self_attn.qkv"),
            *pair("blocks.{}.attn.proj", p + "self_attn.projection"), *pair("blocks.{}.norm1", p + "layer_norm1"),
            *pair("blocks.{}.norm2", p + "layer_norm2"), *pair("blocks.{}.mlp.fc", p + "mlp.fc1"),
            *pair("blocks.{}.mlp.proj", p + "mlp.fc2"), *pair("norm", "post_layernorm")]


def qformer_rows() -> list:
    """Blip2QFormerModel -> our QFormer (layers without cross-attention simply have no such rows)."""
    p, o = "encoder.layer.{}.", "layers.{}."
    a, x = p + "attention.", p + "crossattention."

    def kv(part):
        return concat(f"{o}cross_attn.kv.{part}", f"{x}attention.key.{part}", f"{x}attention.value.{part}",
                      sizes=lambda s: [s.dim, s.dim])

    return [*pair("norm", "layernorm"),
            *separate_qkv(o + "attn.qkv", a + "attention.query", a + "attention.key", a + "attention.value"),
            *pair(o + "attn.proj", a + "output.dense"), *pair(o + "norm1", a + "output.LayerNorm"),
            *pair(o + "cross_attn.q", x + "attention.query"), kv("weight"), kv("bias"),
            *pair(o + "cross_attn.proj", x + "output.dense"), *pair(o + "norm_cross", x + "output.LayerNorm"),
            *pair(o + "mlp_query.fc", p + "intermediate_query.dense"), *pair(o + "mlp_query.proj", p + "output_query.dense"),
            *pair(o + "norm_query", p + "output_query.LayerNorm"), *pair(o + "mlp_text.fc", p + "intermediate.dense"),
            *pair(o + "mlp_text.proj", p + "output.dense"), *pair(o + "norm_text", p + "output.LayerNorm")]


def _qformer_spec(q) -> BlockSpec:
    return BlockSpec(dim=q.width, n_head=q.heads)


def _parts(c) -> list:
    """(rows, sizing spec, layers) of everything but the language model."""
    top = [same("query_tokens", "query_tokens")]
    if c.text is not None:
        top += pair("language_projection", "language_projection")
    if c.stage1:
        top += [same("text_embeddings.word.weight", "embeddings.word_embeddings.weight"),
                same("text_embeddings.position.weight", "embeddings.position_embeddings.weight"),
                *pair("vision_projection", "vision_projection"), *pair("text_projection", "text_projection"),
                *pair("itm_head", "itm_head")]
    return [(prefixed(vision_rows(), "vision.", "vision_model."), c.vision.block_spec(), c.vision.depth),
            (prefixed(qformer_rows(), "qformer.", "qformer."), _qformer_spec(c.qformer), c.qformer.depth),
            (top, None, 1)]


# ---------------------------------------------------------------------- configs both ways
def vision_config_from_hf(hf: dict):
    from ..models.vit import ViTConfig

    if not hf.get("qkv_bias", True):
        raise CheckpointError("a BLIP-2 vision tower with qkv_bias=False (a biased output projection but no q/v "
                              "biases) is not supported")
    act = activation_from_hf(hf.get("hidden_act", "gelu"))
    return ViTConfig(name="blip2-vision", description="imported from a Hugging Face Blip2VisionModel",
                     image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 14), width=hf["hidden_size"],
                     depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                     intermediate_size=hf["intermediate_size"], activation=act,
                     norm_eps=hf.get("layer_norm_eps", 1e-6), final_norm="tokens+pooled", pooling="cls")


def vision_config_to_hf(v) -> dict:
    ok = (v.class_token and not v.pre_norm and v.final_norm == "tokens+pooled" and v.pooling == "cls" and v.patch_bias
          and v.attn_bias and v.position == "learned" and v.layer_scale is None and not v.conv_stem and not v.mask_token
          and v.channels == 3 and v.activation in EXPORTABLE_ACTIVATIONS)
    if not ok:
        raise CheckpointError(f"ViT {v.name!r} does not have Blip2VisionModel's layout (class token, no pre-LN, post-LN "
                              f"over the tokens and the class token, biased patches and qkv); save format='allformers'")
    return dict(model_type="blip_2_vision_model", hidden_size=v.width, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.depth, num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                hidden_act=activation_to_hf(v.activation, "gelu_pytorch_tanh"), layer_norm_eps=v.norm_eps, qkv_bias=True,
                attention_dropout=0.0)


def qformer_config_from_hf(hf: dict, num_query_tokens: int = 32):
    from ..models.qformer import QFormerConfig

    act = activation_from_hf(hf.get("hidden_act", "gelu"))
    return QFormerConfig(width=hf["hidden_size"], depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                         intermediate_size=hf["intermediate_size"], activation=act,
                         norm_eps=hf.get("layer_norm_eps", 1e-12), vision_width=hf.get("encoder_hidden_size", 1408),
                         num_query_tokens=num_query_tokens, cross_attention_frequency=hf.get("cross_attention_frequency", 2),
                         text_input=hf.get("use_qformer_text_input", False), vocab_size=hf.get("vocab_size", 30522),
                         max_positions=hf.get("max_position_embeddings", 512), pad_token_id=hf.get("pad_token_id", 0) or 0)


def qformer_config_to_hf(q) -> dict:
    return dict(model_type="blip_2_qformer", hidden_size=q.width, num_hidden_layers=q.depth,
                num_attention_heads=q.heads, intermediate_size=q.intermediate_size,
                hidden_act=activation_to_hf(q.activation, "gelu_pytorch_tanh"),
                layer_norm_eps=q.norm_eps, encoder_hidden_size=q.vision_width,
                cross_attention_frequency=q.cross_attention_frequency, use_qformer_text_input=q.text_input,
                vocab_size=q.vocab_size, max_position_embeddings=q.max_positions, pad_token_id=q.pad_token_id,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def lm_config_from_hf(hf: dict) -> Config:
    """A text_config dict (any family of the decoder / T5 tables) -> the LM's Config, task "lm"."""
    from .hf import _family

    family = _family(hf.get("model_type"))
    if "lm" not in family.architectures:
        raise CheckpointError(f"a {family.model_type} cannot be BLIP-2's language model (no LM head in its table)")
    try:
        kw = family.config_from_hf(hf)
    except KeyError as e:
        raise CheckpointError(f"BLIP-2's text_config has no {e.args[0]!r}, which a {family.model_type} needs") from None
    return Config(name=hf.get("_name_or_path", "") or family.model_type, family="decoder",
                  description=f"the language model of a Hugging Face BLIP-2 ({family.model_type})", task="lm", **kw)


def lm_config_to_hf(c: Config) -> tuple:
    """-> (family, text_config dict) for the LM's Config."""
    from .hf import hf_family

    family = hf_family(c)
    if family is None or family.architectures.get("lm") is None:
        raise CheckpointError(f"BLIP-2's language model {c.name!r} has no Hugging Face family; save format='allformers'")
    return family, {"model_type": family.model_type, **family.config_to_hf(c)}


def blip2_config_from_hf(hf: dict, retrieval: bool):
    from ..models.blip2 import BLIP2Config

    qc = hf.get("qformer_config") or {}
    n = hf.get("num_query_tokens", 32)
    text = None if retrieval else lm_config_from_hf(hf.get("text_config") or {"model_type": "opt"})
    tc = hf.get("text_config") or {}
    return BLIP2Config(vision_config_from_hf(hf.get("vision_config") or {}), qformer_config_from_hf(qc, n), text,
                       name=hf.get("_name_or_path", "") or "blip-2",
                       description=f"imported from a Hugging Face {(hf.get('architectures') or ['Blip2'])[0]}",
                       image_token_id=hf.get("image_token_index"), bos_token_id=tc.get("bos_token_id"),
                       stage1=retrieval, embed_dim=hf.get("image_text_hidden_size", 256), itg_head=False,
                       temperature_init=hf.get(TEMPERATURE, 0.07))


# ---------------------------------------------------------------------- loading
def _architecture(hf: dict, path) -> str:
    arch = (hf.get("architectures") or ["Blip2ForConditionalGeneration"])[0]
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: {arch} is not a BLIP-2 class allformers reads; supported: {list(ARCHITECTURES)}")
    return arch


def _import(model, state: dict, parts, path, lm_family=None, extra=None):
    from .hf import hf_to_ours
    from .files import load_state_dict_into

    ours, used = dict(extra or {}), set()
    for rows, spec, n in parts:
        o, u = import_state(state, rows, spec, n)
        ours.update(o)
        used |= u
    if lm_family is not None:
        lm_state = {k[len(LM):]: v for k, v in state.items() if k.startswith(LM)}
        lm_ours, leftover = hf_to_ours(lm_state, model.config.text, lm_family)
        ours.update({"lm." + k: v for k, v in lm_ours.items()})
        used |= {LM + k for k in lm_state if k not in leftover}
    check_leftover(state, used, str(path))
    return load_state_dict_into(model, ours, str(path))


def load_hf_blip2(path, hf: dict):
    """A Hugging Face BLIP-2 folder (model_type "blip-2", "blip_2_qformer" or "blip_2_vision_model") -> (model, report)."""
    from ..models.blip2 import BLIP2
    from ..models.qformer import QFormer
    from ..models.vit import ViT
    from .hf import _family, read_hf_weights

    path, mt = Path(path), hf.get("model_type")
    state = read_hf_weights(path)
    if mt == "blip_2_vision_model":
        config = vision_config_from_hf(hf)
        model = ViT(config)
        return model, _import(model, state, [(vision_rows(), config.block_spec(), config.depth)], path)
    if mt == "blip_2_qformer":
        config = qformer_config_from_hf(hf)
        model = QFormer(config)
        return model, _import(model, state, [(qformer_rows(), _qformer_spec(config), config.depth)], path)
    arch = _architecture(hf, path)
    config = blip2_config_from_hf(hf, retrieval=arch == "Blip2ForImageTextRetrieval")
    model = BLIP2(config)
    family = _family(hf["text_config"]["model_type"]) if config.text is not None else None
    # the ITC temperature is ours (HF's logits are plain cosines): kept in config.json beside HF's keys
    extra = {"temperature": torch.tensor(float(config.temperature_init))} if config.stage1 else None
    return model, _import(model, state, _parts(config), path, family, extra)


# ---------------------------------------------------------------------- saving
def hf_config(c) -> tuple:
    """-> (architecture, HF config dict, LM family or None) for a BLIP2Config, or a CheckpointError saying why none."""
    if c.stage1 and c.text is not None:
        raise CheckpointError("a BLIP-2 with both stage-1 heads and a language model has no single Hugging Face class "
                              "(Blip2ForConditionalGeneration holds no ITC/ITM heads); save format='allformers', or "
                              "export model.without_stage1()")
    if c.stage1 and c.itg_head:
        raise CheckpointError("Blip2ForImageTextRetrieval has no Q-Former captioning (ITG) head; save format='allformers'")
    hf = {"model_type": "blip-2", "vision_config": vision_config_to_hf(c.vision),
          "qformer_config": qformer_config_to_hf(c.qformer), "num_query_tokens": c.num_query_tokens,
          "image_text_hidden_size": c.embed_dim, "image_token_index": c.image_token_id}
    family = None
    if c.text is not None:
        family, text = lm_config_to_hf(c.text)
        if c.bos_token_id is not None:
            text["bos_token_id"] = c.bos_token_id
        hf["text_config"] = text
    return ("Blip2ForImageTextRetrieval" if c.text is None else "Blip2ForConditionalGeneration"), hf, family


def save_hf_blip2(model, path, tokenizer=None) -> Path:
    """Write a BLIP2 as Blip2ForConditionalGeneration (with a language model) or Blip2ForImageTextRetrieval (stage 1)."""
    from .hf import ours_to_hf
    from .files import contiguous_state

    c = model.config
    arch, hf, family = hf_config(c)
    state = contiguous_state(model.state_dict())
    out = {}
    for rows, spec, n in _parts(c):
        out.update(export_state(state, rows, spec, n))
    if family is not None:
        lm = {k[3:]: v for k, v in state.items() if k.startswith("lm.")}
        lm_hf = ours_to_hf(lm, c.text, family)
        if c.text.tie_embeddings and family.tied_hf_key:
            lm_hf.pop(family.tied_hf_key, None)
        out.update({LM + k: v for k, v in lm_hf.items()})
    hf.update(architectures=[arch], dtype="float32")
    if c.stage1:
        hf[TEMPERATURE] = float(model.temperature.detach())
    return write_hf_folder(path, out, hf, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None))
