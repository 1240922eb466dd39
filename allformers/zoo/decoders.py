"""Decoder-only models: GPT, GPT-2, GPT-3, GPT-NeoX / Pythia, BLOOM, PaLM, LLaMA / SmolLM2, CTRL.
Each entry is a Config of the same blocks; the comments say what sets it apart."""
from ..config import register

# --- GPT (Radford et al. 2018): post-norm, learned positions, BookCorpus BPE of 40,478 tokens.
register(name="gpt", family="decoder", description="GPT-1 (2018): 12x768 post-LN decoder, learned positions, 512 context",
         vocab_size=40478, block_size=512, n_layer=12, n_head=12, n_embd=768, norm_placement="post",
         activation="gelu", position="learned")

# --- GPT-2 (2019): pre-LN plus a final LayerNorm, tanh GELU, byte-level BPE of 50,257 tokens.
for name, (layers, heads, dim), size in [("gpt2", (12, 12, 768), "124M"), ("gpt2-medium", (24, 16, 1024), "355M"),
                                         ("gpt2-large", (36, 20, 1280), "774M"), ("gpt2-xl", (48, 25, 1600), "1.5B")]:
    register(name=name, family="decoder",
             description=f"GPT-2 {size}: pre-LN decoder, tanh GELU, learned positions, 1,024 context",
             vocab_size=50257, block_size=1024, n_layer=layers, n_head=heads, n_embd=dim,
             activation="gelu_tanh", position="learned")

# --- GPT-NeoX / Pythia (2022): rotary on 25% of each head, parallel attention + MLP residual,
#     untied embeddings, vocabulary padded to 50,304.
for name, (layers, heads, dim), vocab in [
        ("pythia-70m", (6, 8, 512), 50304), ("pythia-160m", (12, 12, 768), 50304),
        ("pythia-410m", (24, 16, 1024), 50304), ("pythia-1b", (16, 8, 2048), 50304),
        ("pythia-1.4b", (24, 16, 2048), 50304), ("pythia-2.8b", (32, 32, 2560), 50304),
        ("pythia-6.9b", (32, 32, 4096), 50432), ("pythia-12b", (36, 40, 5120), 50688),
        ("gpt-neox-20b", (44, 64, 6144), 50432)]:
    register(name=name, family="decoder",
             description=("GPT-NeoX-20B" if name.startswith("gpt-neox") else f"Pythia {name[7:]}")
             + ": parallel residual, rotary on 25% of each head, untied embeddings, 2,048 context",
             vocab_size=vocab, block_size=2048, n_layer=layers, n_head=heads, n_embd=dim,
             position="rotary", rotary_pct=0.25, parallel_residual=True, activation="gelu", tie_embeddings=False)

# --- BLOOM (2022): ALiBi instead of position embeddings, LayerNorm right after the embeddings.
register(name="bloom-560m", family="decoder",
         description="BLOOM 560M: ALiBi attention biases, embedding LayerNorm, 250K multilingual vocabulary",
         vocab_size=250880, block_size=2048, n_layer=24, n_head=16, n_embd=1024, position="alibi",
         embedding_norm=True, activation="gelu_tanh")

# --- PaLM (2022): SwiGLU, parallel block sharing one norm, multi-query attention, no biases.
register(name="palm-8b", family="decoder",
         description="PaLM 8B: parallel block with one shared norm, multi-query attention, SwiGLU, no biases",
         vocab_size=256000, block_size=2048, n_layer=32, n_head=16, n_embd=4096, n_kv_head=1,
         intermediate_size=16384, position="rotary", parallel_residual=True, shared_parallel_norm=True,
         mlp_class="GLU", activation="silu", attn_bias=False, mlp_bias=False, norm_bias=False)

# --- LLaMA (2023): pre-RMSNorm, SwiGLU, rotary, no biases, untied head.
_llama = dict(family="decoder", position="rotary", norm_class="RMSNorm", mlp_class="GLU", activation="silu",
              attn_bias=False, mlp_bias=False, tie_embeddings=False)
for name, (layers, heads, dim, ff) in [("llama-7b", (32, 32, 4096, 11008)), ("llama-13b", (40, 40, 5120, 13824)),
                                       ("llama-33b", (60, 52, 6656, 17920)), ("llama-65b", (80, 64, 8192, 22016))]:
    register(name=name, description=f"LLaMA {name[6:].upper()}: pre-RMSNorm, SwiGLU, rotary, no biases",
             vocab_size=32000, block_size=2048, n_layer=layers, n_head=heads, n_embd=dim, intermediate_size=ff,
             norm_eps=1e-6, **_llama)

# SmolLM2 (2024): LLaMA blocks with grouped-query attention and tied embeddings.
for name, (layers, heads, kv, dim, ff) in [("smollm2-135m", (30, 9, 3, 576, 1536)),
                                           ("smollm2-360m", (32, 15, 5, 960, 2560))]:
    register(name=name, description=f"SmolLM2 {name[8:].upper()}: LLaMA blocks, GQA ({heads} query / {kv} kv heads), tied embeddings",
             vocab_size=49152, block_size=8192, n_layer=layers, n_head=heads, n_kv_head=kv, n_embd=dim,
             intermediate_size=ff, rope_base=100000.0, **{**_llama, "tie_embeddings": True})

# --- Small configs the training recipes start from (the character-level "baby GPT" of nanoGPT).
register(name="baby-gpt-char", family="decoder",
         description="nanoGPT's CPU baby GPT: 4 layers, 4 heads, 128 wide, 64-token context, character vocabulary",
         vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, activation="gelu", position="learned")

# --- GPT-3 (Brown et al. 2020, table 2.1): GPT-2's blocks with dense and locally banded sparse attention
#     layers alternating, as in the Sparse Transformer, and 2,048 context. The band's width is not in the
#     paper; 256 is GPT-Neo's (EleutherAI's replication). Two rows of the table do not multiply out: XL lists
#     24 heads of 128 for d_model 2,048 and 13B lists d_model 5,140 for 40 heads of 128; 16 heads and 5,120
#     make them whole and give the table's parameter counts (tests/test_zoo_counts.py).
for name, (layers, dim, heads), size in [
        ("gpt3-125m", (12, 768, 12), "125M"), ("gpt3-350m", (24, 1024, 16), "350M"), ("gpt3-760m", (24, 1536, 16), "760M"),
        ("gpt3-1.3b", (24, 2048, 16), "1.3B"), ("gpt3-2.7b", (32, 2560, 32), "2.7B"), ("gpt3-6.7b", (32, 4096, 32), "6.7B"),
        ("gpt3-13b", (40, 5120, 40), "13B"), ("gpt3-175b", (96, 12288, 96), "175B")]:
    register(name=name, family="decoder",
             description=f"GPT-3 {size}: GPT-2 blocks, dense and locally banded (256) attention alternating, 2,048 context",
             vocab_size=50257, block_size=2048, n_layer=layers, n_head=heads, n_embd=dim, activation="gelu_tanh",
             position="learned", attention_pattern=["global", "local"], window_size=256)

# --- CTRL (Keskar et al. 2019): a control code as each sequence's first token conditions everything after it.
#     Fixed sinusoidal positions laid out [sin | cos], embeddings scaled by sqrt(d), pre-LN, ReLU, a biased
#     head tied to the embeddings, 246,534-token BPE, 256 context. Loads from CTRLLMHeadModel.
register(name="ctrl", family="decoder",
         description="CTRL 1.6B: control-code conditioning, [sin | cos] positions, embeddings x sqrt(1280), 256 context",
         vocab_size=246534, block_size=256, n_layer=48, n_head=16, n_embd=1280, intermediate_size=8192,
         position="sinusoidal", sinusoidal_layout="halves", embed_scale=1280 ** 0.5, activation="relu",
         lm_head_bias=True, norm_eps=1e-6)
register(name="baby-ctrl-char", family="decoder",
         description="A character-level CTRL for the control-code recipe: CTRL's switches at the baby GPT's size (4 x 128, 128 context)",
         vocab_size=102, block_size=128, n_layer=4, n_head=4, n_embd=128, intermediate_size=512, position="sinusoidal",
         sinusoidal_layout="halves", embed_scale=128 ** 0.5, activation="relu", lm_head_bias=True, norm_eps=1e-6)

# --- OPT (Zhang et al. 2022): GPT-3-shaped pre-LN decoders with ReLU, learned positions offset by 2 (the table
#     starts after the padding index), tied embeddings, 50,272 tokens, 2,048 context; BLIP-2's default decoder.
for name, (layers, heads, dim) in [("opt-125m", (12, 12, 768)), ("opt-1.3b", (24, 32, 2048)),
                                   ("opt-2.7b", (32, 32, 2560)), ("opt-6.7b", (32, 32, 4096)),
                                   ("opt-13b", (40, 40, 5120)), ("opt-30b", (48, 56, 7168)), ("opt-66b", (64, 72, 9216))]:
    register(name=name, family="decoder",
             description=f"OPT {name[4:].upper()}: pre-LN, ReLU, learned positions offset by 2, tied embeddings",
             vocab_size=50272, block_size=2048, n_layer=layers, n_head=heads, n_embd=dim, intermediate_size=4 * dim,
             activation="relu", position="learned", position_offset=2)
