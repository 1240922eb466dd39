"""Key tables for encoder-decoders: T5 (v1.0 and v1.1), mT5, BART.

Our keys are `encoder.*` and `decoder.*` TransformerLM keys; rows under `decoder.` are shaped by the
decoder stack (Config.decoder_config(): n_decoder_layer layers, n_decoder_head heads, decoder_intermediate_size)."""
from ..config import Config
from ..errors import CheckpointError
from .maps import (Family, Row, activation_from_hf, activation_to_hf, concat, pair, qkv_sizes, register_family, same,
                   separate_qkv)


def _kv_sizes(c: Config):
    return [c.n_kv_head * c.head_dim] * 2


# ---------------------------------------------------------------- T5 / mT5
def _t5_rows(c: Config):
    rows = [same("encoder.wte.weight", "shared.weight"),
            same("encoder.relative.emb.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            same("decoder.relative.emb.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            same("encoder.norm.weight", "encoder.final_layer_norm.weight"),
            same("decoder.norm.weight", "decoder.final_layer_norm.weight")]
    if not c.tie_embeddings:
        rows.append(same("decoder.lm_head.weight", "lm_head.weight"))
    for stack, ff in (("encoder", 1), ("decoder", 2)):
        p, o = f"{stack}.block.{{}}.layer.", f"{stack}.blocks.{{}}."
        rows += [*separate_qkv(o + "attn.qkv", *(p + f"0.SelfAttention.{x}" for x in "qkv"), bias=False),
                 same(o + "attn.proj.weight", p + "0.SelfAttention.o.weight"),
                 same(o + "norm1.weight", p + "0.layer_norm.weight"), same(o + "norm2.weight", p + f"{ff}.layer_norm.weight"),
                 same(o + "mlp.proj.weight", p + f"{ff}.DenseReluDense.wo.weight")]
        if c.mlp_class == "GLU":  # v1.1 / mT5: gated GELU, wi_0 is the gate
            rows.append(concat(o + "mlp.fc.weight", p + f"{ff}.DenseReluDense.wi_0.weight", p + f"{ff}.DenseReluDense.wi_1.weight",
                               sizes=lambda c: [c.intermediate_size] * 2))
        else:
            rows.append(same(o + "mlp.fc.weight", p + f"{ff}.DenseReluDense.wi.weight"))
    p, o = "decoder.block.{}.layer.1.", "decoder.blocks.{}."
    rows += [same(o + "cross_attn.q.weight", p + "EncDecAttention.q.weight"),
             concat(o + "cross_attn.kv.weight", p + "EncDecAttention.k.weight", p + "EncDecAttention.v.weight", sizes=_kv_sizes),
             same(o + "cross_attn.proj.weight", p + "EncDecAttention.o.weight"),
             same(o + "norm_cross.weight", p + "layer_norm.weight")]
    return rows


def t5_config(h):
    proj = h.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    name = proj.replace("gated-", "")
    # HF's T5Config reads "gated-gelu" as gelu_new (the tanh approximation); a plain "gelu" is the exact one
    act = activation_from_hf("gelu_new" if proj == "gated-gelu" else name, "feed_forward_proj")
    tied = h.get("tie_word_embeddings", True)
    # v1.0 scales the decoder output by d_model**-0.5, v1.1 does not; older configs signal it
    # with tie_word_embeddings=False, transformers 5 with scale_decoder_outputs.
    scaled = h.get("scale_decoder_outputs", tied)
    return dict(is_encoder_decoder=True, vocab_size=h["vocab_size"], n_embd=h["d_model"], head_dim=h["d_kv"],
                n_head=h["num_heads"], intermediate_size=h["d_ff"], n_layer=h["num_layers"],
                n_decoder_layer=h.get("num_decoder_layers") or h["num_layers"], block_size=h.get("n_positions", 512),
                position="relative_bias", rel_buckets=h.get("relative_attention_num_buckets", 32),
                rel_max_distance=h.get("relative_attention_max_distance", 128), norm_class="RMSNorm",
                norm_eps=h.get("layer_norm_epsilon", 1e-6), attn_bias=False, mlp_bias=False, attn_scale=1.0,
                mlp_class="GLU" if gated else "MLP", activation=act, tie_embeddings=tied,
                head_input_scale=h["d_model"] ** -0.5 if scaled else None,
                init="t5",  # a fresh T5 (training from scratch) starts as Mesh TensorFlow's does
                decoder_start_token_id=h.get("decoder_start_token_id", 0) or 0)


def _t5_to_hf(c: Config):
    if c.mlp_class == "GLU" and c.activation == "gelu":
        raise CheckpointError("T5's feed_forward_proj='gated-gelu' is the tanh approximation; this model's gated MLP "
                              "uses the exact GELU, which HF's T5 cannot express: use activation='gelu_tanh'")
    gated_gelu = c.mlp_class == "GLU" and c.activation == "gelu_tanh"
    act = "gelu" if gated_gelu else activation_to_hf(c.activation)  # "gated-gelu" is read back as gelu_new
    return dict(vocab_size=c.vocab_size, d_model=c.n_embd, d_kv=c.head_dim, num_heads=c.n_head, d_ff=c.intermediate_size,
                num_layers=c.n_layer, num_decoder_layers=c.n_decoder_layer, relative_attention_num_buckets=c.rel_buckets,
                relative_attention_max_distance=c.rel_max_distance, layer_norm_epsilon=c.norm_eps,
                feed_forward_proj=("gated-" if c.mlp_class == "GLU" else "") + act, tie_word_embeddings=c.tie_embeddings,
                scale_decoder_outputs=c.head_input_scale is not None,
                dropout_rate=0.0, decoder_start_token_id=c.decoder_start_token_id, pad_token_id=0, eos_token_id=1,
                is_encoder_decoder=True)


def _t5_fits(c: Config):
    return (c.is_encoder_decoder and c.position == "relative_bias" and c.norm_class == "RMSNorm"
            and c.norm_placement == "pre" and not c.attn_bias and c.attn_scale == 1.0 and c.n_kv_head == c.n_head
            and c.head_input_scale in (None, c.n_embd ** -0.5)
            # T5's stacks differ in depth only (num_decoder_layers); heads and d_ff are shared
            and c.n_decoder_head == c.n_head and c.decoder_intermediate_size == c.intermediate_size)


_T5_IGNORE = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
register_family(Family("t5", {"lm": "T5ForConditionalGeneration"}, _t5_rows, t5_config, _t5_to_hf, _t5_fits,
                       ignore=_T5_IGNORE, tied_hf_key="lm_head.weight"))
def mt5_config(h):
    return {**t5_config(h), "head_input_scale": None}  # mT5 never scales its decoder output


register_family(Family("mt5", {"lm": "MT5ForConditionalGeneration"}, _t5_rows, mt5_config, _t5_to_hf,
                       lambda c: False,  # exports go out as "t5" (same layout); mT5 folders still import
                       ignore=_T5_IGNORE, tied_hf_key="lm_head.weight"))


# ---------------------------------------------------------------- BART
def _bart_rows(c: Config):
    rows = [same("encoder.wte.weight", "model.shared.weight"),
            Row("decoder.lm_head_bias", ("final_logits_bias",), lambda ts, c: ts[0][0], lambda t, c: [t[None]])]
    for stack in ("encoder", "decoder"):
        p, o = f"model.{stack}.layers.{{}}.", f"{stack}.blocks.{{}}."
        rows += [same(f"{stack}.wpe.weight", f"model.{stack}.embed_positions.weight"),
                 *pair(f"{stack}.embed_norm", f"model.{stack}.layernorm_embedding"),
                 *separate_qkv(o + "attn.qkv", *(p + f"self_attn.{x}_proj" for x in "qkv")),
                 *pair(o + "attn.proj", p + "self_attn.out_proj"), *pair(o + "norm1", p + "self_attn_layer_norm"),
                 *pair(o + "mlp.fc", p + "fc1"), *pair(o + "mlp.proj", p + "fc2"), *pair(o + "norm2", p + "final_layer_norm")]
    p, o = "model.decoder.layers.{}.", "decoder.blocks.{}."
    kv = lambda suffix: concat(o + f"cross_attn.kv.{suffix}", p + f"encoder_attn.k_proj.{suffix}",  # noqa: E731
                               p + f"encoder_attn.v_proj.{suffix}", sizes=_kv_sizes)
    rows += [*pair(o + "cross_attn.q", p + "encoder_attn.q_proj"), kv("weight"), kv("bias"),
             *pair(o + "cross_attn.proj", p + "encoder_attn.out_proj"), *pair(o + "norm_cross", p + "encoder_attn_layer_norm")]
    return rows


def bart_config(h):
    d = h["d_model"]
    # The decoder's heads and width are left to derive from the encoder's when they are equal, so a zoo
    # entry resized with from_name(n_head=..., intermediate_size=...) resizes both stacks.
    heads, ffn = h["encoder_attention_heads"], h["encoder_ffn_dim"]
    return dict(is_encoder_decoder=True, vocab_size=h["vocab_size"], n_embd=d, n_head=heads,
                n_decoder_head=None if h["decoder_attention_heads"] == heads else h["decoder_attention_heads"],
                intermediate_size=ffn, decoder_intermediate_size=None if h["decoder_ffn_dim"] == ffn else h["decoder_ffn_dim"],
                n_layer=h["encoder_layers"],
                n_decoder_layer=h["decoder_layers"],
                block_size=h["max_position_embeddings"], position="learned", position_offset=2,
                norm_placement="post", embedding_norm=True, final_norm=False,
                activation=activation_from_hf(h.get("activation_function", "gelu"), "activation_function"),
                embed_scale=d ** 0.5 if h.get("scale_embedding") else None, tie_embeddings=True, lm_head_bias=True,
                decoder_start_token_id=h.get("decoder_start_token_id", 2))


def _bart_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, d_model=c.n_embd, encoder_attention_heads=c.n_head,
                decoder_attention_heads=c.n_decoder_head, encoder_ffn_dim=c.intermediate_size,
                decoder_ffn_dim=c.decoder_intermediate_size, encoder_layers=c.n_layer,
                decoder_layers=c.n_decoder_layer, max_position_embeddings=c.block_size,
                activation_function=activation_to_hf(c.activation),
                scale_embedding=c.embed_scale is not None, decoder_start_token_id=c.decoder_start_token_id,
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                forced_eos_token_id=None, is_encoder_decoder=True, tie_word_embeddings=True)


def _bart_fits(c: Config):
    return (c.is_encoder_decoder and c.position == "learned" and c.position_offset == 2 and c.norm_placement == "post"
            and c.embedding_norm and c.norm_class == "LayerNorm" and c.tie_embeddings and c.lm_head_bias
            and c.n_kv_head == c.n_head and c.head_dim * c.n_head == c.n_embd  # BART: head_dim = d_model / heads
            and c.n_embd % c.n_decoder_head == 0)


register_family(Family("bart", {"lm": "BartForConditionalGeneration"}, _bart_rows, bart_config, _bart_to_hf, _bart_fits,
                       ignore=("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"),
                       tied_hf_key="lm_head.weight"))
