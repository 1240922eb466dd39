"""Koala-style SFT (Geng et al. 2023): one chat model fine-tuned on a mixture of dialogue sources,
each drawn at its own weight, on the library's one SFT path (recipes/sft.py: run_sft).

    allformers train --recipe koala-smollm2-lora
    allformers train --recipe koala-smollm2-lora --set 'sources={"seed-tasks": 1, "runs/si.jsonl": 3}'

`sources` maps a source to its weight. A source is a built-in set (generated here, no download):
  * "seed-tasks": the 20 Alpaca-style seed tasks shipped with allformers;
  * "tool-use": calculator word problems as tool-calling conversations (dialogue/data.py);
  * "helpful-chat": specific, sensible replies to everyday questions (LaMDA's SSI set, the positives);
or a JSON-lines file of SFT records (Alpaca or chat: self-instruct output, converted ShareGPT ...).
A mixture of `mixture_size` records gives source i its share size * w_i / sum w of them (largest
remainder, so the counts sum to size), drawn without replacement while the source has enough,
then repeated (a small source at a high weight is upsampled, as Koala's mixtures were); the
records are shuffled together and the summary counts them per source. run_sft holds out records by hash, so copies of an upsampled record may fall on both
sides: weigh the held-out loss of such a mixture accordingly."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..models.lora import LoRAConfig
from ..objectives.sft import SFTError, check_record
from .registry import register
from .sft import SFTRecipe, read_sft_records, run_sft, settings_of


def builtin_source(name: str, seed: int = 0) -> list:
    from ..dialogue.data import TOPICS, arithmetic_questions, tool_use_records
    from .self_instruct import SEED_TASKS

    if name == "seed-tasks":
        return read_sft_records(SEED_TASKS)
    if name == "tool-use":
        return tool_use_records(arithmetic_questions(100, seed=seed))
    if name == "helpful-chat":
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in TOPICS]
    raise KeyError(name)


BUILTIN = ("seed-tasks", "tool-use", "helpful-chat")


def read_source(name: str, seed: int = 0) -> list:
    if name in BUILTIN:
        return builtin_source(name, seed)
    if not Path(name).is_file():
        raise SFTError(f"source {name!r} is neither a built-in set ({', '.join(BUILTIN)}) nor a JSON-lines file")
    return read_sft_records(name)


def mix_sources(sources: dict, size: int, seed: int = 0) -> tuple[list, dict]:
    """(records, {source: count}): `size` records drawn from sources = {name: (records, weight)}."""
    if not sources:
        raise SFTError("a mixture needs at least one source")
    bad = {k: w for k, (_, w) in sources.items() if not isinstance(w, (int, float)) or w < 0}
    if bad or not sum(w for _, w in sources.values()) > 0:
        raise SFTError(f"source weights must be non-negative numbers with a positive sum, got "
                       f"{ {k: w for k, (_, w) in sources.items()} }")
    if size < 1:
        raise SFTError(f"mixture_size must be >= 1, got {size}")
    total = sum(w for _, w in sources.values())
    rng, out, counts = random.Random(seed), [], {}
    # largest remainder: floors first, the leftover records to the largest fractions, so the counts
    # always sum to `size` (rounding each share alone can give size +- 1)
    quota = {name: size * w / total for name, (_, w) in sources.items()}
    share = {name: int(q) for name, q in quota.items()}
    for name in sorted(quota, key=lambda k: quota[k] - share[k], reverse=True)[:size - sum(share.values())]:
        share[name] += 1
    for name, (records, w) in sources.items():
        n = share[name]
        if n and not records:
            raise SFTError(f"source {name!r} has no records")
        order = []
        while len(order) < n:  # every record once before any repeats
            block = list(range(len(records)))
            rng.shuffle(block)
            order += block
        out += [records[i] for i in order[:n]]
        counts[name] = n
    rng.shuffle(out)
    for i, r in enumerate(out):
        check_record(r, f"mixture record {i}")
    return out, counts


@dataclass(kw_only=True)
class KoalaRecipe(SFTRecipe):
    """SFTRecipe whose data is a weighted mixture of sources (the module docstring)."""

    sources: dict = field(default_factory=lambda: {"seed-tasks": 1.0, "tool-use": 1.0, "helpful-chat": 1.0})
    mixture_size: int = 300

    def run(self, *, out: Path, data=None, progress: bool = True, resume: bool = False, verbose: bool = True) -> dict:
        kw = settings_of(self)
        sources, size = kw.pop("sources"), kw.pop("mixture_size")
        if data is not None:  # --data adds one more source at weight 1
            sources = {**sources, str(data): 1.0}
        records, counts = mix_sources({k: (read_source(k, self.seed), w) for k, w in sources.items()}, size,
                                      seed=self.seed)
        kw["data"] = records
        result = run_sft(out=out, progress=progress, verbose=verbose, **kw)
        result.pop("trained_model")
        result["mixture"] = {"sources": dict(sources), "records": counts}
        return result

    def with_max_steps(self, n: int) -> "KoalaRecipe":
        return dataclasses.replace(self, max_steps=n)


register(KoalaRecipe(
    name="koala-smollm2-lora", description="Koala-style LoRA SFT of the bundled SmolLM2-135M-Instruct on a weighted "
    "mixture of dialogue sources (default: the seed tasks, tool-use conversations and helpful chat, equal weights; "
    "--set sources={...} takes built-in names or JSON-lines files), merged into a plain model",
    template="chatml", lora=LoRAConfig(rank=8, alpha=16), merge=True, max_steps=40, batch_size=4, lr=1e-3, max_length=320,
    target="the held-out response loss falls; `allformers chat OUT` answers as trained"))
