"""benchmarks/bench_vision_language.py: --quick runs every section of this checkout and prints, last, one JSON
object with the acceptance keys (the numbers themselves come from the full run, not from this test); its
retrieval metric and text-only baseline checked by hand."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_vision_language.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_vision_language", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_the_keys(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--sections", "clip,coca", "--threads", "1",
                          "--set", f"coca.save={str(tmp_path / 'coca')!r}"],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("clip", "coca"):
        for key in ("recall_at_1", "recall_at_1_seen_captions", "text_only_recall_at_1", "chance_recall_at_1"):
            assert isinstance(result[f"{name}_{key}"], float) and 0 <= result[f"{name}_{key}"] <= 1, key
        assert set(result[f"{name}_recall_at_1_by_kind"]) <= {"single", "pair", "count"}
        assert result[f"{name}_chance_recall_at_1"] == 1 / result[f"{name}_candidates"]
    for key in ("coca_caption_exact", "coca_caption_exact_seen_captions", "coca_text_only_caption_exact"):
        assert 0 <= result[key] <= 1, key
    assert (tmp_path / "coca" / "config.json").is_file() and (tmp_path / "coca" / "tokenizer.json").is_file()


def test_unknown_section_and_setting_are_refused():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--sections", "nope"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 2 and "unknown section" in out.stderr
    bench = bench_module()
    try:
        bench.clip_section(quick=True, stepz=3)
    except SystemExit as e:
        assert "stepz" in str(e)
    else:
        raise AssertionError("an unknown setting was accepted")


def test_recall_and_caption_prior_by_hand():
    bench = bench_module()
    candidates = ["a red circle", "two blue squares", "a green square"]
    texts = torch.eye(3)
    images = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 0, 1.0]])  # picks candidates 0, 2, 2
    r = bench.retrieval_recall(images, texts, candidates, ["a red circle", "two blue squares", "a green square"],
                               ["single", "count", "single"])
    assert r == {"all": 2 / 3, "count": 0.0, "single": 1.0}
    # "a" and "square" are the commonest training words: "a green square" is the one fixed guess
    train = ["a red square", "a blue square", "a green circle"]
    assert bench.caption_prior_recall(train, candidates, ["a green square", "a red circle"]) == 0.5


def test_batches_never_repeat_a_caption():
    bench = bench_module()
    captions = ["a", "b", "a", "c", "b", "a", "d"]
    batches = bench.unique_caption_batches(captions, 3, torch.Generator().manual_seed(0))
    for _ in range(10):
        b = next(batches)
        assert len(b) == 3 and len({captions[i] for i in b}) == 3
