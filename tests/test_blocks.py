"""Blocks on their own: positions, attention variants, residual layouts."""
import math

import pytest
import torch
import torch.nn.functional as F

from allformers import Config, TransformerLM
from allformers.blocks import Attention, Rotary, SinusoidalPositions, alibi_slopes, apply_rotary


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8-head geometric series, then every other slope of the 16-head one
    s16 = [2.0 ** (-0.5 * (i + 1)) for i in range(16)]
    assert torch.allclose(alibi_slopes(12), torch.tensor([2.0 ** -(i + 1) for i in range(8)] + s16[0::2][:4]))


def test_sinusoidal_table():
    t = SinusoidalPositions(50, 16).table
    assert torch.allclose(t[7, 0], torch.tensor(math.sin(7.0)))
    assert torch.allclose(t[7, 1], torch.tensor(math.cos(7.0)))
    assert torch.allclose(t[3, 4], torch.tensor(math.sin(3 / 10000 ** (4 / 16))))


def test_partial_rotary_keeps_the_rest_and_preserves_norms():
    x = torch.randn(2, 3, 5, 16)
    cos, sin = Rotary(8)(torch.arange(5).expand(2, 5))
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    assert torch.allclose(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1), atol=1e-5)
    assert torch.allclose(y[:, :, 0], x[:, :, 0])  # position 0 does not rotate


def test_rotary_scores_depend_only_on_distance():
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rot = Rotary(8)

    def score(i, j):
        ci, si = rot(torch.tensor([[i]]))
        cj, sj = rot(torch.tensor([[j]]))
        return (apply_rotary(q, ci, si) * apply_rotary(k, cj, sj)).sum()

    assert torch.allclose(score(3, 1), score(12, 10), atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = Attention(32, 4, 2, 8)
    mha = Attention(32, 4, 4, 8)
    q, k, v = gqa.qkv.weight.split([32, 16, 16])
    rep = lambda w: w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)  # noqa: E731
    qb, kb, vb = gqa.qkv.bias.split([32, 16, 16])
    repb = lambda b: b.view(2, 8).repeat_interleave(2, dim=0).reshape(32)  # noqa: E731
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([q, rep(k), rep(v)]))
        mha.qkv.bias.copy_(torch.cat([qb, repb(kb), repb(vb)]))
        mha.proj.load_state_dict(gqa.proj.state_dict())
    x = torch.randn(2, 6, 32)
    assert torch.allclose(gqa(x), mha(x), atol=1e-6)


def test_causal_attention_ignores_the_future():
    model = TransformerLM(Config(n_layer=2, n_embd=32, n_head=4, vocab_size=20, block_size=16)).eval()
    x = torch.randint(0, 20, (1, 10))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 20
    assert torch.allclose(model(x)[:, :7], model(y)[:, :7], atol=1e-6)


def test_bidirectional_stack_sees_both_ways():
    model = TransformerLM(Config(n_layer=1, n_embd=32, n_head=4, vocab_size=20, block_size=16, causal=False)).eval()
    x = torch.randint(0, 20, (1, 10))
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % 20
    assert not torch.allclose(model(x)[:, 0], model(y)[:, 0])


@pytest.mark.parametrize("kw", [dict(norm_placement="post"), dict(parallel_residual=True),
                                dict(parallel_residual=True, shared_parallel_norm=True),
                                dict(mlp_class="GLU", activation="silu", norm_class="RMSNorm", position="rotary")])
def test_residual_layouts_build_and_train(kw):
    torch.manual_seed(0)
    model = TransformerLM(Config(n_layer=2, n_embd=32, n_head=4, vocab_size=20, block_size=16, **kw))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 20, (4, 16))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    if kw.get("shared_parallel_norm"):
        assert model.blocks[0].norm2 is None
