"""Cached decoding must equal recomputing the whole sequence, for every decoder in the zoo."""
import pytest
import torch

from allformers import Config, TransformerLM
from allformers.config import REGISTRY
from allformers.generation import generate
from allformers.models import build_model

from .conftest import assert_padded_batch_equals_alone, recompute_greedy

DECODERS = [n for n in REGISTRY if Config.from_name(n).causal and not Config.from_name(n).is_encoder_decoder]


def tiny(name: str) -> TransformerLM:
    """The named config shrunk to a few layers, keeping every switch that makes it itself
    (positions, norms, GLU, parallel residual, MQA/GQA ratio)."""
    c = Config.from_name(name)
    kv = 1 if c.n_kv_head == 1 else (2 if c.n_kv_head < c.n_head else 4)
    small = c.replace(n_layer=2, n_head=4, n_kv_head=kv, n_embd=64, head_dim=None, intermediate_size=96,
                      vocab_size=101, block_size=96)
    torch.manual_seed(0)
    model = build_model(small).eval()  # TransformerXL for Transformer-XL's relative positions with memory
    with torch.no_grad():  # peaked logits: a near-tie could flip argmax on rounding alone
        model.wte.weight.mul_(20)
    return model


@pytest.mark.parametrize("name", DECODERS)
def test_50_cached_steps_equal_recomputation(name):
    model = tiny(name)
    prompt = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = recompute_greedy(model, prompt, 50)
    cached = generate(model, prompt, max_new_tokens=50)
    assert torch.equal(cached, full), name


@pytest.mark.parametrize("name", ["gpt2", "pythia-70m", "bloom-560m", "smollm2-135m"])
def test_cached_logits_equal_full_forward(name):
    """Prefill in two chunks, then one token at a time: logits match the full pass."""
    model = tiny(name)
    x = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 32)
        parts = [model(x[:, :8], cache=cache), model(x[:, 8:13], cache=cache)]
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(13, 20)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "bloom-560m", "llama-7b", "gpt"])
def test_left_padded_batch_equals_each_prompt_alone(name):
    model = tiny(name)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (3, 9, 6)]
    assert_padded_batch_equals_alone(model, seqs, 20)
