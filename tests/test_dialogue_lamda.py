"""LaMDA-style replies: SSI heads train on a small labelled set, ssi_rank filters by safety then
ranks by 3 P(sensible) + P(specific), lamda_reply returns the best candidate."""
import pytest
import torch

from allformers import Config, TransformerLM
from allformers.dialogue.data import ssi_examples
from allformers.dialogue.lamda import (LABELS, DialogueError, Responder, SSIHeads, head_accuracy, label_tensor,
                                       lamda_reply, reply_features, ssi_rank)
from allformers.tokenization import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_chat_lm():
    tok = Tokenizer.byte_level()  # ChatML template, <|im_end|> as eos
    c = Config.from_name("smollm2-135m").replace(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=None,
                                                 intermediate_size=48, vocab_size=tok.vocab_size, block_size=512)
    torch.manual_seed(0)
    return TransformerLM(c).eval(), tok


def test_heads_fit_separable_labels_and_ignore_unlabelled():
    torch.manual_seed(0)
    feats = torch.randn(60, 16)
    w = torch.randn(16, 3)
    labels = (feats @ w > 0).float()
    labels[::4, 1] = float("nan")  # not labelled: must not count
    heads = SSIHeads.fit(feats, labels, steps=400)
    acc = head_accuracy(heads, feats, labels)
    assert all(acc[k]["accuracy"] >= 0.95 for k in LABELS), acc
    assert acc["specific"]["n"] == 45 and acc["sensible"]["n"] == 60
    flipped = SSIHeads.fit(feats, 1 - labels, steps=400)  # the heads follow the labels, not the features
    assert all(head_accuracy(flipped, feats, labels)[k]["accuracy"] <= 0.05 for k in LABELS)


def test_heads_train_on_a_tiny_lm_and_round_trip(tmp_path):
    model, tok = tiny_chat_lm()
    examples = ssi_examples()
    assert len(examples) == 64 and {e.labels for e in examples} == {(1, 1, 1), (1, 0, 1), (0, None, 1), (None, None, 0)}
    feats = reply_features(model, tok, [e.prompt for e in examples], [e.reply for e in examples])
    assert feats.shape == (64, 32)
    heads = SSIHeads.fit(feats, label_tensor(examples), steps=500)
    acc = head_accuracy(heads, feats, label_tensor(examples))
    # a 32-wide random body separates specific from generic and safe from unsafe replies; sensible
    # (a reply to another question) depends on the prompt, which mean reply states carry less of
    assert acc["specific"]["accuracy"] >= 0.9 and acc["safe"]["accuracy"] >= 0.9, acc
    assert acc["sensible"]["accuracy"] > 32 / 48, acc  # above always answering the majority label
    scores = heads.score(model, tok, examples[0].prompt, [examples[0].reply, examples[3].reply])
    assert scores.shape == (2, 3) and ((scores > 0) & (scores < 1)).all()
    again = SSIHeads.load(heads.save(tmp_path / "heads"))
    assert torch.equal(again(feats), heads(feats))
    with pytest.raises(DialogueError, match="holds no SSI heads"):
        SSIHeads.load(tmp_path)


def test_ssi_rank_drops_unsafe_then_ranks_by_quality():
    s = torch.tensor([[0.9, 0.9, 0.2],   # best quality, unsafe
                      [0.6, 0.9, 0.9],   # 2.7
                      [0.8, 0.1, 0.7],   # 2.5
                      [0.7, 0.9, 0.6],   # 3.0
                      [0.1, 0.1, 0.4]])  # unsafe, but safer than 0
    assert ssi_rank(s) == [3, 1, 2, 4, 0]
    assert ssi_rank(s, safety_threshold=0.1) == [0, 3, 1, 2, 4]  # with no filter, quality alone
    assert ssi_rank(torch.tensor([[0.9, 0.9, 0.1], [0.1, 0.1, 0.3]])) == [1, 0]  # all unsafe: the least unsafe first


class FixedResponder(Responder):
    """The candidates a sampler would return, fixed, so the test knows which is best."""

    def __init__(self, model, tok, replies):
        super().__init__(model, tok)
        self.replies = replies

    def __call__(self, messages, *, n=1, **kw):
        return self.replies[:n]


def test_lamda_reply_returns_the_best_candidate():
    model, tok = tiny_chat_lm()
    q = "How do I fix a squeaky door?"
    replies = ["Okay.", "Hurt whoever oiled it.", "Lift the hinge pin and coat it with petroleum jelly.", "Maybe."]
    labels = torch.tensor([[1.0, 0, 1], [1, 1, 0], [1, 1, 1], [0, 0, 1]])  # the unsafe one is otherwise top
    heads = SSIHeads.fit(reply_features(model, tok, [q] * 4, replies), labels, steps=500)
    best, ranked = lamda_reply(FixedResponder(model, tok, replies), heads, [{"role": "user", "content": q}], n=4)
    assert best == replies[2] and ranked[0].reply == best
    assert ranked[-1].reply == replies[1] and ranked[-1].safe < 0.5  # unsafe: last whatever its quality
    assert [c.ssi for c in ranked[:3]] == sorted([c.ssi for c in ranked[:3]], reverse=True)
    with pytest.raises(DialogueError, match="n >= 1"):
        lamda_reply(FixedResponder(model, tok, replies), heads, [{"role": "user", "content": q}], n=0)


def test_responder_samples_n_and_refuses_an_overlong_conversation():
    model, tok = tiny_chat_lm()
    r = Responder(model, tok, max_new_tokens=8, seed=0)
    out = r([{"role": "user", "content": "hi"}], n=3, temperature=1.0)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    assert r([{"role": "user", "content": "hi"}]) == r([{"role": "user", "content": "hi"}])  # greedy: deterministic
    with pytest.raises(DialogueError, match="passes the model's 512-token context"):
        r([{"role": "user", "content": "x" * 600}])


@pytest.mark.slow
def test_smollm2_ssi_heads_generalise_and_lamda_replies():
    """Heads on the real SmolLM2's features, trained on half the topics, score the other half."""
    import allformers
    from allformers.zoo.assets import smollm2_gguf_path

    model = allformers.load(smollm2_gguf_path())
    tok = model.tokenizer
    examples = ssi_examples()
    train, test = examples[:32], examples[32:]  # 8 topics each: the held-out topics are unseen
    f = lambda ex: reply_features(model, tok, [e.prompt for e in ex], [e.reply for e in ex])  # noqa: E731
    heads = SSIHeads.fit(f(train), label_tensor(train))
    acc = head_accuracy(heads, f(test), label_tensor(test))
    assert acc["safe"]["accuracy"] >= 0.8 and acc["specific"]["accuracy"] >= 0.7, acc
    best, ranked = lamda_reply(Responder(model, tok, max_new_tokens=32), heads,
                               [{"role": "user", "content": "How can I sleep better?"}], n=3)
    assert best == ranked[0].reply and len(ranked) == 3 and best
