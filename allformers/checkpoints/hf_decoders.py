"""Key tables for the decoder families: GPT-2, GPT-NeoX, BLOOM, LLaMA, GPT-Neo, Mixtral, CTRL."""
import torch

from ..config import Config
from .maps import (EXPORTABLE_ACTIVATIONS, Family, Row, activation_from_hf, activation_to_hf, concat, pair, per_head_qkv,
                   register_family, same, separate_qkv, transposed)


def _rope(h):
    rp = h.get("rope_parameters") or {}
    return (rp.get("rope_theta", h.get("rope_theta", h.get("rotary_emb_base", 10000.0))),
            rp.get("partial_rotary_factor", h.get("partial_rotary_factor", h.get("rotary_pct", 1.0))))


# ---------------------------------------------------------------- GPT-2
def _gpt2_rows(c):
    p = "transformer.h.{}."
    rows = [same("wte.weight", "transformer.wte.weight"), same("wpe.weight", "transformer.wpe.weight"),
            *pair("norm", "transformer.ln_f"), *pair("blocks.{}.norm1", p + "ln_1"), *pair("blocks.{}.norm2", p + "ln_2")]
    for ours, hf in [("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]:
        rows += [transposed(f"blocks.{{}}.{ours}.weight", p + f"{hf}.weight"), same(f"blocks.{{}}.{ours}.bias", p + f"{hf}.bias")]
    return rows


def _gpt2_config(h):
    act = h.get("activation_function", "gelu_new")
    return dict(vocab_size=h["vocab_size"], block_size=h["n_positions"], n_layer=h["n_layer"], n_head=h["n_head"],
                n_embd=h["n_embd"], intermediate_size=h.get("n_inner") or 4 * h["n_embd"], norm_eps=h["layer_norm_epsilon"],
                activation=activation_from_hf(act, "activation_function"),
                position="learned", tie_embeddings=h.get("tie_word_embeddings", True))


def _gpt2_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                n_inner=c.intermediate_size, layer_norm_epsilon=c.norm_eps,
                activation_function=activation_to_hf(c.activation),
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=c.tie_embeddings)


def _gpt2_fits(c: Config):
    return (c.position == "learned" and c.position_offset == 0 and c.norm_placement == "pre" and not c.parallel_residual
            and c.causal and c.norm_class == "LayerNorm" and c.mlp_class == "MLP" and c.attn_bias and c.mlp_bias
            and c.n_kv_head == c.n_head and c.tie_embeddings and not c.embedding_norm and not c.type_vocab_size)


register_family(Family("gpt2", {"lm": "GPT2LMHeadModel"}, _gpt2_rows, _gpt2_config, _gpt2_to_hf, _gpt2_fits,
                       ignore=(".attn.bias", ".attn.masked_bias"), tied_hf_key="lm_head.weight",
                       base_prefix="transformer."))


# ---------------------------------------------------------------- GPT-NeoX (Pythia)
def _neox_rows(c):
    p = "gpt_neox.layers.{}."
    rows = [same("wte.weight", "gpt_neox.embed_in.weight"), same("lm_head.weight", "embed_out.weight"),
            *pair("norm", "gpt_neox.final_layer_norm")]
    for ours, hf in [("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("attn.proj", "attention.dense"),
                     ("mlp.fc", "mlp.dense_h_to_4h"), ("mlp.proj", "mlp.dense_4h_to_h")]:
        rows += pair(f"blocks.{{}}.{ours}", p + hf)
    rows += [per_head_qkv("blocks.{}.attn.qkv.weight", p + "attention.query_key_value.weight"),
             per_head_qkv("blocks.{}.attn.qkv.bias", p + "attention.query_key_value.bias")]
    return rows


def _neox_config(h):
    base, pct = _rope(h)
    return dict(vocab_size=h["vocab_size"], block_size=h["max_position_embeddings"], n_layer=h["num_hidden_layers"],
                n_head=h["num_attention_heads"], n_embd=h["hidden_size"], intermediate_size=h["intermediate_size"],
                norm_eps=h["layer_norm_eps"], activation=activation_from_hf(h["hidden_act"]),
                position="rotary", rotary_pct=pct, rope_base=base, parallel_residual=h.get("use_parallel_residual", True),
                attn_bias=h.get("attention_bias", True), tie_embeddings=h.get("tie_word_embeddings", False))


def _neox_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                layer_norm_eps=c.norm_eps, hidden_act=activation_to_hf(c.activation),
                rope_parameters={"rope_theta": c.rope_base, "partial_rotary_factor": c.rotary_pct, "rope_type": "default"},
                use_parallel_residual=c.parallel_residual, attention_bias=c.attn_bias,
                tie_word_embeddings=c.tie_embeddings, attention_dropout=0.0, hidden_dropout=0.0)


def _neox_fits(c: Config):
    return (c.position == "rotary" and c.norm_class == "LayerNorm" and c.mlp_class == "MLP" and c.causal
            and c.n_kv_head == c.n_head and not c.shared_parallel_norm and c.mlp_bias and c.norm_placement == "pre")


register_family(Family("gpt_neox", {"lm": "GPTNeoXForCausalLM"}, _neox_rows, _neox_config, _neox_to_hf, _neox_fits,
                       ignore=(".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq"),
                       tied_hf_key="embed_out.weight", aliases=(("lm_head.weight", "embed_out.weight"),)))


# ---------------------------------------------------------------- BLOOM
def _bloom_rows(c):
    p = "transformer.h.{}."
    rows = [same("wte.weight", "transformer.word_embeddings.weight"),
            *pair("embed_norm", "transformer.word_embeddings_layernorm"), *pair("norm", "transformer.ln_f")]
    for ours, hf in [("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
                     ("attn.proj", "self_attention.dense"), ("mlp.fc", "mlp.dense_h_to_4h"), ("mlp.proj", "mlp.dense_4h_to_h")]:
        rows += pair(f"blocks.{{}}.{ours}", p + hf)
    rows += [per_head_qkv("blocks.{}.attn.qkv.weight", p + "self_attention.query_key_value.weight"),
             per_head_qkv("blocks.{}.attn.qkv.bias", p + "self_attention.query_key_value.bias")]
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


def _bloom_fits(c: Config):
    return (c.position == "alibi" and c.embedding_norm and c.norm_class == "LayerNorm" and c.mlp_class == "MLP" and c.causal
            and not c.parallel_residual and c.n_kv_head == c.n_head and c.norm_placement == "pre")


register_family(Family("bloom", {"lm": "BloomForCausalLM"}, _bloom_rows, _bloom_config, _bloom_to_hf, _bloom_fits,
                       tied_hf_key="lm_head.weight"))


# ---------------------------------------------------------------- LLaMA (and SmolLM2)
def _llama_rows(c: Config):
    p = "model.layers.{}."
    glu = lambda ours, g, u: concat(ours, g, u, sizes=lambda c: [c.intermediate_size] * 2)  # noqa: E731
    rows = [same("wte.weight", "model.embed_tokens.weight"), same("lm_head.weight", "lm_head.weight"),
            same("norm.weight", "model.norm.weight"), same("blocks.{}.norm1.weight", p + "input_layernorm.weight"),
            same("blocks.{}.norm2.weight", p + "post_attention_layernorm.weight"),
            *separate_qkv("blocks.{}.attn.qkv", *(p + f"self_attn.{x}_proj" for x in "qkv"), bias=c.attn_bias),
            same("blocks.{}.attn.proj.weight", p + "self_attn.o_proj.weight"),
            glu("blocks.{}.mlp.fc.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            same("blocks.{}.mlp.proj.weight", p + "mlp.down_proj.weight")]
    if c.attn_out_bias:
        rows.append(same("blocks.{}.attn.proj.bias", p + "self_attn.o_proj.bias"))
    if c.mlp_bias:
        rows += [glu("blocks.{}.mlp.fc.bias", p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"),
                 same("blocks.{}.mlp.proj.bias", p + "mlp.down_proj.bias")]
    return rows


def _llama_config(h):
    base, _ = _rope(h)
    heads = h["num_attention_heads"]
    return dict(vocab_size=h["vocab_size"], block_size=h["max_position_embeddings"], n_layer=h["num_hidden_layers"],
                n_head=heads, n_kv_head=h.get("num_key_value_heads") or heads, n_embd=h["hidden_size"],
                head_dim=h.get("head_dim") or h["hidden_size"] // heads, intermediate_size=h["intermediate_size"],
                norm_eps=h["rms_norm_eps"], rope_base=base, position="rotary", norm_class="RMSNorm", mlp_class="GLU",
                activation=activation_from_hf(h.get("hidden_act", "silu")),
                attn_bias=h.get("attention_bias", False), mlp_bias=h.get("mlp_bias", False),
                tie_embeddings=h.get("tie_word_embeddings", False))


def _llama_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, hidden_size=c.n_embd, head_dim=c.head_dim,
                intermediate_size=c.intermediate_size, rms_norm_eps=c.norm_eps,
                rope_parameters={"rope_theta": c.rope_base, "rope_type": "default"},
                hidden_act=activation_to_hf(c.activation, "gelu_pytorch_tanh"),
                attention_bias=c.attn_bias, mlp_bias=c.mlp_bias, tie_word_embeddings=c.tie_embeddings)


def _llama_fits(c: Config):
    return (c.position == "rotary" and c.norm_class == "RMSNorm" and c.mlp_class == "GLU" and c.causal
            and c.norm_placement == "pre" and not c.parallel_residual and c.rope_n_elem == c.head_dim
            and c.attn_out_bias == c.attn_bias)


register_family(Family("llama", {"lm": "LlamaForCausalLM"}, _llama_rows, _llama_config, _llama_to_hf, _llama_fits,
                       ignore=("rotary_emb.inv_freq",), tied_hf_key="lm_head.weight"))


# ---------------------------------------------------------------- GPT-Neo (GPT-3's alternating dense / local layers)
def _neo_rows(c):
    p, a = "transformer.h.{}.", "transformer.h.{}.attn.attention."
    rows = [same("wte.weight", "transformer.wte.weight"), same("wpe.weight", "transformer.wpe.weight"),
            *pair("norm", "transformer.ln_f"), *pair("blocks.{}.norm1", p + "ln_1"), *pair("blocks.{}.norm2", p + "ln_2"),
            *separate_qkv("blocks.{}.attn.qkv", a + "q_proj", a + "k_proj", a + "v_proj", bias=False),
            *pair("blocks.{}.attn.proj", a + "out_proj"), *pair("blocks.{}.mlp.fc", p + "mlp.c_fc"),
            *pair("blocks.{}.mlp.proj", p + "mlp.c_proj")]
    if not c.tie_embeddings:
        rows.append(same("lm_head.weight", "lm_head.weight"))
    return rows


def period(layers: list) -> list:
    """The shortest list that, cycled, gives `layers` (["global", "local"] * 12 -> ["global", "local"])."""
    for n in range(1, len(layers) + 1):
        if all(layers[i] == layers[i % n] for i in range(len(layers))):
            return list(layers[:n])
    return list(layers)


def _neo_config(h):
    layers = [kind for kinds, n in h.get("attention_types") or [[["global", "local"], 12]] for _ in range(n) for kind in kinds]
    act = h.get("activation_function", "gelu_new")
    return dict(vocab_size=h["vocab_size"], block_size=h["max_position_embeddings"], n_layer=h["num_layers"],
                n_head=h["num_heads"], n_embd=h["hidden_size"], intermediate_size=h.get("intermediate_size") or 4 * h["hidden_size"],
                norm_eps=h["layer_norm_epsilon"], position="learned", attn_bias=False, attn_out_bias=True,
                attn_scale=1.0,  # GPT-Neo does not divide the scores by sqrt(head_dim)
                attention_pattern=period(layers), window_size=h.get("window_size", 256),
                activation=activation_from_hf(act, "activation_function"),
                tie_embeddings=h.get("tie_word_embeddings", True))


def _neo_to_hf(c: Config):
    pattern = c.attention_pattern or ["global"]
    if c.n_layer % len(pattern) == 0:
        types = [[list(pattern), c.n_layer // len(pattern)]]
    else:
        types = [[[c.layer_attention(i)], 1] for i in range(c.n_layer)]
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, num_layers=c.n_layer, num_heads=c.n_head,
                hidden_size=c.n_embd, intermediate_size=c.intermediate_size, layer_norm_epsilon=c.norm_eps,
                attention_types=types, window_size=c.window_size,
                activation_function=activation_to_hf(c.activation),
                resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=c.tie_embeddings)


def _neo_fits(c: Config):
    return (c.position == "learned" and c.position_offset == 0 and c.norm_placement == "pre" and not c.parallel_residual
            and c.causal and c.norm_class == "LayerNorm" and c.mlp_class == "MLP" and not c.attn_bias and c.attn_out_bias
            and c.attn_scale == 1.0 and c.mlp_bias and c.n_kv_head == c.n_head and not c.embedding_norm
            and not c.type_vocab_size and not c.lm_head_bias
            and c.norm_bias and c.head_dim * c.n_head == c.n_embd)


register_family(Family("gpt_neo", {"lm": "GPTNeoForCausalLM"}, _neo_rows, _neo_config, _neo_to_hf, _neo_fits,
                       ignore=(".attn.attention.bias", ".attn.attention.masked_bias"), tied_hf_key="lm_head.weight",
                       base_prefix="transformer.", patterns=("global", "local")))


# ---------------------------------------------------------------- Mixtral (mixture of experts, blocks/moe.py)
def _expert_keys(c, name):
    return tuple(f"model.layers.{{}}.block_sparse_moe.experts.{e}.{name}.weight" for e in range(c.n_expert))


def _experts_fc(c):
    """Our (E, 2I, D) [gate; up] per expert <- w1 (gate) and w3 (up) of each expert, (I, D) each."""
    E = c.n_expert
    return Row("blocks.{}.mlp.experts.fc.weight", _expert_keys(c, "w1") + _expert_keys(c, "w3"),
               lambda ts, c: torch.stack([torch.cat([ts[e], ts[E + e]]) for e in range(E)]),
               lambda t, c: [t[e, :c.intermediate_size] for e in range(E)] + [t[e, c.intermediate_size:] for e in range(E)])


def _experts_proj(c):
    return Row("blocks.{}.mlp.experts.proj.weight", _expert_keys(c, "w2"),
               lambda ts, c: torch.stack(ts), lambda t, c: list(t.unbind(0)))


def _mixtral_rows(c: Config):
    p = "model.layers.{}."
    return [same("wte.weight", "model.embed_tokens.weight"), same("lm_head.weight", "lm_head.weight"),
            same("norm.weight", "model.norm.weight"), same("blocks.{}.norm1.weight", p + "input_layernorm.weight"),
            same("blocks.{}.norm2.weight", p + "post_attention_layernorm.weight"),
            *separate_qkv("blocks.{}.attn.qkv", *(p + f"self_attn.{x}_proj" for x in "qkv"), bias=False),
            same("blocks.{}.attn.proj.weight", p + "self_attn.o_proj.weight"),
            same("blocks.{}.mlp.router.weight", p + "block_sparse_moe.gate.weight"), _experts_fc(c), _experts_proj(c)]


def _mixtral_unfuse(hf_state: dict, c: Config) -> dict:
    """transformers 5.x holds each layer's experts fused in memory (mlp.experts.gate_up_proj (E, 2I, D),
    mlp.experts.down_proj (E, D, I), mlp.gate) and writes them per expert (w1/w3/w2) on disk."""
    out = {}
    for k, t in hf_state.items():
        head, sep, tail = k.partition(".mlp.")
        if not sep:
            out[k] = t
        elif tail == "gate.weight":
            out[f"{head}.block_sparse_moe.gate.weight"] = t
        elif tail == "experts.gate_up_proj":
            for e in range(t.shape[0]):
                w1, w3 = t[e].split(t.shape[1] // 2)
                out[f"{head}.block_sparse_moe.experts.{e}.w1.weight"] = w1
                out[f"{head}.block_sparse_moe.experts.{e}.w3.weight"] = w3
        elif tail == "experts.down_proj":
            for e in range(t.shape[0]):
                out[f"{head}.block_sparse_moe.experts.{e}.w2.weight"] = t[e]
        else:
            out[k] = t
    return out


def _mixtral_config(h):
    kw = _llama_config({**h, "attention_bias": False, "mlp_bias": False})
    window = h.get("sliding_window")
    return dict(kw, n_expert=h["num_local_experts"], n_expert_per_token=h["num_experts_per_tok"], moe_every=1,
                moe_aux_loss_coef=h.get("router_aux_loss_coef", 0.001), moe_z_loss_coef=0.0,
                **(dict(attention_pattern=["local"], window_size=window) if window else {}))


def _mixtral_to_hf(c: Config):
    hf = _llama_to_hf(c)
    for k in ("attention_bias", "mlp_bias"):
        hf.pop(k)
    local = c.layer_attention(0) == "local"
    return dict(hf, num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token,
                router_aux_loss_coef=c.moe_aux_loss_coef, router_jitter_noise=0.0, attention_dropout=0.0,
                sliding_window=c.window_size if local else None)


def _mixtral_fits(c: Config):
    return (_llama_fits(c) and not c.attn_bias and not c.mlp_bias and c.moe_every == 1 and c.moe_mlp_class == "GLU"
            and c.moe_eval_capacity_factor is None and len(set(c.attention_pattern or ["global"])) == 1)


register_family(Family("mixtral", {"lm": "MixtralForCausalLM"}, _mixtral_rows, _mixtral_config, _mixtral_to_hf,
                       _mixtral_fits, ignore=("rotary_emb.inv_freq",), tied_hf_key="lm_head.weight",
                       patterns=("global", "local"), experts=True, normalize=_mixtral_unfuse))


# ---------------------------------------------------------------- CTRL (control codes: conditioning is data, not weights)
def _ctrl_rows(c: Config):
    p, a = "transformer.h.{}.", "transformer.h.{}.multi_head_attention."
    rows = [same("wte.weight", "transformer.w.weight"), *pair("norm", "transformer.layernorm"),
            *separate_qkv("blocks.{}.attn.qkv", a + "Wq", a + "Wk", a + "Wv"), *pair("blocks.{}.attn.proj", a + "dense"),
            *pair("blocks.{}.norm1", p + "layernorm1"), *pair("blocks.{}.norm2", p + "layernorm2"),
            *pair("blocks.{}.mlp.fc", p + "ffn.0"), *pair("blocks.{}.mlp.proj", p + "ffn.2")]
    if c.tie_embeddings:  # the head's bias stays separate from the tied matrix
        return rows + [same("lm_head_bias", "lm_head.bias")]
    return rows + pair("lm_head", "lm_head")


def _ctrl_config(h):
    return dict(vocab_size=h["vocab_size"], block_size=h["n_positions"], n_layer=h["n_layer"], n_head=h["n_head"],
                n_embd=h["n_embd"], intermediate_size=h["dff"], norm_eps=h.get("layer_norm_epsilon", 1e-6),
                position="sinusoidal", sinusoidal_layout="halves", embed_scale=h["n_embd"] ** 0.5, activation="relu",
                lm_head_bias=True, tie_embeddings=h.get("tie_word_embeddings", True))


def _ctrl_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                dff=c.intermediate_size, layer_norm_epsilon=c.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                tie_word_embeddings=c.tie_embeddings)


def _ctrl_fits(c: Config):
    # CTRL's layer norms inside the blocks have eps 1e-6 fixed in code; only the final one reads the config
    return (c.position == "sinusoidal" and c.sinusoidal_layout == "halves" and c.embed_scale == c.n_embd ** 0.5
            and c.norm_placement == "pre" and not c.parallel_residual and c.causal and c.norm_class == "LayerNorm"
            and c.mlp_class == "MLP" and c.activation == "relu" and c.attn_bias and c.mlp_bias and c.lm_head_bias
            and c.n_kv_head == c.n_head and c.head_dim * c.n_head == c.n_embd and c.attn_scale is None
            and c.norm_eps == 1e-6 and c.norm_bias and not c.embedding_norm and not c.type_vocab_size)


register_family(Family("ctrl", {"lm": "CTRLLMHeadModel"}, _ctrl_rows, _ctrl_config, _ctrl_to_hf, _ctrl_fits,
                       ignore=("pos_encoding",), tied_hf_key="lm_head.weight", base_prefix="transformer."))


# ---------------------------------------------------------------- OPT (Zhang et al. 2022; BLIP-2's default decoder)
def _linear(ours, hf, bias: bool) -> list:
    """One Linear's rows: weight, and bias when it has one."""
    return pair(ours, hf) if bias else [same(f"{ours}.weight", f"{hf}.weight")]


def _opt_rows(c: Config):
    p = "model.decoder.layers.{}."
    return [same("wte.weight", "model.decoder.embed_tokens.weight"),
            same("wpe.weight", "model.decoder.embed_positions.weight"),  # max_position_embeddings + 2 rows
            *(pair("norm", "model.decoder.final_layer_norm") if c.final_norm else []),
            *separate_qkv("blocks.{}.attn.qkv", *(p + f"self_attn.{x}_proj" for x in "qkv"), bias=c.attn_bias),
            *_linear("blocks.{}.attn.proj", p + "self_attn.out_proj", c.attn_bias),
            *pair("blocks.{}.norm1", p + "self_attn_layer_norm"), *pair("blocks.{}.norm2", p + "final_layer_norm"),
            *_linear("blocks.{}.mlp.fc", p + "fc1", c.mlp_bias), *_linear("blocks.{}.mlp.proj", p + "fc2", c.mlp_bias),
            *([] if c.tie_embeddings else [same("lm_head.weight", "lm_head.weight")])]


def _opt_config(h):
    from ..errors import CheckpointError

    dim = h["hidden_size"]
    if (h.get("word_embed_proj_dim") or dim) != dim:
        raise CheckpointError(f"OPT with word_embed_proj_dim={h['word_embed_proj_dim']} != hidden_size={dim} (opt-350m's "
                              f"projected embeddings) is not supported yet")
    if not h.get("layer_norm_elementwise_affine", True):
        raise CheckpointError("OPT with layer_norm_elementwise_affine=False (norms without weights) is not supported")
    act = h.get("activation_function", "relu")
    pre = h.get("do_layer_norm_before", True)
    bias = h.get("enable_bias", True)
    return dict(vocab_size=h["vocab_size"], block_size=h["max_position_embeddings"], n_layer=h["num_hidden_layers"],
                n_head=h["num_attention_heads"], n_embd=dim, intermediate_size=h["ffn_dim"], position="learned",
                position_offset=2,  # OPT's position table starts at the padding index + 1, as BART's
                norm_placement="pre" if pre else "post", final_norm=pre and not h.get("_remove_final_layer_norm", False),
                attn_bias=bias, mlp_bias=bias,
                activation=activation_from_hf(act, "activation_function"),
                tie_embeddings=h.get("tie_word_embeddings", True))


def _opt_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, hidden_size=c.n_embd, ffn_dim=c.intermediate_size,
                word_embed_proj_dim=c.n_embd, do_layer_norm_before=c.norm_placement == "pre",
                _remove_final_layer_norm=c.norm_placement == "pre" and not c.final_norm, enable_bias=c.attn_bias,
                activation_function=activation_to_hf(c.activation),
                tie_word_embeddings=c.tie_embeddings, dropout=0.0, attention_dropout=0.0, layerdrop=0.0)


def _opt_fits(c: Config):
    # post-norm OPT (opt-350m's layout) has no final norm; the biases of attention and MLP are one switch
    return (c.position == "learned" and c.position_offset == 2 and not c.parallel_residual and c.causal
            and c.norm_class == "LayerNorm" and c.norm_bias and c.norm_eps == 1e-5 and c.mlp_class == "MLP"
            and c.attn_bias == c.attn_out_bias == c.mlp_bias and c.n_kv_head == c.n_head
            and c.head_dim * c.n_head == c.n_embd and c.attn_scale is None and c.embedding_size == c.n_embd
            and not c.embedding_norm and not c.type_vocab_size and not c.lm_head_bias and c.embed_scale is None
            and (c.norm_placement == "pre" or not c.final_norm) and c.activation in EXPORTABLE_ACTIVATIONS)


register_family(Family("opt", {"lm": "OPTForCausalLM"}, _opt_rows, _opt_config, _opt_to_hf, _opt_fits,
                       tied_hf_key="lm_head.weight"))
