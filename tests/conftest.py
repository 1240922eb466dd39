"""Shared fixtures: tiny random Hugging Face models (our parity oracle) saved to folders."""
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 97


@pytest.fixture()
def one_thread():
    """For training tests: tiny models gain nothing from threads, a second thread stalls every op
    when another process holds the other core, and one thread fixes the summation order (golden
    losses). Files opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_hf(family: str):
    """A tiny random `transformers` causal LM of each family, with the switches that make it
    different turned on (NeoX: partial rotary + parallel residual; LLaMA: GQA; BLOOM: ALiBi + embedding norm;
    GPT-Neo: global and local layers, unscaled attention; Mixtral: experts, GQA, sliding window; CTRL)."""
    import transformers as T

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=128,
                           bos_token_id=0, eos_token_id=0)
        model = T.GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":
        cfg = T.GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                              vocab_size=VOCAB, max_position_embeddings=128, rotary_pct=0.25,
                              use_parallel_residual=True, bos_token_id=0, eos_token_id=0)
        model = T.GPTNeoXForCausalLM(cfg)
    elif family == "llama":
        cfg = T.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                            intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128,
                            bos_token_id=0, eos_token_id=0)
        model = T.LlamaForCausalLM(cfg)
    elif family == "gpt_neo":  # GPT-3-style dense/local layers; a window (7) that divides none of the lengths
        cfg = T.GPTNeoConfig(num_layers=3, num_heads=4, hidden_size=32, vocab_size=VOCAB, max_position_embeddings=128,
                             attention_types=[[["global", "local", "local"], 1]], window_size=7,
                             bos_token_id=0, eos_token_id=0)
        model = T.GPTNeoForCausalLM(cfg)
    elif family == "mixtral":  # 4 experts, top 2, GQA, untied head, a sliding window (6) that divides no length
        cfg = T.MixtralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                              intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=128, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=6, bos_token_id=0, eos_token_id=0)
        model = T.MixtralForCausalLM(cfg)
    elif family == "ctrl":  # [sin | cos] positions, embeddings x sqrt(d), ReLU, a biased tied head
        cfg = T.CTRLConfig(n_layer=2, n_head=4, n_embd=32, dff=64, vocab_size=VOCAB, n_positions=128,
                           bos_token_id=0, eos_token_id=0)
        model = T.CTRLLMHeadModel(cfg)
    elif family == "opt":  # learned positions offset by 2, ReLU, tied head
        cfg = T.OPTConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, ffn_dim=64, vocab_size=VOCAB,
                          max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2,
                          pad_token_id=1)
        model = T.OPTForCausalLM(cfg)
    elif family == "bloom":
        cfg = T.BloomConfig(n_layer=2, n_head=4, hidden_size=32, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
        model = T.BloomForCausalLM(cfg)
    else:
        raise ValueError(family)
    # Bigger weights than the default init so logits are far from uniform and argmax is stable.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    return model.eval()


def padded_logits_diff(hf, model, x, mask) -> float:
    """Max abs logits difference over the real (mask 1) positions of a left-padded batch; transformers
    gets the position ids that count real tokens only, as its generate() computes them."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        diff = (hf(x, attention_mask=mask, position_ids=pos).logits - model(x, attention_mask=mask)).abs()
    return (diff * mask[..., None]).max().item()


def recompute_greedy(model, ids, n):
    """n greedy tokens, each from a full forward pass over everything so far (no cache)."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def assert_padded_batch_equals_alone(model, seqs, n):
    """Prompts of different lengths generated as one left-padded batch give each prompt's own tokens."""
    from allformers.generation import generate, left_pad

    ids, mask = left_pad(seqs, pad_id=0)
    batched = generate(model, ids, attention_mask=mask, max_new_tokens=n)
    for i, s in enumerate(seqs):
        alone = generate(model, torch.tensor([s]), max_new_tokens=n)
        assert torch.equal(batched[i, ids.shape[1]:], alone[0, len(s):])


FAMILIES = ["gpt2", "gpt_neox", "llama", "bloom", "gpt_neo", "mixtral", "ctrl", "opt"]


@pytest.fixture(params=FAMILIES)
def hf_folder(request, tmp_path):
    model = tiny_hf(request.param)
    model.save_pretrained(tmp_path / "hf")
    return request.param, model, tmp_path / "hf"
