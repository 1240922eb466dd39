"""Reward model, PPO, DPO/IPO and best-of-n on one shared Trainer (the ChatGPT recipe's stages 2-3).

Data shapes used throughout: a prompt is a list of token ids (the chat template already applied),
a reply is a list of token ids ending with eos when the model finished. `join` right-pads
prompt + reply into (B, T) rows; because attention is causal, padding at the end never changes
the real tokens, so no attention mask is needed to score replies.

    rm = train_reward_model(lm, tok, pairs, RewardConfig())          # pairs: prompt/chosen/rejected
    summary = train_ppo(policy_lm, tok, rm, prompts, PPOConfig())     # policy_lm gets LoRA adapters
    summary = train_dpo(policy_lm, tok, pairs, DPOConfig())
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..data.split import hash_split
from ..deprecation import accepts_old_names
from ..errors import AllformersError
from ..generation.generate import generate, left_pad
from ..models.lora import LoRAConfig, apply_lora, lora_disabled
from ..models.rl import PolicyWithValue, reward_model_from, reward_scores
from ..objectives.ppo import (entropy, gae, masked_mean, masked_whiten, policy_loss, shaped_rewards, token_logprobs,
                              value_loss)
from ..objectives.preference import preference_loss, reward_pair_loss, sequence_logprob
from ..objectives.sft import chat_prompt
from .trainer import Trainer, TrainConfig, to_device


class RLHFError(AllformersError, ValueError):
    """Preference data or an RLHF setting is unusable."""


# ---------------------------------------------------------------------- text <-> ids
def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A user message rendered with the chat template, ready for the assistant's reply."""
    text = chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer.backend.encode(text, add_special_tokens=False).ids


def encode_reply(tokenizer, reply: str) -> list[int]:
    """A finished reply: its tokens and eos (the end of the assistant's turn)."""
    return tokenizer.backend.encode(reply, add_special_tokens=False).ids + [tokenizer.eos_id]


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


def join(prompts: Sequence[list[int]], replies: Sequence[list[int]], pad_id: int) -> dict:
    """Right-padded prompt + reply rows.

    input_ids (B, T), attention_mask (B, T); index (B, R): positions whose next token is reply
    token r (= prompt length - 1 + r); reply_ids (B, R); reply_mask (B, R) 1 on real reply tokens."""
    if len(prompts) != len(replies):
        raise RLHFError(f"{len(prompts)} prompts but {len(replies)} replies")
    if any(len(r) == 0 for r in replies):
        raise RLHFError("a reply has no tokens; every reply needs at least its end-of-turn token")
    B = len(prompts)
    T = max(len(p) + len(r) for p, r in zip(prompts, replies))
    R = max(len(r) for r in replies)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    index = torch.zeros(B, R, dtype=torch.long)
    reply_ids = torch.full((B, R), pad_id, dtype=torch.long)
    reply_mask = torch.zeros(B, R)
    for b, (p, r) in enumerate(zip(prompts, replies)):
        n = len(p) + len(r)
        ids[b, :n] = torch.tensor(p + r)
        mask[b, :n] = 1
        index[b] = (len(p) - 1 + torch.arange(R)).clamp(max=T - 1)
        reply_ids[b, :len(r)] = torch.tensor(r)
        reply_mask[b, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "index": index, "reply_ids": reply_ids, "reply_mask": reply_mask}


def reply_logprobs(lm, batch: dict) -> torch.Tensor:
    """Summed log-prob of each row's reply under a causal LM: (B,). Only reply positions go
    through the LM head."""
    batch = to_device(batch, lm.device)
    h = _gather(lm(batch["input_ids"], return_hidden=True), batch["index"])  # (B, R, C)
    return sequence_logprob(lm.head(h), batch["reply_ids"], batch["reply_mask"])


@torch.no_grad()
def sample_replies(lm, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int = 32,
                   temperature: float = 1.0, top_p: Optional[float] = None, batch_size: int = 16,
                   generator: Optional[torch.Generator] = None, progress: bool = False) -> list[list[int]]:
    """One sampled reply per prompt (left-padded batches). A reply keeps its eos if it finished;
    a cut one just stops at max_new_tokens."""
    from tqdm import tqdm

    was_training = lm.training
    lm.eval()
    eos, pad = tokenizer.eos_id, pad_id_of(tokenizer)
    out: list[list[int]] = []
    chunks = range(0, len(prompts), batch_size)
    for s in tqdm(chunks, desc="sampling", disable=not progress, leave=False):
        chunk = list(prompts[s:s + batch_size])
        x, mask = left_pad(chunk, pad)
        rows = generate(lm, x, attention_mask=mask if len(chunk) > 1 else None, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, eos_id=eos, pad_id=pad, generator=generator)
        for row in rows[:, x.shape[1]:].tolist():
            out.append(row[:row.index(eos) + 1] if eos in row else row)
    lm.train(was_training)
    return out


# ---------------------------------------------------------------------- preference pairs
@dataclass
class PairData:
    """Preference pairs as token ids, sampled with replacement by the Trainer."""
    prompts: list
    chosen: list
    rejected: list
    pad_id: int
    seed: int = 0
    extra: dict = field(default_factory=dict)  # per-pair tensors to carry along (DPO's reference log-probs)

    def __post_init__(self):
        if not (len(self.prompts) == len(self.chosen) == len(self.rejected)) or not self.prompts:
            raise RLHFError(f"preference data needs equally many prompts, chosen and rejected replies (got "
                            f"{len(self.prompts)}, {len(self.chosen)}, {len(self.rejected)}), at least one each")
        self.generator = torch.Generator().manual_seed(self.seed)

    def __len__(self):
        return len(self.prompts)

    def rows(self, idx: Sequence[int]) -> dict:
        c = join([self.prompts[i] for i in idx], [self.chosen[i] for i in idx], self.pad_id)
        r = join([self.prompts[i] for i in idx], [self.rejected[i] for i in idx], self.pad_id)
        batch = {**{f"chosen_{k}": v for k, v in c.items()}, **{f"rejected_{k}": v for k, v in r.items()}}
        for k, v in self.extra.items():
            batch[k] = v[list(idx)]
        return batch

    def sample(self, n: int) -> dict:
        return self.rows(torch.randint(len(self), (n,), generator=self.generator).tolist())

    def batches(self, n: int) -> list[dict]:
        return [self.rows(range(s, min(s + n, len(self)))) for s in range(0, len(self), n)]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def pairs_from_records(records: Sequence[dict], tokenizer, seed: int = 0) -> PairData:
    """{prompt, chosen, rejected} text records -> PairData (chat template on the prompt)."""
    for i, r in enumerate(records):
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(r.get(k), str)]
        if missing:
            raise RLHFError(f"preference record {i} lacks text field(s) {missing}; each line needs "
                            f'{{"prompt": ..., "chosen": ..., "rejected": ...}}')
    return PairData([encode_prompt(tokenizer, r["prompt"]) for r in records],
                    [encode_reply(tokenizer, r["chosen"]) for r in records],
                    [encode_reply(tokenizer, r["rejected"]) for r in records], pad_id_of(tokenizer), seed)


def split_records(records: Sequence[dict], fraction: float) -> tuple[list, list]:
    """(train, held out): the round(fraction * n_prompts) prompts with the smallest hash are held out
    (data.split.hash_split), every pair of one prompt on the same side."""
    train, held = hash_split(records, fraction, key=lambda r: str(r.get("prompt")), error=RLHFError)
    return [records[i] for i in train], [records[i] for i in held]


def _device_of(model) -> str:
    # train where the model already is (the Trainer's "auto" would move a CPU model to a GPU)
    return next(model.parameters()).device.type


def _pair_train_config(cfg, model, threads: Optional[int]) -> TrainConfig:
    """The Trainer settings of the pair trainings (reward model, DPO): cfg's steps, batch, lr and seed,
    10% warm-up, cosine to lr / 10, no weight decay, every step logged, no checkpoints."""
    return TrainConfig(max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.lr / 10,
                       warmup_steps=max(1, cfg.steps // 10), weight_decay=0.0, eval_interval=0, eval_at_start=False,
                       log_interval=1, checkpoint=False, seed=cfg.seed, threads=threads,
                       device=_device_of(model))


def _side(batch: dict, side: str) -> dict:
    return {k[len(side) + 1:]: v for k, v in batch.items() if k.startswith(side + "_")}


# ---------------------------------------------------------------------- reward model
@dataclass
class RewardConfig:
    # SmolLM2, pairs differing by the opening words: lr 2e-4 left the head near 0 after 20 steps
    # (loss 0.678, margin 0.03: PPO then had nothing to climb); 2e-3 reaches loss 0.005, margin 7.6.
    steps: int = 20
    batch_size: int = 8
    lr: float = 2e-3
    lora: Optional[LoRAConfig] = field(default_factory=lambda: LoRAConfig(rank=8, alpha=16, top_layers=8))
    seed: int = 0


class RewardLoss:
    """loss_fn for the Trainer: -log sigmoid(r_chosen - r_rejected), with accuracy and margin logged."""

    def __call__(self, rm, batch):
        c, r = _side(batch, "chosen"), _side(batch, "rejected")
        ids = torch.cat([_pad_to(c["input_ids"], r["input_ids"].shape[1], 0),
                         _pad_to(r["input_ids"], c["input_ids"].shape[1], 0)])  # one forward for both sides
        mask = torch.cat([_pad_to(c["attention_mask"], r["attention_mask"].shape[1], 0),
                          _pad_to(r["attention_mask"], c["attention_mask"].shape[1], 0)])
        scores = reward_scores(rm, ids, mask)
        n = c["input_ids"].shape[0]
        return reward_pair_loss(scores[:n], scores[n:])

    @staticmethod
    def num_tokens(batch) -> int:
        return int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())


def _pad_to(x: torch.Tensor, T: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, max(0, T - x.shape[1])), value=value)


@torch.no_grad()
def evaluate_reward_model(rm, pairs: PairData, batch_size: int = 16) -> dict:
    rm.eval()
    right, margin, n = 0, 0.0, 0
    for batch in pairs.batches(batch_size):
        batch = to_device(batch, rm.device)
        c, r = _side(batch, "chosen"), _side(batch, "rejected")
        diff = reward_scores(rm, c["input_ids"], c["attention_mask"]) - reward_scores(rm, r["input_ids"],
                                                                                       r["attention_mask"])
        right, margin, n = right + int((diff > 0).sum()), margin + float(diff.sum()), n + len(diff)
    return {"accuracy": right / n, "margin": margin / n, "pairs": n}


@accepts_old_names
def train_reward_model(lm, tokenizer, pairs: PairData, cfg: RewardConfig = RewardConfig(), *, out=None,
                       eval_pairs: Optional[PairData] = None, progress: bool = True, threads: Optional[int] = None):
    """Reward model from `lm` (copied; `lm` is untouched), trained on pairs. LoRA adapters are merged at
    the end, so the result is a plain TaskModel. Returns (reward model, summary)."""
    from ..models.lora import merge_lora

    rm = reward_model_from(lm)
    if cfg.lora is not None:
        apply_lora(rm.body, cfg.lora)  # freezes the body only: the head stays trainable
    tc = _pair_train_config(cfg, lm, threads)
    trainer = Trainer(rm, RewardLoss(), pairs, tc, out=out, progress=progress)
    fit = trainer.fit()
    if cfg.lora is not None:
        merge_lora(rm.body)
    rm.eval()
    summary = {"steps": fit["step"], "train_time_s": fit["train_time_s"], "plot": fit["plot"],
               "train_last": {k: v for k, v in trainer.history[-1].items() if k in ("loss", "accuracy", "margin")}}
    if eval_pairs is not None:
        summary["heldout"] = evaluate_reward_model(rm, eval_pairs)
    return rm, summary


# ---------------------------------------------------------------------- PPO
@dataclass
class PPOConfig:
    iterations: int = 12  # rollout phases
    rollout_batch: int = 16  # replies sampled per phase
    minibatch: int = 8  # replies per optimizer step
    epochs: int = 2  # passes over each phase's replies
    max_new_tokens: int = 24
    temperature: float = 1.0
    # Measured on SmolLM2 (docs/alignment.md): lr 1e-4 did not move the policy in 48 steps; lambda 0.95
    # with an untrained value head gives the first reply token ~0.3 of the last one's credit, so the
    # policy drifted late in the reply instead of changing how it opens: lambda 1 (Monte-Carlo
    # returns minus the value baseline). kl_coef 0.1 / 0.2 / 0.5 ended at KL 13.4 / 11.7 / 5.9 nats
    # per 32-token reply with the property rate at 0.63 / 0.79 / 0.54.
    lr: float = 1e-3
    kl_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 1.0
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    grad_clip: float = 1.0
    lora: Optional[LoRAConfig] = field(default_factory=lambda: LoRAConfig(rank=8, alpha=16, top_layers=8))
    seed: int = 0

    def __post_init__(self):
        if self.rollout_batch % self.minibatch:
            raise RLHFError(f"rollout_batch={self.rollout_batch} must be a multiple of minibatch={self.minibatch}")

    @property
    def steps(self) -> int:
        return self.iterations * self.epochs * (self.rollout_batch // self.minibatch)


class Rollouts:
    """The PPO 'data source': when its queue is empty it samples replies from the current policy,
    scores them, computes KL-shaped rewards, values and whitened GAE advantages, and queues
    `epochs` shuffled passes of minibatches. The Trainer just calls sample(minibatch)."""

    def __init__(self, policy: PolicyWithValue, tokenizer, prompts: Sequence[list[int]],
                 score_fn: Callable[[list, list], torch.Tensor], cfg: PPOConfig,
                 check: Optional[Callable[[str], bool]] = None):
        self.policy, self.tok, self.prompts, self.score_fn, self.cfg, self.check = (
            policy, tokenizer, list(prompts), score_fn, cfg, check)
        self.rng = random.Random(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.queue: list[dict] = []
        self.stats: dict = {}
        self.phase = 0

    def sample(self, n: int) -> dict:
        if n != self.cfg.minibatch:
            raise RLHFError(f"PPO minibatches hold {self.cfg.minibatch} replies; the Trainer asked for {n}")
        if not self.queue:
            self._collect()
        return self.queue.pop(0)

    @torch.no_grad()
    def _collect(self):
        cfg, lm = self.cfg, self.policy.lm
        prompts = [self.rng.choice(self.prompts) for _ in range(cfg.rollout_batch)]
        replies = sample_replies(lm, self.tok, prompts, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, batch_size=cfg.rollout_batch, generator=self.generator)
        batch = to_device(join(prompts, replies, pad_id_of(self.tok)), lm.device)
        self.policy.eval()
        logits, values = self.policy(batch["input_ids"], batch["index"])
        logp = token_logprobs(logits, batch["reply_ids"])
        with lora_disabled(lm):
            ref_logp = token_logprobs(lm.head(_gather(lm(batch["input_ids"], return_hidden=True), batch["index"])),
                                      batch["reply_ids"])
        self.policy.train()
        mask = batch["reply_mask"]
        score = self.score_fn(prompts, replies).to(lm.device)
        rewards, kl = shaped_rewards(score, logp, ref_logp, mask, cfg.kl_coef)
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, mask)
        texts = [self.tok.decode(r) for r in replies]
        self.phase += 1
        self.stats = {"score": score.mean().item(), "kl": kl.sum(1).mean().item(),
                      "reply_tokens": mask.sum(1).mean().item(), "phase": self.phase}
        if self.check is not None:
            self.stats["property"] = sum(map(self.check, texts)) / len(texts)
        rollout = {"input_ids": batch["input_ids"], "index": batch["index"], "reply_ids": batch["reply_ids"],
                   "mask": mask, "old_logp": logp, "old_values": values, "advantages": adv, "returns": returns}
        for _ in range(cfg.epochs):
            perm = torch.randperm(cfg.rollout_batch, generator=self.generator)
            for s in range(0, cfg.rollout_batch, cfg.minibatch):
                idx = perm[s:s + cfg.minibatch]
                self.queue.append({k: v[idx] for k, v in rollout.items()})


def _gather(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))  # (B, T, C) -> (B, R, C)


class PPOLoss:
    """loss_fn: clipped policy loss + vf_coef * clipped value loss on one minibatch; logs the
    rollout statistics (score, KL per reply, property rate) beside the PPO diagnostics."""

    def __init__(self, rollouts: Rollouts):
        self.rollouts = rollouts

    def __call__(self, policy, batch):
        cfg = self.rollouts.cfg
        logits, values = policy(batch["input_ids"], batch["index"])
        mask = batch["mask"]
        logp = token_logprobs(logits, batch["reply_ids"])
        pg, clip_frac, approx_kl = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg.clip)
        vl, vclip = value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip)
        with torch.no_grad():
            ent = masked_mean(entropy(logits), mask)
        metrics = {"policy_loss": pg.item(), "value_loss": vl.item(), "clip_frac": clip_frac.item(),
                   "value_clip_frac": vclip.item(), "approx_kl": approx_kl.item(), "entropy": ent.item(),
                   **self.rollouts.stats}
        return pg + cfg.vf_coef * vl, metrics

    @staticmethod
    def num_tokens(batch) -> int:
        return int(batch["mask"].sum())


@accepts_old_names
def train_ppo(lm, tokenizer, score_fn: Callable[[list, list], torch.Tensor], prompts: Sequence[list[int]],
              cfg: PPOConfig = PPOConfig(), *, out=None, check: Optional[Callable[[str], bool]] = None,
              progress: bool = True, threads: Optional[int] = None) -> dict:
    """PPO on `lm` in place (LoRA adapters when cfg.lora; the adapters disabled are the reference).
    score_fn(prompt ids, reply ids) -> (B,) rewards. Returns the Trainer's summary plus the last
    rollout statistics; `lm` keeps its adapters (merge_lora to fold them in)."""
    if cfg.lora is None:
        raise RLHFError("PPO here keeps the reference policy as the LoRA-disabled model; set PPOConfig.lora "
                        "(full fine-tuning would need a second copy of the weights)")
    apply_lora(lm, cfg.lora)
    policy = PolicyWithValue(lm)
    rollouts = Rollouts(policy, tokenizer, prompts, score_fn, cfg, check)
    tc = TrainConfig(max_steps=cfg.steps, batch_size=cfg.minibatch, lr=cfg.lr, min_lr=cfg.lr, warmup_steps=0,
                     weight_decay=0.0, grad_clip=cfg.grad_clip, eval_interval=0, eval_at_start=False, log_interval=1,
                     checkpoint=False, seed=cfg.seed, threads=threads,
                     device=_device_of(lm))
    trainer = Trainer(policy, PPOLoss(rollouts), rollouts, tc, out=out, progress=progress)
    fit = trainer.fit()
    return {**fit, "last_rollout": rollouts.stats, "history": trainer.history}


# ---------------------------------------------------------------------- DPO / IPO
@dataclass
class DPOConfig:
    # Measured on SmolLM2 with 40 steps (docs/alignment.md): beta 0.1 at lr 2e-4 (30 steps) moved the
    # property rate 0.10 -> 0.27 at KL 0.6, and at lr 4e-4 / 1e-3 collapsed into "Sure!Sure!..." (KL 24 / 50);
    # beta 0.5 saturates the loss 5x sooner: lr 4e-4 gave rate 0.98 at KL 8.2. 30 steps leave KL headroom.
    steps: int = 30
    batch_size: int = 8
    lr: float = 4e-4
    beta: float = 0.5
    loss: str = "dpo"  # or "ipo"
    lora: Optional[LoRAConfig] = field(default_factory=lambda: LoRAConfig(rank=8, alpha=16, top_layers=8))
    seed: int = 0


class DPOLoss:
    """loss_fn: DPO/IPO on a batch of pairs; reference log-probs were computed once beforehand."""

    def __init__(self, beta: float, kind: str):
        self.beta, self.kind = beta, kind

    def __call__(self, lm, batch):
        c, r = _side(batch, "chosen"), _side(batch, "rejected")
        return preference_loss(reply_logprobs(lm, c), reply_logprobs(lm, r), batch["ref_chosen"],
                               batch["ref_rejected"], self.beta, self.kind)

    @staticmethod
    def num_tokens(batch) -> int:
        return int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())


@torch.no_grad()
def reference_logprobs(lm, pairs: PairData, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reply log-probs of every pair under `lm` with its adapters off: (N,), (N,)."""
    was_training = lm.training
    lm.eval()
    chosen, rejected = [], []
    with lora_disabled(lm):
        for batch in pairs.batches(batch_size):
            chosen.append(reply_logprobs(lm, _side(batch, "chosen")))
            rejected.append(reply_logprobs(lm, _side(batch, "rejected")))
    lm.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


@accepts_old_names
def train_dpo(lm, tokenizer, pairs: PairData, cfg: DPOConfig = DPOConfig(), *, out=None, progress: bool = True,
              threads: Optional[int] = None) -> dict:
    """DPO (or IPO) on `lm` in place with LoRA adapters; the adapters disabled are the reference."""
    if cfg.lora is None:
        raise RLHFError("DPO here keeps the reference as the LoRA-disabled model; set DPOConfig.lora")
    apply_lora(lm, cfg.lora)
    ref_c, ref_r = reference_logprobs(lm, pairs)
    data = dataclasses.replace(pairs, extra={"ref_chosen": ref_c, "ref_rejected": ref_r}, seed=cfg.seed)
    tc = _pair_train_config(cfg, lm, threads)
    trainer = Trainer(lm, DPOLoss(cfg.beta, cfg.loss), data, tc, out=out, progress=progress)
    fit = trainer.fit()
    return {**fit, "history": trainer.history}


# ---------------------------------------------------------------------- evaluation and best-of-n
@torch.no_grad()
def evaluate_policy(lm, tokenizer, prompts: Sequence[list[int]], *, check: Callable[[str], bool],
                    score_fn: Optional[Callable] = None, samples: int = 1, max_new_tokens: int = 48,
                    temperature: float = 1.0, batch_size: int = 16, seed: int = 0, progress: bool = False) -> dict:
    """Sample `samples` replies per prompt; report the property rate, the mean KL per reply to the
    reference (the LoRA-disabled model; 0 when `lm` has no adapters), the mean reward, and the
    replies ("texts", "finished": whether each ended with eos).
    KL is the Monte-Carlo estimate E_pi[sum_t log pi(a_t) - log ref(a_t)] over sampled replies."""
    gen = torch.Generator().manual_seed(seed)
    flat = [p for p in prompts for _ in range(samples)]
    replies = sample_replies(lm, tokenizer, flat, max_new_tokens=max_new_tokens, temperature=temperature,
                             batch_size=batch_size, generator=gen, progress=progress)
    texts = [tokenizer.decode(r) for r in replies]
    kls, scores = [], []
    lm.eval()
    for s in range(0, len(flat), batch_size):
        batch = join(flat[s:s + batch_size], replies[s:s + batch_size], pad_id_of(tokenizer))
        pol = reply_logprobs(lm, batch)
        with lora_disabled(lm):
            ref = reply_logprobs(lm, batch)
        kls.append((pol - ref).cpu())
        if score_fn is not None:
            scores.append(score_fn(flat[s:s + batch_size], replies[s:s + batch_size]).cpu())
    kl = torch.cat(kls)
    out = {"rate": sum(map(check, texts)) / len(texts), "kl": kl.mean().item(), "n": len(texts),
           "reply_tokens": sum(map(len, replies)) / len(replies), "examples": texts[:6],
           "texts": texts, "finished": [bool(r) and r[-1] == tokenizer.eos_id for r in replies]}
    if scores:
        out["score"] = torch.cat(scores).mean().item()
    return out


@torch.no_grad()
def best_of_n(lm, tokenizer, rm, prompt: str, n: int = 8, *, max_new_tokens: int = 64, temperature: float = 1.0,
              seed: Optional[int] = None) -> tuple[str, list[tuple[float, str]]]:
    """Sample n replies and return the one the reward model ranks highest (Sparrow's reranking),
    with every (score, reply) sorted best first."""
    if n < 1:
        raise RLHFError(f"best-of-n needs n >= 1, got {n}")
    ids = encode_prompt(tokenizer, prompt)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    replies = sample_replies(lm, tokenizer, [ids] * n, max_new_tokens=max_new_tokens, temperature=temperature,
                             batch_size=n, generator=gen)
    scores = rm_score_fn(rm, tokenizer)([ids] * n, replies)
    ranked = sorted(zip(scores.tolist(), (tokenizer.decode(r) for r in replies)), key=lambda t: -t[0])
    return ranked[0][1], ranked


def rm_score_fn(rm, tokenizer, batch_size: int = 16) -> Callable[[list, list], torch.Tensor]:
    """score_fn(prompt ids, reply ids) -> (B,) for PPO, evaluation and best-of-n."""
    pad = pad_id_of(tokenizer)

    @torch.no_grad()
    def score(prompts, replies):
        rm.eval()
        out = []
        for s in range(0, len(prompts), batch_size):
            b = to_device(join(prompts[s:s + batch_size], replies[s:s + batch_size], pad), rm.device)
            out.append(reward_scores(rm, b["input_ids"], b["attention_mask"]).cpu())
        return torch.cat(out)

    return score


def save_json(path, obj) -> Path:
    """Write JSON through a temporary file, so a crash never leaves half a summary."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
    return path
