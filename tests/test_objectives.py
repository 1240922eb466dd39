"""Pretraining objectives: MLM / dynamic masking / TLM, NSP and SOP, ELECTRA, DistilBERT,
ERNIE's dEA noising and LaBSE's additive-margin ranking loss. Pure tensor tests on tiny models."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from allformers.config import Config
from allformers.models.heads import TaskModel
from allformers.models.lm import TransformerLM
from allformers.objectives import (IGNORE_INDEX, Distillation, Electra, ElectraPretraining, MaskedLM, MaskedLMData,
                                   MLMCollator, MLMMasker, ObjectiveError, SentencePairPrediction,
                                   additive_margin_loss, build_nsp_examples, build_sop_examples, build_tlm_batch,
                                   corrupt, cosine_hidden_loss, dea_loss, dea_noise, distillation_loss, electra_loss,
                                   init_student_from_teacher, mlm_loss, soft_target_loss, tie_embeddings,
                                   translation_ranking_loss)

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
V = 50  # tiny-model vocabulary


def enc_config(**kw):
    """A tiny BERT-style encoder: post-norm, embedding norm, segment embeddings, MLM head."""
    base = dict(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16, causal=False, norm_placement="post",
                embedding_norm=True, type_vocab_size=2, head_transform=True, lm_head_bias=True)
    base.update(kw)
    return Config(**base)


def bert_rows(B, T, vocab, seed=0):
    """[CLS] w ... w [SEP] [PAD] ...: random real lengths, words drawn from the non-special ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), vocab, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)  # (B,) real tokens incl. [CLS] and [SEP]
    pos = torch.arange(T)[None, :]
    attn = (pos < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = SEP
    ids[attn == 0] = PAD
    return ids, attn


# ---------------------------------------------------------------------- MLM masking
def test_mlm_selection_and_80_10_10_rates():
    vocab = 30000
    ids, attn = bert_rows(800, 512, vocab)
    masker = MLMMasker(mask_id=MASK, vocab_size=vocab, special_ids=SPECIALS, pad_id=PAD)
    out, labels = masker(ids, attn, torch.Generator().manual_seed(1))
    eligible = (attn == 1) & (ids >= len(SPECIALS))
    sel = labels != IGNORE_INDEX
    assert eligible.sum() > 100_000
    rate = (sel.sum() / eligible.sum()).item()
    assert abs(rate - 0.15) < 0.01, rate
    assert not (sel & ~eligible).any()  # special and padding tokens never selected
    assert torch.equal(labels[sel], ids[sel]) and (labels[~sel] == IGNORE_INDEX).all()
    assert torch.equal(out[~sel], ids[~sel])  # nothing changes outside the selection
    # padding is known by attention_mask alone, whatever id it holds
    _, labels_pad = masker(torch.where(attn == 1, ids, 7), attn, torch.Generator().manual_seed(1))
    assert torch.equal(labels_pad, labels)
    n = sel.sum().item()
    masked = ((out == MASK) & sel).sum().item() / n
    random_ = ((out != MASK) & (out != ids) & sel).sum().item() / n
    kept = ((out == ids) & sel).sum().item() / n
    assert abs(masked - 0.8) < 0.01 and abs(random_ - 0.1) < 0.01 and abs(kept - 0.1) < 0.01, (masked, random_, kept)
    replaced = out[(out != MASK) & (out != ids) & sel]
    assert replaced.min() >= len(SPECIALS)  # random tokens are never special
    print(f"MLM: {eligible.sum().item()} eligible tokens, selected {rate:.4f}; "
          f"mask {masked:.4f} / random {random_:.4f} / unchanged {kept:.4f}")


def test_mlm_random_tokens_uniform_over_non_special_vocab():
    vocab = 12  # specials 0..4, words 5..11
    ids = torch.full((400, 500), 5)
    masker = MLMMasker(mask_id=MASK, vocab_size=vocab, special_ids=SPECIALS, mlm_probability=0.5)
    out, labels = masker(ids, generator=torch.Generator().manual_seed(0))
    sel = labels != IGNORE_INDEX
    changed = out[sel & (out != MASK) & (out != 5)]
    counts = torch.bincount(changed, minlength=vocab).float()
    assert counts[:6].sum() == 0  # never special, never [MASK]
    share = counts[6:] / counts[6:].sum()
    assert (share - 1 / 6).abs().max() < 0.01, share  # uniform over the 6 other words
    # 10% kept plus the random draws that hit the original word (1 in 7)
    kept = ((out == 5) & sel).sum().item() / sel.sum().item()
    assert abs(kept - (0.1 + 0.1 / 7)) < 0.01, kept


def test_mlm_configurable_rates_and_exact_selection():
    ids, attn = bert_rows(200, 128, 1000, seed=3)
    m20 = MLMMasker(mask_id=MASK, vocab_size=1000, special_ids=SPECIALS, mlm_probability=0.2,
                    mask_prob=1.0, random_prob=0.0)
    out, labels = m20(ids, attn, torch.Generator().manual_seed(0))
    eligible = (attn == 1) & (ids >= len(SPECIALS))
    sel = labels != IGNORE_INDEX
    assert abs(sel.sum().item() / eligible.sum().item() - 0.2) < 0.01
    assert (out[sel] == MASK).all()  # mask_prob=1: every selected token is [MASK]
    exact = MLMMasker(mask_id=MASK, vocab_size=1000, special_ids=SPECIALS, exact=True, max_predictions=20)
    _, labels = exact(ids, attn, torch.Generator().manual_seed(0))
    n = eligible.sum(-1).double()
    want = torch.round(n * 0.15).long().clamp(min=1, max=20)
    assert torch.equal((labels != IGNORE_INDEX).sum(-1), want)
    assert not ((labels != IGNORE_INDEX) & ~eligible).any()
    with pytest.raises(ObjectiveError, match="sum to at most 1"):
        MLMMasker(mask_id=MASK, vocab_size=10, mask_prob=0.8, random_prob=0.3)
    with pytest.raises(ObjectiveError, match="outside the vocabulary"):
        MLMMasker(mask_id=10, vocab_size=10)


def test_mlm_generator_makes_masking_reproducible():
    ids, attn = bert_rows(8, 64, 500)
    masker = MLMMasker(mask_id=MASK, vocab_size=500, special_ids=SPECIALS)
    a = masker(ids, attn, torch.Generator().manual_seed(7))
    b = masker(ids, attn, torch.Generator().manual_seed(7))
    c = masker(ids, attn, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_masker_from_tokenizer_reads_special_tokens():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from allformers.tokenization.tokenizer import Tokenizer

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "the": 5, "cat": 6, "sat": 7}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = Tokenizer(backend, pad_token="[PAD]")
    masker = MLMMasker.from_tokenizer(tok)
    assert masker.mask_id == 4 and masker.pad_id == 0 and set(masker.special_ids) == {0, 1, 2, 3, 4}
    assert masker._random_pool.tolist() == [5, 6, 7]
    with pytest.raises(ObjectiveError, match="no '<mask>' token"):
        MLMMasker.from_tokenizer(tok, mask_token="<mask>")


def test_dynamic_masking_changes_across_epochs_static_does_not():
    ids, attn = bert_rows(64, 32, 1000, seed=5)
    masker = MLMMasker(mask_id=MASK, vocab_size=1000, special_ids=SPECIALS)

    def epoch_labels(data):
        return torch.cat([b["labels"] for b in data.epoch(16, shuffle=False)])

    dyn = MaskedLMData({"input_ids": ids, "attention_mask": attn}, masker, dynamic=True, seed=0)
    e1, e2 = epoch_labels(dyn), epoch_labels(dyn)
    differ = (e1 != e2).any(-1).float().mean().item()
    assert differ > 0.9, differ  # a new mask for (almost) every row
    static = MaskedLMData({"input_ids": ids, "attention_mask": attn}, masker, dynamic=False, seed=0)
    s1, s2 = epoch_labels(static), epoch_labels(static)
    assert torch.equal(s1, s2)
    duped = MaskedLMData({"input_ids": ids, "attention_mask": attn}, masker, dynamic=False, dupe_factor=2, seed=0)
    d1, d2, d3 = epoch_labels(duped), epoch_labels(duped), epoch_labels(duped)
    assert not torch.equal(d1, d2) and torch.equal(d1, d3)  # BERT's dupe_factor: k masks, cycled
    # sample() for the Trainer: masked batches with every key, state round-trips exactly
    state = dyn.state_dict()
    a = dyn.sample(4)
    dyn.load_state_dict(state)
    b = dyn.sample(4)
    assert set(a) == {"input_ids", "attention_mask", "labels"} and torch.equal(a["input_ids"], b["input_ids"])
    collate = MLMCollator(masker, seed=0)
    batch = {"input_ids": ids[:4], "attention_mask": attn[:4]}
    assert not torch.equal(collate(batch)["labels"], collate(batch)["labels"])


def test_mlm_loss_is_cross_entropy_on_selected_positions_and_trains():
    torch.manual_seed(0)
    model = TransformerLM(enc_config())
    ids, attn = bert_rows(6, 24, V, seed=2)
    masker = MLMMasker(mask_id=MASK, vocab_size=V, special_ids=SPECIALS)
    batch = masker.apply({"input_ids": ids, "attention_mask": attn}, torch.Generator().manual_seed(0))
    loss = mlm_loss(model, batch)
    logits = model(batch["input_ids"], attention_mask=attn)
    sel = batch["labels"] != IGNORE_INDEX
    manual = -F.log_softmax(logits[sel], -1).gather(1, batch["labels"][sel, None]).mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    loss.backward()
    assert model.wte.weight.grad.abs().sum() > 0
    none = {**batch, "labels": torch.full_like(ids, IGNORE_INDEX)}
    zero = mlm_loss(model, none)
    assert zero.item() == 0.0 and zero.requires_grad  # no selected token: 0, not NaN


def test_mlm_objective_runs_in_the_trainer():
    from allformers.training.trainer import Trainer, TrainConfig

    torch.manual_seed(0)
    ids, attn = bert_rows(32, 24, V, seed=4)
    data = MaskedLMData({"input_ids": ids, "attention_mask": attn},
                        MLMMasker(mask_id=MASK, vocab_size=V, special_ids=SPECIALS), seed=0)
    trainer = Trainer(TransformerLM(enc_config()), MaskedLM(), data,
                      TrainConfig(max_steps=3, batch_size=4, grad_accum=2, warmup_steps=1, device="cpu"),
                      progress=False)
    before = trainer.raw_model.wte.weight.detach().clone()
    for _ in range(2):
        loss, tokens, seq = trainer.train_step()  # sample -> split into micro-batches -> loss -> step
        assert math.isfinite(loss.item()) and seq == 24
    assert 4 * 12 <= tokens <= 4 * 24  # MaskedLM.num_tokens: the real tokens of the 4 rows
    assert not torch.equal(before, trainer.raw_model.wte.weight)


# ---------------------------------------------------------------------- TLM
def test_tlm_layout_positions_restart_and_language_ids():
    batch = build_tlm_batch([[10, 11, 12], [13]], [[20, 21], [22, 23, 24]], 0, 1, eos_id=SEP, pad_id=PAD)
    assert batch["input_ids"][0].tolist() == [SEP, 10, 11, 12, SEP, SEP, 20, 21, SEP]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert batch["token_type_ids"][0].tolist() == [0] * 5 + [1] * 4
    assert batch["input_ids"][1].tolist() == [SEP, 13, SEP, SEP, 22, 23, 24, SEP, PAD]
    assert batch["position_ids"][1].tolist()[:8] == [0, 1, 2, 0, 1, 2, 3, 4]
    assert batch["attention_mask"][1].tolist() == [1] * 8 + [0]
    masker = MLMMasker(mask_id=MASK, vocab_size=V, special_ids=SPECIALS, mlm_probability=0.5)
    masked = masker.apply(batch, torch.Generator().manual_seed(0))
    assert ((masked["labels"] != IGNORE_INDEX) <= (batch["input_ids"] >= 10)).all()  # never </s> or padding
    torch.manual_seed(0)
    model = TransformerLM(enc_config(type_vocab_size=2))  # two languages
    loss = mlm_loss(model, masked)
    loss.backward()
    assert math.isfinite(loss.item()) and model.wtt.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- NSP / SOP
def make_documents(n_docs=300, seed=0):
    """Token ids encode (document, order): doc d's k-th token is 1000 + 100 d + k, so a span is
    contiguous text of one document exactly when its ids go up by one."""
    import random

    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        tokens = list(range(1000 + 100 * d, 1000 + 100 * d + rng.randint(6, 40)))
        sents, i = [], 0
        while i < len(tokens):
            k = rng.randint(1, 6)
            sents.append(tokens[i:i + k])
            i += k
        docs.append(sents)
    return docs


def segments(batch, i):
    ids, types, mask = batch["input_ids"][i], batch["token_type_ids"][i], batch["attention_mask"][i]
    n = int(mask.sum())
    ids, types = ids[:n].tolist(), types[:n].tolist()
    a_end = types.index(1)
    assert ids[0] == CLS and ids[a_end - 1] == SEP and ids[-1] == SEP
    assert all(t == 0 for t in types[:a_end]) and all(t == 1 for t in types[a_end:])
    return ids[1:a_end - 1], ids[a_end:-1]


def contiguous(seq):
    return all(b == a + 1 for a, b in zip(seq, seq[1:]))


def test_nsp_labels_balanced_and_negatives_from_another_document():
    batch = build_nsp_examples(make_documents(), num_examples=10_000, max_length=512, cls_id=CLS, sep_id=SEP,
                               pad_id=PAD, seed=0)
    labels = batch["next_sentence_label"]
    assert len(labels) == 10_000 and abs(labels.float().mean().item() - 0.5) <= 0.02
    for i in range(len(labels)):
        a, b = segments(batch, i)
        assert a and b and contiguous(a) and contiguous(b)
        if labels[i] == 0:  # IsNext: B continues A in the same document
            assert contiguous(a + b)
        else:  # NotNext: B comes from another document
            assert (a[0] - 1000) // 100 != (b[0] - 1000) // 100


def test_sop_labels_balanced_and_negatives_are_exactly_swapped():
    batch = build_sop_examples(make_documents(), num_examples=10_000, max_length=512, cls_id=CLS, sep_id=SEP,
                               pad_id=PAD, seed=1)
    labels = batch["sentence_order_label"]
    assert abs(labels.float().mean().item() - 0.5) <= 0.02
    for i in range(len(labels)):
        a, b = segments(batch, i)
        if labels[i] == 0:
            assert contiguous(a + b)
        else:  # the same two consecutive segments, in the other order
            assert contiguous(b + a) and not contiguous(a + b)


def test_pair_truncation_and_errors():
    batch = build_nsp_examples(make_documents(50), num_examples=200, max_length=16, cls_id=CLS, sep_id=SEP,
                               pad_id=PAD, short_seq_prob=0.1)
    assert batch["attention_mask"].sum(-1).max() <= 16
    for i in range(200):
        a, b = segments(batch, i)
        assert a and b
    with pytest.raises(ObjectiveError, match="another document"):
        build_nsp_examples([[[10, 11], [12]]], cls_id=CLS, sep_id=SEP, pad_id=PAD)
    with pytest.raises(ObjectiveError, match="two non-empty sentences"):
        build_sop_examples([[[10, 11]], [[12]]], cls_id=CLS, sep_id=SEP, pad_id=PAD)
    with pytest.raises(ObjectiveError, match="cls_id"):
        build_sop_examples(make_documents(3))


def test_sentence_pair_loss_backpropagates():
    torch.manual_seed(0)
    docs = [[[5 + (d * 7 + k) % 40 for k in range(j, j + 3)] for j in range(4)] for d in range(8)]
    batch = build_sop_examples(docs, num_examples=8, max_length=32, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    model = TaskModel(enc_config(task="sequence-classification", num_labels=2))
    loss = SentencePairPrediction()(model, batch)
    loss.backward()
    assert math.isfinite(loss.item()) and model.head.out.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- ELECTRA
def test_electra_corruption_labels_mark_exactly_the_changed_tokens():
    B, T, Vg = 4, 10, 20
    orig = torch.randint(5, Vg, (B, T), generator=torch.Generator().manual_seed(0))
    selected = torch.zeros(B, T, dtype=torch.bool)
    selected[:, 1:9] = True
    logits = torch.full((B, T, Vg), -1e9)
    same, other, coin = selected.clone(), selected.clone(), selected.clone()
    same[:, 3:] = False  # positions 1, 2: the generator is sure of the original token
    other[:, :3] = False
    other[:, 6:] = False  # positions 3, 4, 5: sure of a different token
    coin[:, :6] = False  # positions 6, 7, 8: 50/50 between the original and a different token
    alt = (orig - 5 + 1) % (Vg - 5) + 5  # always != orig
    logits.scatter_(2, orig[..., None], torch.where(same | coin, 0.0, -1e9)[..., None])
    logits.scatter_(2, alt[..., None], torch.where(other | coin, 0.0, -1e9)[..., None])
    corrupted, replaced = corrupt(orig, selected, logits, torch.Generator().manual_seed(0))
    assert torch.equal(replaced, (corrupted != orig).float())
    assert (replaced[same] == 0).all() and torch.equal(corrupted[same], orig[same])  # sampled the original: label 0
    assert (replaced[other] == 1).all()
    assert (replaced[~selected] == 0).all() and torch.equal(corrupted[~selected], orig[~selected])
    assert 0 < replaced[coin].sum() < coin.sum()  # both outcomes occur and are labelled per token


class OracleGenerator(nn.Module):
    """A stand-in generator whose softmax puts all mass on `answer` (set by the test)."""

    def __init__(self, answer):
        super().__init__()
        self.answer, self.bias = answer, nn.Parameter(torch.zeros(()))

    def forward(self, ids, **kw):
        return F.one_hot(self.answer, V).float() * 1e4 + self.bias  # (B, T, V)


def test_electra_step_with_a_generator_that_samples_the_original():
    ids, attn = bert_rows(4, 16, V, seed=1)
    masker = MLMMasker(mask_id=MASK, vocab_size=V, special_ids=SPECIALS, mlm_probability=0.5)
    batch = masker.apply({"input_ids": ids, "attention_mask": attn}, torch.Generator().manual_seed(0))
    sel = batch["labels"] != IGNORE_INDEX
    answer = ids.clone()  # correct everywhere ...
    flip = sel & (torch.arange(16)[None, :] % 2 == 0)
    answer[flip] = (ids[flip] - 5 + 1) % (V - 5) + 5  # ... except at even masked positions
    disc = TaskModel(enc_config(task="token-classification", num_labels=1))
    pair = ElectraPretraining(OracleGenerator(answer), disc, tie=False)
    loss, parts = electra_loss(pair, batch, return_parts=True)
    assert torch.equal(parts["replaced"], flip.float())  # label 1 exactly where the token changed
    assert torch.equal(parts["corrupted"], answer)
    assert torch.allclose(loss, parts["gen_loss"] + 50.0 * parts["disc_loss"])
    per_token = F.binary_cross_entropy_with_logits(parts["disc_logits"], flip.float(), reduction="none")
    assert torch.allclose(parts["disc_loss"], per_token[attn.bool()].mean(), atol=1e-6)  # padding excluded


def test_electra_shared_embeddings_and_joint_loss_backpropagates():
    torch.manual_seed(0)
    gen = TransformerLM(enc_config(n_embd=8, n_head=2, embedding_size=16))  # smaller generator, same embeddings
    disc = TaskModel(enc_config(n_embd=32, embedding_size=16, task="token-classification", num_labels=1))
    pair = ElectraPretraining(gen, disc)
    assert pair.tied == ["wte", "wpe", "wtt", "embed_norm"]
    assert gen.wte.weight is disc.body.wte.weight and gen.wpe is disc.body.wpe and gen.wtt is disc.body.wtt
    n_shared = sum(p.numel() for p in disc.body.wte.parameters())
    assert sum(p.numel() for p in pair.parameters()) == \
        sum(p.numel() for p in gen.parameters()) + sum(p.numel() for p in disc.parameters()) - \
        sum(p.numel() for m in ("wte", "wpe", "wtt", "embed_norm") for p in getattr(gen, m).parameters())
    assert n_shared > 0
    ids, attn = bert_rows(4, 16, V, seed=2)
    batch = MLMMasker(mask_id=MASK, vocab_size=V, special_ids=SPECIALS).apply(
        {"input_ids": ids, "attention_mask": attn}, torch.Generator().manual_seed(0))
    objective = Electra()
    loss = objective(pair, batch)
    loss.backward()
    assert math.isfinite(loss.item()) and set(objective.last) == {"gen_loss", "disc_loss", "replaced_fraction"}
    assert disc.body.wte.weight.grad.abs().sum() > 0
    assert gen.head_transform[0].weight.grad.abs().sum() > 0  # generator-only weights learn (MLM loss)
    assert disc.head.out.weight.grad.abs().sum() > 0  # discriminator-only weights learn (BCE)
    with pytest.raises(ObjectiveError, match="cannot share wte"):
        tie_embeddings(TransformerLM(enc_config(embedding_size=8)), TaskModel(
            enc_config(task="token-classification", num_labels=1)))
    with pytest.raises(ObjectiveError, match="num_labels=1"):
        ElectraPretraining(gen, TaskModel(enc_config(task="token-classification", num_labels=2)))


# ---------------------------------------------------------------------- DistilBERT
def test_temperature_softmax_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    T = 2.0
    # row 1: s/T = (0.5, 1, 0), t/T = (1, 0, 0)
    zs1 = math.exp(0.5) + math.exp(1.0) + 1.0
    log_ps1 = [0.5 - math.log(zs1), 1.0 - math.log(zs1), 0.0 - math.log(zs1)]
    zt1 = math.e + 2.0
    pt1 = [math.e / zt1, 1 / zt1, 1 / zt1]
    kl1 = sum(p * (math.log(p) - lq) for p, lq in zip(pt1, log_ps1))
    # row 2: s/T = (0, 0, 0) -> p_s = 1/3 each; t/T = (0, 2, 0)
    zt2 = 2.0 + math.exp(2.0)
    pt2 = [1 / zt2, math.exp(2.0) / zt2, 1 / zt2]
    kl2 = sum(p * (math.log(p) - math.log(1 / 3)) for p in pt2)
    want = T ** 2 * (kl1 + kl2) / 2  # T^2 * batchmean KL
    assert soft_target_loss(s, t, T).item() == pytest.approx(want, rel=1e-6)
    # soft cross-entropy = KL + teacher entropy
    entropy = -(sum(p * math.log(p) for p in pt1) + sum(p * math.log(p) for p in pt2)) / 2
    assert soft_target_loss(s, t, T, kind="soft_ce").item() == pytest.approx(want + T ** 2 * entropy, rel=1e-6)
    # cosine loss: cos((1, 0), (1, 1)) = 1/sqrt(2); the padding row is ignored
    hs = torch.tensor([[[1.0, 0.0], [5.0, -3.0]]])
    ht = torch.tensor([[[1.0, 1.0], [-1.0, 2.0]]])
    assert cosine_hidden_loss(hs, ht, torch.tensor([[1, 0]])).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)


def test_distillation_loss_combines_the_three_terms_and_trains_only_the_student():
    torch.manual_seed(0)
    teacher = TransformerLM(enc_config(n_layer=4)).eval()
    student = TransformerLM(enc_config(n_layer=2, type_vocab_size=0))
    ids, attn = bert_rows(4, 16, V, seed=3)
    batch = MLMMasker(mask_id=MASK, vocab_size=V, special_ids=SPECIALS).apply(
        {"input_ids": ids, "attention_mask": attn}, torch.Generator().manual_seed(0))
    loss, parts = distillation_loss(student, teacher, batch, return_parts=True)
    sel = batch["labels"] != IGNORE_INDEX
    s_h = student(batch["input_ids"], attention_mask=attn, return_hidden=True)
    t_h = teacher(batch["input_ids"], attention_mask=attn, return_hidden=True)
    s_logits, t_logits = student.head(s_h), teacher.head(t_h)
    ce = soft_target_loss(s_logits[sel], t_logits[sel], 2.0)
    mlm = F.cross_entropy(s_logits[sel], batch["labels"][sel])
    cos = (1 - F.cosine_similarity(s_h[attn.bool()], t_h[attn.bool()], dim=-1)).mean()
    assert torch.allclose(loss, 5.0 * ce + 2.0 * mlm + 1.0 * cos, atol=1e-5)
    assert torch.allclose(parts["ce"], ce, atol=1e-6) and torch.allclose(parts["cos"], cos, atol=1e-6)
    objective = Distillation(teacher)
    objective(student, batch).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_student_init_copies_alternate_teacher_layers():
    torch.manual_seed(0)
    teacher = TransformerLM(enc_config(n_layer=6))
    torch.manual_seed(1)
    student = TransformerLM(enc_config(n_layer=3, type_vocab_size=0))  # DistilBERT drops segment embeddings
    assert not torch.equal(student.blocks[1].attn.qkv.weight, teacher.blocks[2].attn.qkv.weight)
    assert init_student_from_teacher(teacher, student) == [0, 2, 4]
    for i, j in enumerate([0, 2, 4]):
        s_sd, t_sd = student.blocks[i].state_dict(), teacher.blocks[j].state_dict()
        assert s_sd.keys() == t_sd.keys() and all(torch.equal(s_sd[k], t_sd[k]) for k in s_sd)
    for name in ("wte", "wpe", "embed_norm", "head_transform"):
        s_sd, t_sd = getattr(student, name).state_dict(), getattr(teacher, name).state_dict()
        assert all(torch.equal(s_sd[k], t_sd[k]) for k in s_sd)
    assert torch.equal(student.lm_head_bias, teacher.lm_head_bias)
    assert init_student_from_teacher(teacher, student, layers=(0, 3, 5)) == [0, 3, 5]
    assert torch.equal(student.blocks[1].mlp.fc.weight, teacher.blocks[3].mlp.fc.weight)
    with pytest.raises(ObjectiveError, match="one teacher layer per student layer"):
        init_student_from_teacher(teacher, student, layers=(0, 2))
    with pytest.raises(ObjectiveError, match="cannot copy"):
        init_student_from_teacher(teacher, TransformerLM(enc_config(n_layer=3, n_embd=8)))


# ---------------------------------------------------------------------- ERNIE dEA
def test_dea_noise_rates_and_targets():
    g = torch.Generator().manual_seed(0)
    ents = torch.randint(0, 1000, (500, 250), generator=g)
    ents[:, ::5] = -1  # every fifth token has no entity
    out = dea_noise(ents, generator=torch.Generator().manual_seed(1))
    aligned = ents != -1
    n = aligned.sum().item()
    assert n >= 100_000
    replaced, masked, kept = out["replaced"], out["masked"], out["kept"]
    r, m = replaced.sum().item() / n, masked.sum().item() / n
    assert abs(r - 0.05) < 0.01 and abs(m - 0.15) < 0.01, (r, m)
    assert torch.equal(replaced | masked | kept, aligned) and not (replaced & masked).any()
    noised = out["entity_ids"]
    assert (noised[masked] == -1).all() and torch.equal(noised[kept], ents[kept])
    assert (noised[replaced] != ents[replaced]).all()  # a wrong entity, never the right one
    assert torch.isin(noised[replaced], out["candidates"]).all()
    assert torch.equal(noised[~aligned], ents[~aligned])
    cand, tgt = out["candidates"], out["targets"]
    assert torch.equal(cand[tgt[aligned]], ents[aligned]) and (tgt[~aligned] == IGNORE_INDEX).all()
    assert torch.equal(out["entity_mask"], (noised != -1).long())
    print(f"dEA: {n} alignments, replaced {r:.4f}, masked {m:.4f}")
    small = dea_noise(torch.tensor([[7, -1, 9, 7]]), generator=torch.Generator().manual_seed(0))
    assert small["candidates"].tolist() == [7, 9] and small["targets"].tolist() == [[0, IGNORE_INDEX, 1, 0]]
    scores = torch.randn(1, 4, 2, requires_grad=True)
    loss = dea_loss(scores, small["targets"])
    manual = -(F.log_softmax(scores[0, [0, 2, 3]], -1)[[0, 1, 2], [0, 1, 0]]).mean()
    assert torch.allclose(loss, manual)
    loss.backward()
    assert scores.grad.abs().sum() > 0
    with pytest.raises(ObjectiveError, match="not among the candidates"):
        dea_noise(torch.tensor([[3, 4]]), candidates=torch.tensor([3, 5]))


# ---------------------------------------------------------------------- LaBSE
def test_additive_margin_loss_matches_hand_computation():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[2.0, 0.0], [3.0, 4.0]])  # cos: x1.y1 = 1, x1.y2 = 0.6, x2.y1 = 0, x2.y2 = 0.8
    m = 0.3

    def nll(scores, target):
        return -(scores[target] - math.log(sum(math.exp(v) for v in scores)))

    # x -> y: row i scores cos(x_i, y_j), margin off the diagonal entry
    forward = (nll([1 - m, 0.6], 0) + nll([0.0, 0.8 - m], 1)) / 2
    # y -> x: row j scores cos(x_i, y_j) over i
    backward = (nll([1 - m, 0.0], 0) + nll([0.6, 0.8 - m], 1)) / 2
    assert additive_margin_loss(x, y, margin=m).item() == pytest.approx(forward + backward, rel=1e-6)
    assert additive_margin_loss(x, y, margin=m, bidirectional=False).item() == pytest.approx(forward, rel=1e-6)
    s = 10.0
    scaled = (nll([s * (1 - m), s * 0.6], 0) + nll([0.0, s * (0.8 - m)], 1)) / 2 + \
        (nll([s * (1 - m), 0.0], 0) + nll([s * 0.6, s * (0.8 - m)], 1)) / 2
    assert additive_margin_loss(x, y, margin=m, scale=s).item() == pytest.approx(scaled, rel=1e-6)


def test_translation_ranking_loss_backpropagates_through_one_encoder():
    torch.manual_seed(0)
    model = TaskModel(enc_config(task="embedding", pooling="first"))
    src, src_mask = bert_rows(4, 12, V, seed=6)
    tgt, tgt_mask = bert_rows(4, 9, V, seed=7)
    batch = {"source": {"input_ids": src, "attention_mask": src_mask},
             "target": {"input_ids": tgt, "attention_mask": tgt_mask}}
    loss = translation_ranking_loss(model, batch, margin=0.3, scale=10.0)
    want = additive_margin_loss(model(src, attention_mask=src_mask), model(tgt, attention_mask=tgt_mask),
                                margin=0.3, scale=10.0)
    assert torch.allclose(loss, want, atol=1e-5)  # padding the shorter side changes nothing
    loss.backward()
    assert model.body.wte.weight.grad.abs().sum() > 0
