"""Sparrow-style replies (Glaese et al. 2022): retrieve passages for the question, generate
candidates with each passage as evidence and without any, rerank them all with a reward model, and
return the best; a reply that used a passage cites it.

    index = PassageIndex.build(sotu_passages(), minilm)
    reward = RewardHead.train_on(model, tokenizer, pairs)     # or reward_model_scorer(rm, tokenizer)
    best, ranked = sparrow_reply(Responder(model, tokenizer), index, reward, messages)
    best.text       # 'Abraham Lincoln.\n\nSource: [1862, Lincoln: ...]'

As in Sparrow, each evidence candidate is conditioned on one passage (shown in the system message),
so the passage it used is known exactly, and the reward model reads the same context the candidate
was written in (evidence included), so it can prefer replies the evidence supports.

The reward model is any `scorer(conversations, replies) -> (N,)` rewards. Two are here:
  * RewardHead: a learned scalar head (LayerNorm + Linear) on the frozen LM's reply features
    (lamda.reply_features), trained with the Bradley-Terry loss on (chosen, rejected) pairs;
    InstructGPT's reward model with its body frozen, so it trains in seconds on a CPU;
  * reward_model_scorer: a full reward model (models/rl.py, trained by training/rlhf.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from .lamda import DialogueError, Responder, render, reply_features
from .retrieval import Passage

EVIDENCE_PROMPT = ("Answer the user's question from the evidence below, a passage of a State of the Union address "
                   "(its source names the year and the president).\n\nEvidence [{source}]: {text}")


def evidence_messages(messages: list, passage: Passage, max_chars: int = 700,
                      prompt: str = EVIDENCE_PROMPT) -> list:
    """`messages` with `passage` as evidence in the system message (before an existing one)."""
    text = passage.citation(max_chars)[len(passage.source) + 2:]
    evidence = prompt.format(source=passage.source, text=text)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + evidence}] + list(messages[1:])
    return [{"role": "system", "content": evidence}] + list(messages)


def last_user(messages: list) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise DialogueError("Sparrow answers a user message; the conversation has none")
    return users[-1]


@dataclass
class SparrowCandidate:
    reply: str
    evidence: Optional[Passage]  # the passage it was written from, or None
    conversation: list  # what it was generated from (and what the reward model reads)
    reward: float = float("nan")

    @property
    def text(self) -> str:
        """The reply, citing the passage it used."""
        return self.reply if self.evidence is None else f"{self.reply}\n\nSource: [{self.evidence.citation(300)}]"


def sparrow_candidates(responder: Responder, index, messages: list, *, k: int = 2, n_evidence: int = 1,
                       n_plain: int = 2, temperature: float = 0.7, top_p: float = 0.95,
                       max_new_tokens: Optional[int] = None) -> list[SparrowCandidate]:
    """The top-k passages for the last user message, n_evidence replies with each (the first greedy,
    the rest sampled) and n_plain without evidence (the first greedy), as one batch per kind."""
    if k < 0 or n_plain < 0 or n_evidence < 0 or k * n_evidence + n_plain < 1:
        raise DialogueError(f"Sparrow needs at least one candidate: got k={k} passages x n_evidence={n_evidence} "
                            f"and n_plain={n_plain}")
    hits = index.search(last_user(messages), k=k) if k and n_evidence else []
    convos = [(evidence_messages(messages, h.passage), h.passage) for h in hits for _ in range(n_evidence)]
    convos += [(list(messages), None)] * n_plain
    greedy = [i for i, c in enumerate(convos) if i == 0 or c[1] is not convos[i - 1][1]]  # the first of each
    out = [None] * len(convos)
    for which, temp in ((greedy, 0.0), ([i for i in range(len(convos)) if i not in greedy], temperature)):
        if which:
            replies = responder.batch([convos[i][0] for i in which], temperature=temp, top_p=top_p if temp else None,
                                      max_new_tokens=max_new_tokens)
            for i, r in zip(which, replies):
                out[i] = SparrowCandidate(r, convos[i][1], convos[i][0])
    return out


def sparrow_reply(responder: Responder, index, scorer: Callable[[list, list], torch.Tensor], messages: list,
                  **kw) -> tuple[SparrowCandidate, list]:
    """(best candidate, every candidate best first) by the reward model's score."""
    cands = sparrow_candidates(responder, index, messages, **kw)
    rewards = scorer([c.conversation for c in cands], [c.reply for c in cands])
    for c, r in zip(cands, rewards.tolist()):
        c.reward = r
    ranked = sorted(cands, key=lambda c: -c.reward)
    return ranked[0], ranked


# ---------------------------------------------------------------------- reward models
class RewardHead(nn.Module):
    """A scalar reward on the frozen LM's reply features (mean last hidden state over the reply)."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.norm = nn.LayerNorm(n_embd, elementwise_affine=False)
        self.out = nn.Linear(n_embd, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(feats))[:, 0]  # (N,)

    @classmethod
    def fit(cls, chosen: torch.Tensor, rejected: torch.Tensor, *, steps: int = 300, lr: float = 0.02,
            weight_decay: float = 0.01, seed: int = 0) -> "RewardHead":
        """Bradley-Terry on feature pairs (P, C) each: loss -log sigmoid(r(chosen) - r(rejected))."""
        if chosen.shape != rejected.shape or not len(chosen):
            raise DialogueError(f"a reward head needs matching (chosen, rejected) feature pairs, got "
                                f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")
        torch.manual_seed(seed)
        head = cls(chosen.shape[1])
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            loss = -nn.functional.logsigmoid(head(chosen) - head(rejected)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return head.eval()

    @classmethod
    def train_on(cls, model, tokenizer, pairs: list, **kw) -> "RewardHead":
        """pairs: (conversation, chosen reply, rejected reply) triples; each side is read in its
        conversation, which may differ (a reply with evidence vs one without): ((conv_c, reply_c),
        (conv_r, reply_r)) pairs are accepted too."""
        sides = [((p[0], p[1]), (p[0], p[2])) if len(p) == 3 else p for p in pairs]
        chosen = scorer_features(model, tokenizer, [c for c, _ in sides])
        rejected = scorer_features(model, tokenizer, [r for _, r in sides])
        head = cls.fit(chosen, rejected, **kw)
        head.reads = (model, tokenizer)  # a tuple, so the LM is not registered as part of the head
        return head

    def scorer(self, model=None, tokenizer=None) -> Callable[[list, list], torch.Tensor]:
        trained = getattr(self, "reads", (None, None))
        model, tokenizer = model or trained[0], tokenizer or trained[1]
        if model is None or tokenizer is None:
            raise DialogueError("the reward head reads an LM's features: pass the model and tokenizer it was trained on")

        @torch.no_grad()
        def score(conversations: list, replies: list) -> torch.Tensor:
            return self(scorer_features(model, tokenizer, list(zip(conversations, replies))))

        return score

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "reward_head.safetensors"))
        (path / "reward_head.json").write_text(json.dumps({"n_embd": self.out.in_features}))
        return path

    @classmethod
    def load(cls, path) -> "RewardHead":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "reward_head.json").is_file():
            raise DialogueError(f"{path} holds no reward head (reward_head.json); train one with RewardHead.train_on")
        head = cls(json.loads((path / "reward_head.json").read_text())["n_embd"])
        head.load_state_dict(load_file(str(path / "reward_head.safetensors")))
        return head.eval()


def scorer_features(model, tokenizer, items: list, batch_size: int = 8) -> torch.Tensor:
    """(N, C) reply features of (conversation, reply) items, each reply read after its own conversation."""
    return reply_features(model, tokenizer, [c for c, _ in items], [r for _, r in items], batch_size=batch_size)


def reward_model_scorer(rm, tokenizer, batch_size: int = 16) -> Callable[[list, list], torch.Tensor]:
    """A full reward model (models/rl.py: scalar head on the last token) as a Sparrow scorer."""
    from ..training.rlhf import encode_reply, rm_score_fn

    score = rm_score_fn(rm, tokenizer, batch_size)

    def scorer(conversations: list, replies: list) -> torch.Tensor:
        return score([render(tokenizer, c) for c in conversations], [encode_reply(tokenizer, r) for r in replies])

    return scorer
