"""LaMDA-style replies: sample several candidates, score each for sensibleness, specificity and
safety with classifier heads on the LM's own hidden states, drop the unsafe ones and return the
best by LaMDA's ranking (3 x P(sensible) + P(specific)); and tools (tools.py) in the loop.

    responder = Responder(model, tokenizer)                   # generation from chat messages
    heads = SSIHeads.train_on(model, tokenizer, ssi_examples())  # dialogue/data.py
    best, ranked = lamda_reply(responder, heads, messages, n=4)
    turn = run_with_tools(responder.tool_turn, messages, [calculator_tool()])

The heads are three logistic regressions on the frozen LM body: the mean of the last layer's
hidden states over the reply's tokens (after the prompt, which the body sees too), so one forward
pass of prompt + reply scores all three. They train in seconds (the body is frozen and its
features are computed once)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import AllformersError
from .tools import CALL_STOP

LABELS = ("sensible", "specific", "safe")


class DialogueError(AllformersError, ValueError):
    """A dialogue setting or model that cannot be used."""


def render(tokenizer, messages: list) -> list[int]:
    """Chat messages -> prompt token ids, with the generation prompt (the model's template, or ChatML)."""
    from ..objectives.sft import chat_prompt

    return tokenizer.backend.encode(chat_prompt(tokenizer, messages), add_special_tokens=False).ids


class Responder:
    """Replies to chat messages with a causal LM: greedy (temperature 0) or n samples at once."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 64, seed: int = 0):
        self.model, self.tok, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, messages: list, *, n: int = 1, temperature: float = 0.0, top_p: Optional[float] = None,
                 stop: Optional[list] = None, max_new_tokens: Optional[int] = None) -> list[str]:
        """n replies to one conversation (n samples, or n copies of the greedy one)."""
        return self.batch([messages] * n, temperature=temperature, top_p=top_p, stop=stop,
                          max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def batch(self, conversations: list, *, temperature: float = 0.0, top_p: Optional[float] = None,
              stop: Optional[list] = None, max_new_tokens: Optional[int] = None) -> list[str]:
        """One reply to each conversation, all generated as one left-padded batch."""
        from ..generation import generate, left_pad, trim_at_stop

        if not conversations:
            return []
        new = max_new_tokens or self.max_new_tokens
        prompts = [render(self.tok, m) for m in conversations]
        limit = self.model.config.block_size
        longest = max(len(p) for p in prompts)
        if longest + new > limit:
            raise DialogueError(f"the conversation has {longest} tokens; with {new} more it passes the model's "
                                f"{limit}-token context")
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        x, mask = left_pad(prompts, pad)  # (B, T)
        out = generate(self.model, x.to(self.model.device),
                       attention_mask=mask.to(self.model.device) if len(set(map(len, prompts))) > 1 else None,
                       max_new_tokens=new, temperature=temperature, top_p=top_p, eos_id=self.tok.eos_id,
                       pad_id=pad, stop=stop, tokenizer=self.tok if stop else None, generator=self.generator)
        texts = []
        for row in out[:, x.shape[1]:].tolist():
            if self.tok.eos_id in row:
                row = row[:row.index(self.tok.eos_id)]
            texts.append(trim_at_stop(self.tok.decode(row), stop).strip())
        return texts

    def tool_turn(self, messages: list) -> str:
        """One greedy turn that ends at a tool call's closing tag (for run_with_tools)."""
        return self.tool_turns([messages])[0]

    def tool_turns(self, conversations: list) -> list[str]:
        """tool_turn for many conversations as one batch (for run_with_tools_batch)."""
        texts = self.batch(conversations, stop=[CALL_STOP])
        return [t + CALL_STOP if "<tool_call>" in t else t for t in texts]


# ---------------------------------------------------------------------- the heads
@torch.no_grad()
def reply_features(model, tokenizer, prompts: list, replies: list, batch_size: int = 8) -> torch.Tensor:
    """(N, C): the LM body's last hidden states averaged over each reply's tokens. prompts are chat
    message lists (or strings: one user message)."""
    from ..training.rlhf import join, pad_id_of

    was = model.training
    model.eval()
    feats = []
    for s in range(0, len(prompts), batch_size):
        p_ids = [render(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p)
                 for p in prompts[s:s + batch_size]]
        r_ids = [tokenizer.backend.encode(r or " ", add_special_tokens=False).ids + [tokenizer.eos_id]
                 for r in replies[s:s + batch_size]]
        limit = model.config.block_size
        for i in range(len(p_ids)):  # keep the reply whole, cut the prompt from the left
            over = len(p_ids[i]) + len(r_ids[i]) - limit
            if over > 0:
                r_ids[i] = r_ids[i][:limit // 2]
                p_ids[i] = p_ids[i][max(0, len(p_ids[i]) + len(r_ids[i]) - limit):]
        b = join(p_ids, r_ids, pad_id_of(tokenizer))
        h = model(b["input_ids"].to(model.device), return_hidden=True)  # (B, T, C)
        h = h.gather(1, (b["index"] + 1).clamp(max=h.shape[1] - 1).to(model.device)[..., None]
                     .expand(-1, -1, h.shape[-1]))  # (B, R, C): the reply's own positions
        m = b["reply_mask"].to(h.device)[..., None]
        feats.append(((h * m).sum(1) / m.sum(1)).float().cpu())
    model.train(was)
    return torch.cat(feats)


class SSIHeads(nn.Module):
    """Three logistic heads on reply features: P(sensible), P(specific), P(safe)."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.norm = nn.LayerNorm(n_embd, elementwise_affine=False)  # features of a frozen body: scale them
        self.heads = nn.Linear(n_embd, len(LABELS))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.heads(self.norm(feats)).sigmoid()  # (N, 3)

    @classmethod
    def fit(cls, feats: torch.Tensor, labels: torch.Tensor, *, steps: int = 300, lr: float = 0.05,
            weight_decay: float = 1e-3, seed: int = 0) -> "SSIHeads":
        """labels (N, 3) in {0, 1, nan (not labelled)}; full-batch AdamW on the masked BCE."""
        torch.manual_seed(seed)
        heads = cls(feats.shape[1])
        opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
        mask = ~labels.isnan()
        y = labels.nan_to_num(0.0)
        # each head weighs its classes equally: the sets have more positives than negatives
        pos = (y * mask).sum(0).clamp(min=1)
        neg = ((1 - y) * mask).sum(0).clamp(min=1)
        w = torch.where(y > 0.5, mask.sum(0) / (2 * pos), mask.sum(0) / (2 * neg)) * mask
        for _ in range(steps):
            logits = heads.heads(heads.norm(feats))
            loss = (nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum() / mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return heads.eval()

    @classmethod
    def train_on(cls, model, tokenizer, examples: list, **kw) -> "SSIHeads":
        """Heads from SSIExample records (dialogue/data.py: ssi_examples)."""
        feats = reply_features(model, tokenizer, [e.prompt for e in examples], [e.reply for e in examples])
        return cls.fit(feats, label_tensor(examples), **kw)

    @torch.no_grad()
    def score(self, model, tokenizer, prompt, replies: list) -> torch.Tensor:
        """(N, 3) probabilities for candidate replies to one prompt (messages or a string)."""
        return self(reply_features(model, tokenizer, [prompt] * len(replies), replies))

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "ssi_heads.safetensors"))
        (path / "ssi_heads.json").write_text(json.dumps({"labels": LABELS, "n_embd": self.heads.in_features}))
        return path

    @classmethod
    def load(cls, path) -> "SSIHeads":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "ssi_heads.json").is_file():
            raise DialogueError(f"{path} holds no SSI heads (ssi_heads.json); train them with SSIHeads.train_on")
        heads = cls(json.loads((path / "ssi_heads.json").read_text())["n_embd"])
        heads.load_state_dict(load_file(str(path / "ssi_heads.safetensors")))
        return heads.eval()


def label_tensor(examples: list) -> torch.Tensor:
    return torch.tensor([[float("nan") if v is None else float(v) for v in e.labels] for e in examples])


@torch.no_grad()
def head_accuracy(heads: SSIHeads, feats: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per head: accuracy at 0.5 over the labelled examples (and how many there were)."""
    p = heads(feats)
    out = {}
    for j, name in enumerate(LABELS):
        m = ~labels[:, j].isnan()
        out[name] = {"accuracy": float(((p[m, j] > 0.5).float() == labels[m, j]).float().mean()) if m.any() else None,
                     "n": int(m.sum())}
    return out


def ssi_rank(scores: torch.Tensor, safety_threshold: float = 0.5) -> list[int]:
    """Candidate order, best first: safe ones (P(safe) >= threshold) by 3 P(sensible) + P(specific), then
    the unsafe ones by P(safe) (when every candidate is unsafe, the least unsafe is still last resort)."""
    quality = 3 * scores[:, 0] + scores[:, 1]
    safe = scores[:, 2] >= safety_threshold
    order = sorted(range(len(scores)), key=lambda i: (not bool(safe[i]),
                                                      -float(quality[i]) if safe[i] else -float(scores[i, 2])))
    return order


@dataclass
class Candidate:
    reply: str
    sensible: float
    specific: float
    safe: float

    @property
    def ssi(self) -> float:
        return 3 * self.sensible + self.specific


def lamda_reply(responder: Responder, heads: SSIHeads, messages: list, *, n: int = 4, temperature: float = 0.8,
                top_p: float = 0.95, safety_threshold: float = 0.5, max_new_tokens: Optional[int] = None):
    """(best reply, candidates best first): n sampled replies scored by the heads."""
    if n < 1:
        raise DialogueError(f"LaMDA needs n >= 1 candidates, got {n}")
    replies = responder(messages, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    scores = heads.score(responder.model, responder.tok, messages, replies)
    ranked = [Candidate(replies[i], *map(float, scores[i])) for i in ssi_rank(scores, safety_threshold)]
    return ranked[0].reply, ranked
