"""The README's training recipe, run in full (slow suite): nanoGPT's CPU baby GPT on
character-level Tiny Shakespeare must reach validation loss <= 1.89. Its wall time is
measured by benchmarks/bench_shakespeare.py, not asserted here."""
import pytest

from allformers.training.recipes import run_recipe


@pytest.mark.slow
def test_shakespeare_char_cpu_reaches_its_target(tmp_path):
    result = run_recipe("shakespeare-char-cpu", out_dir=tmp_path / "run", progress=False)
    assert result["step"] == 2000
    assert result["val_loss"] <= 1.89, result["val_loss"]
    assert (tmp_path / "run" / "loss.png").exists() and (tmp_path / "run" / "metrics.jsonl").exists()
    assert all(len(s) > 50 for s in result["samples"])
