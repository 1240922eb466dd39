"""Mixtures of experts: GLaM and Mixtral. Each is a Config of the same blocks with `n_expert` set
(blocks/moe.py); `count_active_params` gives the parameters one token runs through."""
from ..config import register

# --- GLaM (Du et al. 2022, table 4): a decoder whose first feed-forward of every two layers is 64 experts
#     with top-2 routing; T5-style relative position biases, RMSNorm without bias, no biases anywhere, a
#     256K-token vocabulary tied to the softmax. The dense layers are gated GELU units (two input matrices),
#     the experts plain two-matrix GELU feed-forwards, as in GLaM's praxis code (praxis/layers/glam.py); the
#     heads times their width follow the table (64B/64E: 128 heads of 128, twice d_model). With these rules
#     the non-embedding parameter counts round to the table's totals (tests/test_zoo_counts.py). Capacity:
#     GShard's 2N/E for top-2 (capacity factor 1); load-balancing weight 0.01; no router z-loss (GLaM predates it).
_glam = dict(family="decoder", vocab_size=256000, block_size=1024, position="relative_bias", norm_class="RMSNorm",
             norm_bias=False, attn_bias=False, mlp_bias=False, mlp_class="GLU", activation="gelu", moe_mlp_class="MLP",
             n_expert=64, n_expert_per_token=2, moe_every=2, moe_capacity_factor=1.0, moe_aux_loss_coef=0.01,
             moe_z_loss_coef=0.0)
for name, (layers, dim, hidden, heads, head_dim) in [
        ("glam-0.1b-64e", (12, 768, 3072, 12, 64)), ("glam-1.7b-64e", (24, 2048, 8192, 16, 128)),
        ("glam-8b-64e", (32, 4096, 16384, 32, 128)), ("glam-64b-64e", (64, 8192, 32768, 128, 128))]:
    size = name[5:].replace("-64e", "").upper()
    register(name=name, description=f"GLaM {size}/64E: 64 experts (top 2) in every other layer, relative position "
             f"biases, RMSNorm, GEGLU dense layers, 1,024 context",
             n_layer=layers, n_embd=dim, intermediate_size=hidden, n_head=heads, head_dim=head_dim, **_glam)

# --- Mixtral 8x7B (Jiang et al. 2024): LLaMA/Mistral blocks (GQA 32 query / 8 kv heads, rotary with base
#     10^6) whose every feed-forward is 8 SwiGLU experts, top 2; untied head; 32K context. Imports from and
#     exports to transformers' MixtralForCausalLM (checkpoints/hf_decoders.py).
register(name="mixtral-8x7b", family="decoder",
         description="Mixtral 8x7B: 8 SwiGLU experts (top 2) in every layer, GQA, rotary, 32K context",
         vocab_size=32000, block_size=32768, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
         position="rotary", rope_base=1e6, norm_class="RMSNorm", mlp_class="GLU", activation="silu", attn_bias=False,
         mlp_bias=False, tie_embeddings=False, n_expert=8, n_expert_per_token=2, moe_every=1, moe_aux_loss_coef=0.001,
         moe_z_loss_coef=0.0)
