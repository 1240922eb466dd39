"""Transformer-XL's mechanism, pinned without an oracle (transformers 5.x removed TransfoXL): segment
memory equals one pass with the equivalent mask, no gradient flows into memory, generation carries the
memory, and the rel-shift puts every distance where it belongs. XLNet's two-stream masks and
permutation targets too."""
import pytest
import torch
import torch.nn.functional as F

from allformers import Config, ConfigError
from allformers.blocks.relative_xl import distances, rel_shift
from allformers.generation import generate, left_pad
from allformers.models import TransformerXL, build_model
from allformers.models.xlnet import segment_recurrence_mask
from allformers.objectives.permutation_lm import permutation_lm_batch, permutation_masks

V = 53


def xl(**kw) -> TransformerXL:
    """A tiny Transformer-XL: causal relative attention, ReLU, scaled embeddings, memory."""
    c = Config(name="tiny-xl", vocab_size=V, block_size=256, n_layer=3, n_head=4, n_embd=32, intermediate_size=48,
               position="relative_xl", attention_class="RelativeXLAttention", activation="relu", attn_bias=False,
               embed_scale=32 ** 0.5, **{"mem_len": 8, "norm_placement": "post", **kw})
    torch.manual_seed(0)
    model = build_model(c).eval()
    with torch.no_grad():  # larger than the init so u, v and the positions all move the scores
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0, 0.15)
    return model


def _ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seg, mem_len, placement", [(8, 8, "post"), (8, 5, "post"), (6, 11, "pre")])
def test_segment_memory_equals_one_pass_with_the_equivalent_mask(seg, mem_len, placement):
    """Post-norm (the paper) remembers each layer's input; pre-norm (its pre_lnorm) the normalised input."""
    model = xl(mem_len=mem_len, norm_placement=placement)
    ids = _ids(2, 4 * seg)
    with torch.no_grad():
        memory = model.new_memory()
        recurrent = torch.cat([model(ids[:, k:k + seg], cache=memory) for k in range(0, ids.shape[1], seg)], dim=1)
        assert memory.length == mem_len and memory.layers[0].shape == (2, mem_len, 32)
        blocked = segment_recurrence_mask([seg] * 4, mem_len)
        one_pass = model(ids, perm_mask=blocked.float().expand(2, -1, -1))
        plain = model(ids)  # full causal attention: differs once a key falls out of the memory
    assert (recurrent[:, -seg:] - one_pass[:, -seg:]).abs().max() <= 1e-5  # the last segment
    assert (recurrent - one_pass).abs().max() <= 1e-5  # and every other one
    assert torch.allclose(recurrent[:, :seg], plain[:, :seg], atol=1e-5)  # the first segment has no memory
    assert (recurrent[:, -seg:] - plain[:, -seg:]).abs().max() > 1e-3  # so the test can fail


def test_memory_changes_the_prediction_and_is_off_with_mem_len_0():
    ids = _ids(2, 16)
    with torch.no_grad():
        model = xl()
        memory = model.new_memory()
        model(ids[:, :8], cache=memory)
        with_memory = model(ids[:, 8:], cache=memory)
        alone = model(ids[:, 8:])
        off = model.new_memory(mem_len=0)
        model(ids[:, :8], cache=off)
        assert off.length == 0 and torch.allclose(model(ids[:, 8:], cache=off), alone, atol=1e-6)
    assert (with_memory - alone).abs().max() > 1e-3


def test_no_gradient_flows_into_memory():
    model = xl().train()
    ids = _ids(2, 16)
    first = model.wte(ids[:, :8]).detach().requires_grad_(True)  # the previous segment's input, a leaf
    memory = model.new_memory()
    model(None, inputs_embeds=first, cache=memory)
    assert all(not m.requires_grad and m.grad_fn is None for m in memory.layers)  # detached
    saved = [m.clone() for m in memory.layers]
    loss = F.cross_entropy(model(ids[:, 8:], cache=memory).flatten(0, 1), ids[:, 8:].flatten())
    loss.backward()
    assert first.grad is None  # nothing reached the previous segment's computation
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # the same gradients as with the memory handed in as constants
    model.zero_grad()
    constant = model.new_memory()
    constant.layers = saved
    F.cross_entropy(model(ids[:, 8:], cache=constant).flatten(0, 1), ids[:, 8:].flatten()).backward()
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def _greedy(model, ids, n, blocked=None):
    """Recompute the whole sequence for every new token (with a mask builder for bounded memory)."""
    for _ in range(n):
        kw = {} if blocked is None else dict(perm_mask=blocked(ids.shape[1]).float().expand(ids.shape[0], -1, -1))
        ids = torch.cat([ids, model(ids, **kw)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_generation_with_memory_equals_recomputation(placement):
    prompt = _ids(2, 7, seed=3)
    with torch.no_grad():
        every = xl(mem_len=0, norm_placement=placement)  # mem_len=0: generation remembers every past token
        assert torch.equal(generate(every, prompt, max_new_tokens=20), _greedy(every, prompt, 20))
        bounded = xl(mem_len=4, norm_placement=placement)  # each new token sees the last 4 tokens: a sliding window
        ref = _greedy(bounded, prompt, 20, blocked=lambda T: segment_recurrence_mask([7] + [1] * (T - 7), 4))
        assert torch.equal(generate(bounded, prompt, max_new_tokens=20), ref)
        # and the logits themselves: prefill in two chunks, then one token at a time
        x = _ids(2, 20, seed=4)
        cache = every.new_cache(2)
        parts = [every(x[:, :8], cache=cache), every(x[:, 8:13], cache=cache)]
        parts += [every(x[:, t:t + 1], cache=cache) for t in range(13, 20)]
        assert torch.allclose(torch.cat(parts, dim=1), every(x), atol=1e-5)


def test_left_padded_generation_equals_each_prompt_alone():
    model = xl(mem_len=0)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 9, 6)]
    ids, mask = left_pad(seqs, pad_id=0)
    batched = generate(model, ids, attention_mask=mask, max_new_tokens=8)
    for row, s in zip(batched, seqs):
        alone = generate(model, torch.tensor([s]), max_new_tokens=8)
        assert row[-8:].tolist() == alone[0, -8:].tolist()


def test_rel_shift_puts_each_distance_at_its_key():
    """bd[i, r] scores query i against distance d_r; after the shift, column j holds distance M + i - j."""
    for causal in (True, False):
        T, M = 5, 3
        S = M + T
        d = distances(T, S, causal)  # largest first
        bd = d.expand(1, 1, T, -1).contiguous()  # the score IS the distance: easy to read
        shifted = rel_shift(bd, S)[0, 0]
        for i in range(T):
            for j in range(M + i + 1 if causal else S):  # causal: future keys are masked, their values unused
                assert shifted[i, j] == M + i - j


def test_two_stream_masks_query_never_sees_its_own_token():
    torch.manual_seed(0)
    c = Config(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=16, intermediate_size=32, causal=False,
               position="relative_xl", attention_class="RelativeXLAttention", norm_placement="post", attn_bias=False,
               relative_segments=True)
    model = build_model(c).eval()
    order = torch.tensor([[4, 1, 6, 0, 3, 7, 2, 5]])  # targets: the last 3 of the order -> positions 7, 2, 5
    perm_mask, target_mapping, targets = permutation_masks(order, 3)
    assert targets.tolist() == [[2, 5, 7]]
    content, query = model._masks(1, 8, 0, None, perm_mask, torch.device("cpu"))
    diag = torch.arange(8)
    assert (query[0, 0, diag, diag] < 0).sum() == 3  # the query stream: blocked on the targets' own tokens
    assert (content[0, 0, diag, diag] == 0).all()  # the content stream sees itself
    ids = _ids(1, 8, seed=6)
    rank = {pos: r for r, pos in enumerate(order[0].tolist())}  # the targets 2, 5, 7 have ranks 6, 7, 5
    with torch.no_grad():
        out = model(ids, perm_mask=perm_mask, target_mapping=target_mapping)  # (1, 3, V): one row per target
        for target in targets[0].tolist():
            changed = ids.clone()
            changed[0, target] = (changed[0, target] + 1) % V
            again = model(changed, perm_mask=perm_mask, target_mapping=target_mapping)
            for q, other in enumerate(targets[0].tolist()):
                moved = (again[0, q] - out[0, q]).abs().max()
                if rank[other] <= rank[target]:  # itself, and the targets before it in the order, never read it
                    assert moved <= 1e-6, (target, other)
                else:  # a target later in the order does
                    assert moved > 1e-4, (target, other)


def test_permutation_targets_hand_worked():
    """T=4, order z = (2, 0, 3, 1), predict the last 2 of z: positions 3 (rank 2) and 1 (rank 3).
    Non-targets 0 and 2 see each other only; 3 sees 0 and 2; 1 sees 0, 2 and 3; no target sees itself."""
    perm_mask, target_mapping, targets = permutation_masks(torch.tensor([[2, 0, 3, 1]]), 2)
    assert perm_mask[0].tolist() == [[0, 1, 0, 1],
                                     [0, 1, 0, 0],
                                     [0, 1, 0, 1],
                                     [0, 1, 0, 1]]
    assert target_mapping[0].tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
    assert targets.tolist() == [[1, 3]]
    batch = permutation_lm_batch(torch.tensor([[10, 11, 12, 13, 14, 15]]), k=3, generator=torch.Generator().manual_seed(0))
    assert batch["labels"].shape == (1, 2) and batch["target_mapping"].shape == (1, 2, 6)
    assert batch["labels"][0].tolist() == (batch["target_mapping"][0].argmax(-1) + 10).tolist()
    with pytest.raises(Exception, match="num_predict"):
        permutation_masks(torch.tensor([[0, 1, 2]]), 3)


@pytest.mark.parametrize("kw, words", [
    (dict(parallel_residual=True), "parallel_residual"),
    (dict(norm_placement="post", n_kv_head=2), "n_kv_head"),
    (dict(norm_placement="post", attention_class="Attention"), "go together"),
])
def test_bad_xl_configs_are_refused(kw, words):
    base = dict(n_layer=1, n_head=4, n_embd=32, position="relative_xl", attention_class="RelativeXLAttention")
    with pytest.raises(ConfigError, match=words):
        Config(**{**base, **kw})
    with pytest.raises(ConfigError, match="only apply to position='relative_xl'"):
        Config(mem_len=16)
