"""Key tables for the encoder families: BERT, RoBERTa, ELECTRA, ALBERT, DistilBERT, XLM.

BERT, RoBERTa and ELECTRA share one layer layout (only the prefix changes); the others name
the same parts differently. Task heads (classification, tokens, QA, MLM) have rows of their own."""
from ..blocks import SinusoidalPositions
from ..config import Config
from ..errors import CheckpointError
from .maps import (EXPORTABLE_ACTIVATIONS, Family, Row, activation_from_hf, activation_to_hf, pair, register_family, same,
                   separate_qkv)

POST_NORM = dict(causal=False, norm_placement="post", embedding_norm=True, position="learned", tie_embeddings=True,
                 lm_head_bias=True, head_transform=True)


def _post_ln_encoder(c: Config, causal_ok=False):
    """The layer all these encoders share: post-LN attention + MLP, biases everywhere, plain multi-head attention."""
    return ((causal_ok or not c.causal) and c.norm_placement == "post" and c.embedding_norm and not c.final_norm
            and not c.parallel_residual and c.norm_class == "LayerNorm" and c.norm_bias and c.mlp_class == "MLP"
            and c.attn_bias and c.attn_out_bias and c.mlp_bias and c.n_kv_head == c.n_head
            and c.head_dim * c.n_head == c.n_embd and c.attn_scale in (None, c.head_dim ** -0.5)
            and c.activation in EXPORTABLE_ACTIVATIONS and getattr(c, "attention_class", "Attention") == "Attention"
            and not getattr(c, "is_encoder_decoder", False))


def _heads_fit(c: Config, cls_act="tanh", mlm_act=None, cls_dense=True, mlm_transform=True):
    """Does the config's task head have the shape of this family's HF head? cls_act: the sequence classifier's
    activation; mlm_act: the MLM transform's (None: hidden_act). Which families have a pooler or a replaced-token
    detector at all is their table's business (head_rows, architectures)."""
    mlm_ok = (c.tie_embeddings and c.lm_head_bias and c.head_transform == mlm_transform
              and (not mlm_transform or c.head_activation == (mlm_act or c.activation)))
    cls_ok = (c.pooling == "first" and c.classifier_dense == cls_dense
              and (not cls_dense or c.classifier_activation == cls_act))
    if c.task == "lm":
        return mlm_ok
    if c.task == "sequence-classification":
        return cls_ok
    if c.task == "pretraining":  # MLM head + pooled [CLS] sentence-pair head (BertForPreTraining)
        return mlm_ok and cls_ok
    if c.task == "token-classification":
        return not c.classifier_dense
    if c.task == "replaced-token-detection":  # ELECTRA's dense + hidden_act + one logit
        return c.classifier_dense and c.classifier_activation == c.activation
    if c.task == "base":  # BertModel's pooler: [CLS] -> dense -> tanh
        return not c.classifier_dense or (c.pooling == "first" and c.classifier_activation == "tanh")
    return True


def _one_segment_default(c: Config):
    """BERT-style token types: without token_type_ids every token is segment 0."""
    return not c.type_vocab_size or c.default_token_type == 0


def _bert_layers(p):
    return [*separate_qkv("blocks.{}.attn.qkv", p + "attention.self.query", p + "attention.self.key", p + "attention.self.value"),
            *pair("blocks.{}.attn.proj", p + "attention.output.dense"), *pair("blocks.{}.norm1", p + "attention.output.LayerNorm"),
            *pair("blocks.{}.mlp.fc", p + "intermediate.dense"), *pair("blocks.{}.mlp.proj", p + "output.dense"),
            *pair("blocks.{}.norm2", p + "output.LayerNorm")]


def _bert_embeddings(p, types=True):
    rows = [same("wte.weight", p + "word_embeddings.weight"), same("wpe.weight", p + "position_embeddings.weight"),
            *pair("embed_norm", p + "LayerNorm")]
    return rows + ([same("wtt.weight", p + "token_type_embeddings.weight")] if types else [])


def _classifier(dense, out):
    """TaskModel head rows: [dense], out."""
    return lambda c: ([*pair("head.dense", dense)] if dense else []) + pair("head.out", out)


def _bert_like(model_type, prefix, arch, mlm_rows, cls_rows, extra_body=lambda c: [], offset=False, cls_act="tanh",
               mlm_act=None, head_config=None, factorized=False):
    """cls_act: the sequence classifier's activation; mlm_act: the MLM transform's (None: hidden_act);
    head_config: Family.head_config (what an HF head fixes beyond the generic switches); factorized: the HF config
    has its own embedding_size (ELECTRA, default 128), so it is always written and may differ from hidden_size."""
    def body(c):
        return _bert_embeddings(f"{prefix}.embeddings.", types=c.type_vocab_size > 0) + extra_body(c) + \
            _bert_layers(f"{prefix}.encoder.layer.{{}}.")

    def from_hf(h):
        off = h.get("pad_token_id", 1) + 1 if offset else 0
        return dict(vocab_size=h["vocab_size"], block_size=h["max_position_embeddings"] - off, position_offset=off,
                    n_layer=h["num_hidden_layers"], n_head=h["num_attention_heads"], n_embd=h["hidden_size"],
                    intermediate_size=h["intermediate_size"], activation=activation_from_hf(h["hidden_act"]),
                    norm_eps=h["layer_norm_eps"], type_vocab_size=h.get("type_vocab_size", 2),
                    embedding_size=h.get("embedding_size") or h["hidden_size"], **POST_NORM,
                    **({"head_activation": mlm_act} if mlm_act else {}))

    def to_hf(c: Config):
        d = dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size + c.position_offset,
                 num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, hidden_size=c.n_embd,
                 intermediate_size=c.intermediate_size, hidden_act=activation_to_hf(c.activation), layer_norm_eps=c.norm_eps,
                 type_vocab_size=c.type_vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        if c.embedding_size != c.n_embd or factorized:
            d["embedding_size"] = c.embedding_size
        if offset:
            d["pad_token_id"] = c.position_offset - 1
        return d

    def fits(c: Config):
        return (_post_ln_encoder(c) and c.position == "learned" and c.share_layers == "none" and c.type_vocab_size >= 1
                and (c.embedding_size == c.n_embd or factorized) and bool(c.position_offset) == offset
                and _one_segment_default(c) and _heads_fit(c, cls_act, mlm_act))

    return register_family(Family(model_type, arch, body, from_hf, to_hf, fits, head_rows={"lm": mlm_rows, **cls_rows},
                                  ignore=("position_ids", "embeddings.position_ids"), tied_hf_key=None,
                                  base_prefix=prefix + ".", head_config=head_config or {}))


def _mlm(transform, ln, bias):
    return lambda c: [*pair("head_transform.0", transform), *pair("head_transform.2", ln), same("lm_head_bias", bias)]


def _pretraining(mlm_rows, pooler, pair_out):
    """MLM + sentence-pair heads (BertForPreTraining, AlbertForPreTraining): the MLM rows live on the body
    (PretrainingModel.body), the pooler and the 2-way classifier are the pair head."""
    from dataclasses import replace

    return lambda c: [replace(r, ours="body." + r.ours) for r in mlm_rows(c)] + _classifier(pooler, pair_out)(c)


def _pooler(dense):
    """A bare backbone's pooler (task="base" with classifier_dense): our head.dense."""
    return lambda c: pair("head.dense", dense)


def _token_and_qa():
    return {"token-classification": _classifier(None, "classifier"), "question-answering": _classifier(None, "qa_outputs")}


def _archs(name):
    return {"lm": f"{name}ForMaskedLM", "sequence-classification": f"{name}ForSequenceClassification",
            "token-classification": f"{name}ForTokenClassification", "question-answering": f"{name}ForQuestionAnswering",
            "base": f"{name}Model"}


_BERT_MLM = _mlm("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias")
_bert_like("bert", "bert", {**_archs("Bert"), "pretraining": "BertForPreTraining"}, _BERT_MLM,
           {"sequence-classification": _classifier("bert.pooler.dense", "classifier"), **_token_and_qa(),
            "pretraining": _pretraining(_BERT_MLM, "bert.pooler.dense", "cls.seq_relationship"),
            "base": _pooler("bert.pooler.dense")})
_bert_like("roberta", "roberta", _archs("Roberta"), _mlm("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
           {"sequence-classification": _classifier("classifier.dense", "classifier.out_proj"), **_token_and_qa(),
            "base": _pooler("roberta.pooler.dense")},
           offset=True, mlm_act="gelu")
_bert_like("electra", "electra", {**_archs("Electra"), "replaced-token-detection": "ElectraForPreTraining"},
           _mlm("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head.bias"),
           {"sequence-classification": _classifier("classifier.dense", "classifier.out_proj"), **_token_and_qa(),
            "replaced-token-detection": _classifier("discriminator_predictions.dense",
                                                    "discriminator_predictions.dense_prediction")},
           extra_body=lambda c: pair("embed_proj", "electra.embeddings_project") if c.embedding_size != c.n_embd else [],
           cls_act="gelu", mlm_act="gelu", factorized=True,
           # ElectraClassificationHead is GELU whatever hidden_act says; the discriminator's dense uses hidden_act
           head_config={"sequence-classification": lambda h: dict(classifier_activation="gelu"),
                        "replaced-token-detection": lambda h: dict(classifier_dense=True,
                                                                   classifier_activation=activation_from_hf(h["hidden_act"]))})


# ---------------------------------------------------------------------- shared by ALBERT, DistilBERT, XLM
def _sinusoidal_table(c: Config):
    return SinusoidalPositions(c.block_size, c.embedding_size, c.sinusoidal_layout).table


def _word_and_positions(word, pos):
    """Token and position embedding rows. A sinusoidal table is a buffer we compute, not a weight: on import the
    HF table is checked against ours (refused if it differs) and dropped; on export ours is written out."""
    def rows(c: Config):
        if c.position == "learned":
            return [same("wte.weight", word), same("wpe.weight", pos)]

        def to_ours(ts, c):
            table = _sinusoidal_table(c)
            diff = (ts[1].float() - table).abs().max().item() if ts[1].shape == table.shape else float("inf")
            if diff > 1e-3:
                raise CheckpointError(
                    f"{pos} {tuple(ts[1].shape)} is not the sinusoidal table allformers computes for "
                    f"{tuple(table.shape)} (max diff {diff:.3g}); the checkpoint's config says sinusoidal positions "
                    f"but its table was changed: set sinusoidal_pos_embds/sinusoidal_embeddings to false in config.json "
                    f"to load it as learned positions")
            return ts[0]

        return [Row("wte.weight", (word, pos), to_ours, lambda t, c: [t, _sinusoidal_table(c)])]
    return rows


def _layers(q, k, v, o, norm1, fc, proj, norm2, layer="{}"):
    """One post-LN layer; `layer` is "{}" (one set of weights per layer) or "0" (ALBERT: one set shared by all)."""
    b = f"blocks.{layer}."
    return [*separate_qkv(b + "attn.qkv", q, k, v), *pair(b + "attn.proj", o), *pair(b + "norm1", norm1),
            *pair(b + "mlp.fc", fc), *pair(b + "mlp.proj", proj), *pair(b + "norm2", norm2)]


# ---------------------------------------------------------------------- ALBERT
# Factorized embeddings (embedding_size -> hidden_size by embedding_hidden_mapping_in) and one layer shared by
# every depth: HF's layer group 0 is our blocks.0, which share_layers="all" reuses for blocks.1...n-1.
_AL = "albert.encoder.albert_layer_groups.0.albert_layers.0."


def _albert_body(c: Config):
    return (_bert_embeddings("albert.embeddings.") + pair("embed_proj", "albert.encoder.embedding_hidden_mapping_in")
            + _layers(_AL + "attention.query", _AL + "attention.key", _AL + "attention.value", _AL + "attention.dense",
                      _AL + "attention.LayerNorm", _AL + "ffn", _AL + "ffn_output", _AL + "full_layer_layer_norm",
                      layer="0"))


def _albert_from_hf(h):
    groups, inner = h.get("num_hidden_groups", 1), h.get("inner_group_num", 1)
    if groups != 1 or inner != 1:
        raise CheckpointError(
            f"ALBERT with num_hidden_groups={groups}, inner_group_num={inner} is not supported: allformers shares one "
            f"layer across the whole depth (share_layers='all'), which is num_hidden_groups=1, inner_group_num=1")
    E = h.get("embedding_size", 128)
    if E == h["hidden_size"]:
        raise CheckpointError(
            f"ALBERT with embedding_size == hidden_size ({E}) is not supported: its embedding_hidden_mapping_in is a "
            f"square matrix, and allformers only has an embedding projection when embedding_size != n_embd")
    return dict(vocab_size=h["vocab_size"], block_size=h.get("max_position_embeddings", 512),
                n_layer=h["num_hidden_layers"], n_head=h["num_attention_heads"], n_embd=h["hidden_size"],
                intermediate_size=h["intermediate_size"], activation=activation_from_hf(h.get("hidden_act", "gelu_new")),
                norm_eps=h.get("layer_norm_eps", 1e-12), type_vocab_size=h.get("type_vocab_size", 2), embedding_size=E,
                share_layers="all", **POST_NORM)


def _albert_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, embedding_size=c.embedding_size, hidden_size=c.n_embd,
                num_hidden_layers=c.n_layer, num_hidden_groups=1, inner_group_num=1, num_attention_heads=c.n_head,
                intermediate_size=c.intermediate_size, hidden_act=activation_to_hf(c.activation),
                max_position_embeddings=c.block_size, type_vocab_size=c.type_vocab_size, layer_norm_eps=c.norm_eps,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)


def _albert_fits(c: Config):
    return (_post_ln_encoder(c) and c.position == "learned" and not c.position_offset and c.type_vocab_size >= 1
            and c.share_layers == "all" and c.embedding_size != c.n_embd and _one_segment_default(c) and _heads_fit(c))


_ALBERT_MLM = _mlm("predictions.dense", "predictions.LayerNorm", "predictions.bias")
register_family(Family("albert", {**_archs("Albert"), "pretraining": "AlbertForPreTraining"}, _albert_body,
                       _albert_from_hf, _albert_to_hf, _albert_fits,
                       head_rows={"lm": _ALBERT_MLM,
                                  "sequence-classification": _classifier("albert.pooler", "classifier"),
                                  **_token_and_qa(),
                                  "pretraining": _pretraining(_ALBERT_MLM, "albert.pooler", "sop_classifier.classifier"),
                                  "base": _pooler("albert.pooler")},
                       ignore=("position_ids", "predictions.decoder.bias"), tied_hf_key="predictions.decoder.weight",
                       base_prefix="albert."))


# ---------------------------------------------------------------------- DistilBERT
# BERT without token types or pooler, half the layers, LayerNorm eps fixed at 1e-12; the classifier is
# pre_classifier + ReLU; positions may be the fixed sinusoidal table (sinusoidal_pos_embds).
_DL = "distilbert.transformer.layer.{}."


def _distilbert_body(c: Config):
    return (_word_and_positions("distilbert.embeddings.word_embeddings.weight",
                                "distilbert.embeddings.position_embeddings.weight")(c)
            + pair("embed_norm", "distilbert.embeddings.LayerNorm")
            + _layers(_DL + "attention.q_lin", _DL + "attention.k_lin", _DL + "attention.v_lin", _DL + "attention.out_lin",
                      _DL + "sa_layer_norm", _DL + "ffn.lin1", _DL + "ffn.lin2", _DL + "output_layer_norm"))


def _distilbert_from_hf(h):
    return dict(vocab_size=h["vocab_size"], block_size=h.get("max_position_embeddings", 512), n_layer=h["n_layers"],
                n_head=h["n_heads"], n_embd=h["dim"], intermediate_size=h["hidden_dim"],
                activation=activation_from_hf(h.get("activation", "gelu"), "activation"), norm_eps=1e-12, type_vocab_size=0,
                classifier_activation="relu",
                **{**POST_NORM, "position": "sinusoidal" if h.get("sinusoidal_pos_embds") else "learned"})


def _distilbert_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size,
                sinusoidal_pos_embds=c.position == "sinusoidal", n_layers=c.n_layer, n_heads=c.n_head, dim=c.n_embd,
                hidden_dim=c.intermediate_size, activation=activation_to_hf(c.activation), dropout=0.0, attention_dropout=0.0,
                qa_dropout=0.0, seq_classif_dropout=0.0)


def _distilbert_fits(c: Config):
    return (_post_ln_encoder(c) and c.position in ("learned", "sinusoidal") and not c.position_offset
            and c.type_vocab_size == 0 and c.embedding_size == c.n_embd and c.share_layers == "none"
            and c.norm_eps == 1e-12 and _heads_fit(c, cls_act="relu"))


register_family(Family("distilbert", _archs("DistilBert"), _distilbert_body, _distilbert_from_hf, _distilbert_to_hf,
                       _distilbert_fits,
                       head_rows={"lm": _mlm("vocab_transform", "vocab_layer_norm", "vocab_projector.bias"),
                                  "sequence-classification": _classifier("pre_classifier", "classifier"),
                                  **_token_and_qa()},
                       ignore=("position_ids",), tied_hf_key="vocab_projector.weight", base_prefix="distilbert."))


# ---------------------------------------------------------------------- XLM
# Per-layer ModuleLists (attentions.{i}, layer_norm1.{i}, ...), language embeddings as our token types (type ids =
# language ids), no MLM transform: pred_layer.proj is tied to the embeddings with a bias; FFN always 4x wide.
# HF zeroes the hidden states at padded positions after every layer; real tokens are unaffected. Pass the language
# ids as token_type_ids; without them no language is embedded, as in HF (default_token_type=None).
_XT = "transformer."


def _xlm_body(c: Config):
    langs = [same("wtt.weight", _XT + "lang_embeddings.weight")] if c.type_vocab_size else []
    return (_word_and_positions(_XT + "embeddings.weight", _XT + "position_embeddings.weight")(c) + langs
            + pair("embed_norm", _XT + "layer_norm_emb")
            + _layers(_XT + "attentions.{}.q_lin", _XT + "attentions.{}.k_lin", _XT + "attentions.{}.v_lin",
                      _XT + "attentions.{}.out_lin", _XT + "layer_norm1.{}", _XT + "ffns.{}.lin1", _XT + "ffns.{}.lin2",
                      _XT + "layer_norm2.{}"))


def _xlm_from_hf(h):
    if h.get("asm"):
        raise CheckpointError("XLM with an adaptive softmax head (asm=true) is not supported; only asm=false")
    if "XLMForSequenceClassification" in (h.get("architectures") or []):
        summary = (h.get("summary_type", "first"), h.get("summary_use_proj", True), h.get("summary_proj_to_labels", True),
                   h.get("summary_activation"))
        if summary != ("first", True, True, None):
            raise CheckpointError(
                f"XLM sequence summary (summary_type, summary_use_proj, summary_proj_to_labels, summary_activation) = "
                f"{summary} is not supported; only ('first', True, True, None): first token -> linear to the labels")
    n_langs = h.get("n_langs", 1)
    dim = h["emb_dim"]
    return dict(vocab_size=h.get("vocab_size") or h["n_words"], block_size=h.get("max_position_embeddings", 512),
                n_layer=h["n_layers"], n_head=h["n_heads"], n_embd=dim, intermediate_size=4 * dim,
                activation="gelu" if h.get("gelu_activation", True) else "relu", norm_eps=h.get("layer_norm_eps", 1e-12),
                type_vocab_size=n_langs if n_langs > 1 and h.get("use_lang_emb", True) else 0,
                default_token_type=None, classifier_dense=False,
                **{**POST_NORM, "causal": bool(h.get("causal", False)), "head_transform": False,
                   "position": "sinusoidal" if h.get("sinusoidal_embeddings") else "learned"})


def _xlm_to_hf(c: Config):
    return dict(vocab_size=c.vocab_size, emb_dim=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
                max_position_embeddings=c.block_size, gelu_activation=c.activation == "gelu",
                sinusoidal_embeddings=c.position == "sinusoidal", causal=c.causal, n_langs=max(c.type_vocab_size, 1),
                use_lang_emb=c.type_vocab_size > 1, layer_norm_eps=c.norm_eps, asm=False, is_encoder=True,
                dropout=0.0, attention_dropout=0.0, summary_type="first", summary_use_proj=True,
                summary_proj_to_labels=True, summary_activation=None, summary_first_dropout=0.0)


def _xlm_fits(c: Config):
    return (_post_ln_encoder(c, causal_ok=True) and c.position in ("learned", "sinusoidal") and not c.position_offset
            and c.type_vocab_size != 1 and c.embedding_size == c.n_embd and c.share_layers == "none"
            and c.activation in ("gelu", "relu") and c.intermediate_size == 4 * c.n_embd
            # default_token_type 0 is let through (a config written for BERT-style segments): given language ids
            # it is exact; without them HF XLM embeds no language
            and c.default_token_type in (None, 0) and _heads_fit(c, cls_dense=False, mlm_transform=False))


register_family(Family("xlm", {"lm": "XLMWithLMHeadModel", "sequence-classification": "XLMForSequenceClassification",
                               "token-classification": "XLMForTokenClassification",
                               "question-answering": "XLMForQuestionAnsweringSimple", "base": "XLMModel"},
                       _xlm_body, _xlm_from_hf, _xlm_to_hf, _xlm_fits,
                       head_rows={"lm": lambda c: [same("lm_head_bias", "pred_layer.proj.bias")],
                                  "sequence-classification": _classifier(None, "sequence_summary.summary"),
                                  **_token_and_qa()},
                       ignore=("position_ids",), tied_hf_key="pred_layer.proj.weight", base_prefix=_XT))
