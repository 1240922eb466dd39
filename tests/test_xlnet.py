"""XLNet against tiny random `transformers` models (XLNetLMHeadModel and its heads), import and export:
relative attention (bi and uni), padding, segments, two-stream attention with perm_mask and
target_mapping, and mems carried from a previous call."""
import pytest
import torch
import transformers as T

from allformers import load

VOCAB = 99
SMALL = dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=64)
TOL = 1e-4


def _hf(head="LMHeadModel", **extra):
    torch.manual_seed(0)
    model = getattr(T, "XLNet" + head)(T.XLNetConfig(**SMALL, **extra)).eval()
    with torch.no_grad():  # bigger than the default init so every term (u, v, segments, mask_emb) matters
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _both_ways(hf, tmp_path):
    """Our import of `hf`, and transformers' reload of our export of it."""
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    ours.save(tmp_path / "out", format="hf")
    back = type(hf).from_pretrained(tmp_path / "out").eval()
    return ours, back


def _ids(B=3, T_=11, seed=0):
    return torch.randint(6, VOCAB, (B, T_), generator=torch.Generator().manual_seed(seed))


def _rowwise(model):
    """HF's attn_type="uni" adds a batched data mask (padding, perm_mask) in place to its (T, S, 1, 1) causal
    mask and fails for B > 1; ask it one row at a time then."""
    def call(ids, **kw):
        if model.config.attn_type != "uni" or ids.shape[0] == 1 or not ({"attention_mask", "perm_mask"} & set(kw)):
            return model(ids, **kw)
        def row(k, v, b):
            if k == "mems":  # (M, B, C) per layer
                return [m[:, b:b + 1] for m in v]
            return v[b:b + 1] if torch.is_tensor(v) else v

        rows = [model(ids[b:b + 1], **{k: row(k, v, b) for k, v in kw.items()}) for b in range(ids.shape[0])]
        return type(rows[0])(logits=torch.cat([r.logits for r in rows]))
    return call


def _diff(a, b, keep=slice(None)):
    return (a[keep] - b[keep]).abs().max().item()


@pytest.mark.parametrize("extra", [{}, dict(attn_type="uni"), dict(bi_data=True, clamp_len=4),
                                   dict(attn_type="uni", same_length=True), dict(ff_activation="relu", tie_word_embeddings=False)],
                         ids=["bi", "uni", "bi_data-clamp", "uni-same_length", "relu-untied"])
def test_lm_parity_plain_padding_and_segments(extra, tmp_path):
    hf = _hf(**extra)
    ours, back = _both_ways(hf, tmp_path)
    ids = _ids(B=4)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding (XLNet's tokenizer pads on the left)
    mask[2, 8:] = 0  # and right padding
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    types[3, 2:5] = 1
    with torch.no_grad():
        for kw in (dict(), dict(attention_mask=mask), dict(token_type_ids=types), dict(attention_mask=mask, token_type_ids=types)):
            ref = _rowwise(hf)(ids, **kw).logits
            keep = mask.bool() if "attention_mask" in kw else slice(None)
            assert _diff(ref, ours(ids, **kw), keep) <= TOL, kw
            assert _diff(ref, _rowwise(back)(ids, **kw).logits, keep) <= TOL, kw


def _perm_inputs(B, T_, P, seed=0):
    """A random factorisation order per row; the last P tokens of each order are the targets."""
    from allformers.objectives.permutation_lm import permutation_masks

    g = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(T_, generator=g) for _ in range(B)])
    perm_mask, target_mapping, _ = permutation_masks(orders, P)
    return perm_mask, target_mapping


@pytest.mark.parametrize("extra", [{}, dict(attn_type="uni")], ids=["bi", "uni"])
def test_two_stream_parity_with_perm_mask_and_target_mapping(extra, tmp_path):
    hf = _hf(**extra)
    ours, back = _both_ways(hf, tmp_path)
    ids = _ids()
    perm_mask, target_mapping = _perm_inputs(3, 11, 4)
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    with torch.no_grad():
        for kw in (dict(perm_mask=perm_mask), dict(perm_mask=perm_mask, target_mapping=target_mapping),
                   dict(perm_mask=perm_mask, target_mapping=target_mapping, token_type_ids=types)):
            ref = _rowwise(hf)(ids, **kw).logits
            got = ours(ids, **kw)
            assert got.shape == ref.shape, kw  # (B, P, V) with target_mapping: the query stream only
            assert _diff(ref, got) <= TOL, kw
            assert _diff(ref, _rowwise(back)(ids, **kw).logits) <= TOL, kw


@pytest.mark.parametrize("extra", [dict(mem_len=5), dict(mem_len=None), dict(mem_len=7, reuse_len=4, attn_type="uni")],
                         ids=["mem_len-5", "keep-all", "reuse_len-uni"])
def test_mems_from_a_previous_call(extra, tmp_path):
    hf = _hf(**extra)
    ours, back = _both_ways(hf, tmp_path)
    first, second = _ids(T_=9, seed=1), _ids(T_=6, seed=2)
    perm_mask, target_mapping = _perm_inputs(3, 6, 2)
    with torch.no_grad():
        out1 = hf(first, use_mems=True)
        # mem_len=None: HF keeps every past token, as our generation cache does (our config says mem_len=0)
        new = ours.new_cache if extra["mem_len"] is None else ours.new_memory
        memory = new()
        assert _diff(out1.logits, ours(first, cache=memory)) <= TOL
        for layer, ref_mem in zip(memory.layers, out1.mems):  # the memory is HF's mems, batch first
            assert layer.shape == ref_mem.transpose(0, 1).shape and _diff(ref_mem.transpose(0, 1), layer) <= TOL
        for kw in (dict(), dict(perm_mask=perm_mask, target_mapping=target_mapping)):
            ref = _rowwise(hf)(second, mems=out1.mems, use_mems=True, **kw).logits
            again = new()
            ours(first, cache=again)
            assert _diff(ref, ours(second, cache=again, **kw)) <= TOL, kw
            mems = back(first, use_mems=True).mems
            assert _diff(ref, _rowwise(back)(second, mems=mems, use_mems=True, **kw).logits) <= TOL, kw


def _head_out(out, head):
    if head == "Model":
        return out.last_hidden_state
    if head == "ForQuestionAnsweringSimple":
        return torch.stack([out.start_logits, out.end_logits], -1)
    return out.logits


@pytest.mark.parametrize("head", ["ForSequenceClassification", "ForTokenClassification", "ForQuestionAnsweringSimple",
                                  "Model"])
def test_task_heads_parity(head, tmp_path):
    hf = _hf(head, num_labels=3 if head != "ForQuestionAnsweringSimple" else 2)
    ours, back = _both_ways(hf, tmp_path)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the classifier reads the last position, a real token
    mask[2, :7] = 0
    types = torch.zeros_like(ids)
    types[:, 7:] = 1
    kw = dict(attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        ref = _head_out(hf(ids, **kw), head)
        if head == "Model":  # a bare backbone loads as an encoder; compare its token states
            got = ours.body(ids, return_hidden=True, **kw)
        else:
            got = ours(ids, **kw)
            got = torch.stack(got, -1) if head == "ForQuestionAnsweringSimple" else got
        assert got.shape == ref.shape
        keep = mask.bool() if ref.shape[:2] == ids.shape else slice(None)
        assert _diff(ref, got, keep) <= TOL
        assert _diff(ref, _head_out(back(ids, **kw), head), keep) <= TOL
