"""Key tables for the encoder families: BERT, RoBERTa, ELECTRA, ALBERT, DistilBERT, XLM.

BERT, RoBERTa and ELECTRA share one layer layout (only the prefix changes); the others name
the same parts differently. Task heads (classification, tokens, QA, MLM) have rows of their own."""
from ..config import Config
from .maps import Family, pair, register_family, same, separate_qkv

ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu",
          "swish": "silu", "tanh": "tanh"}
ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu", "tanh": "tanh"}
POST_NORM = dict(causal=False, norm_placement="post", embedding_norm=True, position="learned", tie_embeddings=True,
                 lm_head_bias=True, head_transform=True)


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


def _bert_like(model_type, prefix, arch, mlm_rows, cls_rows, extra_body=lambda c: [], offset=False):
    def body(c):
        return _bert_embeddings(f"{prefix}.embeddings.", types=c.type_vocab_size > 0) + extra_body(c) + \
            _bert_layers(f"{prefix}.encoder.layer.{{}}.")

    def from_hf(h):
        off = h.get("pad_token_id", 1) + 1 if offset else 0
        return dict(vocab_size=h["vocab_size"], block_size=h["max_position_embeddings"] - off, position_offset=off,
                    n_layer=h["num_hidden_layers"], n_head=h["num_attention_heads"], n_embd=h["hidden_size"],
                    intermediate_size=h["intermediate_size"], activation=ACT_IN[h["hidden_act"]],
                    norm_eps=h["layer_norm_eps"], type_vocab_size=h.get("type_vocab_size", 2),
                    embedding_size=h.get("embedding_size") or h["hidden_size"], **POST_NORM)

    def to_hf(c: Config):
        d = dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size + c.position_offset,
                 num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, hidden_size=c.n_embd,
                 intermediate_size=c.intermediate_size, hidden_act=ACT_OUT[c.activation], layer_norm_eps=c.norm_eps,
                 type_vocab_size=c.type_vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        if c.embedding_size != c.n_embd:
            d["embedding_size"] = c.embedding_size
        if offset:
            d["pad_token_id"] = c.position_offset - 1
        return d

    def fits(c: Config):
        return (not c.causal and c.norm_placement == "post" and c.embedding_norm and c.position == "learned"
                and c.mlp_class == "MLP" and c.share_layers == "none" and c.n_kv_head == c.n_head
                and (c.embedding_size == c.n_embd or model_type == "electra") and bool(c.position_offset) == offset)

    return register_family(Family(model_type, arch, body, from_hf, to_hf, fits, head_rows={"lm": mlm_rows, **cls_rows},
                                  ignore=("position_ids", "embeddings.position_ids"), tied_hf_key=None,
                                  base_prefix=prefix + "."))


def _mlm(transform, ln, bias):
    return lambda c: [*pair("head_transform.0", transform), *pair("head_transform.2", ln), same("lm_head_bias", bias)]


def _token_and_qa():
    return {"token-classification": _classifier(None, "classifier"), "question-answering": _classifier(None, "qa_outputs")}


def _archs(name):
    return {"lm": f"{name}ForMaskedLM", "sequence-classification": f"{name}ForSequenceClassification",
            "token-classification": f"{name}ForTokenClassification", "question-answering": f"{name}ForQuestionAnswering",
            "embedding": f"{name}Model"}


_bert_like("bert", "bert", _archs("Bert"), _mlm("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                                               "cls.predictions.bias"),
           {"sequence-classification": _classifier("bert.pooler.dense", "classifier"), **_token_and_qa()})
_bert_like("roberta", "roberta", _archs("Roberta"), _mlm("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
           {"sequence-classification": _classifier("classifier.dense", "classifier.out_proj"), **_token_and_qa()},
           offset=True)
_bert_like("electra", "electra", {**_archs("Electra"), "replaced-token-detection": "ElectraForPreTraining"},
           _mlm("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head.bias"),
           {"sequence-classification": _classifier("classifier.dense", "classifier.out_proj"), **_token_and_qa(),
            "replaced-token-detection": _classifier("discriminator_predictions.dense",
                                                    "discriminator_predictions.dense_prediction")},
           extra_body=lambda c: pair("embed_proj", "electra.embeddings_project") if c.embedding_size != c.n_embd else [])
