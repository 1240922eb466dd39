"""Hugging Face folders in and out, through one small template table per family.

A table row says: our key (with "{}" for the layer index) <- the HF key(s) and how the
tensors change on the way (transposed for GPT-2's Conv1D, concatenated for separate q/k/v
or gate/up projections, re-ordered for GPT-NeoX's per-head fused qkv). Each row converts in
both directions, and the tests round-trip every family through `transformers`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import Config
from ..errors import CheckpointError
from .io import CONFIG_FILE, _contiguous, atomic_folder_write, load_state_dict_into, read_safetensors


# ---------------------------------------------------------------------- row kinds
@dataclass
class Row:
    ours: str
    hf: tuple  # one or more HF templates
    to_ours: Callable  # (list of HF tensors, config) -> our tensor
    to_hf: Callable  # (our tensor, config) -> list of HF tensors


def same(ours, hf):
    return Row(ours, (hf,), lambda ts, c: ts[0], lambda t, c: [t])


def transposed(ours, hf):  # GPT-2 stores Linear weights as Conv1D (in, out)
    return Row(ours, (hf,), lambda ts, c: ts[0].t(), lambda t, c: [t.t()])


def concat(ours, *hf, sizes: Callable):
    """Several HF matrices stacked on dim 0 into one of ours (q/k/v -> qkv, gate/up -> fc)."""
    return Row(ours, hf, lambda ts, c: torch.cat(ts, 0), lambda t, c: list(t.split(sizes(c), 0)))


def _qkv_sizes(c: Config):
    return [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]


def neox_qkv(ours, hf):
    """GPT-NeoX fuses qkv per head: rows ordered (head, [q|k|v], dim); ours are ([q|k|v], head, dim)."""
    def to_ours(ts, c):
        t = ts[0]
        return t.view(c.n_head, 3, c.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    def to_hf(t, c):
        return [t.view(3, c.n_head, c.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)]

    return Row(ours, (hf,), to_ours, to_hf)


# ---------------------------------------------------------------------- families
@dataclass
class Family:
    model_type: str
    architecture: str
    rows: list
    config_from_hf: Callable  # HF config dict -> Config kwargs
    config_to_hf: Callable  # Config -> HF config dict
    ignore: tuple = ()  # HF keys that are buffers, not weights
    tied_hf_key: Optional[str] = None  # HF head key that is absent/duplicated when tied
    aliases: tuple = ()  # (other name, canonical name): names newer transformers use in memory


def _gpt2_rows():
    p = "transformer.h.{}."
    rows = [same("wte.weight", "transformer.wte.weight"), same("wpe.weight", "transformer.wpe.weight"),
            same("norm.weight", "transformer.ln_f.weight"), same("norm.bias", "transformer.ln_f.bias")]
    for ours, hf in [("norm1", "ln_1"), ("norm2", "ln_2")]:
        rows += [same(f"blocks.{{}}.{ours}.weight", p + f"{hf}.weight"), same(f"blocks.{{}}.{ours}.bias", p + f"{hf}.bias")]
    for ours, hf in [("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]:
        rows += [transposed(f"blocks.{{}}.{ours}.weight", p + f"{hf}.weight"), same(f"blocks.{{}}.{ours}.bias", p + f"{hf}.bias")]
    return rows


def _gpt2_config(h):
    act = h.get("activation_function", "gelu_new")
    return dict(vocab_size=h["vocab_size"], block_size=h["n_positions"], n_layer=h["n_layer"], n_head=h["n_head"],
                n_embd=h["n_embd"], intermediate_size=h.get("n_inner") or 4 * h["n_embd"], norm_eps=h["layer_norm_epsilon"],
                activation={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}[act],
                position="learned", tie_embeddings=h.get("tie_word_embeddings", True))


def _gpt2_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                n_inner=c.intermediate_size, layer_norm_epsilon=c.norm_eps,
                activation_function={"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[c.activation],
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=c.tie_embeddings)


def _neox_rows():
    p = "gpt_neox.layers.{}."
    rows = [same("wte.weight", "gpt_neox.embed_in.weight"), same("lm_head.weight", "embed_out.weight"),
            same("norm.weight", "gpt_neox.final_layer_norm.weight"), same("norm.bias", "gpt_neox.final_layer_norm.bias")]
    for ours, hf in [("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("attn.proj", "attention.dense"),
                     ("mlp.fc", "mlp.dense_h_to_4h"), ("mlp.proj", "mlp.dense_4h_to_h")]:
        rows += [same(f"blocks.{{}}.{ours}.weight", p + f"{hf}.weight"), same(f"blocks.{{}}.{ours}.bias", p + f"{hf}.bias")]
    rows += [neox_qkv("blocks.{}.attn.qkv.weight", p + "attention.query_key_value.weight"),
             neox_qkv("blocks.{}.attn.qkv.bias", p + "attention.query_key_value.bias")]
    return rows


def _rope(h):
    rp = h.get("rope_parameters") or {}
    return (rp.get("rope_theta", h.get("rope_theta", h.get("rotary_emb_base", 10000.0))),
            rp.get("partial_rotary_factor", h.get("partial_rotary_factor", h.get("rotary_pct", 1.0))))


def _neox_config(h):
    base, pct = _rope(h)
    return dict(vocab_size=h["vocab_size"], block_size=h["max_position_embeddings"], n_layer=h["num_hidden_layers"],
                n_head=h["num_attention_heads"], n_embd=h["hidden_size"], intermediate_size=h["intermediate_size"],
                norm_eps=h["layer_norm_eps"], activation={"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}[h["hidden_act"]],
                position="rotary", rotary_pct=pct, rope_base=base, parallel_residual=h.get("use_parallel_residual", True),
                attn_bias=h.get("attention_bias", True), tie_embeddings=h.get("tie_word_embeddings", False))


def _neox_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                layer_norm_eps=c.norm_eps, hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[c.activation],
                rope_parameters={"rope_theta": c.rope_base, "partial_rotary_factor": c.rotary_pct, "rope_type": "default"},
                use_parallel_residual=c.parallel_residual, attention_bias=c.attn_bias,
                tie_word_embeddings=c.tie_embeddings, attention_dropout=0.0, hidden_dropout=0.0)


def _bloom_rows():
    p = "transformer.h.{}."
    rows = [same("wte.weight", "transformer.word_embeddings.weight")]
    for ours, hf in [("embed_norm", "transformer.word_embeddings_layernorm"), ("norm", "transformer.ln_f")]:
        rows += [same(f"{ours}.weight", f"{hf}.weight"), same(f"{ours}.bias", f"{hf}.bias")]
    for ours, hf in [("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
                     ("attn.proj", "self_attention.dense"), ("mlp.fc", "mlp.dense_h_to_4h"), ("mlp.proj", "mlp.dense_4h_to_h")]:
        rows += [same(f"blocks.{{}}.{ours}.weight", p + f"{hf}.weight"), same(f"blocks.{{}}.{ours}.bias", p + f"{hf}.bias")]
    # BLOOM fuses qkv per head exactly like GPT-NeoX
    rows += [neox_qkv("blocks.{}.attn.qkv.weight", p + "self_attention.query_key_value.weight"),
             neox_qkv("blocks.{}.attn.qkv.bias", p + "self_attention.query_key_value.bias")]
    return rows


def _bloom_config(h):
    return dict(vocab_size=h["vocab_size"], block_size=h.get("seq_length") or 2048, n_layer=h.get("n_layer", h.get("num_hidden_layers")),
                n_head=h.get("n_head", h.get("num_attention_heads")), n_embd=h["hidden_size"],
                norm_eps=h["layer_norm_epsilon"], activation="gelu_tanh", position="alibi", embedding_norm=True,
                tie_embeddings=h.get("tie_word_embeddings", True))


def _bloom_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                layer_norm_epsilon=c.norm_eps, seq_length=c.block_size, tie_word_embeddings=c.tie_embeddings,
                apply_residual_connection_post_layernorm=False, hidden_dropout=0.0, attention_dropout=0.0)


def _llama_rows(c: Config):
    p = "model.layers.{}."
    rows = [same("wte.weight", "model.embed_tokens.weight"), same("lm_head.weight", "lm_head.weight"),
            same("norm.weight", "model.norm.weight"), same("blocks.{}.norm1.weight", p + "input_layernorm.weight"),
            same("blocks.{}.norm2.weight", p + "post_attention_layernorm.weight"),
            concat("blocks.{}.attn.qkv.weight", *(p + f"self_attn.{x}_proj.weight" for x in "qkv"), sizes=_qkv_sizes),
            same("blocks.{}.attn.proj.weight", p + "self_attn.o_proj.weight"),
            concat("blocks.{}.mlp.fc.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight",
                   sizes=lambda c: [c.intermediate_size] * 2),
            same("blocks.{}.mlp.proj.weight", p + "mlp.down_proj.weight")]
    if c is None or c.attn_bias:
        rows.append(concat("blocks.{}.attn.qkv.bias", *(p + f"self_attn.{x}_proj.bias" for x in "qkv"), sizes=_qkv_sizes))
    if c is None or c.attn_out_bias:
        rows.append(same("blocks.{}.attn.proj.bias", p + "self_attn.o_proj.bias"))
    if c is None or c.mlp_bias:
        rows += [concat("blocks.{}.mlp.fc.bias", p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias",
                        sizes=lambda c: [c.intermediate_size] * 2),
                 same("blocks.{}.mlp.proj.bias", p + "mlp.down_proj.bias")]
    return rows


def _llama_config(h):
    base, _ = _rope(h)
    heads = h["num_attention_heads"]
    return dict(vocab_size=h["vocab_size"], block_size=h["max_position_embeddings"], n_layer=h["num_hidden_layers"],
                n_head=heads, n_kv_head=h.get("num_key_value_heads") or heads, n_embd=h["hidden_size"],
                head_dim=h.get("head_dim") or h["hidden_size"] // heads, intermediate_size=h["intermediate_size"],
                norm_eps=h["rms_norm_eps"], rope_base=base, position="rotary", norm_class="RMSNorm", mlp_class="GLU",
                activation={"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}[h.get("hidden_act", "silu")],
                attn_bias=h.get("attention_bias", False), mlp_bias=h.get("mlp_bias", False),
                tie_embeddings=h.get("tie_word_embeddings", False))


def _llama_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, hidden_size=c.n_embd, head_dim=c.head_dim,
                intermediate_size=c.intermediate_size, rms_norm_eps=c.norm_eps,
                rope_parameters={"rope_theta": c.rope_base, "rope_type": "default"},
                hidden_act={"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[c.activation],
                attention_bias=c.attn_bias, mlp_bias=c.mlp_bias, tie_word_embeddings=c.tie_embeddings)


FAMILIES = {
    "gpt2": Family("gpt2", "GPT2LMHeadModel", _gpt2_rows(), _gpt2_config, _gpt2_to_hf,
                   ignore=(".attn.bias", ".attn.masked_bias"), tied_hf_key="lm_head.weight"),
    "gpt_neox": Family("gpt_neox", "GPTNeoXForCausalLM", _neox_rows(), _neox_config, _neox_to_hf,
                       ignore=(".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq"),
                       tied_hf_key="embed_out.weight", aliases=(("lm_head.weight", "embed_out.weight"),)),
    "bloom": Family("bloom", "BloomForCausalLM", _bloom_rows(), _bloom_config, _bloom_to_hf,
                    tied_hf_key="lm_head.weight"),
    "llama": Family("llama", "LlamaForCausalLM", None, _llama_config, _llama_to_hf,
                    ignore=("rotary_emb.inv_freq",), tied_hf_key="lm_head.weight"),
}


def rows_for(family: Family, config: Optional[Config]):
    return family.rows if family.rows is not None else _llama_rows(config)


def _expand(template: str, n_layer: int):
    return [template.format(i) for i in range(n_layer)] if "{}" in template else [template]


def _family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise CheckpointError(f"Hugging Face model_type {model_type!r} is not supported yet; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


# ---------------------------------------------------------------------- conversion
def hf_to_ours(hf_state: dict, config: Config, family: Family):
    """Returns (our state dict, HF keys left over)."""
    hf_state = dict(hf_state)
    if family.model_type == "gpt2" and not any(k.startswith("transformer.") for k in hf_state):
        hf_state = {("transformer." + k if not k.startswith("lm_head") else k): v for k, v in hf_state.items()}
    for alias, canonical in family.aliases:
        if alias in hf_state and canonical not in hf_state:
            hf_state[canonical] = hf_state.pop(alias)
    ours, used = {}, set()
    for row in rows_for(family, config):
        n = config.n_layer if "{}" in row.ours else 1
        for i in range(n):
            keys = [t.format(i) for t in row.hf]
            if not all(k in hf_state for k in keys):
                continue  # reported as missing by load_state_dict_into
            ours[row.ours.format(i)] = row.to_ours([hf_state[k] for k in keys], config).contiguous()
            used.update(keys)
    leftover = [k for k in hf_state if k not in used and not any(k.endswith(s) for s in family.ignore)]
    if config.tie_embeddings and family.tied_hf_key in leftover:
        leftover.remove(family.tied_hf_key)  # a duplicated tied head carries nothing new
    return ours, leftover


def ours_to_hf(state: dict, config: Config, family: Family) -> dict:
    out = {}
    for row in rows_for(family, config):
        for key in _expand(row.ours, config.n_layer):
            if key not in state:
                continue
            i = int(key.split(".")[1]) if "{}" in row.ours else None
            for t, tensor in zip(row.hf, row.to_hf(state[key], config)):
                out[t.format(i) if i is not None else t] = tensor.contiguous()
    return out


def read_hf_weights(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.exists():  # sharded checkpoint
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            state.update(read_safetensors(path / f))
        return state
    if (path / "model.safetensors").exists():
        return read_safetensors(path / "model.safetensors")
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{path} has a config.json but no model.safetensors, sharded index or pytorch_model.bin")


def config_from_hf(hf: dict) -> Config:
    family = _family(hf.get("model_type"))
    return Config(name=hf.get("_name_or_path", "") or family.model_type, family="decoder",
                  description=f"imported from a Hugging Face {family.architecture}", **family.config_from_hf(hf))


def load_hf(path):
    from ..models import TransformerLM

    path = Path(path)
    hf = json.loads((path / CONFIG_FILE).read_text())
    family = _family(hf.get("model_type"))
    config = config_from_hf(hf)
    model = TransformerLM(config)
    ours, leftover = hf_to_ours(read_hf_weights(path), config, family)
    report = load_state_dict_into(model, ours, str(path), strict=False)
    report.unexpected = sorted(set(report.unexpected) | set(leftover))
    if report.missing or report.unexpected:
        raise CheckpointError(f"{path} does not match a {family.architecture}: {report}")
    return model, report


def save_hf(model, path, tokenizer=None):
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    from safetensors.torch import save_file

    config = model.config
    family = next((f for f in FAMILIES.values() if _fits(f, config)), None)
    if family is None:
        raise CheckpointError(
            f"config {config.name!r} has no Hugging Face equivalent among {sorted(FAMILIES)} "
            f"(position={config.position}, norm={config.norm_class}, mlp={config.mlp_class}); "
            f"save it with format='allformers'")
    state = ours_to_hf(_contiguous(model.state_dict()), config, family)
    if config.tie_embeddings:
        state.pop(family.tied_hf_key, None)
    hf_config = {"model_type": family.model_type, "architectures": [family.architecture],
                 "dtype": "float32", **family.config_to_hf(config)}
    if getattr(model, "tokenizer", None) is not None and tokenizer is None:
        tokenizer = model.tokenizer

    def write(tmp: Path):
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)

    atomic_folder_write(Path(path), write)
    return Path(path)


def _fits(family: Family, c: Config) -> bool:
    """Which HF architecture can hold this config exactly."""
    if family.model_type == "gpt2":
        return (c.position == "learned" and c.norm_placement == "pre" and not c.parallel_residual
                and c.norm_class == "LayerNorm" and c.mlp_class == "MLP" and c.attn_bias and c.mlp_bias
                and c.n_kv_head == c.n_head and c.tie_embeddings and not c.embedding_norm)
    if family.model_type == "bloom":
        return (c.position == "alibi" and c.embedding_norm and c.norm_class == "LayerNorm" and c.mlp_class == "MLP"
                and not c.parallel_residual and c.n_kv_head == c.n_head and c.norm_placement == "pre")
    if family.model_type == "gpt_neox":
        return (c.position == "rotary" and c.norm_class == "LayerNorm" and c.mlp_class == "MLP"
                and c.n_kv_head == c.n_head and not c.shared_parallel_norm and c.mlp_bias)
    return c.position == "rotary" and c.norm_class == "RMSNorm" and c.mlp_class == "GLU" and c.norm_placement == "pre"
