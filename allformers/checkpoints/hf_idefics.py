"""Key table for Hugging Face's IdeficsForVisionText2Text (the open Flamingo), both ways, onto Flamingo
(models/flamingo.py). Idefics's parts are ours:

  model.vision_model.*              CLIP's vision tower (IdeficsVisionTransformer)  -> vision.*  (hf_vision's rows)
  model.perceiver_resampler.*       latents, blocks.{i}.0 attention, blocks.{i}.1 MLP -> resampler.*
  model.gated_cross_attn_layers.{j} alpha_cross_attn / alpha_dense, cross_attn, mlp -> xattn.{j}.*
  model.layers.*, model.norm        a LLaMA decoder                                  -> lm.*  (the llama table)
  model.embed_tokens(.additional_embedding), lm_head(.additional_fc): Idefics's "decoupled" vocabulary, its last
      additional_vocab_size rows kept in separate tensors -> one table of ours (split again on export).

What does not fit, refused on export with the reason: a perceiver MLP not 4 x the vision width with ReLU and
LayerNorm eps 1e-5 (Idefics fixes those), a LM with grouped-query heads or biases, a ViT that is not CLIP's
layout, n_layer not a multiple of cross_attn_every. Not carried by a checkpoint: Idefics's freeze_* training
flags (allformers' freeze() decides), and its own bicubic position interpolation (interpolate_pos_encoding)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..errors import CheckpointError
from . import hf_decoders  # noqa: F401  (registers the llama table used below, also when this module loads first)
from .hf_clip import prefixed
from .hf_vision import (check_leftover, export_state, hf_layout, import_state, vision_rows,
                        vit_config_from_hf, vit_config_to_hf, write_hf_folder)
from .maps import FAMILIES, Row, concat, pair, same

ARCH = "IdeficsForVisionText2Text"
LM_ACTS = ("silu", "gelu")


# ---------------------------------------------------------------------- the template table
def _resampler_rows(c) -> list:
    p, b = "model.perceiver_resampler.", "model.perceiver_resampler.blocks.{}."
    ours = "resampler.layers.{}."
    kv = lambda c: [c.resampler_heads * c.resampler_head_dim] * 2  # noqa: E731
    rows = [same("resampler.latents", p + "latents"), *pair("resampler.norm", p + "layer_norm"),
            *pair(ours + "context_norm", b + "0.context_layer_norm"), *pair(ours + "latents_norm", b + "0.latents_layer_norm"),
            same(ours + "attn.q.weight", b + "0.q_proj.weight"),
            concat(ours + "attn.kv.weight", b + "0.k_proj.weight", b + "0.v_proj.weight", sizes=kv),
            same(ours + "attn.proj.weight", b + "0.output_proj.weight"),
            *pair(ours + "mlp_norm", b + "1.ln"), same(ours + "mlp.fc.weight", b + "1.fc.weight"),
            same(ours + "mlp.proj.weight", b + "1.c_proj.weight")]
    if c.resampler_qk_norm:
        rows += [*pair(ours + "attn.q_norm", b + "0.q_layer_norm"), *pair(ours + "attn.k_norm", b + "0.k_layer_norm")]
    return rows


def _xattn_rows(c) -> list:
    p, ours = "model.gated_cross_attn_layers.{}.", "xattn.{}."
    kv = lambda c: [c.text.n_head * c.text.head_dim] * 2  # noqa: E731
    glu = lambda c: [c.text.intermediate_size] * 2  # noqa: E731
    rows = [same(ours + "attn_gate", p + "alpha_cross_attn"), same(ours + "ff_gate", p + "alpha_dense"),
            same(ours + "norm1.weight", p + "input_layernorm.weight"),
            same(ours + "norm2.weight", p + "post_attention_layernorm.weight"),
            same(ours + "attn.q.weight", p + "cross_attn.q_proj.weight"),
            concat(ours + "attn.kv.weight", p + "cross_attn.k_proj.weight", p + "cross_attn.v_proj.weight", sizes=kv),
            same(ours + "attn.proj.weight", p + "cross_attn.o_proj.weight"),
            concat(ours + "mlp.fc.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", sizes=glu),
            same(ours + "mlp.proj.weight", p + "mlp.down_proj.weight")]
    if c.xattn_qk_norm:
        rows += [same(ours + "attn.q_norm.weight", p + "cross_attn.q_layer_norm.weight"),
                 same(ours + "attn.k_norm.weight", p + "cross_attn.k_layer_norm.weight")]
    return rows


def _decoupled(ours: str, hf: str, extra_hf: str, extra: int):
    """Idefics's decoupled table: its first rows in `hf`, the last `extra` in `extra_hf` <-> one tensor of ours."""
    if not extra:
        return same(ours, hf)
    return Row(ours, (hf, extra_hf), lambda ts, c: torch.cat(ts, 0),
               lambda t, c: list(t.split([t.shape[0] - extra, extra], 0)))


def _vocab_rows(c) -> list:
    n = c.additional_vocab_size
    rows = [_decoupled("lm.wte.weight", "model.embed_tokens.weight", "model.embed_tokens.additional_embedding.weight", n)]
    if not c.text.tie_embeddings:
        rows.append(_decoupled("lm.lm_head.weight", "lm_head.weight", "lm_head.additional_fc.weight", n))
    return rows


def _parts(c) -> list:
    """(rows, the config their sizes come from, layers) for each part."""
    lm = [r for r in FAMILIES["llama"].body_rows(c.text) if r.ours not in ("wte.weight", "lm_head.weight")]
    parts = [(prefixed(vision_rows("clip_vision_model", c.vision), "vision.", "model.vision_model."),
              c.vision.block_spec(), c.vision.depth),
             (prefixed(lm, "lm.", ""), c.text, c.text.n_layer), (_vocab_rows(c), c, 1),
             (_xattn_rows(c), c, len(c.xattn_layers))]
    if c.use_resampler:
        parts.append((_resampler_rows(c), c, c.resampler_depth))
    return parts


# ---------------------------------------------------------------------- configs both ways
def idefics_config_from_hf(hf: dict):
    from ..models.flamingo import FlamingoConfig

    vc, pc = hf.get("vision_config") or {}, hf.get("perceiver_config") or {}
    act = hf.get("hidden_act", "silu")
    if act not in LM_ACTS:
        raise CheckpointError(f"Idefics hidden_act={act!r} is not supported; supported: {list(LM_ACTS)}")
    if hf.get("alpha_type", "float") not in ("float", "vector"):
        raise CheckpointError(f"Idefics alpha_type={hf['alpha_type']!r}: only 'float' and 'vector' gates exist")
    extra = hf.get("additional_vocab_size", 0)
    g = lambda d, k, default: d.get(k, default)  # noqa: E731  (IdeficsConfig's defaults: the 9B model's shapes)
    llama = dict(vocab_size=g(hf, "vocab_size", 32000) + extra, hidden_size=g(hf, "hidden_size", 4096),
                 intermediate_size=g(hf, "intermediate_size", 11008), num_hidden_layers=g(hf, "num_hidden_layers", 32),
                 num_attention_heads=g(hf, "num_attention_heads", 32), rms_norm_eps=g(hf, "rms_norm_eps", 1e-6),
                 max_position_embeddings=g(hf, "max_position_embeddings", 2048), hidden_act=act,
                 rope_parameters=hf.get("rope_parameters"), rope_theta=g(hf, "rope_theta", 10000.0),
                 tie_word_embeddings=g(hf, "tie_word_embeddings", False))
    text = Config(name="idefics-lm", family="decoder", task="lm",
                  description="the LLaMA decoder of a Hugging Face Idefics", **FAMILIES["llama"].config_from_hf(llama))
    vision = vit_config_from_hf({
        "model_type": "clip_vision_model", "hidden_size": g(vc, "embed_dim", 768),
        "intermediate_size": g(vc, "intermediate_size", 5120), "num_hidden_layers": g(vc, "num_hidden_layers", 32),
        "num_attention_heads": g(vc, "num_attention_heads", 16), "image_size": g(vc, "image_size", 224),
        "patch_size": g(vc, "patch_size", 14), "num_channels": g(vc, "num_channels", 3),
        "hidden_act": g(vc, "hidden_act", "gelu"), "layer_norm_eps": g(vc, "layer_norm_eps", 1e-5),
        "_name_or_path": "idefics-vision"})
    eos = hf.get("eos_token_id", 2)
    return FlamingoConfig(
        text, vision, name=hf.get("_name_or_path", "") or "idefics", description=f"imported from a Hugging Face {ARCH}",
        # the processor's <image>: Idefics's tokenizers add <fake_token_around_image> then <image> as the last rows
        image_token_id=hf.get("image_token_id", text.vocab_size - 1 if extra else 0),
        end_of_chunk_id=eos if isinstance(eos, int) else None, cross_attn_every=hf.get("cross_layer_interval", 1),
        use_resampler=hf.get("use_resampler", False), n_latents=pc.get("resampler_n_latents", 64),
        resampler_depth=pc.get("resampler_depth", 6), resampler_heads=pc.get("resampler_n_heads", 16),
        resampler_head_dim=pc.get("resampler_head_dim", 96), resampler_qk_norm=pc.get("qk_layer_norms_perceiver", False),
        xattn_qk_norm=hf.get("qk_layer_norms", False), gate_type=hf.get("alpha_type", "float"),
        additional_vocab_size=extra)


def idefics_misfits(c) -> list:
    """What of this FlamingoConfig IdeficsForVisionText2Text cannot hold (empty: it fits)."""
    t, bad = c.text, []
    if not FAMILIES["llama"].fits(t) or t.attn_bias or t.mlp_bias or t.activation not in LM_ACTS:
        bad.append("the LM is not a bias-free LLaMA decoder (rotary, RMSNorm, SiLU/GELU GLU)")
    if t.n_kv_head != t.n_head or t.head_dim * t.n_head != t.n_embd or t.attn_scale not in (None, t.head_dim ** -0.5):
        bad.append(f"Idefics's attention has n_embd / n_head-wide heads, all of them keyed (n_kv_head={t.n_kv_head}, "
                   f"head_dim={t.head_dim})")
    if t.n_layer % c.cross_attn_every:
        bad.append(f"n_layer={t.n_layer} is not a multiple of cross_attn_every={c.cross_attn_every}")
    if c.use_resampler and (c.resampler_intermediate_size != 4 * c.vision.width or c.resampler_activation != "relu"
                            or c.resampler_norm_eps != 1e-5):
        bad.append("Idefics's perceiver MLP is 4 x the vision width with ReLU and LayerNorm eps 1e-5")
    try:
        if hf_layout(c.vision) != "clip_vision_model":
            bad.append(f"the ViT has the layout of {hf_layout(c.vision)}, not CLIP's vision tower")
    except CheckpointError as e:
        bad.append(str(e))
    return bad


def idefics_config_to_hf(c) -> dict:
    t, v = c.text, c.vision
    vision = vit_config_to_hf(v, "clip_vision_model")
    vision = {**vision, "model_type": "idefics_vision", "embed_dim": vision.pop("hidden_size")}
    llama = FAMILIES["llama"].config_to_hf(t)
    return {"model_type": "idefics", "architectures": [ARCH], "dtype": "float32",
            "vocab_size": t.vocab_size - c.additional_vocab_size, "additional_vocab_size": c.additional_vocab_size,
            **{k: llama[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "rms_norm_eps", "max_position_embeddings", "hidden_act", "rope_parameters",
                                     "tie_word_embeddings")},
            "image_token_id": c.image_token_id, "cross_layer_interval": c.cross_attn_every,
            "qk_layer_norms": c.xattn_qk_norm, "alpha_type": c.gate_type,
            "alpha_initializer": "zeros", "use_resampler": c.use_resampler, "dropout": 0.0,
            "eos_token_id": c.end_of_chunk_id,  # None stays None: inventing an id would make it stop on a real token
            "vision_config": vision,
            "perceiver_config": {"model_type": "idefics_perciever", "use_resampler": c.use_resampler,
                                 "resampler_n_latents": c.n_latents, "resampler_depth": c.resampler_depth,
                                 "resampler_n_heads": c.resampler_heads, "resampler_head_dim": c.resampler_head_dim,
                                 "qk_layer_norms_perceiver": c.resampler_qk_norm}}


# ---------------------------------------------------------------------- folders
def load_hf_idefics(path, hf: dict):
    """A Hugging Face IdeficsForVisionText2Text folder -> (Flamingo, LoadReport)."""
    from ..models.flamingo import Flamingo
    from .hf import read_hf_weights
    from .files import load_state_dict_into

    path = Path(path)
    arch = (hf.get("architectures") or [ARCH])[0]
    if arch != ARCH:
        raise CheckpointError(f"{path}: {arch} is not supported; Idefics folders load as {ARCH}")
    config = idefics_config_from_hf(hf)
    model = Flamingo(config)
    state = read_hf_weights(path)
    ours, used = {}, set()
    for rows, spec, n in _parts(config):
        o, u = import_state(state, rows, spec, n)
        ours.update(o)
        used |= u
    if config.text.tie_embeddings:  # a tied head repeats the embeddings
        used |= {k for k in state if k.startswith("lm_head.")}
    check_leftover(state, used, str(path), ignore=("position_ids", "inv_freq"))
    return model, load_state_dict_into(model, ours, str(path))


def save_hf_idefics(model, path, tokenizer=None) -> Path:
    """Write a Flamingo as IdeficsForVisionText2Text (or a CheckpointError naming what Idefics cannot hold)."""
    from .files import contiguous_state

    c = model.config
    bad = idefics_misfits(c)
    if bad:
        raise CheckpointError(f"{c.name or 'this Flamingo'} does not fit IdeficsForVisionText2Text: {'; '.join(bad)}; "
                              f"save format='allformers'")
    state = contiguous_state(model.state_dict())
    out = {}
    for rows, spec, n in _parts(c):
        out.update(export_state(state, rows, spec, n))
    return write_hf_folder(path, out, idefics_config_to_hf(c),
                           tokenizer if tokenizer is not None else getattr(model, "tokenizer", None))


__all__ = ["load_hf_idefics", "save_hf_idefics", "idefics_config_from_hf", "idefics_config_to_hf", "idefics_misfits"]
