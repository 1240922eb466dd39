"""The RLHF recipe's every stage on the real SmolLM2-135M-Instruct, with the quick settings
(a few steps each; slow suite). The full run and its acceptance numbers: benchmarks/bench_rlhf.py."""
import json

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_quick_rlhf_recipe_on_smollm2(tmp_path):
    from allformers import load
    from allformers.cli.common import load_model
    from allformers.training.rlhf import encode_prompt, encode_reply, rm_score_fn
    from allformers.recipes.rlhf import PROPERTIES, RLHFRecipe, quick_recipe, run_rlhf

    lm = load_model("smollm2")
    s = run_rlhf(lm, lm.tokenizer, tmp_path, quick_recipe(RLHFRecipe()), progress=False, log=lambda m: None)
    rows = s["rows"]
    assert set(rows) == {"start", "ppo", "dpo", "best-of-4"}
    assert rows["start"]["kl"] == 0.0 and all(0.0 <= r["rate"] <= 1.0 for r in rows.values())
    # the trained policies moved: untouched adapters give exactly 0 (B = 0); the sign of a Monte-Carlo
    # KL estimate on 16 replies after 8 small PPO steps is noise
    assert all(rows[k]["kl"] != 0.0 for k in ("ppo", "dpo")), {k: rows[k]["kl"] for k in ("ppo", "dpo")}
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    check = PROPERTIES["affirmative-opening"].check
    assert pairs and all(check(p["chosen"]) and not check(p["rejected"]) for p in pairs)
    ppo = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(ppo) == 8 and {"score", "kl", "property", "clip_frac", "entropy"} <= set(ppo[-1])
    # the saved reward model scores like the in-memory one did
    rm = load(tmp_path / "reward" / "model")
    tok = lm.tokenizer
    p, c, r = encode_prompt(tok, pairs[0]["prompt"]), encode_reply(tok, pairs[0]["chosen"]), encode_reply(tok, pairs[0]["rejected"])
    scores = rm_score_fn(rm, tok)([p, p], [c, r])
    assert torch.isfinite(scores).all()
    assert (tmp_path / "rlhf.png").stat().st_size > 10_000
