"""Supervised fine-tuning (SFT): prompt/response pairs, loss on the response tokens only.

A record is a JSON object in one of two shapes:
  * Alpaca: {"instruction": ..., "input": ... (optional), "output": ...} (what self-instruct writes);
  * chat:   {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} whose last
            message is the assistant's reply; earlier turns are context (not trained on).

Two templates turn a record into a prompt and a response:
  * "chatml": the tokenizer's own chat template (apply_chat_template with the generation prompt),
    or, for a tokenizer without one, the built-in ChatML template below;
  * "alpaca": Stanford Alpaca's prompt, with or without its "### Input:" section.
The response is followed by the tokenizer's eos (ChatML models use <|im_end|> as eos, so that is
the end-of-turn token the model learns to emit, and the one generation stops at).

Prompt and response are tokenised separately, exactly as `chat` / `generate` tokenise the prompt
at inference, so the mask boundary is exact. An example is stored shifted, like causal_lm's
batches: input_ids = tokens[:-1], labels = tokens[1:] with -100 on every target that is a prompt
token (and on padding).

Packing puts several examples into one row of `block_size` tokens with `document_ids` (B, T):
the model then attends only within each document and restarts positions at 0 in each, so a
packed row computes exactly what the examples would alone (tests/test_sft.py checks the loss)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import AllformersError
from .causal_lm import IGNORE_INDEX
from .ddp import unwrap
from .epochs import EpochSampler

TEMPLATES = ("chatml", "alpaca")

# ChatML for tokenizers without a template of their own. The end of a turn is the tokenizer's
# eos, which is <|im_end|> for ChatML models: past turns look the way the trained reply ends.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                   "+ eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")

# Stanford Alpaca's prompts (tatsu-lab/stanford_alpaca, train.py), verbatim.
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
# The same prompt as a chat template, saved with Alpaca-tuned models that had none, so `allformers chat`
# asks them the way they were trained (the last user message is the instruction).
ALPACA_CHAT_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\n{{ messages[-1]['content'] }}\n\n### Response:")


class SFTError(AllformersError, ValueError):
    """An SFT record, template or setting is unusable."""


@dataclass
class Example:
    """One tokenised record, already shifted: labels[t] is the target after input_ids[t]."""
    input_ids: list[int]
    labels: list[int]

    def __len__(self):
        return len(self.input_ids)


# ---------------------------------------------------------------------- records -> text
def check_record(record: dict, where: str = "record") -> None:
    if not isinstance(record, dict):
        raise SFTError(f"{where} is a {type(record).__name__}, not a JSON object")
    if "messages" in record:
        msgs = record["messages"]
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in msgs)):
            raise SFTError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects with string values")
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise SFTError(f"{where}: the last message must be the assistant's reply after at least one other "
                           f"message (roles: {[m['role'] for m in msgs]})")
    elif "instruction" in record and "output" in record:
        for k in ("instruction", "input", "output"):
            if not isinstance(record.get(k) or "", str):
                raise SFTError(f"{where}: '{k}' must be a string")
    else:
        raise SFTError(f"{where} has fields {sorted(record)}; an SFT record needs 'instruction' and 'output' "
                       f"(Alpaca, optional 'input') or 'messages' (chat, last one the assistant's)")


def as_chat(record: dict) -> tuple[list[dict], str]:
    """(prompt messages, reply) of either record shape. An Alpaca input follows its instruction
    after a blank line in the user turn."""
    if "messages" in record:
        return record["messages"][:-1], record["messages"][-1]["content"]
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}], record["output"]


def render(record: dict, tokenizer, template: str) -> tuple[str, str]:
    """(prompt text, response text) of one record under `template`."""
    if template == "alpaca":
        if "messages" in record:
            users = [m for m in record["messages"][:-1] if m["role"] == "user"]
            if len(record["messages"]) != 2 or len(users) != 1:
                raise SFTError("the alpaca template takes single-turn records (one user message, then the "
                               "assistant's reply); use --template chatml for conversations")
            instruction, inp, output = users[0]["content"], "", record["messages"][-1]["content"]
        else:
            instruction, inp, output = record["instruction"], record.get("input") or "", record["output"]
        prompt = (ALPACA_PROMPT_INPUT if inp else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction, input=inp)
        return prompt, output
    if template == "chatml":
        messages, reply = as_chat(record)
        return chat_prompt(tokenizer, messages), reply
    raise SFTError(f"unknown template {template!r}; use one of {list(TEMPLATES)}")


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The tokenizer's own chat template, or the built-in ChatML one when it has none."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    from copy import copy

    tok = copy(tokenizer)  # the same tokenizer with the built-in template; the caller's is not changed
    tok.chat_template = CHATML_TEMPLATE
    return tok.apply_chat_template(messages, add_generation_prompt=True)


def template_for_saving(tokenizer, template: str) -> Optional[str]:
    """The chat template to save with the fine-tuned model: its own when it has one, else the
    template it was trained with (so `allformers chat` prompts it the same way)."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    return CHATML_TEMPLATE if template == "chatml" else ALPACA_CHAT_TEMPLATE


# ---------------------------------------------------------------------- text -> tokens
def encode_example(record: dict, tokenizer, template: str, max_length: int) -> Optional[Example]:
    """Token ids with the loss mask on the response and its eos. Over-long examples are cut at
    the right (the prompt is kept whole); None when no response token would remain."""
    if tokenizer.eos_id is None:
        raise SFTError("SFT needs an end-of-reply token but the tokenizer has no eos_token; set tokenizer.eos_token")
    prompt, response = render(record, tokenizer, template)
    if template == "chatml":  # chat templates write their own special tokens, as `chat` does
        prompt_ids = tokenizer.backend.encode(prompt, add_special_tokens=False).ids
    else:  # a plain prompt, as `generate` encodes it (bos when the tokenizer adds one)
        prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise SFTError("the prompt rendered to no tokens; every example needs a prompt before its response")
    response_ids = tokenizer.backend.encode(response, add_special_tokens=False).ids + [tokenizer.eos_id]
    tokens = (prompt_ids + response_ids)[:max_length + 1]
    if len(tokens) <= len(prompt_ids):
        return None
    labels = [IGNORE_INDEX] * (len(prompt_ids) - 1) + tokens[len(prompt_ids):]
    return Example(tokens[:-1], labels)


# ---------------------------------------------------------------------- batches
def collate(examples: list[Example], pad_id: int) -> dict:
    """One example a row, right-padded to the longest: {input_ids, labels} (B, T). No attention
    mask is needed: with causal attention, padding at the end is never seen by real tokens."""
    T = max(len(e) for e in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        x[i, :len(e)], y[i, :len(e)] = torch.tensor(e.input_ids), torch.tensor(e.labels)
    return {"input_ids": x, "labels": y}


def collate_packed(rows: list[list[Example]], block_size: int, pad_id: int) -> dict:
    """Rows of several examples each, padded to block_size: {input_ids, labels, document_ids}.
    Padding is a document of its own (it sees only itself; its labels are ignored)."""
    x = torch.full((len(rows), block_size), pad_id, dtype=torch.long)
    y = torch.full((len(rows), block_size), IGNORE_INDEX, dtype=torch.long)
    doc = torch.zeros((len(rows), block_size), dtype=torch.long)
    for i, row in enumerate(rows):
        t = 0
        doc[i] = len(row)  # the padding's id, after the row's documents 0 .. len(row) - 1
        for d, e in enumerate(row):
            n = len(e)
            if t + n > block_size:
                raise SFTError(f"packed row {i} holds {t + n} tokens, more than block_size={block_size}")
            x[i, t:t + n], y[i, t:t + n], doc[i, t:t + n] = torch.tensor(e.input_ids), torch.tensor(e.labels), d
            t += n
    return {"input_ids": x, "labels": y, "document_ids": doc}


def pack_examples(examples: list[Example], block_size: int) -> list[list[Example]]:
    """Greedy packing in order: each example joins the current row if it fits, else starts a new one."""
    rows: list[list[Example]] = []
    used = block_size + 1
    for e in examples:
        if len(e) > block_size:
            raise SFTError(f"an example of {len(e)} tokens does not fit block_size={block_size}; "
                           f"encode with max_length <= block_size")
        if used + len(e) > block_size:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(e)
    return rows


class SFTData(EpochSampler):
    """Examples drawn in epochs (a fresh permutation from the sampler's own generator each time).
    sample(n) gives n rows: one example each, or with `pack` as many whole examples as fit in
    block_size tokens. Its state goes into the Trainer's checkpoints, so a resumed run continues
    with the same batches."""

    def __init__(self, examples: list[Example], pad_id: int, *, pack: bool = False,
                 block_size: Optional[int] = None, seed: int = 0):
        if not examples:
            raise SFTError("no examples to train on")
        if pack and not block_size:
            raise SFTError("packing needs block_size (the length of a packed row)")
        if pack and max(len(e) for e in examples) > block_size:
            raise SFTError(f"the longest example ({max(len(e) for e in examples)} tokens) does not fit "
                           f"block_size={block_size}")
        self.examples, self.pad_id, self.pack, self.block_size = examples, pad_id, pack, block_size
        self.start_epochs(len(examples), seed)

    def __len__(self):
        return len(self.examples)

    def _peek(self) -> Example:
        return self.examples[self.peek_row()]

    def sample(self, n: int) -> dict:
        if not self.pack:
            rows = []
            for _ in range(n):
                rows.append(self._peek())
                self.pos += 1
            return collate(rows, self.pad_id)
        packed = []
        for _ in range(n):  # fill a row until the next example would not fit; it opens the next row
            row, used = [], 0
            while used + len(self._peek()) <= self.block_size:
                row.append(self._peek())
                used += len(row[-1])
                self.pos += 1
            packed.append(row)
        return collate_packed(packed, self.block_size, self.pad_id)


# ---------------------------------------------------------------------- the loss
def sft_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of the batch (labels != -100). The LM head runs
    only at those positions: prompts are often most of the tokens, and the head is the largest
    matmul of a small model."""
    labels = batch["labels"]
    kwargs = {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}
    hidden = model(batch["input_ids"], return_hidden=True, **kwargs)  # (B, T, C)
    keep = labels != IGNORE_INDEX
    lm = unwrap(model)
    logits = lm.head(hidden[keep])  # (N, V), N response targets
    return F.cross_entropy(logits.float(), labels[keep])


class SFTLoss:
    """The objective object for the Trainer: sft_loss plus the count of supervised tokens (so
    evaluation averages over response tokens, and tokens/s counts trained tokens)."""

    name = "sft"

    def __call__(self, model, batch) -> torch.Tensor:
        return sft_loss(model, batch)

    @staticmethod
    def num_tokens(batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())
