"""ALBERT, DistilBERT and XLM with every head against tiny random `transformers` models: import and export."""
import json

import pytest
import torch
import transformers as T

from allformers import load
from allformers.errors import CheckpointError

VOCAB = 99


def _cfg(kind):
    if kind == "albert":  # factorized: embedding_size < hidden_size
        return T.AlbertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                              embedding_size=16, vocab_size=VOCAB, max_position_embeddings=64)
    if kind in ("distilbert", "distilbert-sin"):
        return T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB,
                                  max_position_embeddings=64, sinusoidal_pos_embds=kind == "distilbert-sin")
    if kind in ("xlm", "xlm-1lang"):  # 2 languages: language ids are our token types
        return T.XLMConfig(emb_dim=32, n_layers=2, n_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                           n_langs=1 if kind == "xlm-1lang" else 2)
    raise ValueError(kind)


PREFIX = {"albert": "Albert", "distilbert": "DistilBert", "distilbert-sin": "DistilBert", "xlm": "XLM",
          "xlm-1lang": "XLM"}
HEADS = ("ForMaskedLM", "Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
CASES = [(k, h) for k in ("albert", "distilbert", "xlm") for h in HEADS]
CASES += [("distilbert-sin", "ForMaskedLM"), ("xlm-1lang", "ForMaskedLM"), ("xlm-1lang", "ForSequenceClassification")]


def _cls(kind, head):
    name = PREFIX[kind] + head
    if kind.startswith("xlm"):
        name = {"XLMForMaskedLM": "XLMWithLMHeadModel", "XLMForQuestionAnswering": "XLMForQuestionAnsweringSimple"}.get(
            name, name)
    return getattr(T, name)


def _outputs(model_out, head):
    if head == "Model":
        return model_out.last_hidden_state
    if head == "ForQuestionAnswering":
        return torch.stack([model_out.start_logits, model_out.end_logits], -1)
    return model_out.logits


def _inputs(types=2):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # right padding, as encoders are fed
    mask[2, 9:] = 0
    tt = torch.zeros_like(ids)
    if types > 1:
        tt[:, 10:] = 1
    return ids, mask, tt


def _hf_kwargs(model_type, mask, types):
    """Each HF family names the token types differently: XLM calls them languages, DistilBERT has none."""
    if model_type == "xlm":
        return dict(attention_mask=mask, langs=types)
    if model_type == "distilbert":
        return dict(attention_mask=mask)
    return dict(attention_mask=mask, token_type_ids=types)


def _hf_model(kind, head):
    torch.manual_seed(0)
    hf = _cls(kind, head)(_cfg(kind)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if kind == "distilbert-sin" and "position_embeddings" in name:
                continue  # the fixed sinusoidal table
            if p.dim() >= 2:
                p.normal_(0, 0.1)
            else:  # nonzero biases and norms off 1, so a vector mapped to the wrong place shows
                p.add_(torch.randn_like(p) * 0.05)
    return hf


@pytest.mark.parametrize("kind, head", CASES)
def test_parity_import_and_export(kind, head, tmp_path):
    hf = _hf_model(kind, head)
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    model_type = hf.config.model_type
    has_types = model_type == "albert" or kind == "xlm"
    ids, mask, types = _inputs(2 if has_types else 1)
    with torch.no_grad():
        ref = _outputs(hf(ids, **_hf_kwargs(model_type, mask, types)), head)
        kw = dict(attention_mask=mask, token_type_ids=types if has_types else None)
        got = ours(ids, **kw)
        if head == "Model":  # a bare backbone gives HF's last_hidden_state
            got = got.last_hidden_state
        got = torch.stack(got, -1) if head == "ForQuestionAnswering" else got
    keep = mask.bool() if ref.shape[:2] == ids.shape else slice(None)  # token outputs: real tokens only
    diff = (ref[keep] - got[keep]).abs().max().item()
    print(f"{kind} {head} import max|diff| = {diff:.2e}")
    assert diff <= 1e-4
    # export, reload in transformers with the class the folder names, compare again
    ours.save(tmp_path / "out", format="hf")
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    arch = out_cfg["architectures"][0]
    if head in ("ForMaskedLM", "ForSequenceClassification") or model_type != "xlm":
        assert arch == type(hf).__name__  # the family is recognised from the config alone
    # XLM's bare/token/QA models are exactly BERT's (2 languages) or DistilBERT's (1), which claim them first.
    back = getattr(T, arch).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = _outputs(back(ids, **_hf_kwargs(out_cfg["model_type"], mask, types)), head)
    diff = (again[keep] - ref[keep]).abs().max().item()
    print(f"{kind} {head} export ({arch}) max|diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_albert_layers_are_stored_once_and_counted_like_transformers(tmp_path):
    for head in ("ForMaskedLM", "ForSequenceClassification"):
        hf = _hf_model("albert", head)
        hf.save_pretrained(tmp_path / head)
        ours = load(tmp_path / head)
        body = ours if head == "ForMaskedLM" else ours.body
        assert all(b is body.blocks[0] for b in body.blocks)
        assert ours.num_params() == sum(p.numel() for p in hf.parameters())
        ours.save(tmp_path / f"ours-{head}")  # our format: one copy of the shared layer
        from safetensors import safe_open
        with safe_open(str(tmp_path / f"ours-{head}" / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert any(".blocks.0.attn.qkv.weight" in "." + k for k in keys)
        assert not any(".blocks.1." in "." + k for k in keys)
        ours.save(tmp_path / f"hf-{head}", format="hf")
        with safe_open(str(tmp_path / f"hf-{head}" / "model.safetensors"), "pt") as f:
            assert not any("albert_layer_groups.1" in k or "albert_layers.1" in k for k in f.keys())


def test_albert_refuses_what_it_cannot_hold(tmp_path):
    cfg = _cfg("albert")
    cfg.num_hidden_groups = 2
    T.AlbertForMaskedLM(cfg).save_pretrained(tmp_path / "groups")
    with pytest.raises(CheckpointError, match="num_hidden_groups=2"):
        load(tmp_path / "groups")
    cfg = _cfg("albert")
    cfg.embedding_size = cfg.hidden_size
    T.AlbertForMaskedLM(cfg).save_pretrained(tmp_path / "square")
    with pytest.raises(CheckpointError, match="embedding_size == hidden_size"):
        load(tmp_path / "square")


def test_distilbert_sinusoidal_table(tmp_path):
    from transformers.models.distilbert.modeling_distilbert import _create_sinusoidal_embeddings

    from allformers.blocks import SinusoidalPositions

    ref = _create_sinusoidal_embeddings(512, 768, torch.empty(512, 768))
    assert (SinusoidalPositions(512, 768).table - ref).abs().max().item() < 1e-4
    hf = _hf_model("distilbert-sin", "Model")
    hf.save_pretrained(tmp_path / "hf")
    assert load(tmp_path / "hf").config.position == "sinusoidal"
    with torch.no_grad():  # a table that is no longer the sinusoid is refused, not silently replaced
        hf.embeddings.position_embeddings.weight.normal_()
    hf.save_pretrained(tmp_path / "changed")
    with pytest.raises(CheckpointError, match="sinusoidal"):
        load(tmp_path / "changed")


def test_new_families_do_not_claim_each_other():
    from allformers import Config
    from allformers.checkpoints.hf import hf_family

    def family_for(**kw):
        return getattr(hf_family(Config(**kw)), "model_type", None)

    enc = dict(causal=False, norm_placement="post", embedding_norm=True, tie_embeddings=True, lm_head_bias=True,
               norm_eps=1e-12, vocab_size=99, n_embd=32, n_head=4, n_layer=2, block_size=64)
    assert family_for(**enc, type_vocab_size=2, head_transform=True) == "bert"
    assert family_for(**enc, type_vocab_size=2, head_transform=True, embedding_size=16, share_layers="all") == "albert"
    assert family_for(**enc, type_vocab_size=0, head_transform=True) == "distilbert"
    assert family_for(**enc, type_vocab_size=2) == "xlm"  # MLM without the transform
    assert family_for(**enc, type_vocab_size=0) == "xlm"
    assert family_for(**enc, type_vocab_size=2, task="sequence-classification", classifier_dense=False) == "xlm"
    assert family_for(**enc, type_vocab_size=0, task="sequence-classification", classifier_activation="relu") == "distilbert"
    assert family_for(**enc, type_vocab_size=2, task="sequence-classification") == "bert"
    assert family_for(**enc, type_vocab_size=1, head_transform=False) is None  # one language is no language embedding


@pytest.mark.parametrize("name, family, millions", [
    ("bert-base-uncased", "bert", 110), ("roberta-base", "roberta", 125), ("albert-base-v2", "albert", 11.2),
    ("distilbert-base-uncased", "distilbert", 67), ("electra-small-discriminator", "electra", 13.5),
    ("electra-base-generator", "electra", 33.7), ("xlm-mlm-en-2048", "xlm", 667), ("labse", "bert", 470),
    ("all-minilm-l6-v2", "bert", 22.6)])
def test_zoo_encoders_have_their_size_and_export_to_their_family(name, family, millions):
    from allformers import Config
    from allformers.checkpoints.hf import hf_family
    from allformers.zoo import count_params

    c = Config.from_name(name)
    assert abs(count_params(c) / 1e6 - millions) / millions < 0.01
    assert hf_family(c).model_type == family
