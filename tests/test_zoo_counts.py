"""Parameter counts of the big zoo entries, built on the meta device, against the papers' tables."""
import pytest
import torch

from allformers import Config
from allformers.models import build_model
from allformers.zoo import count_active_params, count_params


def printed(text: str):
    """'1.2T' -> (1.2e12, half a unit of its last digit): the interval the paper's rounding allows."""
    scale = {"M": 1e6, "B": 1e9, "T": 1e12}[text[-1]]
    digits = text[:-1]
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return float(digits) * scale, 0.5 * 10 ** -decimals * scale


# GPT-3 table 2.1: name, paper's parameter count, n_layers, d_model, n_heads, d_head. The table's own counts are
# loosely rounded (350M for 24 x 1024 layers, whose weights alone are 356M), so they are matched within 2%.
GPT3 = [("gpt3-125m", "125M", 12, 768, 12, 64), ("gpt3-350m", "350M", 24, 1024, 16, 64),
        ("gpt3-760m", "760M", 24, 1536, 16, 96), ("gpt3-1.3b", "1.3B", 24, 2048, 16, 128),
        ("gpt3-2.7b", "2.7B", 32, 2560, 32, 80), ("gpt3-6.7b", "6.7B", 32, 4096, 32, 128),
        ("gpt3-13b", "13.0B", 40, 5120, 40, 128), ("gpt3-175b", "175.0B", 96, 12288, 96, 128)]


@pytest.mark.parametrize("name,count,layers,dim,heads,head_dim", GPT3)
def test_gpt3_sizes(name, count, layers, dim, heads, head_dim):
    c = Config.from_name(name)
    assert (c.n_layer, c.n_embd, c.n_head, c.head_dim, c.block_size) == (layers, dim, heads, head_dim, 2048)
    assert [c.layer_attention(i) for i in range(4)] == ["global", "local", "global", "local"]
    paper, _ = printed(count)
    assert abs(count_params(c) - paper) <= 0.02 * paper, f"{name}: {count_params(c) / 1e9:.3f}B vs {count}"


# GLaM table 4: total parameters (without the embedding table) round to the table's figures.
GLAM = [("glam-0.1b-64e", "1.9B"), ("glam-1.7b-64e", "27B"), ("glam-8b-64e", "143B"), ("glam-64b-64e", "1.2T")]


@pytest.mark.parametrize("name,total", GLAM)
def test_glam_totals(name, total):
    c = Config.from_name(name)
    with torch.device("meta"):
        n = build_model(c).num_params(exclude_embeddings=True)
    paper, slack = printed(total)
    assert abs(n - paper) <= slack, f"{name}: {n / 1e9:.2f}B vs {total}"
    assert c.n_expert == 64 and [c.layer_is_moe(i) for i in range(4)] == [True, False, True, False]


def test_glam_64b_activated_parameters():
    """The headline number: 96.6B of GLaM's 1.2T parameters run for each token (embeddings included)."""
    paper, slack = printed("96.6B")
    assert abs(count_active_params(Config.from_name("glam-64b-64e")) - paper) <= slack


def test_mixtral_total_and_active():
    """Mistral AI's figures for Mixtral 8x7B: 46.7B parameters, 12.9B active per token."""
    c = Config.from_name("mixtral-8x7b")
    for got, text in ((count_params(c), "46.7B"), (count_active_params(c), "12.9B")):
        paper, slack = printed(text)
        assert abs(got - paper) <= slack


def test_ctrl_size():
    """Keskar et al.: 1.63 billion parameters (the paper truncates: 1.638B with the head's bias)."""
    assert abs(count_params(Config.from_name("ctrl")) - 1.63e9) <= 0.01 * 1.63e9


def test_dense_models_are_fully_active():
    c = Config.from_name("gpt3-125m")
    assert count_active_params(c) == count_params(c)


@pytest.mark.parametrize("name", ["opt-125m", "opt-2.7b"])
def test_opt_sizes_equal_transformers(name):
    """OPT's zoo entries hold exactly the parameters of transformers' OPTForCausalLM of that size (both on meta)."""
    import transformers as T

    from allformers.checkpoints.hf import FAMILIES

    c = Config.from_name(name)
    with torch.device("meta"):
        hf = T.OPTForCausalLM(T.OPTConfig(**FAMILIES["opt"].config_to_hf(c)))
    assert count_params(c) == sum(p.numel() for p in hf.parameters())
