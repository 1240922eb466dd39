"""Encoder-only models: BERT, RoBERTa, ALBERT, DistilBERT, ELECTRA, XLM and sentence encoders.
Each entry is a Config of the same blocks with causal=False; the comments say what sets it apart."""
from ..config import register

# Every encoder here: bidirectional, post-LN, LayerNorm after the embeddings, learned positions, MLM head with a
# dense + activation + LayerNorm transform and a bias, tied to the word embeddings.
_post_ln = dict(family="encoder", causal=False, norm_placement="post", embedding_norm=True, position="learned",
                tie_embeddings=True, lm_head_bias=True, head_transform=True, norm_eps=1e-12, activation="gelu")
_bert = dict(_post_ln, vocab_size=30522, block_size=512, type_vocab_size=2)

# --- BERT (2018): WordPiece vocabulary of 30,522, 2 segment types, exact GELU, eps 1e-12.
for name, (layers, heads, dim), size in [("bert-base-uncased", (12, 12, 768), "110M"),
                                         ("bert-large-uncased", (24, 16, 1024), "340M")]:
    register(name=name, description=f"BERT {name.split('-')[1]} {size}: post-LN encoder, 2 segment types, MLM head transform",
             n_layer=layers, n_head=heads, n_embd=dim, **_bert)

# --- RoBERTa (2019): byte-level BPE of 50,265, one segment type, positions start at padding_idx + 1 = 2, eps 1e-5.
for name, (layers, heads, dim), size in [("roberta-base", (12, 12, 768), "125M"),
                                         ("roberta-large", (24, 16, 1024), "355M")]:
    register(name=name, description=f"RoBERTa {name[8:]} {size}: BERT layers, byte BPE, positions offset by 2, no segments",
             vocab_size=50265, block_size=512, position_offset=2, type_vocab_size=1, n_layer=layers, n_head=heads,
             n_embd=dim, **{**_post_ln, "norm_eps": 1e-5})

# --- ALBERT v2 (2019): 128-wide factorized embeddings projected up, one layer shared by every depth, tanh GELU.
for name, (layers, heads, dim), size in [("albert-base-v2", (12, 12, 768), "12M"),
                                         ("albert-large-v2", (24, 16, 1024), "18M"),
                                         ("albert-xlarge-v2", (24, 16, 2048), "60M"),
                                         ("albert-xxlarge-v2", (12, 64, 4096), "235M")]:
    register(name=name, description=f"ALBERT {name[7:-3]} v2 {size}: one layer shared {layers} deep, 128-wide factorized embeddings",
             n_layer=layers, n_head=heads, n_embd=dim, embedding_size=128, share_layers="all",
             **{**_bert, "vocab_size": 30000, "activation": "gelu_tanh"})

# --- DistilBERT (2019): BERT-base distilled to 6 layers, no segment embeddings.
register(name="distilbert-base-uncased", description="DistilBERT 66M: BERT-base halved to 6 layers, no segment types",
         n_layer=6, n_head=12, n_embd=768, **{**_bert, "type_vocab_size": 0})

# --- ELECTRA (2020): a small MLM generator and a replaced-token discriminator (one logit per token, (B, T):
#     dense + GELU + dense_prediction); embeddings may be narrower than the layers (projected up).
for name, (layers, heads, dim, ff, emb), size in [
        ("electra-small-discriminator", (12, 4, 256, 1024, 128), "14M"),
        ("electra-small-generator", (12, 4, 256, 1024, 128), "14M"),
        ("electra-base-discriminator", (12, 12, 768, 3072, 768), "110M"),
        ("electra-base-generator", (12, 4, 256, 1024, 768), "34M")]:
    disc = name.endswith("discriminator")
    head = (dict(task="replaced-token-detection", classifier_activation="gelu") if disc else {})
    register(name=name, description=f"ELECTRA {name[8:]} {size}: "
             + ("replaced-token detector (one logit per token)" if disc else "MLM generator that feeds the discriminator")
             + (f", {emb}-wide embeddings projected to {dim}" if emb != dim else ""),
             n_layer=layers, n_head=heads, n_embd=dim, intermediate_size=ff, embedding_size=emb, **head, **_bert)

# --- XLM (2019): English MLM, 2,048 wide, one language (no language embeddings), 30,145 BPE vocabulary,
#     MLM head without the transform: logits straight from the tied embeddings plus a bias.
register(name="xlm-mlm-en-2048", description="XLM MLM English 665M: 12x2048 post-LN, no MLM transform, 30,145 BPE",
         vocab_size=30145, block_size=512, n_layer=12, n_head=16, n_embd=2048,
         **{**_post_ln, "head_transform": False})

# --- Sentence encoders: a body with no LM head, pooled into one unit-length vector per sentence.
register(name="labse", description="LaBSE 471M: BERT-base with a 501,153-token multilingual vocabulary, [CLS] embeddings",
         n_layer=12, n_head=12, n_embd=768, task="embedding", pooling="first", **{**_bert, "vocab_size": 501153})
register(name="all-minilm-l6-v2", description="all-MiniLM-L6-v2 22.7M: 6x384 BERT, mean-pooled sentence embeddings",
         n_layer=6, n_head=12, n_embd=384, intermediate_size=1536, task="embedding", pooling="mean", **_bert)

# --- DeBERTa-v3 (2021): no absolute positions at all. Attention is disentangled: each layer adds content-to-position
#     and position-to-content scores (scaled by 1/sqrt(3 * head_dim)) read from ONE relative-embedding table of
#     256 log-spaced distance buckets per side (LayerNorm'd, shared by every layer, projected by each layer's own
#     q/k weights). 128K SentencePiece vocabulary, no segments, eps 1e-7, GELU classification pooler.
_deberta_v3 = dict(_post_ln, vocab_size=128100, block_size=512, type_vocab_size=0, norm_eps=1e-7,
                   position="disentangled", rel_buckets=512,  # 256 a side
                   rel_max_distance=512, pos_att_type="c2p|p2c", classifier_activation="gelu")
for name, (layers, heads, dim, ff), size in [("deberta-v3-xsmall", (12, 6, 384, 1536), "22M backbone + 49M embeddings"),
                                             ("deberta-v3-small", (6, 12, 768, 3072), "43M backbone + 98M embeddings"),
                                             ("deberta-v3-base", (12, 12, 768, 3072), "85M backbone + 98M embeddings"),
                                             ("deberta-v3-large", (24, 16, 1024, 4096), "303M backbone + 131M embeddings")]:
    register(name=name, description=f"DeBERTa-v3 {name[11:]} ({size}): disentangled content/position attention, "
             f"one log-bucketed relative-position table shared by all {layers} layers, no absolute positions",
             n_layer=layers, n_head=heads, n_embd=dim, intermediate_size=ff, **_deberta_v3)
