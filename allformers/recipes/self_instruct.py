"""Self-instruct (Wang et al. 2022, as Alpaca used it): grow an instruction-tuning data set from
a few seed tasks with the model itself.

Each round, for a batch of prompts:
  1. Instructions. The chat model is asked for "a list of 10 diverse tasks" and its reply is
     started for it with k numbered example tasks (k-1 seeds and one task it wrote earlier);
     it continues the list, and every numbered line after the examples is a candidate.
     Continuing a list is the one thing a 135M chat model does reliably; asking it for "one
     new task" mostly gets commentary.
  2. Filters on the instruction, cheapest first: starts with a letter or digit, 3..150 words,
     no word about things a text model cannot do (image, file, draw, ...), not a normalised
     duplicate, and ROUGE-L < 0.7 against every task kept so far (seeds included).
  3. Inputs. Instructions that point at something to work on ("the following text", "the
     sentence", ...) get an example input: the model answers "Write a short example input for
     this task" with its reply started as "Input:".
  4. Outputs: the model's own chat reply to the instruction (and input), as an SFT record will
     later ask it. Replies cut off by the token limit are trimmed back to their last full
     sentence; empty replies and replies that only repeat the instruction are rejected.

Every candidate ends kept or rejected for exactly one named reason (or unused, when the quota
was met mid-round), and the counts are returned and printed. The kept records are Alpaca-format
JSONL ({"instruction", "input", "output"}), rewritten atomically after every round so a run can
be stopped and resumed: the tasks already in the output file are read back and count as kept.

    from allformers.recipes.self_instruct import ChatSampler, SelfInstructConfig, load_tasks, self_instruct
    lm = ChatSampler(model, model.tokenizer, temperature=0.8, top_p=0.95, seed=0)
    result = self_instruct(lm, load_tasks(SEED_TASKS), SelfInstructConfig(num=200), out="data.jsonl")

`lm` is any callable (requests, max_new_tokens, stop) -> [(text, finished)], where a request is
(chat messages, the start of the assistant's reply); tests pass a scripted fake.
`run_self_instruct` does it all from a model name (`allformers self-instruct`; the recipe
`self-instruct-smollm2` of `allformers train`)."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import AllformersError
from ..metrics.rouge import max_rouge_l, rouge_tokens
from ..training.data import read_jsonl
from .registry import Recipe, register

SEED_TASKS = Path(__file__).with_name("seed_tasks.jsonl")  # 20 everyday tasks shipped with the package

# Alpaca's list: tasks about these need senses or tools a text model does not have.
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "photo", "photos", "file", "files",
             "map", "maps", "draw", "plot", "go to", "video", "videos", "audio", "music", "flowchart", "diagram")
_BLACKLIST_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.IGNORECASE)

# "the sentence", "the following text", "each word": the instruction needs something to work on.
_NEEDS_INPUT_RE = re.compile(
    r"\b(following|given|below|provided|each (word|item|number)|(the|this|these) (sentence|sentences|text|paragraph|"
    r"passage|list|word|words|review|story|email|poem|statement|numbers|article|question|phrase|data))\b",
    re.IGNORECASE)
_QUOTED_RE = re.compile(r"[\"“'‘].{3,}[\"”'’]|:\s*\S")  # the instruction already holds its input
_ITEM_RE = re.compile(r"^\s*(\d+)\s*[.)]\s*(.*)$")
_ITEM_PREFIX_RE = re.compile(r"^(\d+[.)]\s+)+")
_SENTENCE_END_RE = re.compile(r"[.!?…)\]\"”']\s|[.!?…)\]\"”']$|\n")

REASONS = ("bad_start", "length", "blacklist", "duplicate", "similar", "no_input", "empty_output", "output_copy")

# A request: (chat messages, the start of the assistant's reply). An LM maps a list of requests
# to [(completion text, finished)] where finished means it ended by itself (EOS or a stop string).
Request = tuple[list[dict], str]
LM = Callable[[Sequence[Request], int, Optional[Sequence[str]]], list[tuple[str, bool]]]


class SelfInstructError(AllformersError):
    """A seed or output file is unreadable, or the settings cannot work."""


@dataclass
class SelfInstructConfig:
    num: int = 200  # kept machine-written tasks to reach (the output file's length)
    batch_size: int = 8  # instruction prompts per round (and rows per generate call)
    num_examples: int = 3  # example tasks shown in each instruction prompt
    threshold: float = 0.7  # keep an instruction only if its ROUGE-L to every kept one is below this
    min_words: int = 3
    max_words: int = 150
    instruction_tokens: int = 96  # new tokens for the list continuation (about 5 tasks)
    input_tokens: int = 48
    output_tokens: int = 128
    seed: int = 0
    max_rounds: Optional[int] = None  # give up after this many rounds (default: 10 * num / batch_size + 10)

    def __post_init__(self):
        if self.num < 1 or self.batch_size < 1 or self.num_examples < 1:
            raise SelfInstructError(f"num={self.num}, batch_size={self.batch_size} and num_examples="
                                    f"{self.num_examples} must all be >= 1")
        if not 0 < self.threshold <= 1:
            raise SelfInstructError(f"threshold={self.threshold} must be in (0, 1]: it is a ROUGE-L F1 bound")


# ---------------------------------------------------------------------- files
def load_tasks(path) -> list[dict]:
    """A JSONL file of {"instruction", "input" (optional, may be ""), "output"} -> records."""
    path = Path(path)
    if not path.exists():
        raise SelfInstructError(f"{path} does not exist; pass a JSONL file of "
                                '{"instruction", "input", "output"} records (the package ships one: --seed-tasks default)')
    tasks = []
    for n, rec in read_jsonl(path, SelfInstructError):
        if not str(rec.get("instruction") or "").strip() or "output" not in rec:
            raise SelfInstructError(f"{path} line {n} needs a non-empty 'instruction' and an 'output' "
                                    f"(and optionally 'input'); got {str(rec)[:80]}")
        tasks.append({"instruction": rec["instruction"].strip(), "input": str(rec.get("input") or "").strip(),
                      "output": str(rec["output"]).strip()})
    return tasks


def write_jsonl_atomic(path, records: Sequence[dict]) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- filters (pure)
def normalize(text: str) -> str:
    """Lower-case alphanumeric words joined by one space: 'Name 3 fruits!' == 'name 3  fruits'."""
    return " ".join(rouge_tokens(text))


def starts_well(instruction: str) -> bool:
    """Starts with an ASCII letter or digit (not punctuation, a bullet or non-ASCII junk)."""
    return bool(instruction) and instruction[0].isascii() and instruction[0].isalnum()


def length_ok(instruction: str, min_words: int = 3, max_words: int = 150) -> bool:
    return min_words <= len(instruction.split()) <= max_words


def has_blacklisted_word(instruction: str) -> bool:
    return _BLACKLIST_RE.search(instruction) is not None


def similar_enough(tokens: Sequence[str], kept_tokens: Sequence[Sequence[str]], threshold: float = 0.7) -> bool:
    """True (reject) when ROUGE-L to some kept task is >= threshold."""
    return max_rouge_l(tokens, kept_tokens) >= threshold


def output_rejection(instruction: str, inp: str, output: str) -> Optional[str]:
    """Why an (instruction, input, output) cannot be kept, or None."""
    out = normalize(output)
    if not out:
        return "empty_output"
    if out == normalize(instruction) or out == normalize(inp):
        return "output_copy"
    return None


def needs_input(instruction: str) -> bool:
    """Does the instruction point at something it does not contain ("Summarize the paragraph")?"""
    return _NEEDS_INPUT_RE.search(instruction) is not None and _QUOTED_RE.search(instruction) is None


def instruction_rejection(instruction: str, cfg: SelfInstructConfig) -> Optional[str]:
    """The first content filter the instruction fails, or None."""
    if not starts_well(instruction):
        return "bad_start"
    if not length_ok(instruction, cfg.min_words, cfg.max_words):
        return "length"
    if has_blacklisted_word(instruction):
        return "blacklist"
    return None


class TaskPool:
    """Tasks as the novelty filters need them: normalised texts and ROUGE token lists, computed
    once per task (a candidate is then compared with all of them in one max_rouge_l call)."""

    def __init__(self, tasks: Sequence[dict] = ()):
        self.norms: set = set()
        self.tokens: list = []
        for t in tasks:
            self.add(t["instruction"])

    def __len__(self):
        return len(self.tokens)

    def add(self, instruction: str):
        self.norms.add(normalize(instruction))
        self.tokens.append(rouge_tokens(instruction))

    def novelty_rejection(self, instruction: str, threshold: float = 0.7) -> Optional[str]:
        """'duplicate' (same normalised text), 'similar' (ROUGE-L >= threshold to one task) or None."""
        if normalize(instruction) in self.norms:
            return "duplicate"
        if similar_enough(rouge_tokens(instruction), self.tokens, threshold):
            return "similar"
        return None


# ---------------------------------------------------------------------- prompts and parsing
LIST_REQUEST = "Write a list of 10 diverse tasks that a person could ask an assistant to do."
INPUT_REQUEST = "Write a short example input for this task: {instruction}"


def instruction_request(examples: Sequence[str]) -> Request:
    """The reply starts with the numbered examples and the next number: the model continues the list."""
    body = "".join(f"{i}. {e}\n" for i, e in enumerate(examples, 1))
    return [{"role": "user", "content": LIST_REQUEST}], f"{body}{len(examples) + 1}."


def parse_instructions(completion: str, first: int, finished: bool) -> list[str]:
    """The numbered items of a list continuation that began at item `first` (its number is in the
    prompt, so the completion's first line is that item). Reading stops at the first line that is
    not an item; a last line cut off by the token limit is dropped."""
    lines = f"{first}.{completion}".split("\n")
    if not finished:
        lines = lines[:-1]  # the token limit stopped it mid-line
    items = []
    for line in lines:
        m = _ITEM_RE.match(line)
        if m is None:
            break
        text = _ITEM_PREFIX_RE.sub("", " ".join(m.group(2).split())).strip("\"“”")  # "4. 1. Do x" -> "Do x"
        if text:
            items.append(text)
    return items


def input_request(instruction: str) -> Request:
    return [{"role": "user", "content": INPUT_REQUEST.format(instruction=instruction)}], "Input:"


def trim_unfinished(text: str, finished: bool) -> str:
    """A reply cut off by the token limit, trimmed back to its last sentence end ('' if none)."""
    text = text.strip()
    if finished:
        return text
    ends = list(_SENTENCE_END_RE.finditer(text))
    return text[: ends[-1].start() + 1].strip() if ends else ""


def parse_input(completion: str, finished: bool) -> str:
    """The example input: the text before any 'Output:' the model went on to write, unquoted."""
    cut = re.split(r"\n\s*\n|\bOutput\s*:", completion, maxsplit=1)
    text = trim_unfinished(cut[0], finished or len(cut) > 1).strip()
    if len(text) >= 2 and text[0] in "\"“'" and text[-1] in "\"”'":
        text = text[1:-1].strip()
    return text


def output_request(instruction: str, inp: str) -> Request:
    """The instruction as an SFT record asks it: the input follows after a blank line."""
    return [{"role": "user", "content": instruction + (f"\n\n{inp}" if inp else "")}], ""


# ---------------------------------------------------------------------- the model
class ChatSampler:
    """Batched sampling from a chat model: requests -> [(completion, finished)].

    Each request is rendered with the tokenizer's chat template plus the start of the reply,
    rows are left-padded into batches of `batch_size`, and one torch.Generator seeds all sampling."""

    def __init__(self, model, tokenizer, *, temperature: float = 0.8, top_p: Optional[float] = 0.95,
                 batch_size: int = 8, seed: int = 0):
        if not tokenizer.chat_template:
            raise SelfInstructError("self-instruct needs a chat model: this tokenizer has no chat template")
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed)

    def render(self, request: Request) -> list[int]:
        messages, prefix = request
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True) + prefix
        return self.tok.backend.encode(text, add_special_tokens=False).ids

    def __call__(self, requests: Sequence[Request], max_new_tokens: int,
                 stop: Optional[Sequence[str]] = None) -> list[tuple[str, bool]]:
        from ..generation import generate, left_pad

        eos = self.tok.eos_id
        out = []
        for i in range(0, len(requests), self.batch_size):
            ids, mask = left_pad([self.render(r) for r in requests[i:i + self.batch_size]], self.tok.pad_id)
            rows = generate(self.model, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                            temperature=self.temperature, top_p=self.top_p, eos_id=eos, pad_id=eos, stop=stop,
                            tokenizer=self.tok, generator=self.generator)[:, ids.shape[1]:]  # (b, new)
            for row in rows.tolist():
                n = row.index(eos) if eos in row else len(row)
                text = self.tok.decode(row[:n])
                hit = [text.index(s) for s in stop or () if s in text]
                out.append((text[: min(hit)] if hit else text, eos in row or bool(hit)))
        return out


# ---------------------------------------------------------------------- the loop
@dataclass
class SelfInstructResult:
    records: list  # the kept machine-written tasks (resumed ones first)
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    candidates: int = 0  # instructions parsed from the model's lists in this run
    kept: int = 0  # kept in this run (resumed records not included)
    unused: int = 0  # passed the instruction filters but were not needed: the quota was met
    rounds: int = 0

    def summary(self) -> dict:
        return {"candidates": self.candidates, "kept": self.kept, "unused": self.unused, "rounds": self.rounds,
                "rejected": {r: self.rejected[r] for r in REASONS}, "total_records": len(self.records)}


def sample_examples(rng: random.Random, seeds: Sequence[dict], machine: Sequence[dict], k: int) -> list[str]:
    """k example instructions: k-1 seeds and one machine task once there are some (all seeds
    before). Mostly seeds keep the model on the seeds' style; one machine task adds variety."""
    n_machine = 1 if machine and k > 1 else 0
    picks = rng.sample(list(seeds), min(k - n_machine, len(seeds))) + rng.sample(list(machine), n_machine)
    rng.shuffle(picks)
    return [t["instruction"] for t in picks]


def self_instruct(lm: LM, seeds: Sequence[dict], cfg: SelfInstructConfig = SelfInstructConfig(),
                  out=None, resume: bool = True, progress: bool = True) -> SelfInstructResult:
    """Run rounds until `cfg.num` tasks are kept (or `cfg.max_rounds` pass); see the module doc."""
    if not seeds:
        raise SelfInstructError("the seed file has no tasks; self-instruct needs a few to show the model")
    rng = random.Random(cfg.seed)
    machine = load_tasks(out) if out is not None and resume and Path(out).exists() else []
    pool = TaskPool(list(seeds) + machine)
    res = SelfInstructResult(records=machine)
    max_rounds = cfg.max_rounds if cfg.max_rounds is not None else 10 * cfg.num // cfg.batch_size + 10
    bar = tqdm(total=cfg.num, initial=min(len(machine), cfg.num), desc="self-instruct", unit="task",
               disable=not progress)
    while len(machine) < cfg.num and res.rounds < max_rounds:
        res.rounds += 1
        k = cfg.num_examples
        requests = [instruction_request(sample_examples(rng, seeds, machine, k)) for _ in range(cfg.batch_size)]
        # 1-2. instructions, filtered against the pool and against this round's earlier survivors
        # (this round's survivors join the check at once, so no output is generated for two
        # near-copies; one that later fails its output may thus have turned away a near-copy)
        fresh, fresh_pool = [], TaskPool()
        for text, finished in lm(requests, cfg.instruction_tokens, ["\n\n"]):
            for ins in parse_instructions(text, k + 1, finished):
                res.candidates += 1
                reason = (instruction_rejection(ins, cfg) or pool.novelty_rejection(ins, cfg.threshold)
                          or fresh_pool.novelty_rejection(ins, cfg.threshold))
                if reason:
                    res.rejected[reason] += 1
                else:
                    fresh.append({"instruction": ins, "input": "", "output": ""})
                    fresh_pool.add(ins)
        # 3. inputs for the instructions that point at one
        wanting = [t for t in fresh if needs_input(t["instruction"])]
        if wanting:
            for t, (text, finished) in zip(wanting, lm([input_request(t["instruction"]) for t in wanting],
                                                       cfg.input_tokens, ["\n\n"])):
                t["input"] = parse_input(text, finished)
        # 4. outputs, one batch at a time so that no reply is generated past the quota
        for i in range(0, len(fresh), cfg.batch_size):
            if len(machine) >= cfg.num:
                res.unused += len(fresh) - i
                break
            chunk = fresh[i:i + cfg.batch_size]
            replies = lm([output_request(t["instruction"], t["input"]) for t in chunk], cfg.output_tokens, None)
            for j, (t, (text, finished)) in enumerate(zip(chunk, replies)):
                if len(machine) >= cfg.num:
                    res.unused += len(chunk) - j
                    break
                t["output"] = trim_unfinished(text, finished)
                reason = ("no_input" if needs_input(t["instruction"]) and not t["input"] else
                          output_rejection(t["instruction"], t["input"], t["output"]))
                if reason:
                    res.rejected[reason] += 1
                    continue
                pool.add(t["instruction"])
                machine.append(t)
                res.kept += 1
                bar.update(1)
        bar.set_postfix(candidates=res.candidates, rejected=sum(res.rejected.values()))
        if out is not None:
            write_jsonl_atomic(out, machine)
    bar.close()
    return res


# ---------------------------------------------------------------------- from a model name, and the recipe
def run_self_instruct(model, seed_tasks, cfg: SelfInstructConfig, out, *, temperature: float = 0.8,
                      top_p: Optional[float] = 0.95, fresh: bool = False, progress: bool = True) -> dict:
    """Load `model` (a folder, .gguf or "smollm2"), grow `out` (JSONL; an existing one is resumed
    unless `fresh`) from the tasks in `seed_tasks`, and write OUT.stats.json; returns those stats."""
    from ..checkpoints.io import load_reporting

    seeds = load_tasks(seed_tasks)
    lm = load_reporting(model, need_tokenizer=True)
    sampler = ChatSampler(lm, lm.tokenizer, temperature=temperature, top_p=top_p, batch_size=cfg.batch_size,
                          seed=cfg.seed)
    t0 = time.perf_counter()
    res = self_instruct(sampler, seeds, cfg, out=out, resume=not fresh, progress=progress)
    summary = {"wall_s": round(time.perf_counter() - t0, 1), "seed_tasks": len(seeds), **res.summary()}
    stats = Path(out).with_suffix(".stats.json")
    stats.write_text(json.dumps(summary, indent=1) + "\n")
    if len(res.records) < cfg.num:
        print(f"self-instruct: stopped after {res.rounds} rounds with {len(res.records)} of {cfg.num} tasks; "
              "raise --max-rounds or --temperature for more", file=sys.stderr)
    print(f"wrote {len(res.records)} tasks to {out} (stats: {stats})", file=sys.stderr)
    return {**summary, "out": str(out), "stats": str(stats)}


@dataclass(kw_only=True)
class SelfInstructRecipe(Recipe):
    """Grow OUT/tasks.jsonl (Alpaca records) from seed tasks with a chat model. `data` (--data): the
    seed tasks file. Sized by config.num (--set num=N), not by optimizer steps."""

    model: str = "smollm2"
    seed_tasks: str = str(SEED_TASKS)
    config: SelfInstructConfig = field(default_factory=SelfInstructConfig)
    temperature: float = 0.8
    top_p: Optional[float] = 0.95
    fresh: bool = False  # ignore (and overwrite) an existing OUT/tasks.jsonl instead of resuming it
    kind = "self-instruct"

    def with_max_steps(self, n: int) -> "SelfInstructRecipe":
        raise SelfInstructError(f"self-instruct trains nothing: size it by the tasks to keep (--set num={n})")

    def run(self, *, out: Path, data=None, progress: bool = True, resume: bool = False, verbose: bool = True) -> dict:
        Path(out).mkdir(parents=True, exist_ok=True)
        return run_self_instruct(self.model, data if data is not None else self.seed_tasks, self.config,
                                 Path(out) / "tasks.jsonl", temperature=self.temperature, top_p=self.top_p,
                                 fresh=self.fresh and not resume, progress=progress)


register(SelfInstructRecipe(
    name="self-instruct-smollm2", description="Alpaca's self-instruct with the bundled SmolLM2-135M-Instruct: 200 "
    "tasks grown from the 20 shipped seed tasks (ROUGE-L < 0.7 to every kept task)",
    target="200 kept of 281 candidates, max pairwise ROUGE-L 0.667 (docs/alignment.md)"))
