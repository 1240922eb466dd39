"""Sparrow-style replies: evidence in the context, candidates with and without it, reward-model
reranking, and the citation of the passage the reply used."""
import pytest
import torch

from allformers.dialogue.lamda import DialogueError, Responder
from allformers.dialogue.retrieval import Passage, PassageIndex
from allformers.dialogue.sparrow import (RewardHead, evidence_messages, reward_model_scorer, scorer_features,
                                         sparrow_candidates, sparrow_reply)
from allformers.models.rl import reward_model_from

from .test_dialogue_lamda import tiny_chat_lm
from .test_dialogue_tools import tiny_encoder

pytestmark = pytest.mark.usefixtures("one_thread")
Q = [{"role": "user", "content": "the cat sat"}]


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("ALLFORMERS_CACHE", str(tmp_path))
    passages = [Passage(t, f"19{i}0, Doc{i}", i) for i, t in enumerate(["the cat sat", "a tax on tea", "war and peace",
                                                                       "the cat sat down"])]
    model, tok = tiny_chat_lm()
    return PassageIndex.build(passages, tiny_encoder()), Responder(model, tok, max_new_tokens=6), model, tok


def test_evidence_goes_into_the_system_message():
    p = Passage("We must build roads.", "1830, Jackson", 3)
    m = evidence_messages(Q, p)
    assert m[0]["role"] == "system" and "Evidence [1830, Jackson]: We must build roads." in m[0]["content"]
    assert m[1:] == Q
    merged = evidence_messages([{"role": "system", "content": "Be brief."}] + Q, p)
    assert len(merged) == 2 and merged[0]["content"].startswith("Be brief.\n\n") and "1830, Jackson" in merged[0]["content"]


def test_candidates_with_each_passage_and_without(setup):
    index, responder, _, _ = setup
    cands = sparrow_candidates(responder, index, Q, k=2, n_evidence=2, n_plain=2)
    hits = index.search("the cat sat", k=2)
    assert [c.evidence for c in cands] == [hits[0].passage] * 2 + [hits[1].passage] * 2 + [None, None]
    assert all("Evidence [" + c.evidence.source in c.conversation[0]["content"] for c in cands[:4])
    assert cands[4].conversation == Q
    # greedy ones (the first of each kind) are what the responder says alone: left padding changes nothing
    assert cands[0].reply == responder(cands[0].conversation)[0]
    assert cands[4].reply == responder(Q)[0]
    with pytest.raises(DialogueError, match="at least one candidate"):
        sparrow_candidates(responder, index, Q, k=0, n_plain=0)
    with pytest.raises(DialogueError, match="has none"):
        sparrow_candidates(responder, index, [{"role": "system", "content": "x"}])


def test_reply_is_the_reward_models_best_and_cites_its_passage(setup):
    index, responder, _, _ = setup
    prefer_evidence = lambda convs, replies: torch.tensor([float(c[0]["role"] == "system") + 0.1 * i  # noqa: E731
                                                           for i, c in enumerate(convs)])
    best, ranked = sparrow_reply(responder, index, prefer_evidence, Q, k=2, n_plain=2)
    assert best is ranked[0] and best.evidence == index.search("the cat sat", k=2)[1].passage
    assert best.text.startswith(best.reply) and best.text.endswith(f"Source: [{best.evidence.citation(300)}]")
    assert [c.reward for c in ranked] == sorted([c.reward for c in ranked], reverse=True)
    prefer_plain = lambda convs, replies: torch.tensor([float(c[0]["role"] != "system") for c in convs])  # noqa: E731
    plain, _ = sparrow_reply(responder, index, prefer_plain, Q, k=2, n_plain=1)
    assert plain.evidence is None and plain.text == plain.reply  # no passage used: none cited


def test_reward_head_learns_pairs_and_round_trips(setup, tmp_path):
    torch.manual_seed(0)
    w = torch.randn(16)
    x = torch.randn(600, 16)
    a, b = x[:300], x[300:]
    chosen = torch.where(((a @ w) > (b @ w))[:, None], a, b)
    rejected = torch.where(((a @ w) > (b @ w))[:, None], b, a)
    head = RewardHead.fit(chosen[:250], rejected[:250])
    # held-out pairs, far above chance (0.5); the LayerNorm in front bends the linear rule a little
    assert float((head(chosen[250:]) > head(rejected[250:])).float().mean()) >= 0.85
    with pytest.raises(DialogueError, match="matching"):
        RewardHead.fit(chosen, rejected[:5])

    _, _, model, tok = setup
    ev = evidence_messages(Q, Passage("the cat sat", "1900, Doc0", 0))
    pairs = [(ev, "It was Doc0."), (Q, "Nobody knows.")], [(ev, "In 1900."), (Q, "Maybe never.")]
    head = RewardHead.train_on(model, tok, [tuple(p) for p in pairs])
    score = head.scorer()
    r = score([ev, Q, ev, Q], ["It was Doc0.", "Nobody knows.", "In 1900.", "Maybe never."])
    assert r[0] > r[1] and r[2] > r[3]
    again = RewardHead.load(head.save(tmp_path / "rm"))
    assert torch.allclose(again.scorer(model, tok)([ev], ["It was Doc0."]), r[:1])
    with pytest.raises(DialogueError, match="no reward head"):
        RewardHead.load(tmp_path)


def test_a_full_reward_model_scores_as_rm_score_fn_does(setup):
    _, _, model, tok = setup
    rm = reward_model_from(model)
    with torch.no_grad():
        rm.head.out.weight.normal_()
    convs, replies = [Q, evidence_messages(Q, Passage("x", "1900, A", 0))], ["yes", "no it is not"]
    got = reward_model_scorer(rm, tok)(convs, replies)
    assert got.shape == (2,) and got[0] != got[1]
    feats = scorer_features(model, tok, list(zip(convs, replies)))
    assert feats.shape == (2, model.config.n_embd)
