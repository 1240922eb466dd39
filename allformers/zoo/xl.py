"""Transformer-XL and XLNet: post-norm stacks with relative attention and segment memory
(models/xlnet.py). Each entry is a Config of the same blocks; the comments say what sets it apart."""
from ..config import register

_XL = dict(position="relative_xl", norm_placement="post", attn_bias=False)

# --- Transformer-XL (Dai et al. 2019), the WikiText-103 model: 18 x 1024, ReLU, embeddings scaled by
#     sqrt(d_model), 1,600 tokens of memory at evaluation, distances clamped at 1,000. The paper's adaptive
#     input and softmax (cutoffs 20K / 40K / 200K) are not reproduced: this head is a full tied softmax over
#     the 267,735 words, so it has about 0.5B parameters instead of the paper's 257M.
register(name="transformer-xl-wt103", family="decoder",
         description="Transformer-XL (WikiText-103 shapes): 18x1024 causal relative attention, 1,600 tokens of memory",
         vocab_size=267735, block_size=1728, n_layer=18, n_head=16, n_embd=1024, intermediate_size=4096,
         activation="relu", embed_scale=1024 ** 0.5, mem_len=1600, clamp_len=1000, lm_head_bias=True, **_XL)

# --- XLNet (Yang et al. 2019): the Transformer-XL core, bidirectional, with relative segment encodings and
#     a query stream for permutation language modelling; SentencePiece vocabulary of 32,000.
for name, (layers, heads, dim) in [("xlnet-base-cased", (12, 12, 768)), ("xlnet-large-cased", (24, 16, 1024))]:
    register(name=name, family="encoder",
             description=f"XLNet {name.split('-')[1]}: permutation LM, two-stream relative attention, segment encodings",
             vocab_size=32000, block_size=512, n_layer=layers, n_head=heads, n_embd=dim, intermediate_size=4 * dim,
             activation="gelu", norm_eps=1e-12, causal=False, relative_segments=True, lm_head_bias=True, **_XL)

# --- A CPU-sized Transformer-XL for the long-context benchmark and the docs: 64-token segments, 64 remembered,
#     pre-norm (the paper's pre_lnorm option: post-norm barely leaves the unigram loss in a few hundred steps).
register(name="baby-xl-char", family="decoder",
         description="A CPU baby Transformer-XL: 4 pre-norm layers, 4 heads, 128 wide, 64-token segments + 64 of memory",
         vocab_size=65, block_size=1024, n_layer=4, n_head=4, n_embd=128, activation="gelu", mem_len=64,
         **{**_XL, "norm_placement": "pre"})
