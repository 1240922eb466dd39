"""The passage index with the real MiniLM: a planted fact is found; the cache is hit or missed by
corpus and encoder, and a hit embeds nothing."""
import pytest
import torch

import allformers
from allformers.dialogue import retrieval
from allformers.dialogue.retrieval import Passage, PassageIndex, sotu_passages
from allformers.zoo.assets import minilm_path

FACT = "The lighthouse keeper of Port Ellery painted the tower bright orange in the spring of the flood."


@pytest.fixture(scope="module")
def minilm():
    return allformers.load(minilm_path()).eval()


@pytest.fixture()
def corpus():
    passages = sotu_passages(words=60, addresses=[0, 1, 2])  # Washington's first three: ~100 passages
    planted = Passage(FACT, "planted", 999)
    return passages[:40] + [planted] + passages[40:]


def test_retrieval_returns_the_passage_with_a_planted_fact(minilm, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLFORMERS_CACHE", str(tmp_path))
    index = PassageIndex.build(corpus, minilm)
    for query in ("Who painted the lighthouse orange?", "What colour is the tower at Port Ellery?"):
        hits = index.search(query, k=3)
        assert hits[0].passage.source == "planted", [h.passage.source for h in hits]
        assert hits[0].score > hits[1].score
    # the same question restricted to other documents cannot return it
    assert all(h.passage.doc != 999 for h in index.search("Who painted the lighthouse orange?", k=3, docs={0, 1}))


def test_cache_hit_embeds_nothing_and_a_miss_embeds_again(minilm, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLFORMERS_CACHE", str(tmp_path))
    calls = []
    real = retrieval._embed_all
    monkeypatch.setattr(retrieval, "_embed_all", lambda texts, *a: calls.append(len(texts)) or real(texts, *a))
    first = PassageIndex.build(corpus, minilm)
    assert calls == [len(corpus)]
    again = PassageIndex.build(corpus, minilm)  # same corpus, same encoder: read from disk
    assert calls == [len(corpus)] and again.path == first.path and torch.equal(again.embeddings, first.embeddings)
    rechunked = [Passage(FACT, "planted", 999)] + sotu_passages(words=80, addresses=[0])  # another chunking
    assert PassageIndex.build(rechunked, minilm).path != first.path and calls[-1] == len(rechunked)
    n = len(calls)
    with torch.no_grad():  # another encoder (one weight changed): a miss, and a new file
        p = next(minilm.parameters())
        p[0, 0] += 1.0
    try:
        other = PassageIndex.build(corpus, minilm)
    finally:
        with torch.no_grad():
            p[0, 0] -= 1.0
    assert len(calls) == n + 1 and other.path != first.path
    assert len(list((tmp_path / "retrieval").glob("*.safetensors"))) == 3
    nocache = PassageIndex.build(corpus, minilm, cache=False)
    assert nocache.path is None and len(calls) == n + 2
