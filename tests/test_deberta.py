"""DeBERTa-v2 / v3 against tiny random `transformers` models: disentangled attention, log-bucketed
relative positions shared by every layer, and every head, imported and exported."""
import pytest
import torch
import transformers as T
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta

from allformers import load
from allformers.blocks.disentangled import DisentangledAttention, DisentangledPositions, log_bucket_position
from allformers.config import Config
from allformers.errors import ConfigError
from allformers.models.lm import TransformerLM

VOCAB = 99
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
             max_position_embeddings=64)
# DeBERTa-v3's settings, scaled down: 8 buckets that stop growing at distance 32, so a 40-token
# batch uses exact, log-spaced and clamped distances.
V3 = dict(relative_attention=True, position_buckets=8, max_relative_positions=32, norm_rel_ebd="layer_norm",
          share_att_key=True, pos_att_type="p2c|c2p", position_biased_input=False)
CONFIGS = {"v3": V3, "hf-defaults": {}, "c2p-only-no-buckets": dict(V3, pos_att_type="c2p", position_buckets=-1)}
HEADS = ("ForMaskedLM", "Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
CASES = ([("v3", h) for h in HEADS] + [("hf-defaults", h) for h in ("ForMaskedLM", "ForSequenceClassification")]
         + [("c2p-only-no-buckets", "ForMaskedLM")])


def _hf(kind, head, **extra):
    torch.manual_seed(0)
    model = getattr(T, "DebertaV2" + head)(T.DebertaV2Config(**SMALL, **CONFIGS[kind], **extra)).eval()
    with torch.no_grad():  # bigger than the default init so every term matters
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    return model


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding, as encoders are fed
    mask[2, 9:] = 0
    return ids, mask


def _ref(out, head):
    if head == "Model":
        return out.last_hidden_state
    if head == "ForQuestionAnswering":
        return torch.stack([out.start_logits, out.end_logits], -1)
    return out.logits


def _max_diff(ref, got, mask):
    keep = mask.bool() if ref.shape[:2] == mask.shape else slice(None)  # token outputs: real tokens only
    return (ref[keep] - got[keep]).abs().max().item()


@pytest.mark.parametrize("kind, head", CASES)
def test_deberta_parity_import_and_export(kind, head, tmp_path):
    hf = _hf(kind, head)
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    ids, mask = _inputs()
    with torch.no_grad():
        ref = _ref(hf(ids, attention_mask=mask), head)
        got = ours(ids, attention_mask=mask)
        if head == "Model":  # a bare backbone gives HF's last_hidden_state
            got = got.last_hidden_state
        got = torch.stack(got, -1) if head == "ForQuestionAnswering" else got
    assert _max_diff(ref, got, mask) <= 1e-4
    # export, reload in transformers, compare again
    ours.save(tmp_path / "out", format="hf")
    back = getattr(T, "DebertaV2" + head).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert _max_diff(ref, _ref(back(ids, attention_mask=mask), head), mask) <= 1e-4


def test_non_legacy_mlm_head_imports(tmp_path):
    """legacy=False checkpoints name the MLM head lm_predictions.lm_head.*; it is the same head."""
    hf = _hf("v3", "ForMaskedLM", legacy=False)
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    ids, mask = _inputs()
    with torch.no_grad():
        assert _max_diff(hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask), mask) <= 1e-4


@pytest.mark.parametrize("extra, option", [
    (dict(embedding_size=16), "embedding_size"),  # HF normalises after a bias-free projection; we before ours
    (dict(conv_kernel_size=3), "conv_kernel_size"),
    (dict(share_att_key=False), "share_att_key"),
    (dict(norm_rel_ebd="none"), "norm_rel_ebd"),
])
def test_unsupported_options_are_refused_by_name(extra, option, tmp_path):
    hf = T.DebertaV2Model(T.DebertaV2Config(**SMALL, **{**V3, **extra}))
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError, match=option):
        load(tmp_path / "hf")


@pytest.mark.parametrize("buckets, max_position", [(256, 512), (8, 32), (16, 64), (6, 100)])
def test_log_buckets_match_transformers(buckets, max_position):
    rel = torch.arange(-3 * max_position, 3 * max_position + 1)
    ref = hf_deberta.make_log_bucket_position(rel, buckets, max_position).long()
    assert torch.equal(log_bucket_position(rel, buckets, max_position), ref)
    # and the table rows the model reads, for a whole sequence (HF: relative_pos + span, clamped)
    T_ = 2 * max_position
    x = torch.zeros(1, T_, 1)
    hf_rel = hf_deberta.build_relative_position(x, x, bucket_size=buckets, max_position=max_position)
    pos = torch.arange(T_)[None]
    rows = DisentangledPositions(4, buckets, max_position, None).relative_index(pos, pos)
    assert torch.equal(rows, (hf_rel + buckets).clamp(0, 2 * buckets - 1))


def _v3_tiny(**kw):
    return Config(n_layer=3, n_head=4, n_embd=32, vocab_size=50, block_size=64, causal=False, norm_placement="post",
                  embedding_norm=True, position="disentangled", attention_class="DisentangledAttention",
                  rel_buckets=16, rel_max_distance=32, **kw)


def test_relative_embeddings_are_one_table_shared_by_every_layer():
    model = TransformerLM(_v3_tiny()).eval()
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if n.startswith("relative.")] == ["relative.emb.weight", "relative.norm.weight",
                                                                 "relative.norm.bias"]
    assert not any("rel" in n or "pos" in n for n in names if n.startswith("blocks."))  # no per-layer tables
    assert model.relative.emb.weight.shape == (2 * 8, 32)
    seen = []
    for block in model.blocks:
        assert isinstance(block.attn, DisentangledAttention)
        block.attn.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["rel_embeddings"]),
                                             with_kwargs=True)
    model(torch.randint(0, 50, (2, 12)))
    assert len(seen) == 3 and all(t is seen[0] for t in seen)  # normalised once, read by every layer
    # and every layer's scores depend on it: the gradient reaches the table through each layer alone
    for i in range(3):
        model.zero_grad()
        x = model.embed_norm(model.wte(torch.randint(0, 50, (1, 12))))
        rel = model.relative(torch.arange(12)[None], torch.arange(12)[None])
        model.blocks[i](x, mask=None, **rel).sum().backward()
        assert model.relative.emb.weight.grad.abs().sum() > 0


def test_bucket_defaults_follow_the_scheme():
    # one vocabulary, each scheme's published default: DeBERTa 256 buckets a side up to 512, T5 32 up to 128
    d = Config(position="disentangled", causal=False)
    assert (d.rel_buckets, d.rel_max_distance) == (512, 512)
    t = Config(position="relative_bias", causal=False)
    assert (t.rel_buckets, t.rel_max_distance) == (32, 128)
    assert Config.from_dict(d.to_dict()) == d


def test_config_switches_go_together():
    # the attention class follows from the position scheme (issue 11); a contradicting one is refused
    assert Config(position="disentangled", causal=False).attention_class == "DisentangledAttention"
    with pytest.raises(ConfigError, match="attention_class"):
        Config(position="disentangled", attention_class="Attention", causal=False)
    with pytest.raises(ConfigError, match="position"):
        Config(attention_class="DisentangledAttention", causal=False)
    with pytest.raises(ConfigError, match="pos_att_type"):
        _v3_tiny(pos_att_type="c2p|p2p")
    with pytest.raises(ConfigError, match="n_kv_head"):
        _v3_tiny(n_kv_head=2)
    with pytest.raises(ConfigError, match="rel_buckets"):
        _v3_tiny().replace(rel_max_distance=4)
    with pytest.raises(ConfigError, match="must be even"):
        _v3_tiny().replace(rel_buckets=15)
    c = _v3_tiny(pos_att_type="p2c")
    assert Config.from_dict(c.to_dict()) == c


# microsoft/deberta-v3-base's config.json (the released checkpoint; no architectures entry)
V3_BASE = {"model_type": "deberta-v2", "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
           "max_position_embeddings": 512, "relative_attention": True, "position_buckets": 256,
           "norm_rel_ebd": "layer_norm", "share_att_key": True, "pos_att_type": "p2c|c2p", "layer_norm_eps": 1e-7,
           "max_relative_positions": -1, "position_biased_input": False, "num_attention_heads": 12,
           "num_hidden_layers": 12, "type_vocab_size": 0, "vocab_size": 128100}


def test_zoo_deberta_v3_base_is_the_released_config():
    from allformers.checkpoints.hf import config_from_hf
    from allformers.zoo import count_params

    imported = config_from_hf(V3_BASE)  # no architectures: a bare backbone (DebertaV2Model, no pooler)
    zoo = Config.from_name("deberta-v3-base", task="base", classifier_dense=False)
    skip = {"name", "description", "family", "pooling", "pos_att_type", "lm_head"}
    assert {k: v for k, v in imported.to_dict().items() if k not in skip} == \
        {k: v for k, v in zoo.to_dict().items() if k not in skip}
    assert set(imported.pos_att_type.split("|")) == set(zoo.pos_att_type.split("|"))
    with torch.device("meta"):
        hf = T.DebertaV2Model(T.DebertaV2Config(**V3_BASE))
    assert count_params(zoo) == sum(p.numel() for p in hf.parameters())


def test_configs_saved_with_the_old_bucket_names_still_load():
    """position_buckets / max_relative_positions became rel_buckets / rel_max_distance (one vocabulary with
    T5's). Every older config.json has both old fields; only a disentangled one reads them."""
    old = {k: v for k, v in _v3_tiny().to_dict().items() if k not in ("rel_buckets", "rel_max_distance")}
    loaded = Config.from_dict({**old, "position_buckets": 8, "max_relative_positions": 32, "rel_buckets": 32,
                               "rel_max_distance": 128})
    assert (loaded.rel_buckets, loaded.rel_max_distance) == (16, 32) and loaded == _v3_tiny()
    t5 = Config.from_name("t5-small")
    again = Config.from_dict({**t5.to_dict(), "position_buckets": 256, "max_relative_positions": 512})
    assert again == t5 and again.rel_buckets == 32
