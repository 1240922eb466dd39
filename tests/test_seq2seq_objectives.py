"""T5 span corruption and BART's five noising functions: their statistical rules over many
sequences (within 5% relative) and exactness properties; the seq2seq loss, ROUGE-L, the
encoder-decoder zoo and the Flan-style renderer."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

from allformers.config import Config
from allformers.objectives.denoising import (BartNoiser, DenoisingData, document_rotation, poisson_span_lengths,
                                             sentence_permutation, split_sentences, text_infilling, token_deletion,
                                             token_masking, undo_deletion, undo_infilling)
from allformers.objectives.seq2seq import Seq2SeqExamples, Seq2SeqLoss, seq2seq_loss
from allformers.objectives.span_corruption import (SpanCorruptionData, compute_input_and_target_lengths,
                                                   random_segmentation, random_spans_noise_mask, reassemble,
                                                   span_corruption, t5_sentinel_ids)
from allformers.recipes.seq2seq import lcs_length, rouge_l, rouge_tokens

V = 1000
SENTINELS = t5_sentinel_ids(V, 100)  # <extra_id_0> = 999, counting down
EOS, MASK = 1, 3
N = 10_000


def rel(a, b):
    return abs(a - b) / abs(b)


def lengths(rng, n=N, lo=20, hi=300):
    return rng.integers(lo, hi, size=n)


# ---------------------------------------------------------------------- T5 span corruption
def test_span_corruption_rates_order_and_reassembly():
    rng = np.random.default_rng(0)
    noise = total = n_spans = 0
    for L in lengths(rng):
        toks = rng.integers(4, 900, size=L)
        inputs, targets, mask = span_corruption(toks, SENTINELS, EOS, 0.15, 3.0, rng, return_mask=True)
        noise, total = noise + mask.sum(), total + L
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        n_spans += len(starts)
        assert not mask[0] and mask[-1]  # kept text first, the last span runs to the end (no random_roll)
        sent_in = inputs[np.isin(inputs, SENTINELS)]
        sent_tg = targets[np.isin(targets, SENTINELS)]
        k = len(starts)
        assert sent_in.tolist() == SENTINELS[:k].tolist() == sent_tg.tolist()  # <extra_id_0>, <extra_id_1>, ...
        assert targets[0] == SENTINELS[0] and inputs[-1] == EOS and targets[-1] == EOS
        assert len(inputs) == L - mask.sum() + k + 1 and len(targets) == mask.sum() + k + 1
        assert reassemble(inputs, targets, SENTINELS, EOS) == toks.tolist()
    assert rel(noise / total, 0.15) < 0.05
    assert rel(noise / n_spans, 3.0) < 0.05


def test_span_corruption_exact_counts_and_random_roll():
    rng = np.random.default_rng(1)
    # T5's numbers: 568 raw tokens -> 512 inputs and 114 targets (EOS included)
    assert compute_input_and_target_lengths(512) == (568, 114)
    mask = random_spans_noise_mask(568, rng=rng)
    assert mask.sum() == round(568 * 0.15) == 85
    for L in (2, 5, 17, 100):
        seg = random_segmentation(L, max(1, L // 3), rng)
        assert seg.sum() == L and (seg > 0).all()
    # rolled masks: the text may end with kept tokens; targets then end with one more sentinel before EOS
    ended_kept = 0
    for _ in range(200):
        toks = rng.integers(4, 900, size=60)
        inputs, targets, mask = span_corruption(toks, SENTINELS, EOS, rng=rng, random_roll=True, return_mask=True)
        assert reassemble(inputs, targets, SENTINELS, EOS) == toks.tolist()
        if not mask[-1]:
            ended_kept += 1
            assert targets[-2] in SENTINELS
    assert ended_kept > 0


def test_span_corruption_data_batches():
    stream = np.random.default_rng(2).integers(4, 900, size=5000)
    data = SpanCorruptionData(stream, SENTINELS, EOS, pad_id=0, inputs_length=64, seed=0)
    b = data.sample(8)
    assert b["input_ids"].shape == (8, 64) and (b["attention_mask"] == 1).all()
    assert b["labels"].shape[1] == data.targets_length
    again = data.fixed_batches(4, 2, seed=5)
    assert torch.equal(again[0]["input_ids"], data.fixed_batches(4, 2, seed=5)[0]["input_ids"])
    state = data.state_dict()
    x = data.sample(3)["input_ids"]
    data.load_state_dict(state)
    assert torch.equal(x, data.sample(3)["input_ids"])


# ---------------------------------------------------------------------- BART noising
def test_token_masking_rate_and_positions():
    rng = np.random.default_rng(3)
    masked = total = 0
    for L in lengths(rng):
        toks = rng.integers(4, 900, size=L)
        out, pos = token_masking(toks, MASK, 0.15, rng)
        assert len(out) == L and (out[pos] == MASK).all()
        keep = np.ones(L, bool)
        keep[pos] = False
        assert (out[keep] == toks[keep]).all()
        masked, total = masked + len(pos), total + L
    assert rel(masked / total, 0.15) < 0.05
    out, pos = token_masking(np.arange(4, 504), MASK, 0.5, rng, random_ratio=1.0, vocab_size=V, special_ids=[0, 1, 2])
    assert not np.isin(out[pos], [0, 1, 2, MASK]).any()  # random replacements are never special


def test_token_deletion_rate_and_subsequence():
    rng = np.random.default_rng(4)
    deleted = total = 0
    for L in lengths(rng):
        toks = rng.integers(4, 900, size=L)
        out, pos = token_deletion(toks, 0.15, rng)
        assert np.array_equal(out, np.delete(toks, pos))  # the kept tokens, in order: a subsequence
        assert undo_deletion(out, pos, toks[pos]) == toks.tolist()
        deleted, total = deleted + len(pos), total + L
    assert rel(deleted / total, 0.15) < 0.05


def test_text_infilling_poisson_spans_and_restore():
    rng = np.random.default_rng(5)
    lam = 3.0
    covered = total = n_masks = inserts = 0
    early = []  # each sequence's first 3 spans: their lengths are plain Poisson draws (the budget is far)
    for L in lengths(rng, lo=100):
        toks = rng.integers(4, 900, size=L)
        r = text_infilling(toks, MASK, 0.3, lam, rng)
        assert (r.tokens[r.mask_positions] == MASK).all()
        assert (r.tokens == MASK).sum() == len(r.lengths)  # ONE mask per span, insertions included
        assert [len(s) for s in r.spans] == r.lengths.tolist()
        assert undo_infilling(r.tokens, r.mask_positions, r.spans) == toks.tolist()  # = r.restore()
        covered, total = covered + r.lengths.sum(), total + L
        n_masks, inserts = n_masks + len(r.lengths), inserts + (r.lengths == 0).sum()
        early += r.lengths[:3].tolist()
    assert rel(covered / total, 0.3) < 0.05
    early = np.asarray(early)
    assert rel(early.mean(), lam) < 0.05
    assert rel((early == 0).mean(), math.exp(-lam)) < 0.05  # 0-length spans: P(0) = e^-3 ~ 5%, each an insertion
    assert inserts > 0 and len(early) >= 3 * N


def test_poisson_budget_is_spent_exactly():
    rng = np.random.default_rng(6)
    for budget in (1, 2, 7, 45, 300):
        lens = poisson_span_lengths(budget, 3.0, rng)
        assert lens.sum() == budget and (lens >= 0).all() and lens[-1] > 0


def test_sentence_permutation_uniform_and_multiset():
    rng = np.random.default_rng(7)
    STOP = 2
    k = 5
    sents = [np.append(rng.integers(4, 900, size=int(rng.integers(1, 12))), STOP) for _ in range(k)]
    doc = np.concatenate(sents)
    assert [s.tolist() for s in split_sentences(doc, [STOP])] == [s.tolist() for s in sents]
    where = np.zeros((k, k))
    for _ in range(N):
        out, order = sentence_permutation(doc, [STOP], 1.0, rng)
        # the output is the sentences in `order`, a permutation: the same multiset of sentences
        assert sorted(order.tolist()) == list(range(k)) and np.array_equal(out, np.concatenate([sents[i] for i in order]))
        where[order, np.arange(k)] += 1
    got = split_sentences(out, [STOP])
    assert Counter(tuple(s) for s in got) == Counter(tuple(s) for s in sents)
    assert np.abs(where / N * k - 1).max() < 0.05 * 2  # every sentence equally likely at every slot (2k per cell)
    assert np.abs(where / N * k - 1).mean() < 0.05
    # ratio 0.5 of 10 sentences: 5 shuffled among themselves -> expected fixed points 5 + 1 = 6 of 10
    sents10 = np.concatenate([[10 + i, STOP] for i in range(10)])
    fixed = np.mean([np.mean(sentence_permutation(sents10, [STOP], 0.5, rng)[1] == np.arange(10)) for _ in range(N)])
    assert rel(fixed, 0.6) < 0.05
    # trailing text without a full stop is a sentence too; runs of full stops end one sentence
    assert [s.tolist() for s in split_sentences([5, 2, 2, 6, 7], [2])] == [[5, 2, 2], [6, 7]]


def test_document_rotation_rate_and_uniform_start():
    rng = np.random.default_rng(8)
    L = 20
    toks = np.arange(100, 100 + L)
    offsets, rotated = [], 0
    for _ in range(N):
        out, off = document_rotation(toks, 0.5, rng)
        assert out.tolist() == np.roll(toks, -off).tolist()  # a rotation of the original
        if off:
            rotated += 1
            offsets.append(off)
    # applied with probability 0.5, start uniform over the L tokens (offset 0 = applied but unchanged)
    assert rel(rotated / N, 0.5 * (L - 1) / L) < 0.05
    counts = np.bincount(offsets, minlength=L)[1:]
    assert rel(np.mean(offsets), L / 2) < 0.05 and counts.min() > 0


def test_bart_noiser_and_data():
    rng = np.random.default_rng(9)
    noiser = BartNoiser(mask_id=MASK, full_stop_ids=[2], permute_ratio=1.0, infill_ratio=0.3)
    doc = np.concatenate([np.append(rng.integers(4, 900, size=9), 2) for _ in range(6)])
    out = noiser(doc, rng)
    assert (out == MASK).any() and len(out) < len(doc)
    with pytest.raises(Exception):
        BartNoiser(mask_id=MASK, mask_ratio=0.1, infill_ratio=0.3)
    stream = rng.integers(4, 900, size=3000)
    stream[::11] = 2
    data = DenoisingData(stream, noiser, EOS, pad_id=0, window=64, seed=0)
    b = data.sample(4)
    assert b["labels"].shape == (4, 65) and (b["labels"][:, -1] == EOS).all()


# ---------------------------------------------------------------------- loss, metric, zoo
def tiny_t5(vocab=64):
    return Config.from_name("t5-small", vocab_size=vocab, n_layer=2, n_decoder_layer=2, n_embd=32, n_head=4,
                            head_dim=8, intermediate_size=64, head_input_scale=32 ** -0.5,
                            init="gpt2")  # GPT-2's small init: the untrained loss is log(vocab); T5's starts ~0.6 above


def test_seq2seq_loss_decreases_on_tiny_t5(one_thread):
    from allformers.models import Seq2SeqLM
    from allformers.training import TrainConfig, Trainer

    torch.manual_seed(0)
    model = Seq2SeqLM(tiny_t5())
    g = torch.Generator().manual_seed(0)
    src = [torch.randint(4, 64, (int(n),), generator=g).tolist() + [EOS] for n in torch.randint(5, 12, (16,), generator=g)]
    tgt = [s[:4][::-1] + [EOS] for s in src]  # a learnable mapping: the first 4 tokens reversed
    data = Seq2SeqExamples(src, tgt, pad_id=0, seed=0)
    batch = data.take(range(16))
    assert (batch["labels"] == -100).sum() == 0 and batch["attention_mask"].sum() == sum(map(len, src))
    obj = Seq2SeqLoss()
    assert obj.num_tokens(batch) == 16 * 5
    before = seq2seq_loss(model, batch).item()
    assert abs(before - math.log(64)) < 0.5
    cfg = TrainConfig(max_steps=100, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=5, weight_decay=0.0,
                      eval_interval=0, eval_at_start=False, log_interval=10, device="cpu", threads=1)
    Trainer(model, obj, data, cfg, progress=False).fit()
    after = seq2seq_loss(model.eval(), batch).item()
    assert after < 0.6 * before
    # padded labels are ignored: the loss on a batch equals the token-weighted mean of its rows
    b2 = data.take([0, 1])
    rows = [seq2seq_loss(model, data.take([i])) * data.take([i])["labels"].ne(-100).sum() for i in (0, 1)]
    assert torch.allclose(seq2seq_loss(model, b2), sum(rows) / b2["labels"].ne(-100).sum(), atol=1e-5)


def test_rouge_l():
    assert rouge_tokens("Re: [ILUG] Hello, World!") == ["re", "ilug", "hello", "world"]
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], [1]) == 0
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("a b", "c d") == 0.0
    # candidate "police killed the gunman", reference "police kill the gunman": LCS 3, P = R = 3/4
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # P = 2/2, R = 2/4 -> F1 = 2/3
    assert rouge_l("cat sat", "the cat sat down") == pytest.approx(2 / 3)


def test_rouge_l_matches_rouge_score_if_installed():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rougeL"])
    for c, r in [("the quick brown fox", "a quick fox jumps"), ("Re: hello there", "hello world, there")]:
        assert rouge_l(c, r) == pytest.approx(scorer.score(r, c)["rougeL"].fmeasure)


# published sizes (t5-large: the paper's "770M"; its checkpoint holds 737.7M, 4.2% less)
SEQ2SEQ_ZOO = {"transformer-base": 65e6, "t5-small": 60e6, "t5-base": 220e6, "t5-large": 770e6,
               "t5-v1_1-small": 77e6, "t5-v1_1-base": 248e6, "mt5-small": 300e6, "mt5-base": 580e6,
               "flan-t5-small": 77e6, "flan-t5-base": 248e6, "bart-base": 140e6, "bart-large": 406e6}
@pytest.mark.parametrize("name", sorted(SEQ2SEQ_ZOO))
def test_zoo_entries_build_with_published_sizes(name):
    from allformers.zoo import count_params

    cfg = Config.from_name(name)
    assert cfg.family == "encoder-decoder" and cfg.is_encoder_decoder and cfg.description
    assert rel(count_params(cfg), SEQ2SEQ_ZOO[name]) < 0.05


def test_zoo_switches():
    t5, v11, mt5 = Config.from_name("t5-small"), Config.from_name("t5-v1_1-base"), Config.from_name("mt5-base")
    assert (t5.activation, t5.mlp_class, t5.tie_embeddings, t5.head_input_scale) == ("relu", "MLP", True, 512 ** -0.5)
    assert (t5.rel_buckets, t5.rel_max_distance, t5.vocab_size, t5.position) == (32, 128, 32128, "relative_bias")
    assert (v11.mlp_class, v11.activation, v11.tie_embeddings, v11.head_input_scale) == ("GLU", "gelu_tanh", False, None)
    assert mt5.vocab_size == 250112 and mt5.mlp_class == "GLU"
    assert Config.from_name("flan-t5-base").to_dict() | {"name": "", "description": ""} == \
        v11.to_dict() | {"name": "", "description": ""}
    tb = Config.from_name("transformer-base")
    assert (tb.position, tb.norm_placement, tb.activation, tb.embed_scale, tb.n_decoder_layer) == \
        ("sinusoidal", "post", "relu", 512 ** 0.5, 6)
    bart = Config.from_name("bart-base")
    assert (bart.position_offset, bart.norm_placement, bart.embedding_norm, bart.lm_head_bias) == (2, "post", True, True)


def test_flan_renderer():
    from allformers.zoo.seq2seq import TEMPLATES, flan_mixture, render_instruction

    rec = {"id": "x1", "subject": "Hello  there", "text": "Body  text\nhere", "label": "ham"}
    src, tgt = render_instruction("subject", rec, template=0)
    assert src == f"instruction: {TEMPLATES['subject'][0]} input: Body text here" and tgt == "Hello there"
    assert render_instruction("classify", rec)[1] == "ham"
    src, tgt = render_instruction("continue", {"text": "one two three four"})
    assert src.endswith("input: one two") and tgt == "three four"
    assert render_instruction("subject", rec) == render_instruction("subject", rec)  # stable template choice
    mix = flan_mixture({"subject": [rec], "classify": [rec]}, seed=0)
    assert sorted(m[0] for m in mix) == ["classify", "subject"]
