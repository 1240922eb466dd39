"""Per-layer attention patterns (GPT-3's alternating dense / locally banded layers): which keys each
query sees, the blocked local computation against the masked one, the window KV cache, padding."""
import pytest
import torch
import torch.nn.functional as F

from allformers import Config, ConfigError, TransformerLM
from allformers.blocks.sparse import WindowKVCache, local_blocked, pattern_allowed, patterned_attention
from allformers.generation import generate

from .conftest import assert_padded_batch_equals_alone, recompute_greedy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_local_window_golden():
    """window 3: query i sees keys i-2, i-1, i (never a future key)."""
    got = pattern_allowed("local", torch.arange(6), torch.arange(6), window=3, stride=1).int()
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 1, 1, 1]])
    assert torch.equal(got, expected)


def test_strided_golden():
    """stride 2: keys at distances 0, 2, 4, ..."""
    got = pattern_allowed("strided", torch.arange(5), torch.arange(5), window=1, stride=2).int()
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [0, 1, 0, 0, 0],
                             [1, 0, 1, 0, 0],
                             [0, 1, 0, 1, 0],
                             [1, 0, 1, 0, 1]])
    assert torch.equal(got, expected)


def test_cached_queries_use_absolute_indices():
    """Two new queries at positions 7 and 8 against cached keys 5..8 with window 3."""
    got = pattern_allowed("local", torch.tensor([7, 8]), torch.arange(5, 9), window=3, stride=1).int()
    assert torch.equal(got, torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]))


def _masked_reference(q, k, v, window, q_start, k_start, key_valid):
    T, S = q.shape[2], k.shape[2]
    allowed = pattern_allowed("local", torch.arange(q_start, q_start + T), torch.arange(k_start, k_start + S), window, 1)
    allowed = allowed[None, None] & key_valid[:, None, None, :]
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("T,W,prefix", [(37, 5, 0), (40, 7, 3), (23, 4, 9), (16, 16, 0), (5, 8, 2)])
def test_blocked_local_equals_masked(T, W, prefix):
    """The linear-cost blocked computation equals the dense masked one: window sizes that do not
    divide the length, keys before the first query (a cache), fewer or more of them than the window,
    left padding, GQA (4 query heads on 2 key/value heads)."""
    g = torch.Generator().manual_seed(T * W + prefix)
    B, H, Hkv, D = 2, 4, 2, 8
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, prefix + T, D, generator=g), torch.randn(B, Hkv, prefix + T, D, generator=g)
    valid = torch.ones(B, prefix + T, dtype=torch.bool)
    valid[1, :6] = False  # left padding in row 1
    got = local_blocked(q, k, v, window=W, q_start=prefix, k_start=0, key_valid=valid, scale=None, dropout_p=0.0,
                        gqa=True)
    ref = _masked_reference(q, k, v, W, prefix, 0, valid)
    real = valid[:, prefix:][:, None, :, None]  # padding queries' outputs are never used
    assert ((got - ref) * real).abs().max().item() < 1e-5


def test_patterned_attention_adds_a_relative_bias():
    """With a model-wide bias (ALiBi, T5 buckets) the local layer keeps the bias and adds its band."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 2, 12, 12, generator=g)
    got = patterned_attention(q, k, v, kind="local", window=4, stride=1, q_start=0, k_idx=torch.arange(12),
                              key_mask=None, mask=bias, scale=None, dropout_p=0.0, gqa=False)
    band = pattern_allowed("local", torch.arange(12), torch.arange(12), 4, 1)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~band, float("-inf")))
    assert (got - ref).abs().max().item() < 1e-5


def test_window_cache_keeps_only_the_window():
    cache = WindowKVCache(1, 1, 4, 2, torch.float32, "cpu")
    keys = torch.arange(10.0)[None, None, :, None].expand(1, 1, 10, 2)
    k, _ = cache.update(0, keys[:, :, :6], keys[:, :, :6])  # a 6-token prompt: all 6 attended, last 4 kept
    assert k.shape[2] == 6 and cache.k.shape[2] == 4
    for t in range(6, 10):  # one token at a time: the ring holds positions t-3..t
        k, _ = cache.update(t, keys[:, :, t:t + 1], keys[:, :, t:t + 1])
        assert sorted(k[0, 0, :, 0].tolist()) == list(map(float, range(t - 3, t + 1)))
        assert torch.equal(k[0, 0, :, 0].long(), cache.positions(t + 1))


def local_model(pattern=("global", "local"), window=5, **kw):
    c = Config(**{**dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=32, vocab_size=61, block_size=128, position="rotary",
                         norm_class="RMSNorm", mlp_class="GLU", activation="silu"), **kw},
               attention_pattern=list(pattern), window_size=window)
    torch.manual_seed(0)
    model = TransformerLM(c).eval()
    with torch.no_grad():
        model.wte.weight.mul_(20)  # peaked logits: argmax does not flip on rounding
    return model


def test_window_limits_what_a_token_sees():
    """In an all-local model of depth L, token t depends on tokens t - L*(W-1) .. t only."""
    # float64: the change decays fast with depth (about 1e-6 seven tokens on in fp32, where one
    # position can round to exactly no change); masked keys still weigh exactly 0 outside the field
    model = local_model(pattern=["local"], window=3).double()  # 4 layers: receptive field 4 * 2 = 8 back
    x = torch.randint(0, 61, (1, 30), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 61
    with torch.no_grad():
        a, b = model(x), model(y)
    changed = (a - b).abs().amax(-1)[0] > 0  # exactly 0 outside the receptive field (masked keys weigh 0)
    assert changed[10:19].all() and not changed[:10].any() and not changed[19:].any()


@pytest.mark.parametrize("pattern", [["global", "local"], ["local", "strided"]])
def test_cached_decoding_equals_recomputation(pattern):
    model = local_model(pattern=pattern)
    prompt = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(model, prompt, max_new_tokens=25), recompute_greedy(model, prompt, 25))


def test_chunked_prefill_with_window_cache_equals_full_forward():
    model = local_model()
    x = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 64)
        parts = [model(x[:, :17], cache=cache), model(x[:, 17:20], cache=cache)]
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(20, 40)]
    assert isinstance(cache.layers[1], WindowKVCache) and cache.layers[1].k.shape[2] == 5
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-4


def test_left_padded_batch_equals_each_prompt_alone():
    model = local_model()
    g = torch.Generator().manual_seed(3)
    assert_padded_batch_equals_alone(model, [torch.randint(1, 61, (n,), generator=g).tolist() for n in (3, 14, 8)], 12)


def test_local_with_packed_documents_and_alibi():
    """The fallback path (a dense mask that carries more than padding) still applies the window."""
    model = local_model(pattern=["local"], window=4, position="alibi")
    x = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(4))
    docs = torch.tensor([[0] * 12 + [1] * 8])
    with torch.no_grad():
        packed = model(x, document_ids=docs)
        alone = model(x[:, 12:])
    assert (packed[:, 12:] - alone).abs().max().item() < 1e-4


def test_pattern_config_errors():
    with pytest.raises(ConfigError, match="attention_pattern"):
        Config(attention_pattern=["global", "sparse"])
    with pytest.raises(ConfigError, match="causal"):
        Config(attention_pattern=["local"], causal=False)
    with pytest.raises(ConfigError, match="share_layers"):
        Config(attention_pattern=["global", "local"], share_layers="all")
    c = Config(n_layer=5, attention_pattern=["global", "local"])
    assert [c.layer_attention(i) for i in range(5)] == ["global", "local", "global", "local", "global"]
    again = Config.from_dict(c.to_dict())
    assert again.attention_pattern == ["global", "local"]


def test_the_server_engine_keeps_the_window():
    """The batching engine (serve/engine.py) attends through each layer's band: its greedy tokens for
    prompts longer than the window, batched, are the cached generate()'s for each alone."""
    from .serve_util import engine_greedy, tiny_chat_model

    model, tok = tiny_chat_model("gpt3-125m", window_size=6)  # 2 layers: global, local
    prompts = [tok.encode(t) for t in ("the window is six tokens wide", "ab", "a longer prompt than the window, surely")]
    for p, got in zip(prompts, engine_greedy(model, tok, prompts, 10)):
        assert got == generate(model, torch.tensor([p]), max_new_tokens=10)[0, len(p):].tolist()
