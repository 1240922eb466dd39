"""benchmarks/vl_vqa.py, the palme and blip2 sections of bench_vision_language.py: --quick prints their keys last (the
numbers come from the full run, not from this test); the tokenizer reads every question the generator asks; only the
answer and </s> are scored; accuracy by question type checked by hand; a saved model answers through `allformers ask`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import vl_vqa  # noqa: E402
from allformers.data.synthetic_shapes import SyntheticShapes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_prints_the_keys(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vision_language.py"), "--quick",
                          "--sections", "palme,blip2", "--threads", "1",
                          "--set", f"palme.save={str(tmp_path / 'palme')!r}",
                          "--set", f"blip2.save={str(tmp_path / 'blip2')!r}"],
                         capture_output=True, text=True, env=env, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("palme_vqa_accuracy", "palme_text_only_vqa_accuracy", "blip2_vqa_accuracy",
                "blip2_text_only_vqa_accuracy", "blip2_lm_given_caption_accuracy"):
        assert isinstance(result[key], float) and 0 <= result[key] <= 1, key
    assert set(result["palme_vqa_accuracy_by_type"]) <= {"colour", "shape", "count", "relation"}
    assert result["blip2_trainable_params"] < result["blip2_params"]  # the ViT and the LM are frozen
    assert (tmp_path / "palme" / "preprocessor_config.json").is_file() and result["palme_saved"] == str(tmp_path / "palme")
    import vl_figure  # the docs' picture, from the saved models

    vl_figure.main(["--palme", str(tmp_path / "palme"), "--blip2", str(tmp_path / "blip2"), "--n", "2",
                    "--out", str(tmp_path / "fig.png")])
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_question_encodes_word_by_word():
    tok = vl_vqa.vqa_tokenizer()
    data = SyntheticShapes(300, "train", 3)
    for i in range(len(data)):
        for q, a in data[i].questions:
            words = q.replace("?", " ?").split()
            assert len(tok.encode(q)) == len(words) and tok.decode(tok.encode(q)) == " ".join(words)
            assert len(tok.encode(a)) == 1


def test_only_the_answer_is_scored():
    tok = vl_vqa.vqa_tokenizer()
    p1, p2 = tok.encode("Question: what colour is the circle? Answer:"), tok.encode("Question: which shape is red? Answer:")
    ids, labels = vl_vqa.rows([p1, p2], ["red", "circle"], tok)
    assert ids.shape == labels.shape == (2, max(len(p1), len(p2)) + 2)
    assert labels[0].tolist() == [-100] * len(p1) + [tok.token_id("red"), tok.eos_id] + [-100] * (ids.shape[1] - len(p1) - 2)
    assert labels[1, len(p2):len(p2) + 2].tolist() == [tok.token_id("circle"), tok.eos_id]
    # the loss at position t is the label at t + 1: a model sure of the answer after the prompt has loss ~0
    logits = torch.full((2, ids.shape[1], tok.vocab_size), -30.0)
    for r in range(2):
        for t in range(ids.shape[1] - 1):
            logits[r, t, ids[r, t + 1]] = 30.0
    assert vl_vqa.lm_loss(logits, labels).item() < 1e-6


def test_accuracy_by_type_by_hand():
    items = vl_vqa.Items(torch.zeros(1, 3, 32, 32), ["a red circle"], [0, 0, 0],
                         ["what colour is the circle?", "which shape is red?", "how many shapes are there?"],
                         ["red", "circle", "one"])
    r = vl_vqa.accuracy(["red", "square", "one"], items, "x")
    assert r == {"x": 2 / 3, "x_by_type": {"colour": 1.0, "count": 1.0, "shape": 0.0}}
