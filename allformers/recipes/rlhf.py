"""The whole ChatGPT recipe in one call, sized for a CPU: `allformers rlhf` (= `allformers train
--recipe rlhf-smollm2`) and benchmarks/bench_rlhf.py. The trainers it chains (reward model, PPO,
DPO, best-of-n) are the engine's: allformers/training/rlhf.py.

1. Prompts: everyday requests from templates x topics; held-out prompts use topics never seen in training.
2. Preference pairs where a program can check which reply is better: the starting policy samples a
   short reply to each training prompt; the reply with the property is preferred over the same reply
   without it, and over the same reply behind a look-alike that fails the check (a near miss).
3. Reward model: the starting LM with a scalar head, trained on the pairs (accuracy on held-out pairs).
4. PPO against the reward model with a KL penalty to the starting policy; separately DPO on the pairs.
5. On held-out prompts: the share of sampled replies with the property and the mean KL per reply to
   the starting policy, for the start, PPO, DPO (and best-of-n reranking with the reward model).

The property (PROPERTIES) is a reply that opens by agreeing to help ("Sure", "Of course",
"Certainly", "Absolutely"). It is decided by the first tokens, so rollouts can stay short on a CPU,
and the starting model already does it sometimes (PPO needs some successes to reinforce).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..deprecation import accepts_old_names
from ..training.rlhf import (DPOConfig, PairData, PPOConfig, RewardConfig, RLHFError, best_of_n, encode_prompt, evaluate_policy,
                   pad_id_of, rm_score_fn, sample_replies, save_json, train_dpo, train_ppo, train_reward_model)
from .registry import Recipe, register


# ---------------------------------------------------------------------- the checkable property
@dataclass(frozen=True)
class Property:
    name: str
    description: str
    check: Callable[[str], bool]  # does this reply have it?
    add: Callable[[str, random.Random], str]  # the reply rewritten to have it
    remove: Callable[[str], str]  # the reply rewritten not to have it
    near_miss: Optional[Callable[[str, random.Random], str]] = None  # rewritten to look like it, without it


OPENERS = ("Sure!", "Of course!", "Certainly!", "Absolutely!")
_OPENING = re.compile(r"^\s*(sure|of course|certainly|absolutely)\b[\s!,.:;-]*", re.IGNORECASE)


def _opens_affirmative(reply: str) -> bool:
    return bool(_OPENING.match(reply))


def _add_opener(reply: str, rng: random.Random) -> str:
    return f"{rng.choice(OPENERS)} {reply.lstrip()}"


def _remove_opener(reply: str) -> str:
    rest = _OPENING.sub("", reply, count=1)
    return rest[:1].upper() + rest[1:] if rest else rest


# Openers that are not the property. With only minimal pairs ("Sure! X" over "X") the reward model
# learned "a short exclamation first" and PPO climbed it with "Alrighten!", "Wonderful!" (rate 0.36 while
# the reward rose 5 points); pairs against these decoys teach it which words count.
DECOYS = ("Well!", "Oh!", "Wow!", "Hello!", "Great question!", "Alright!", "Hmm,", "Okay!", "Wonderful!",
          "Interesting!", "Hi there!", "Ah,", "Yes!", "Good question!", "Happy to help!", "Indeed!")


def _decoy_opener(reply: str, rng: random.Random) -> str:
    return f"{rng.choice(DECOYS)} {_remove_opener(reply).lstrip()}"


PROPERTIES = {
    "affirmative-opening": Property(
        "affirmative-opening", "the reply opens by agreeing to help: Sure / Of course / Certainly / Absolutely",
        _opens_affirmative, _add_opener, _remove_opener, _decoy_opener),
}


# ---------------------------------------------------------------------- prompts
TEMPLATES = ("Give me one tip for {}.", "Can you help me with {}?", "What should I know about {}?",
             "Tell me something useful about {}.", "Could you explain {} to me?", "I need advice on {}.")
TOPICS = ("saving money", "learning to cook", "staying focused", "sleeping better", "public speaking", "gardening",
          "running a marathon", "writing an email", "reading more books", "drinking more water", "learning Spanish",
          "painting a room", "training a puppy", "making friends", "planning a trip", "studying for exams",
          "baking bread", "keeping plants alive", "writing a poem", "starting a blog", "fixing a bike", "meditation",
          "choosing a laptop", "cleaning the kitchen", "job interviews", "time management", "learning guitar",
          "taking photos", "budgeting for groceries", "moving house", "waking up early", "learning to swim",
          "writing a resume", "hosting a dinner", "reducing stress", "learning to code", "organizing a closet",
          "camping", "saving energy at home", "caring for a cat", "making coffee", "playing chess",
          "growing tomatoes", "writing a story", "stretching after exercise", "learning history", "knitting",
          "recycling", "birdwatching", "home workouts", "giving a toast", "sewing a button", "walking more",
          "choosing a book", "learning math", "cooking rice", "keeping a journal", "volunteering",
          "drawing portraits", "packing a suitcase")


def make_prompts(n_heldout_topics: int = 20, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts); held-out ones are about topics never used in training."""
    topics = list(TOPICS)
    random.Random(seed).shuffle(topics)
    held, train = topics[:n_heldout_topics], topics[n_heldout_topics:]
    return [t.format(x) for x in train for t in TEMPLATES], [t.format(x) for x in held for t in TEMPLATES]


# ---------------------------------------------------------------------- pairs
def make_pairs(prompts: list[str], replies: list[str], prop: Property, seed: int = 0,
               near_miss: bool = True) -> list[dict]:
    """{prompt, chosen, rejected} records: each reply with and without the property (the rest of
    the reply is identical, so the only preference signal is the property), and, with `near_miss`
    (when the property has one), a second pair of the same chosen reply over a look-alike without it."""
    rng = random.Random(seed)
    out = []
    for p, r in zip(prompts, replies):
        if prop.check(r):
            chosen, rejected = r, prop.remove(r)
        else:
            chosen, rejected = prop.add(r, rng), r
        sides = [rejected] + ([prop.near_miss(r, rng)] if near_miss and prop.near_miss else [])
        for rej in sides:
            if chosen.strip() and rej.strip() and prop.check(chosen) and not prop.check(rej):
                out.append({"prompt": p, "chosen": chosen, "rejected": rej})
    return out


def encode_pairs(records: list[dict], tokenizer, finished: list[bool], seed: int = 0) -> PairData:
    """Like pairs_from_records, but a reply that was cut at max_new_tokens gets no end-of-turn token."""
    def reply(text, done):
        ids = tokenizer.backend.encode(text, add_special_tokens=False).ids
        return ids + [tokenizer.eos_id] if done else ids

    return PairData([encode_prompt(tokenizer, r["prompt"]) for r in records],
                    [reply(r["chosen"], f) for r, f in zip(records, finished)],
                    [reply(r["rejected"], f) for r, f in zip(records, finished)], pad_id_of(tokenizer), seed)


# ---------------------------------------------------------------------- the recipe
@dataclass(kw_only=True)
class RLHFRecipe(Recipe):
    model: str = "smollm2"  # the starting chat model (folder, .gguf or a bundled name); run() loads it
    property: str = "affirmative-opening"
    train_prompts: int = 128  # pairs for the reward model and DPO (one sampled reply each)
    eval_prompts: int = 96  # held-out prompts for the rates and KL
    # Reply length of the pairs and of PPO's rollouts. The property is decided by the first words; with
    # 24-token replies the reward model's score varied more with the rest of the reply than with the opener
    # (best-of-4 picked property replies no more often than chance) and PPO gained 5-26 points; with 8
    # tokens PPO gained 87-89 points over three seeds (docs/alignment.md).
    pair_tokens: int = 8
    near_miss: bool = True  # also pair each chosen reply against a look-alike without the property
    eval_tokens: int = 32  # reply length at evaluation
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(steps=40))  # two pairs per prompt
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(max_new_tokens=8, kl_coef=1.0))
    dpo: DPOConfig = field(default_factory=DPOConfig)
    best_of: int = 4  # best-of-n reranking row (0: skip)
    best_of_prompts: int = 24
    seed: int = 0
    kind = "rlhf"

    def with_max_steps(self, n: int) -> "RLHFRecipe":
        raise RLHFError(f"the RLHF stages are sized one by one: --set reward.steps={n} --set dpo.steps={n} "
                        f"--set ppo.iterations=N (rollout phases)")

    def run(self, *, out: Path, data=None, progress: bool = True, resume: bool = False, verbose: bool = True) -> dict:
        from ..checkpoints.io import load_reporting

        lm = load_reporting(self.model, need_tokenizer=True)
        return run_rlhf(lm, lm.tokenizer, out, self, progress=progress, log=print if verbose else (lambda m: None))

    def report(self, summary: dict) -> str:
        return format_table(summary) + f"\nplot: {summary['plot']}"


def quick_recipe(recipe: RLHFRecipe) -> RLHFRecipe:
    """The same recipe with every stage cut to a few steps: checks that it all runs (minutes on a CPU)."""
    r = dataclasses.replace
    return r(recipe, train_prompts=16, eval_prompts=16, best_of_prompts=4, reward=r(recipe.reward, steps=4),
             ppo=r(recipe.ppo, iterations=2), dpo=r(recipe.dpo, steps=4))


register(RLHFRecipe(
    name="rlhf-smollm2", description="the ChatGPT recipe on the bundled SmolLM2-135M-Instruct: preference pairs "
    "from its own replies (the chosen one opens by agreeing to help), reward model, PPO with a KL penalty, DPO, "
    "best-of-4; held-out property rates and KL per reply",
    target="PPO 0.969 and DPO 0.948 of held-out replies with the property (start 0.104) in ~15 min on 2 threads"))
register(dataclasses.replace(quick_recipe(RLHFRecipe()), name="rlhf-smollm2-quick",
                             description="rlhf-smollm2 with every stage cut to a few steps: checks that it all runs", target=""))


@accepts_old_names
def run_rlhf(lm, tokenizer, out, recipe: RLHFRecipe = RLHFRecipe(), *, progress: bool = True,
             threads: Optional[int] = None, log: Callable[[str], None] = print) -> dict:
    """Run the recipe from `lm` (left untouched: each stage trains its own copy). Writes
    OUT/summary.json, OUT/pairs.jsonl, OUT/{reward,ppo,dpo}/metrics.jsonl and OUT/rlhf.png."""
    import json

    if recipe.property not in PROPERTIES:
        raise RLHFError(f"unknown property {recipe.property!r}; known: {sorted(PROPERTIES)}")
    if threads:
        torch.set_num_threads(threads)
    prop = PROPERTIES[recipe.property]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, clock = time.perf_counter(), StageClock(log)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    train_text, held_text = make_prompts(seed=recipe.seed)
    train_text = rng.sample(train_text, min(recipe.train_prompts, len(train_text)))
    held_text = rng.sample(held_text, min(recipe.eval_prompts, len(held_text)))
    train_ids = [encode_prompt(tokenizer, p) for p in train_text]
    held_ids = [encode_prompt(tokenizer, p) for p in held_text]

    with clock("pairs"):  # 1. preference pairs from the starting policy's own replies
        gen = torch.Generator().manual_seed(recipe.seed)
        replies = sample_replies(lm, tokenizer, train_ids, max_new_tokens=recipe.pair_tokens, generator=gen,
                                 progress=progress)
        records, finished = pairs_of(train_text, [tokenizer.decode(r) for r in replies],
                                     [bool(r) and r[-1] == tokenizer.eos_id for r in replies], prop, recipe.seed,
                                     recipe.near_miss)
        (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        pairs = encode_pairs(records, tokenizer, finished, seed=recipe.seed)
    with clock("baseline eval"):  # 2. the starting policy on held-out prompts
        ev = dict(check=prop.check, max_new_tokens=recipe.eval_tokens, seed=recipe.seed + 1, progress=progress)
        base = evaluate_policy(lm, tokenizer, held_ids, **ev)
        held_records, held_done = pairs_of(held_text, base.pop("texts"), base.pop("finished"), prop,
                                           recipe.seed + 1, recipe.near_miss)
    log(f"[rlhf] start: property rate {base['rate']:.3f}")
    with clock("reward model"):  # 3. reward model
        rm, rm_summary = train_reward_model(lm, tokenizer, pairs, recipe.reward, out=out / "reward",
                                            eval_pairs=encode_pairs(held_records, tokenizer, held_done),
                                            progress=progress)
        score_fn = rm_score_fn(rm, tokenizer)
        rm.save(out / "reward" / "model", tokenizer=tokenizer)  # for `allformers ppo --reward` / `best-of-n --reward`
    log(f"[rlhf] reward model held-out pair accuracy {rm_summary['heldout']['accuracy']:.3f}")

    # 4. PPO and DPO, each on its own copy of the starting policy, then measured like it
    def tuned(name, train):
        policy = copy.deepcopy(lm)
        with clock(name):
            fit = train(policy)
        with clock(f"{name} eval"):
            return fit, _drop_texts(evaluate_policy(policy, tokenizer, held_ids, score_fn=score_fn, **ev))

    ppo_fit, ppo = tuned("ppo", lambda p: train_ppo(p, tokenizer, score_fn, train_ids, recipe.ppo, out=out / "ppo",
                                                    check=prop.check, progress=progress))
    dpo_fit, dpo = tuned("dpo", lambda p: train_dpo(p, tokenizer, pairs, recipe.dpo, out=out / "dpo",
                                                    progress=progress))
    rows = {"start": base, "ppo": ppo, "dpo": dpo}
    if recipe.best_of:  # 5. best-of-n with the reward model (Sparrow's reranking), no training of the policy
        with clock("best-of-n"):
            picks = [best_of_n(lm, tokenizer, rm, p, recipe.best_of, max_new_tokens=recipe.eval_tokens,
                               seed=recipe.seed + i)[0] for i, p in enumerate(held_text[:recipe.best_of_prompts])]
            rows[f"best-of-{recipe.best_of}"] = {"rate": sum(map(prop.check, picks)) / len(picks), "kl": None,
                                                 "n": len(picks), "examples": picks[:6]}

    from ..training.plot import plot_rlhf

    plot = plot_rlhf(out / "ppo" / "metrics.jsonl", out / "dpo" / "metrics.jsonl", out / "rlhf.png",
                     baseline_rate=base["rate"])
    summary = {"property": prop.name, "property_description": prop.description, "rows": rows,
               "pairs": len(pairs), "heldout_pairs": len(held_records), "reward_model": rm_summary,
               "ppo_last_rollout": ppo_fit["last_rollout"],
               "dpo_last_step": next(r for r in reversed(dpo_fit["history"]) if r["event"] == "train"),
               "times_s": clock.times,
               "wall_time_s": round(time.perf_counter() - t_start, 1), "plot": str(plot),
               "recipe": dataclasses.asdict(recipe)}
    save_json(out / "summary.json", summary)
    return summary


class StageClock:
    """`with clock("name"):` times a stage into clock.times (seconds, 1 decimal) and logs it."""

    def __init__(self, log):
        self.log, self.times = log, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[name] = round(time.perf_counter() - t0, 1)
        self.log(f"[rlhf] {name}: {self.times[name]:.0f} s")


def pairs_of(prompts, texts, finished, prop, seed: int, near_miss) -> tuple[list, list]:
    """(pair records, finished flag of each pair's reply) from one reply per distinct prompt; a
    prompt may give two pairs, each keeping its reply's flag."""
    records = make_pairs(prompts, texts, prop, seed=seed, near_miss=near_miss)
    done_of = dict(zip(prompts, finished))
    return records, [done_of[r["prompt"]] for r in records]


def _drop_texts(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("texts", "finished")}


def format_table(summary: dict) -> str:
    lines = [f"property: {summary['property_description']}",
             f"{'policy':<12} {'rate':>7} {'KL/reply':>9} {'reward':>8} {'tokens':>7}"]
    for name, r in summary["rows"].items():
        kl = f"{r['kl']:.2f}" if r.get("kl") is not None else "-"
        score = f"{r['score']:.2f}" if r.get("score") is not None else "-"
        tokens = f"{r['reply_tokens']:.1f}" if r.get("reply_tokens") is not None else "-"
        lines.append(f"{name:<12} {r['rate']:>7.3f} {kl:>9} {score:>8} {tokens:>7}")
    rm = summary["reward_model"].get("heldout", {})
    if rm:
        lines.append(f"reward model: held-out pair accuracy {rm['accuracy']:.3f} on {rm['pairs']} pairs")
    lines.append(f"wall time {summary['wall_time_s']:.0f} s ({', '.join(f'{k} {v:.0f}s' for k, v in summary['times_s'].items())})")
    return "\n".join(lines)
