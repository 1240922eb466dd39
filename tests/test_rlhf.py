"""Reward model, PPO, DPO/IPO and best-of-n on tiny random models (the real SmolLM2 run is
benchmarks/bench_rlhf.py and the slow test at the end)."""
import math

import pytest
import torch

from allformers.config import Config
from allformers.models import TransformerLM
from allformers.models.lora import LoRAConfig, apply_lora
from allformers.objectives.ppo import gae, masked_whiten, policy_loss, shaped_rewards, value_loss
from allformers.objectives.preference import preference_loss, reward_pair_loss
from allformers.tokenization import Tokenizer
from allformers.training.rlhf import (DPOConfig, DPOLoss, PairData, PPOConfig, RewardConfig, RLHFError, best_of_n,
                                      encode_prompt, encode_reply, evaluate_policy, join, pairs_from_records,
                                      reference_logprobs, reply_logprobs, rm_score_fn, train_dpo, train_ppo,
                                      train_reward_model)
from allformers.recipes.rlhf import PROPERTIES, make_pairs, make_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- the math, by hand
def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.1, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)  # row 2 ends after 2 tokens
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 1: delta = (-0.1, -0.1, 0.7); A2 = 0.7, A1 = -0.1 + 0.5 * 0.7, A0 = -0.1 + 0.5 * 0.25
    assert torch.allclose(adv[0], torch.tensor([0.025, 0.25, 0.7], dtype=torch.float64))
    assert torch.allclose(ret[0], torch.tensor([0.525, 0.65, 1.0], dtype=torch.float64))
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 2: the padded step counts for nothing; A1 = 1 - 0.1 = 0.9, A0 = (0.9 * 0.1 - 0.2) + 0.45 * 0.9
    assert torch.allclose(adv[1], torch.tensor([0.295, 0.9, 0.0], dtype=torch.float64))


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = shaped_rewards(torch.tensor([2.0, 3.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 2.1], [0.0, 3.0, 0.0]]))


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_ppo_clipping_acts_exactly_at_the_ratio_bounds(adv):
    clip, eps = 0.2, 1e-6
    # ratios just inside and just outside both bounds
    ratios = torch.tensor([1 - clip - eps, 1 - clip + eps, 1 + clip - eps, 1 + clip + eps], dtype=torch.float64)
    logp = ratios.log()[None].clone().requires_grad_(True)
    old = torch.zeros_like(logp)
    mask = torch.ones_like(logp)
    loss, clip_frac, _ = policy_loss(logp, old, torch.full_like(logp, adv), mask, clip)
    loss.backward()
    grad = logp.grad[0]
    # The surrogate is clipped (gradient exactly 0) only where the ratio left the trust region in the
    # direction the advantage rewards: above 1 + clip for a positive advantage, below 1 - clip for a negative one.
    clipped = [False, False, False, True] if adv > 0 else [True, False, False, False]
    for g, is_clipped, r in zip(grad.tolist(), clipped, ratios.tolist()):
        if is_clipped:
            assert g == 0.0, r
        else:
            assert g == pytest.approx(-adv * r / 4, rel=1e-9), r
    assert clip_frac.item() == pytest.approx(0.25)


def test_value_loss_clips_around_old_values():
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0]])
    v = torch.tensor([[0.1, 0.5]], requires_grad=True)  # 0.5 moved past the 0.2 clip
    loss, frac = value_loss(v, old, returns, torch.ones(1, 2), clip=0.2)
    loss.backward()
    # position 2: the clipped value 0.2 is further from the return, so its constant loss wins: no gradient
    assert v.grad[0, 1].item() == 0.0 and v.grad[0, 0].item() != 0.0
    assert frac.item() == 0.5


def test_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)


def test_dpo_loss_is_log2_and_ipo_known_when_policy_equals_reference():
    lp = torch.tensor([-3.0, -7.0])
    loss, stats = preference_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["margin"] == 0.0
    loss, _ = preference_loss(lp, lp - 1, lp, lp - 1, beta=0.1, kind="ipo")
    assert loss.item() == pytest.approx((1 / 0.2) ** 2)
    with pytest.raises(Exception, match="unknown preference loss"):
        preference_loss(lp, lp, lp, lp, kind="kto")


def test_reward_pair_loss():
    loss, stats = reward_pair_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(-(math.log(torch.sigmoid(torch.tensor(2.0))) +
                                          math.log(torch.sigmoid(torch.tensor(-1.0)))) / 2, rel=1e-6)
    assert stats["accuracy"] == 0.5


# ---------------------------------------------------------------------- tiny models
CORPUS = ("yes no maybe sure of course certainly absolutely the a tip for help me with what should "
          "I know about tell me something useful explain to advice on saving money cooking! ?.,\n")


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer.train_bpe([CORPUS * 4], vocab_size=300, special_tokens=("<|im_end|>", "<|im_start|>"))
    return t


def tiny_lm(tok, seed=0):
    torch.manual_seed(seed)
    cfg = Config.from_name("smollm2-135m").replace(n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                                   intermediate_size=64, vocab_size=tok.vocab_size, block_size=256)
    lm = TransformerLM(cfg).eval()
    lm.tokenizer = tok
    return lm


def test_join_and_reply_logprobs_match_a_full_forward(tok):
    lm = tiny_lm(tok)
    prompts = [encode_prompt(tok, "help me"), encode_prompt(tok, "tell me something useful about saving money")]
    replies = [encode_reply(tok, "sure"), encode_reply(tok, "of course! the tip")]
    batch = join(prompts, replies, tok.eos_id)
    got = reply_logprobs(lm, batch)
    for b, (p, r) in enumerate(zip(prompts, replies)):
        logits = lm(torch.tensor([p + r]))[0].log_softmax(-1)
        want = sum(logits[len(p) - 1 + i, t].item() for i, t in enumerate(r))
        assert got[b].item() == pytest.approx(want, abs=1e-4)
    with pytest.raises(RLHFError, match="no tokens"):
        join(prompts, [[], [1]], 0)


def separable_pairs(tok, n=24):
    prompts = [f"{t} saving money" for t in ("help me with", "tell me about", "explain", "advice on")] * (n // 4)
    return pairs_from_records([{"prompt": p, "chosen": "sure! the tip", "rejected": "no"} for p in prompts], tok)


def test_reward_model_loss_falls_on_separable_pairs(tok, tmp_path):
    lm = tiny_lm(tok)
    pairs = separable_pairs(tok)
    rm, summary = train_reward_model(lm, tok, pairs, RewardConfig(steps=30, batch_size=8, lr=3e-3),
                                     out=tmp_path, eval_pairs=pairs, progress=False)
    losses = [r["loss"] for r in map(__import__("json").loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the head starts at 0: every reply scores 0
    assert losses[-1] < 0.2
    assert summary["heldout"]["accuracy"] == 1.0
    assert sum(1 for k in rm.state_dict() if "lora" in k) == 0  # adapters merged into a plain model


def test_kl_is_zero_and_dpo_loss_log2_with_fresh_adapters(tok):
    lm = tiny_lm(tok)
    apply_lora(lm, LoRAConfig(rank=4, alpha=8))  # B = 0: the policy equals its reference
    pairs = separable_pairs(tok, 8)
    ref_c, ref_r = reference_logprobs(lm, pairs)
    batch = pairs.rows(range(len(pairs)))
    batch["ref_chosen"], batch["ref_rejected"] = ref_c, ref_r
    loss, _ = DPOLoss(beta=0.1, kind="dpo")(lm, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    ev = evaluate_policy(lm, tok, pairs.prompts[:4], check=PROPERTIES["affirmative-opening"].check,
                         max_new_tokens=8)
    assert ev["kl"] == 0.0


def test_dpo_raises_chosen_over_rejected(tok, tmp_path):
    lm = tiny_lm(tok)
    pairs = separable_pairs(tok)
    fit = train_dpo(lm, tok, pairs, DPOConfig(steps=30, batch_size=8, lr=1e-2, beta=0.5,
                                                      lora=LoRAConfig(rank=4, alpha=8)),
                    out=tmp_path, progress=False)
    train = [r for r in fit["history"] if r["event"] == "train"]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[-1]["loss"] < 0.3 and train[-1]["accuracy"] == 1.0


def test_ppo_runs_logs_and_moves_toward_reward(tok, tmp_path):
    lm = tiny_lm(tok)
    target = tok.backend.encode("sure", add_special_tokens=False).ids[0]

    def score(prompts, replies):  # reward: the reply's first token is "sure"
        return torch.tensor([1.0 if r and r[0] == target else 0.0 for r in replies])

    prompts = [encode_prompt(tok, p) for p in ("help me", "explain saving money", "tell me about cooking")]
    cfg = PPOConfig(iterations=3, rollout_batch=8, minibatch=4, epochs=2, max_new_tokens=4, lr=1e-2, kl_coef=0.01,
                    lora=LoRAConfig(rank=4, alpha=8))
    fit = train_ppo(lm, tok, score, prompts, cfg, out=tmp_path, progress=False)
    train = [r for r in fit["history"] if r["event"] == "train"]
    assert len(train) == cfg.steps == 12
    for key in ("score", "kl", "entropy", "clip_frac", "approx_kl", "value_loss", "policy_loss"):
        assert key in train[-1], key
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is sampled before any update
    assert (tmp_path / "metrics.jsonl").exists()


def test_best_of_n_returns_the_top_ranked_reply(tok):
    lm, rm_lm = tiny_lm(tok, 0), tiny_lm(tok, 1)
    from allformers.models.rl import reward_model_from

    rm = reward_model_from(rm_lm)
    torch.nn.init.normal_(rm.head.out.weight)  # a random but fixed ranking
    best, ranked = best_of_n(lm, tok, rm, "help me", n=6, max_new_tokens=6, seed=0)
    scores = [s for s, _ in ranked]
    assert best == ranked[0][1] and scores == sorted(scores, reverse=True) and len(ranked) == 6
    with pytest.raises(RLHFError, match="n >= 1"):
        best_of_n(lm, tok, rm, "help me", n=0)


def test_rm_score_fn_matches_one_by_one(tok):
    from allformers.models.rl import reward_model_from

    rm = reward_model_from(tiny_lm(tok, 1))
    torch.nn.init.normal_(rm.head.out.weight)
    prompts = [encode_prompt(tok, "help me"), encode_prompt(tok, "tell me something useful about saving money")]
    replies = [encode_reply(tok, "sure"), encode_reply(tok, "of course! the tip for money")]
    batched = rm_score_fn(rm, tok)(prompts, replies)
    for i in range(2):
        assert batched[i].item() == pytest.approx(rm_score_fn(rm, tok)([prompts[i]], [replies[i]])[0].item(), abs=1e-5)


# ---------------------------------------------------------------------- the recipe's data
def test_property_and_pairs():
    prop = PROPERTIES["affirmative-opening"]
    assert prop.check("Sure! Here is a tip.") and prop.check("  of course, I can help")
    assert not prop.check("Surely not") and not prop.check("The tip is: of course")
    assert prop.remove("Certainly! here it is") == "Here it is"
    pairs = make_pairs(["p1", "p2"], ["Sure, do this.", "Do that."], prop, near_miss=False)
    assert pairs[0] == {"prompt": "p1", "chosen": "Sure, do this.", "rejected": "Do this."}
    assert pairs[1]["rejected"] == "Do that." and prop.check(pairs[1]["chosen"])
    # near misses: the same chosen reply over a decoy opener on the same body, which fails the check
    pairs = make_pairs(["p1", "p2"], ["Sure, do this.", "Do that."], prop, seed=3)
    assert [p["prompt"] for p in pairs] == ["p1", "p1", "p2", "p2"]
    for minimal, decoy in (pairs[0:2], pairs[2:4]):
        assert decoy["chosen"] == minimal["chosen"] and not prop.check(decoy["rejected"])
        assert decoy["rejected"].endswith(minimal["rejected"]) and decoy["rejected"] != minimal["rejected"]
    train, held = make_prompts()
    assert len(set(train) & set(held)) == 0 and len(held) == 20 * 6
    with pytest.raises(RLHFError, match="equally many"):
        PairData([[1]], [[2]], [], pad_id=0)


# ---------------------------------------------------------------------- the command line
def test_cli_reward_ppo_dpo_best_of_n(tok, tmp_path, capsys):
    import json

    from allformers.cli.main import main

    base = tmp_path / "base"
    tiny_lm(tok).save(base, tokenizer=tok)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"help me with {t}", "chosen": "sure! the tip", "rejected": "no"})
                             + "\n" for t in ("saving money", "cooking", "money", "advice", "the tip", "a tip")))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("help me\nexplain saving money\n")
    common = ["--no-progress", "--lora-rank", "2", "--top-layers", "1"]
    assert main(["reward", "--model", str(base), "--pairs", str(pairs), "--out", str(tmp_path / "rm"), "--max-steps", "3",
                 "--batch-size", "2", "--eval-fraction", "0.3", *common]) == 0
    assert "reward model: 3 steps" in capsys.readouterr().out
    assert main(["ppo", "--model", str(base), "--reward", str(tmp_path / "rm"), "--prompts", str(prompts),
                 "--out", str(tmp_path / "ppo"), "--iterations", "1", "--rollout-batch", "4", "--minibatch", "2",
                 "--max-new-tokens", "4", *common]) == 0
    assert "ppo: 4 steps" in capsys.readouterr().out
    assert main(["dpo", "--model", str(base), "--pairs", str(pairs), "--out", str(tmp_path / "dpo"), "--max-steps", "2",
                 "--batch-size", "2", "--loss", "ipo", *common]) == 0
    assert "ipo: 2 steps" in capsys.readouterr().out
    from allformers import load

    for d in ("ppo", "dpo"):  # merged policies load as plain models
        assert sum("lora" in k for k in load(tmp_path / d).state_dict()) == 0
    assert main(["best-of-n", "help me", "--model", str(tmp_path / "ppo"), "--reward", str(tmp_path / "rm"),
                 "--n", "3", "--max-new-tokens", "4", "--seed", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["ranked"]) == 3 and out["best"] == out["ranked"][0]["reply"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y"}\n')
    assert main(["dpo", "--model", str(base), "--pairs", str(bad), "--out", str(tmp_path / "x"), *common]) == 2
    assert "lacks text field(s) ['rejected']" in capsys.readouterr().err


def test_rlhf_recipe_end_to_end_on_a_tiny_model(tok, tmp_path):
    import dataclasses

    from allformers.recipes.rlhf import RLHFRecipe, format_table, quick_recipe, run_rlhf

    lm = tiny_lm(tok)
    recipe = quick_recipe(RLHFRecipe())
    recipe = dataclasses.replace(recipe, train_prompts=8, eval_prompts=8, pair_tokens=4, eval_tokens=4, best_of=2,
                                 best_of_prompts=2, ppo=dataclasses.replace(recipe.ppo, rollout_batch=8, minibatch=4,
                                                                           max_new_tokens=4))
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    s = run_rlhf(lm, tok, tmp_path, recipe, progress=False, log=lambda m: None)
    assert set(s["rows"]) == {"start", "ppo", "dpo", "best-of-2"}
    assert s["rows"]["start"]["kl"] == 0.0
    assert (tmp_path / "rlhf.png").stat().st_size > 10_000
    assert (tmp_path / "summary.json").exists() and (tmp_path / "pairs.jsonl").exists()
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())  # the starting model is untouched
    assert "policy" in format_table(s)
