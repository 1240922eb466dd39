"""Encoders and their task heads against tiny random `transformers` models: import and export."""
import pytest
import torch
import transformers as T

from allformers import load

VOCAB = 99
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
             max_position_embeddings=64)


def _cfg(kind):
    if kind == "bert":
        return T.BertConfig(**SMALL)
    if kind == "roberta":
        return T.RobertaConfig(**SMALL, pad_token_id=1)
    if kind == "electra":
        return T.ElectraConfig(**SMALL, embedding_size=16)
    raise ValueError(kind)


CASES = [(k, head) for k in ("bert", "roberta", "electra")
         for head in ("ForMaskedLM", "Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")]
CASES.append(("electra", "ForPreTraining"))


def _outputs(model_out, head):
    if head == "Model":
        return model_out.last_hidden_state
    if head == "ForQuestionAnswering":
        return torch.stack([model_out.start_logits, model_out.end_logits], -1)
    return model_out.logits


def _ours(out, head):
    if head == "ForQuestionAnswering":
        return torch.stack(out, -1)
    if head == "Model":
        return out.last_hidden_state
    return out


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # right padding, as encoders are fed
    mask[2, 9:] = 0
    types = torch.zeros_like(ids)
    types[:, 10:] = 1
    return ids, mask, types


@pytest.mark.parametrize("kind, head", CASES)
def test_encoder_parity_import_and_export(kind, head, tmp_path):
    torch.manual_seed(0)
    cls = getattr(T, {"bert": "Bert", "roberta": "Roberta", "electra": "Electra"}[kind] + head)
    hf_cfg = _cfg(kind)
    if kind == "roberta":
        hf_cfg.type_vocab_size = 1
    hf = cls(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    ids, mask, types = _inputs()
    if kind == "roberta":
        types = torch.zeros_like(ids)
        mask = torch.ones_like(ids)  # RoBERTa positions differ at padding only; compare the real tokens
    kw = dict(attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        ref = _outputs(hf(ids, **kw), head)
        got = _ours(ours(ids, **kw), head)
    keep = mask.bool() if ref.shape[:2] == ids.shape else slice(None)  # token outputs: real tokens only
    assert (ref[keep] - got[keep]).abs().max().item() <= 1e-4
    # export, reload in transformers, compare again
    ours.save(tmp_path / "out", format="hf")
    back = cls.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (_outputs(back(ids, **kw), head)[keep] - ref[keep]).abs().max().item() <= 1e-4
