"""Key table for DeBERTa-v2 and v3 (`model_type` "deberta-v2"; v3 is the same network, pre-trained
as an ELECTRA-style discriminator).

The body is BERT's post-norm encoder with three changes, all config switches of the same blocks:
  * position="disentangled": no absolute positions; one relative embedding table (plus its
    LayerNorm) in `deberta.encoder.rel_embeddings` / `deberta.encoder.LayerNorm`, shared by all layers;
  * attention_class="DisentangledAttention": content-to-content + c2p + p2c scores, the positions
    projected by each layer's own query/key weights (share_att_key);
  * classification goes through a ContextPooler (first token -> dense -> pooler_hidden_act).
With HF's default config (relative_attention=False) DeBERTa-v2 is a plain BERT-style encoder with
learned absolute positions and no segment embeddings, and imports as exactly that.

Not supported (refused by name): the convolution beside the first layer (conv_kernel_size, DeBERTa-v2
xlarge/xxlarge), share_att_key=False, relative embeddings without their LayerNorm, absolute and relative
positions together, and embedding_size != hidden_size (DeBERTa projects the embeddings without a bias
and normalises AFTER the projection; our factorized embeddings normalise before it)."""
import math

from ..config import Config
from ..errors import ConfigError
from .maps import (EXPORTABLE_ACTIVATIONS, Family, activation_from_hf, activation_to_hf, pair, register_family, same,
                   separate_qkv)

PREFIX = "deberta."
TERMS = ("c2p", "p2c")  # the position terms HF computes (it ignores any other name)


def _layers(p):
    return [*separate_qkv("blocks.{}.attn.qkv", p + "attention.self.query_proj", p + "attention.self.key_proj",
                          p + "attention.self.value_proj"),
            *pair("blocks.{}.attn.proj", p + "attention.output.dense"), *pair("blocks.{}.norm1", p + "attention.output.LayerNorm"),
            *pair("blocks.{}.mlp.fc", p + "intermediate.dense"), *pair("blocks.{}.mlp.proj", p + "output.dense"),
            *pair("blocks.{}.norm2", p + "output.LayerNorm")]


def body_rows(c: Config):
    e = PREFIX + "embeddings."
    rows = [same("wte.weight", e + "word_embeddings.weight"), *pair("embed_norm", e + "LayerNorm")]
    if c.position == "learned":
        rows.append(same("wpe.weight", e + "position_embeddings.weight"))
    if c.type_vocab_size:
        rows.append(same("wtt.weight", e + "token_type_embeddings.weight"))
    if c.position == "disentangled":  # the one table every layer reads
        rows += [same("relative.emb.weight", PREFIX + "encoder.rel_embeddings.weight"),
                 *pair("relative.norm", PREFIX + "encoder.LayerNorm")]
    return rows + _layers(PREFIX + "encoder.layer.{}.")


def _classifier(dense, out):
    """TaskModel head rows: [head.dense <- the pooler's dense], head.out <- the output layer."""
    return lambda c: ([*pair("head.dense", dense)] if dense else []) + pair("head.out", out)


def _mlm(c: Config):
    """BERT-style MLM head: transform (dense, activation, LayerNorm) then the tied decoder plus a bias."""
    p = "cls.predictions."
    return [*pair("head_transform.0", p + "transform.dense"), *pair("head_transform.2", p + "transform.LayerNorm"),
            same("lm_head_bias", p + "bias")]


def _terms(h) -> list:
    t = h.get("pos_att_type") or []
    if isinstance(t, str):
        t = [x.strip() for x in t.lower().split("|")]
    return [x for x in t if x in TERMS]


def config_from_hf(h: dict) -> dict:
    hidden, heads = h["hidden_size"], h["num_attention_heads"]
    relative = bool(h.get("relative_attention", False))
    biased = h.get("position_biased_input", True)
    terms = _terms(h)

    def refuse(option, why):
        raise ConfigError(f"DeBERTa-v2 config {option}: {why} is not supported by allformers' DeBERTa blocks")

    if h.get("conv_kernel_size", 0) > 0:
        refuse(f"conv_kernel_size={h['conv_kernel_size']}", "the convolution layer beside the first layer")
    if (h.get("embedding_size") or hidden) != hidden:
        refuse(f"embedding_size={h['embedding_size']} != hidden_size={hidden}",
               "a bias-free embedding projection with the LayerNorm after it")
    if relative and biased:
        refuse("relative_attention=True with position_biased_input=True", "absolute and relative positions together")
    if relative and terms and not h.get("share_att_key", False):
        refuse("share_att_key=False", "separate position projections (pos_key_proj / pos_query_proj)")
    norm_rel = [x.strip() for x in str(h.get("norm_rel_ebd", "none")).lower().split("|")]
    if relative and "layer_norm" not in norm_rel:
        refuse(f"norm_rel_ebd={h.get('norm_rel_ebd', 'none')!r}", "relative embeddings without their LayerNorm")
    d = dict(vocab_size=h["vocab_size"], block_size=h["max_position_embeddings"], n_layer=h["num_hidden_layers"],
             n_head=heads, n_embd=hidden, intermediate_size=h["intermediate_size"],
             activation=activation_from_hf(h.get("hidden_act", "gelu")), norm_eps=h.get("layer_norm_eps", 1e-7),
             type_vocab_size=h.get("type_vocab_size", 0), causal=False, norm_placement="post", embedding_norm=True,
             tie_embeddings=True, lm_head_bias=True, head_transform=True,
             classifier_activation=activation_from_hf(h.get("pooler_hidden_act", "gelu"), "pooler_hidden_act"))
    if relative:
        max_rel = h.get("max_relative_positions", -1)
        d.update(position="disentangled",
                 rel_buckets=2 * max(h.get("position_buckets", -1), 0),  # HF counts one side
                 rel_max_distance=max_rel if max_rel >= 1 else h["max_position_embeddings"],
                 pos_att_type="|".join(terms))
    else:
        d["position"] = "learned" if biased else "none"
        if terms:  # HF scales by the position terms it was told about even when it computes none
            d["attn_scale"] = 1.0 / math.sqrt(hidden // heads * (1 + len(terms)))
    return d


def _scale_terms(c: Config):
    """pos_att_type that gives a plain-attention config its attn_scale in HF, or None if none does."""
    if c.attn_scale is None:
        return []
    for terms in (["c2p"], ["c2p", "p2c"]):
        if math.isclose(c.attn_scale, 1.0 / math.sqrt(c.head_dim * (1 + len(terms))), rel_tol=1e-6):
            return terms
    return None


def config_to_hf(c: Config) -> dict:
    relative = c.position == "disentangled"
    d = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
             intermediate_size=c.intermediate_size, hidden_act=activation_to_hf(c.activation), layer_norm_eps=c.norm_eps,
             max_position_embeddings=c.block_size, type_vocab_size=c.type_vocab_size, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0, pooler_dropout=0.0, pooler_hidden_size=c.n_embd,
             pooler_hidden_act=activation_to_hf(c.classifier_activation), legacy=True,
             relative_attention=relative, position_biased_input=c.position == "learned")
    if relative:
        d.update(position_buckets=c.rel_buckets // 2 or -1, max_relative_positions=c.rel_max_distance,
                 pos_att_type=[t for t in c.pos_att_type.split("|") if t], share_att_key=True, norm_rel_ebd="layer_norm")
    else:
        d["pos_att_type"] = _scale_terms(c) or None
    return d


def fits(c: Config) -> bool:
    head_ok = not c.lm_head or (c.head_transform and c.tie_embeddings and c.lm_head_bias and c.head_input_scale is None)
    cls_ok = c.task != "sequence-classification" or (c.classifier_dense and c.pooling == "first")
    return (not c.causal and c.norm_placement == "post" and c.embedding_norm and not c.final_norm
            and c.norm_class == "LayerNorm" and c.norm_bias and c.mlp_class == "MLP" and c.mlp_bias
            and c.attn_bias and c.attn_out_bias and not c.parallel_residual and c.share_layers == "none"
            and c.n_kv_head == c.n_head and c.head_dim * c.n_head == c.n_embd and c.embedding_size == c.n_embd
            and c.position_offset == 0 and c.position in ("disentangled", "learned", "none")
            and (c.position == "disentangled" or _scale_terms(c) is not None)
            and (c.position != "disentangled" or c.attn_scale is None)
            and c.activation in EXPORTABLE_ACTIVATIONS and c.classifier_activation in EXPORTABLE_ACTIVATIONS
            and head_ok and cls_ok
            and (not c.type_vocab_size or c.default_token_type == 0))


_HEAD = ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias")
register_family(Family(
    "deberta-v2",
    {"lm": "DebertaV2ForMaskedLM", "sequence-classification": "DebertaV2ForSequenceClassification",
     "token-classification": "DebertaV2ForTokenClassification", "question-answering": "DebertaV2ForQuestionAnswering",
     "base": "DebertaV2Model"},
    body_rows, config_from_hf, config_to_hf, fits,
    head_rows={"lm": _mlm,
               "sequence-classification": _classifier("pooler.dense", "classifier"),
               "token-classification": _classifier(None, "classifier"),
               "question-answering": _classifier(None, "qa_outputs")},
    # Leftovers that carry nothing we use: buffers, the tied decoder bias, and (on a bare backbone,
    # e.g. the released v3 checkpoints) the MLM head and v3's replaced-token-detection head.
    ignore=("position_ids", "embeddings.position_embeddings.weight", "cls.predictions.decoder.bias", "lm_predictions.lm_head.bias",
            *(f"{p}.{k}" for p in ("mask_predictions", "lm_predictions.lm_head", "cls.predictions.transform") for k in _HEAD),
            "cls.predictions.bias", "mask_predictions.classifier.weight", "mask_predictions.classifier.bias"),
    tied_hf_key="cls.predictions.decoder.weight",
    # legacy=False checkpoints name the same MLM head lm_predictions.lm_head.*
    aliases=(*((f"lm_predictions.lm_head.{k}", f"cls.predictions.transform.{k}") for k in _HEAD),
             ("lm_predictions.lm_head.bias", "cls.predictions.bias"), ("cls.predictions.decoder.bias", "cls.predictions.bias")),
    base_prefix=PREFIX))
