"""Koala-style SFT: a weighted mixture of dialogue sources on the one SFT path."""
import json

import pytest
import torch

from allformers import Config, TransformerLM
from allformers.objectives.sft import SFTError
from allformers.recipes import apply_overrides, get_recipe
from allformers.recipes.koala import BUILTIN, mix_sources, read_source
from allformers.tokenization import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def recs(tag, n):
    return [{"messages": [{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(n)]


def test_mixture_follows_the_weights_and_upsamples_small_sources():
    mixed, counts = mix_sources({"a": (recs("a", 50), 3.0), "b": (recs("b", 4), 1.0), "c": (recs("c", 9), 0)}, 40)
    assert counts == {"a": 30, "b": 10, "c": 0} and len(mixed) == 40
    tags = [r["messages"][0]["content"] for r in mixed]
    assert len({t for t in tags if t.startswith("a")}) == 30  # enough records: none repeated
    b = [t for t in tags if t.startswith("b")]
    assert len(set(b)) == 4 and all(2 <= b.count(t) <= 3 for t in set(b))  # 4 records upsampled to 10, evenly
    # three equal shares of 10: 3.33 each; rounding each alone would give 9, largest remainder gives 10
    _, counts = mix_sources({k: (recs(k, 5), 1.0) for k in "xyz"}, 10)
    assert sorted(counts.values()) == [3, 3, 4] and sum(counts.values()) == 10
    assert mix_sources({"a": (recs("a", 50), 3.0), "b": (recs("b", 4), 1.0)}, 40, seed=0)[0] != \
        mix_sources({"a": (recs("a", 50), 3.0), "b": (recs("b", 4), 1.0)}, 40, seed=1)[0]
    for bad, why in (({}, "at least one source"), ({"a": (recs("a", 2), -1)}, "non-negative"),
                     ({"a": (recs("a", 2), 0)}, "positive sum"), ({"a": ([], 1)}, "has no records")):
        with pytest.raises(SFTError, match=why):
            mix_sources(bad, 10)
    with pytest.raises(SFTError, match="mixture record"):
        mix_sources({"a": ([{"text": "x"}], 1)}, 3)


def test_sources_are_builtin_sets_or_files(tmp_path):
    for name in BUILTIN:
        assert read_source(name)
    assert read_source("tool-use")[0]["messages"][-1]["content"].startswith("<tool_call>")
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs("m", 3)))
    assert len(read_source(str(f))) == 3
    with pytest.raises(SFTError, match="neither a built-in set"):
        read_source("sharegpt")


def test_the_recipe_trains_on_its_mixture(tmp_path):
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    lm = TransformerLM(Config.from_name("smollm2-135m", n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                        intermediate_size=48, vocab_size=tok.vocab_size, block_size=512))
    lm.save(tmp_path / "tiny", tokenizer=tok)
    recipe = apply_overrides(get_recipe("koala-smollm2-lora"), {
        "model": str(tmp_path / "tiny"), "sources": {"seed-tasks": 1, "helpful-chat": 2}, "mixture_size": 12,
        "max_steps": 2, "batch_size": 2, "max_length": 256, "eval_fraction": 0.2})
    result = recipe.run(out=tmp_path / "koala", progress=False, verbose=False)
    assert result["mixture"]["records"] == {"seed-tasks": 4, "helpful-chat": 8}
    assert result["examples"]["train"] + result["examples"]["heldout"] == 12
    assert result["saved"] == "merged model" and (tmp_path / "koala" / "sft.json").is_file()
