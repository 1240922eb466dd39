"""The flamingo section of benchmarks/bench_vision_language.py (benchmarks/vl_flamingo.py): its prompts hold the
task only in the shots' answers, each answer is about the picture just before it, and --quick returns the
acceptance keys (the numbers come from the full run, not from this test)."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import vl_flamingo as vf  # noqa: E402
from allformers.data.synthetic_shapes import SyntheticShapes  # noqa: E402
from allformers.models.flamingo import media_index  # noqa: E402


def test_prompts_show_the_task_only_through_the_shots():
    tok = vf.tokenizer()
    data = vf.Episodes(SyntheticShapes(6, "train", 0, 32, kinds=vf.KINDS), lambda x: x, tok)
    ids, px = data.prompt("count", [0, 1], 2, answered=False)
    words = tok.decode(ids, skip_special_tokens=False).split()
    n = [vf.answer(data.scenes[i], "count") for i in (0, 1)]
    assert words == ["<image>", "answer:", n[0], "<eoc>", "<image>", "answer:", n[1], "<eoc>", "<image>", "answer:"]
    assert torch.equal(px, data.pixels[[0, 1, 2]])
    # every answer sees only its own picture; the query's "answer:" sees the query's
    assert media_index(torch.tensor([ids]), data.img, data.eoc).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]]
    zero, _ = data.prompt("colour", [], 3, answered=False)
    assert zero == [data.img, tok.token_id("answer:")]  # 0 shots: nothing says which task


def test_quick_section_returns_the_keys():
    out = vf.flamingo_section(quick=True)
    for key in ("flamingo_fewshot_accuracy", "flamingo_text_only_fewshot_accuracy"):
        assert set(out[key]) == {"0", "1", "2", "4"} and all(0 <= v <= 1 for v in out[key].values())
    assert isinstance(out["flamingo_4shot_beats_0shot"], bool)
    assert out["flamingo_trained_params"] < out["flamingo_params"]  # the LM stayed frozen
