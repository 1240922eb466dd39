"""PretrainingModel (BERT MLM + NSP, ALBERT MLM + SOP) against transformers' *ForPreTraining, its loss, training
and our own checkpoint format."""
import pytest
import torch
import transformers as T

from allformers import load
from allformers.config import Config
from allformers.errors import ConfigError
from allformers.models import PretrainingModel, build_model, pretraining_loss
from allformers.models.pretraining import Pretraining, pretraining_losses
from allformers.objectives import MLMMasker, build_nsp_examples, build_sop_examples

VOCAB = 99
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
             max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _hf(kind):
    torch.manual_seed(0)
    if kind == "bert":
        model = T.BertForPreTraining(T.BertConfig(**SMALL))
    else:
        model = T.AlbertForPreTraining(T.AlbertConfig(**SMALL, embedding_size=16, classifier_dropout_prob=0.0))
    with torch.no_grad():  # weights far from init so both heads' outputs are far from trivial
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    return model.eval()


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 9:] = 0
    types = torch.zeros_like(ids)
    types[:, 10:] = 1
    labels = torch.full_like(ids, -100)
    labels[:, 2:6] = ids[:, 2:6]
    return ids, mask, types, labels, torch.tensor([0, 1, 1])


@pytest.mark.parametrize("kind", ["bert", "albert"])
def test_pretraining_parity_import_export_and_loss(kind, tmp_path):
    hf = _hf(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours, report = load(tmp_path / "hf", return_report=True)
    assert isinstance(ours, PretrainingModel) and ours.config.task == "pretraining"
    assert not report.missing and not report.unexpected
    ids, mask, types, labels, pair = _batch()
    kw = dict(attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        ref = hf(ids, labels=labels, **{("next_sentence_label" if kind == "bert" else "sentence_order_label"): pair},
                 **kw)
        mlm, pair_logits = ours(ids, **kw)
        batch = dict(input_ids=ids, labels=labels, next_sentence_label=pair, **kw)
        loss = pretraining_loss(ours, batch)
    keep = mask.bool()
    mlm_err = (mlm[keep] - ref.prediction_logits[keep]).abs().max().item()
    pair_ref = ref.seq_relationship_logits if kind == "bert" else ref.sop_logits
    pair_err = (pair_logits - pair_ref).abs().max().item()
    print(f"{kind}: mlm max err {mlm_err:.2e}, pair max err {pair_err:.2e}, loss {loss.item():.5f} vs {ref.loss.item():.5f}")
    assert mlm.shape == (3, 20, VOCAB) and pair_logits.shape == (3, 2)
    assert mlm_err <= 1e-4 and pair_err <= 1e-4
    assert pair_ref.abs().max() > 0.05  # the pair head is not trivially zero
    assert abs(loss.item() - ref.loss.item()) <= 1e-4  # HF's total: MLM + NSP/SOP cross-entropy

    # export back to a transformers folder that the *ForPreTraining class loads with the same outputs
    ours.save(tmp_path / "back", format="hf")
    hf2 = type(hf).from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        out2 = hf2(ids, **kw)
    assert (out2.prediction_logits[keep] - ref.prediction_logits[keep]).abs().max() <= 1e-4
    assert ((out2.seq_relationship_logits if kind == "bert" else out2.sop_logits) - pair_ref).abs().max() <= 1e-4


def test_pretraining_config_switch():
    c = Config(task="pretraining", causal=False, vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=16)
    assert c.lm_head  # derived: the MLM head is part of the model
    assert c.replace(n_layer=2).lm_head
    with pytest.raises(ConfigError, match="lm_head=True"):
        Config(task="pretraining", lm_head=False, n_embd=16, n_head=2)
    with pytest.raises(ConfigError, match="num_labels=2"):
        Config(task="pretraining", num_labels=3, n_embd=16, n_head=2)
    assert isinstance(build_model(c), PretrainingModel)
    with pytest.raises(ConfigError):
        PretrainingModel(c.replace(task="lm"))


def _bert_tiny(**kw):
    return Config(task="pretraining", causal=False, norm_placement="post", embedding_norm=True, head_transform=True,
                  lm_head_bias=True, type_vocab_size=2, vocab_size=60, block_size=32, n_layer=2, n_head=2, n_embd=32,
                  intermediate_size=64, **kw)


def _toy_pretraining_batch(task):
    docs = [[[10 + d, 20 + s, 30 + (d * s) % 20] for s in range(6)] for d in range(6)]
    build = build_nsp_examples if task == "nsp" else build_sop_examples
    ex = build(docs, num_examples=16, max_length=16, cls_id=1, sep_id=2, pad_id=0, seed=0)
    masker = MLMMasker(mask_id=3, vocab_size=60, special_ids=(0, 1, 2), mlm_probability=0.3)
    return masker.apply(ex, torch.Generator().manual_seed(0))


class _Fixed:
    """A Trainer data source that hands out the same toy batch every step."""

    def __init__(self, batch):
        self.batch = batch

    def sample(self, n):
        assert n == len(self.batch["input_ids"])
        return self.batch


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_pretraining_loss_decreases_with_trainer(task):
    from allformers.training import TrainConfig, Trainer

    torch.manual_seed(0)
    model = PretrainingModel(_bert_tiny())
    batch = _toy_pretraining_batch(task)
    objective = Pretraining()
    assert objective.num_tokens(batch) == int(batch["attention_mask"].sum()) == pretraining_loss.num_tokens(batch)
    with torch.no_grad():
        before = pretraining_losses(model, batch)
    cfg = TrainConfig(max_steps=30, batch_size=16, lr=3e-3, min_lr=3e-3, warmup_steps=0, eval_interval=0,
                      eval_at_start=False, log_interval=1000, device="cpu", weight_decay=0.0)
    Trainer(model, objective, _Fixed(batch), cfg, progress=False).fit()
    with torch.no_grad():
        after = pretraining_losses(model, batch)
    print(f"{task}: mlm {before['mlm']:.3f}->{after['mlm']:.3f}, pair {before['pair']:.3f}->{after['pair']:.3f}")
    assert after["mlm"] < 0.7 * before["mlm"] and after["pair"] < before["pair"]


def test_pretraining_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = PretrainingModel(_bert_tiny()).eval()
    batch = _toy_pretraining_batch("nsp")
    model.save(tmp_path / "m")
    back = load(tmp_path / "m")
    assert isinstance(back, PretrainingModel)
    with torch.no_grad():
        a = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
        b = back(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the decoder stays tied to the word embeddings after loading
    assert back.body.lm_head is None and back.body.head(torch.zeros(1, 1, 32)).shape[-1] == 60


def test_pretraining_batch_without_pair_label_is_refused():
    from allformers.objectives import ObjectiveError

    model = PretrainingModel(_bert_tiny())
    batch = _toy_pretraining_batch("nsp")
    del batch["next_sentence_label"]
    with pytest.raises(ObjectiveError, match="next_sentence_label"):
        pretraining_loss(model, batch)
