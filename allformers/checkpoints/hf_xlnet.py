"""Key table for XLNet (`model_type` "xlnet"; Hugging Face's XLNetLMHeadModel and its task heads).

Each layer is post-norm relative attention + MLP (models/xlnet.py, blocks/relative_xl.py). HF keeps
the projections as (d_model, n_head, d_head) tensors used as x @ W; ours are nn.Linear weights
(out, in), so q/k/v/r go through a reshape and a transpose and o only a reshape. The per-layer biases
r_w_bias, r_r_bias, r_s_bias are our u, v, seg_bias. attn_type "uni" (the Transformer-XL setting)
is causal=True. The sequence classifier pools the last position (XLNet pads on the left) through
sequence_summary (dense + tanh), then logits_proj."""
import math

import torch

from ..config import Config
from ..errors import ConfigError
from .maps import EXPORTABLE_ACTIVATIONS, Family, Row, activation_from_hf, activation_to_hf, pair, register_family, same

PREFIX = "transformer."


def _heads_in(ours, *hf):
    """HF (C, H, D) matrices applied as x @ W, stacked -> one Linear weight (sum of H*D, C)."""
    def to_ours(ts, c):
        return torch.cat([t.reshape(c.n_embd, -1).t() for t in ts], 0)

    def to_hf(t, c):
        return [p.t().reshape(c.n_embd, c.n_head, c.head_dim) for p in t.split(c.n_head * c.head_dim, 0)]

    return Row(ours, hf, to_ours, to_hf)


def _heads_out(ours, hf):
    """HF's o (C, H, D), applied as attn_vec . o -> the output Linear weight (C, H*D): a reshape."""
    return Row(ours, (hf,), lambda ts, c: ts[0].reshape(c.n_embd, -1),
               lambda t, c: [t.reshape(c.n_embd, c.n_head, c.head_dim)])


def body_rows(c: Config):
    p = PREFIX + "layer.{}."
    a = p + "rel_attn."
    rows = [same("wte.weight", PREFIX + "word_embedding.weight"), same("mask_emb", PREFIX + "mask_emb"),
            _heads_in("blocks.{}.attn.qkv.weight", a + "q", a + "k", a + "v"),
            _heads_out("blocks.{}.attn.proj.weight", a + "o"), _heads_in("blocks.{}.attn.pos.weight", a + "r"),
            same("blocks.{}.attn.u", a + "r_w_bias"), same("blocks.{}.attn.v", a + "r_r_bias"),
            *pair("blocks.{}.norm1", a + "layer_norm"), *pair("blocks.{}.mlp.fc", p + "ff.layer_1"),
            *pair("blocks.{}.mlp.proj", p + "ff.layer_2"), *pair("blocks.{}.norm2", p + "ff.layer_norm")]
    if c.relative_segments:
        rows += [same("blocks.{}.attn.seg_bias", a + "r_s_bias"), same("blocks.{}.attn.seg_embed", a + "seg_embed")]
    return rows


def _lm(c: Config):
    return [same("lm_head_bias", "lm_loss.bias")] if c.tie_embeddings else pair("lm_head", "lm_loss")


def config_from_hf(h: dict) -> dict:
    attn = h.get("attn_type", "bi")
    if attn not in ("bi", "uni"):
        raise ConfigError(f"XLNet config attn_type={attn!r} is not supported; XLNet has 'bi' and 'uni' (Transformer-XL)")
    if "XLNetForSequenceClassification" in (h.get("architectures") or []):
        summary = (h.get("summary_type", "last"), h.get("summary_use_proj", True), h.get("summary_activation", "tanh"),
                   bool(h.get("summary_proj_to_labels", False)))
        if summary != ("last", True, "tanh", False):
            raise ConfigError(f"XLNet sequence summary (summary_type, summary_use_proj, summary_activation, "
                              f"summary_proj_to_labels)={summary} is not supported; allformers' XLNet classifier "
                              f"pools the last position through dense + tanh: ('last', True, 'tanh', False)")
    return dict(vocab_size=h["vocab_size"], block_size=512, n_layer=h["n_layer"], n_head=h["n_head"],
                n_embd=h["d_model"], head_dim=h.get("d_head") or h["d_model"] // h["n_head"],
                intermediate_size=h["d_inner"], activation=activation_from_hf(h.get("ff_activation", "gelu"), "ff_activation"),
                norm_eps=h.get("layer_norm_eps", 1e-12), causal=attn == "uni", norm_placement="post",
                position="relative_xl", relative_segments=True,
                attn_bias=False, mlp_bias=True, tie_embeddings=h.get("tie_word_embeddings", True), lm_head_bias=True,
                mem_len=h.get("mem_len") or 0, reuse_len=h.get("reuse_len") or 0,
                clamp_len=max(h.get("clamp_len", -1), 0), same_length=bool(h.get("same_length", False)),
                bi_data=bool(h.get("bi_data", False)), pooling="last")


def config_to_hf(c: Config) -> dict:
    return dict(vocab_size=c.vocab_size, d_model=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, d_head=c.head_dim,
                d_inner=c.intermediate_size, ff_activation=activation_to_hf(c.activation), attn_type="uni" if c.causal else "bi",
                layer_norm_eps=c.norm_eps, dropout=0.0, mem_len=c.mem_len or None, reuse_len=c.reuse_len or None,
                clamp_len=c.clamp_len or -1, same_length=c.same_length, bi_data=c.bi_data,
                tie_word_embeddings=c.tie_embeddings, summary_type="last", summary_use_proj=True,
                summary_activation="tanh", summary_last_dropout=0.0)


def fits(c: Config) -> bool:
    head_ok = not c.lm_head or (c.lm_head_bias and c.head_input_scale is None)
    cls_ok = c.task != "sequence-classification" or (c.pooling == "last" and c.classifier_dense
                                                       and c.classifier_activation == "tanh")
    token_ok = c.task != "token-classification" or not c.classifier_dense
    return (c.position == "relative_xl" and c.relative_segments and c.norm_placement == "post"
            and c.norm_class == "LayerNorm" and c.norm_bias
            and c.mlp_class == "MLP" and c.mlp_bias and not c.attn_bias and not c.attn_out_bias
            and c.head_dim * c.n_head == c.n_embd and c.attn_scale in (None, 1 / math.sqrt(c.head_dim))
            and c.activation in EXPORTABLE_ACTIVATIONS and c.embed_scale is None and not c.final_norm and c.share_layers == "none"
            and head_ok and cls_ok and token_ok)


register_family(Family(
    "xlnet",
    {"lm": "XLNetLMHeadModel", "sequence-classification": "XLNetForSequenceClassification",
     "token-classification": "XLNetForTokenClassification", "question-answering": "XLNetForQuestionAnsweringSimple",
     "base": "XLNetModel"},
    body_rows, config_from_hf, config_to_hf, fits,
    head_rows={"lm": _lm,
               "sequence-classification": lambda c: pair("head.dense", "sequence_summary.summary") + pair("head.out", "logits_proj"),
               "token-classification": lambda c: pair("head.out", "classifier"),
               "question-answering": lambda c: pair("head.out", "qa_outputs")},
    tied_hf_key="lm_loss.weight", base_prefix=PREFIX))
