"""Every bad input a new user tried (issue 17), each answered with a one-line error of the right
type that names the problem and the fix, and with every pre-existing file byte-identical (by
hash). Library calls raise an AllformersError subclass; the CLI exits 2 with one line on stderr.

Run them all: `python -m pytest -q tests/test_bad_inputs.py`."""
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from allformers import (AllformersError, CheckpointError, Config, ConfigError, InputError, TransformerLM,
                        UnknownModelError, load)
from allformers.generation import generate, generate_text
from allformers.generation.seq2seq import generate_seq2seq, seq2seq_text
from allformers.models import build_model
from allformers.tokenization import Tokenizer

TEXT = "to be or not to be, that is the question. "


@dataclass
class Bad:
    name: str  # what the user did
    run: Callable  # run(env) triggers the error
    error: type  # the AllformersError subclass expected
    words: str  # regex the message must match: the problem and the fix


class Env:
    """A tmp tree a user might have: a checkpoint, an HF checkpoint, notes, a thesis folder."""

    def __init__(self, root: Path, shared: Path):
        self.root = root
        shutil.copytree(shared, root, dirs_exist_ok=True)
        self.ckpt, self.hf, self.s2s = root / "ckpt", root / "hf", root / "s2s"
        (root / "notes.txt").write_text("my notes")
        (root / "thesis").mkdir()
        (root / "thesis" / "thesis.tex").write_text("years of work")
        self.tok = Tokenizer.char(TEXT)

    @property
    def lm(self):
        torch.manual_seed(0)
        return TransformerLM(Config(n_layer=1, n_embd=16, n_head=2, vocab_size=self.tok.vocab_size, block_size=32)).eval()

    @property
    def seq2seq(self):
        torch.manual_seed(0)
        return build_model(Config.from_name("t5-small", n_layer=1, n_embd=16, n_head=2, vocab_size=self.tok.vocab_size,
                                            intermediate_size=32, block_size=32)).eval()

    def folder_with_config(self, text: str) -> Path:
        """A copy of the checkpoint whose config.json holds `text`."""
        d = self.root / "broken"
        shutil.copytree(self.ckpt, d)
        (d / "config.json").write_text(text)
        return d

    def hf_without(self, key: str) -> Path:
        d = self.root / "hf-broken"
        shutil.copytree(self.hf, d)
        cfg = json.loads((d / "config.json").read_text())
        del cfg[key]
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    def gen(self, prompt="to be", **kw):
        return generate_text(self.lm, self.tok, prompt, **{"max_new_tokens": 3, **kw})

    def gen2(self, **kw):
        ids = torch.tensor([self.tok.encode("to be")])
        return generate_seq2seq(self.seq2seq, ids, **{"max_new_tokens": 3, **kw})

    def ids(self, ids):
        return generate(self.lm, ids, max_new_tokens=2)


def int8_checkpoint(env: Env):
    from safetensors.torch import load_file, save_file

    f = env.ckpt / "model.safetensors"
    save_file({k: v.to(torch.int8) for k, v in load_file(f).items()}, str(f))
    load(env.ckpt)


def bad_json_field(env: Env):
    cfg = json.loads((env.ckpt / "config.json").read_text())
    cfg["n_embd"] = "16"
    load(env.folder_with_config(json.dumps(cfg)))


LIBRARY = [
    # ------------------------------------------------------------------ config construction
    Bad("n_embd as a string", lambda e: Config(n_embd="768"), ConfigError, r"n_embd='768' must be an integer.*n_embd=768"),
    Bad("rope_base zero", lambda e: Config(position="rotary", rope_base=0.0), ConfigError, r"rope_base=0.0 must be positive.*10000"),
    Bad("rope_base negative", lambda e: Config(position="rotary", rope_base=-10000.0), ConfigError, r"rope_base=-10000.0 must be positive"),
    Bad("attn_scale negative", lambda e: Config(attn_scale=-0.125), ConfigError, r"attn_scale=-0.125 must be positive.*None"),
    Bad("rel_buckets zero", lambda e: Config.from_name("t5-small", rel_buckets=0), ConfigError, r"rel_buckets=0 must be >= 4.*T5 uses 32"),
    Bad("rel_max_distance below the exact buckets", lambda e: Config.from_name("t5-small", rel_max_distance=4),
        ConfigError, r"rel_max_distance=4 must exceed.*T5 uses 128"),
    Bad("dropout NaN", lambda e: Config(dropout=float("nan")), ConfigError, r"dropout=nan must be a finite number"),
    Bad("a bool given as 1", lambda e: Config(causal=1), ConfigError, r"causal=1 must be True or False"),
    Bad("vocab_size zero", lambda e: Config(vocab_size=0), ConfigError, r"vocab_size must be a positive integer"),
    Bad("n_head not dividing n_embd", lambda e: Config(n_embd=64, n_head=5), ConfigError, r"not divisible by n_head=5.*pick n_head among"),
    Bad("n_decoder_layer zero", lambda e: Config.from_name("t5-small", n_decoder_layer=0), ConfigError, r"n_decoder_layer=0 must be a positive"),
    Bad("norm_eps zero", lambda e: Config(norm_eps=0.0), ConfigError, r"norm_eps=0.0 must be positive"),
    Bad("unknown config field", lambda e: Config.from_dict({"n_embdd": 64}), ConfigError, r"unknown config field.*n_embdd.*known fields"),
    Bad("unknown zoo name", lambda e: Config.from_name("gpt-5"), UnknownModelError, r"unknown model name 'gpt-5'.*allformers zoo"),
    # ------------------------------------------------------------------ checkpoint reading
    Bad("config.json junk", lambda e: load(e.folder_with_config("{this is not json")), CheckpointError,
        r"config.json is not valid JSON.*re-save the checkpoint"),
    Bad("config.json empty", lambda e: load(e.folder_with_config("")), CheckpointError, r"config.json is empty; restore it"),
    Bad("config.json truncated", lambda e: load(e.folder_with_config('{"n_layer": 1, "n_em')), CheckpointError,
        r"not valid JSON.*truncated"),
    Bad("config.json a list", lambda e: load(e.folder_with_config("[1, 2, 3]")), CheckpointError,
        r"holds a JSON list, not an object of config fields"),
    Bad("config.json null", lambda e: load(e.folder_with_config("null")), CheckpointError, r"holds a JSON NoneType"),
    Bad("config.json with a string n_embd", bad_json_field, CheckpointError, r"config.json: .*n_embd='16' must be an integer"),
    Bad("HF config missing a key", lambda e: load(e.hf_without("n_embd")), CheckpointError,
        r"has no 'n_embd', which a Hugging Face gpt2 config needs; restore the key"),
    Bad("HF config of an unknown model_type", lambda e: load(e.folder_with_config('{"model_type": "gpt99"}')),
        CheckpointError, r"model_type 'gpt99' is not supported yet; supported:"),
    Bad("load(None)", lambda e: load(None), CheckpointError, r"load\(\) needs the path of a checkpoint.*got None"),
    Bad("load(a number)", lambda e: load(123), CheckpointError, r"needs the path.*got 123"),
    Bad("load a missing path", lambda e: load(e.root / "nothing"), CheckpointError, r"does not exist; pass an allformers folder"),
    Bad("load a folder without a checkpoint", lambda e: load(e.root / "thesis"), CheckpointError,
        r"neither a .gguf file nor a folder with config.json"),
    Bad("integer weights", int8_checkpoint, CheckpointError, r"stored as integers.*re-save it .* float dtype"),
    Bad("load(dtype=int8)", lambda e: load(e.ckpt, dtype=torch.int8), CheckpointError, r"load\(dtype=torch.int8\) cannot hold the weights"),
    Bad("truncated weights", lambda e: ((e.ckpt / "model.safetensors").write_bytes(b"\x08\x00"), load(e.ckpt)),
        CheckpointError, r"not a readable safetensors file.*re-save it"),
    # ------------------------------------------------------------------ saving
    Bad("save onto a file", lambda e: e.lm.save(e.root / "notes.txt"), CheckpointError, r"is a file, not a checkpoint folder; save to another path"),
    Bad("save onto a folder of user files", lambda e: e.lm.save(e.root / "thesis"), CheckpointError,
        r"holds no checkpoint \(thesis.tex\).*overwrite=True"),
    Bad("save under a file", lambda e: e.lm.save(e.root / "notes.txt" / "m"), CheckpointError, r"notes.txt is a file"),
    Bad("save dtype=int8", lambda e: e.lm.save(e.root / "q", dtype=torch.int8), CheckpointError,
        r"save\(dtype=torch.int8\) cannot hold the weights.*torch.float16"),
    Bad("save an unknown format", lambda e: e.lm.save(e.root / "q", format="onnx"), CheckpointError, r"unknown format 'onnx'; use"),
    # ------------------------------------------------------------------ generation settings
    Bad("top_p above 1", lambda e: e.gen(top_p=1.5), InputError, r"top_p=1.5 must be in \(0, 1\]"),
    Bad("top_p zero", lambda e: e.gen(top_p=0.0), InputError, r"top_p=0.0 must be in \(0, 1\]"),
    Bad("top_p negative", lambda e: e.gen(top_p=-0.5), InputError, r"top_p=-0.5 must be in \(0, 1\]"),
    Bad("repetition_penalty zero", lambda e: e.gen(repetition_penalty=0.0), InputError, r"repetition_penalty=0.0 must be > 0 \(1 = off"),
    Bad("repetition_penalty negative", lambda e: e.gen(repetition_penalty=-1.2), InputError, r"repetition_penalty=-1.2 must be > 0"),
    Bad("empty stop string", lambda e: e.gen(stop=[""]), InputError, r"empty stop string.*drop it"),
    Bad("stop string not a string", lambda e: e.gen(stop=[3]), InputError, r"stop strings must be strings, got 3"),
    Bad("top_k negative", lambda e: e.gen(top_k=-1), InputError, r"top_k=-1 must be a whole number >= 0 \(0 or None = off"),
    Bad("top_k fractional", lambda e: e.gen(top_k=2.5), InputError, r"top_k=2.5 must be a whole number"),
    Bad("temperature NaN", lambda e: e.gen(temperature=float("nan")), InputError, r"temperature=nan must be a finite number >= 0 \(0 = greedy"),
    Bad("temperature a string", lambda e: e.gen(temperature="hot"), InputError, r"temperature='hot' must be a finite number"),
    Bad("temperature negative", lambda e: e.gen(temperature=-0.7), InputError, r"temperature=-0.7 must be >= 0 \(0 = greedy"),
    Bad("max_new_tokens fractional", lambda e: e.gen(max_new_tokens=2.5), InputError, r"max_new_tokens=2.5 must be a whole number >= 0"),
    Bad("max_new_tokens negative", lambda e: e.gen(max_new_tokens=-1), InputError, r"max_new_tokens=-1 must be a whole number >= 0"),
    Bad("max_new_tokens past the context", lambda e: e.gen(max_new_tokens=100), AllformersError,
        r"> the model's context of 32; shorten the prompt or lower max_new_tokens"),
    Bad("seq2seq max_new_tokens negative", lambda e: e.gen2(max_new_tokens=-1), InputError, r"max_new_tokens=-1 must be a whole number >= 0"),
    Bad("seq2seq max_new_tokens fractional", lambda e: e.gen2(max_new_tokens=2.5), InputError, r"max_new_tokens=2.5 must be a whole"),
    Bad("seq2seq num_beams zero", lambda e: e.gen2(num_beams=0), InputError, r"num_beams=0 must be a whole number >= 1"),
    Bad("seq2seq top_p above 1", lambda e: e.gen2(top_p=2.0), InputError, r"top_p=2.0 must be in \(0, 1\]"),
    Bad("seq2seq length_penalty NaN", lambda e: e.gen2(num_beams=2, length_penalty=float("nan")), InputError,
        r"length_penalty=nan must be a finite number"),
    Bad("seq2seq no_repeat_ngram_size negative", lambda e: e.gen2(num_beams=2, no_repeat_ngram_size=-2), InputError,
        r"no_repeat_ngram_size=-2 must be a whole number >= 0"),
    Bad("seq2seq max_length zero", lambda e: seq2seq_text(e.seq2seq, e.tok, "to be", max_length=0), InputError,
        r"max_length=0 must be a whole number >= 1"),
    # ------------------------------------------------------------------ token ids and prompts
    Bad("token id >= vocab", lambda e: e.ids(torch.tensor([[0, 99]])), InputError, r"token id 99 .*outside the vocabulary \(0 \.\.\. 14\)"),
    Bad("token id < 0", lambda e: e.ids(torch.tensor([[-1, 2]])), InputError, r"token id -1 .*outside the vocabulary"),
    Bad("float ids", lambda e: e.ids(torch.tensor([[1.0, 2.0]])), InputError, r"must be integers \(torch.long\), got torch.float32"),
    Bad("ids of shape (1, 0)", lambda e: e.ids(torch.zeros(1, 0, dtype=torch.long)), InputError,
        r"shape \(1, 0\): expected \(batch, tokens\) with at least one token"),
    Bad("ids as a list", lambda e: e.ids([[1, 2]]), InputError, r"must be a tensor of integer ids such as torch.tensor"),
    Bad("forward with ids >= vocab", lambda e: e.lm(torch.tensor([[50]])), InputError, r"token id 50 .*outside the vocabulary"),
    Bad("seq2seq source ids >= vocab", lambda e: generate_seq2seq(e.seq2seq, torch.tensor([[70]]), max_new_tokens=2),
        InputError, r"token id 70 in input_ids is outside"),
    Bad("prompt with characters the tokenizer lacks", lambda e: e.gen("to be? ¡sí!"), InputError,
        r"cannot encode '!', '\?', '¡', 'í': not in its vocabulary.*remove them"),
    Bad("prompt not a string", lambda e: e.tok.encode(42), InputError, r"the tokenizer encodes strings, got int"),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The checkpoints every case's tree starts from (saved once)."""
    root = tmp_path_factory.mktemp("shared")
    tok = Tokenizer.char(TEXT)
    torch.manual_seed(0)
    model = TransformerLM(Config(n_layer=1, n_embd=16, n_head=2, vocab_size=tok.vocab_size, block_size=32))
    model.save(root / "ckpt", tokenizer=tok)
    model.save(root / "hf", format="hf", tokenizer=tok)
    return root


def tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", LIBRARY, ids=[b.name for b in LIBRARY])
def test_library_bad_input(bad, tmp_path, shared):
    env = Env(tmp_path / "user", shared)
    before = tree_hashes(tmp_path)
    with pytest.raises(bad.error) as e:
        bad.run(env)
    msg = str(e.value)
    assert isinstance(e.value, AllformersError)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert re.search(bad.words, msg), msg
    after = tree_hashes(tmp_path)
    # a case may corrupt its own copy on purpose (truncated weights, int8 checkpoint): those are the inputs
    own = {"user/ckpt/model.safetensors"} if bad.name in ("integer weights", "truncated weights") else set()
    assert [k for k in before if after.get(k) != before[k] and k not in own] == []  # changed or deleted


def test_enough_distinct_bad_inputs():
    names = [b.name for b in LIBRARY]
    assert len(set(names)) == len(names)
