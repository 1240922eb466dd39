"""Our format: round trip, atomic save, tokenizer beside the weights, load reports and errors."""
import errno
import re

import pytest
import torch

import allformers
from allformers import CheckpointError, Config, TransformerLM, load
from allformers.tokenization import Tokenizer


def small(**kw):
    torch.manual_seed(0)
    return TransformerLM(Config.from_name("gpt2").replace(n_layer=2, n_embd=32, n_head=4, vocab_size=50, block_size=64, **kw)).eval()


def test_round_trip_with_tokenizer(tmp_path):
    model = small()
    tok = Tokenizer.char("hello world")
    model.save(tmp_path / "m", tokenizer=tok)
    back = load(tmp_path / "m")
    x = torch.randint(0, 50, (2, 10))
    assert torch.equal(back(x), model(x))
    assert back.tokenizer.decode(back.tokenizer.encode("hello")) == "hello"
    r = back.load_report
    assert len(r.loaded) == len(model.state_dict()) and not r.missing and not r.unexpected


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = small()
    model.save(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("allformers.checkpoints.files.save_file", boom)  # the one folder writer
    with pytest.raises(CheckpointError, match="disk is full"):
        small(dropout=0.1).save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert load(tmp_path / "m").config == model.config
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind


def test_shapes_that_do_not_fit_the_config_are_named(tmp_path):
    small().save(tmp_path / "m")
    cfg = Config.from_json(tmp_path / "m" / "config.json").replace(n_embd=64)
    cfg.to_json(tmp_path / "m" / "config.json")
    with pytest.raises(CheckpointError) as e:
        load(tmp_path / "m")
    msg = str(e.value)
    assert "28 tensor(s) do not fit" in msg and "n_embd" in msg
    assert re.search(r"blocks\.0\.\S+: checkpoint \(32[,)].* vs model \(64[,)]", msg), msg


def test_truncated_and_foreign_files(tmp_path):
    small().save(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load(tmp_path / "m")
    f.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load(tmp_path / "m")
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nothing")
    (tmp_path / "x.bin").write_bytes(b"123")
    with pytest.raises(CheckpointError, match="neither a .gguf"):
        load(tmp_path / "x.bin")


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    small().save(tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    state.pop("blocks.1.mlp.fc.bias")
    state["blocks.9.extra"] = torch.zeros(1)
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load(tmp_path / "m")
    assert "missing: blocks.1.mlp.fc.bias" in str(e.value) and "unexpected: blocks.9.extra" in str(e.value)


def test_untied_head_and_hf_export_refusal(tmp_path):
    model = TransformerLM(Config(n_layer=1, n_embd=32, n_head=4, vocab_size=40, block_size=16,
                                 position="alibi", tie_embeddings=False))
    model.save(tmp_path / "a")
    assert "lm_head.weight" in load(tmp_path / "a").load_report.loaded
    with pytest.raises(CheckpointError, match="no Hugging Face equivalent"):
        model.save(tmp_path / "b", format="hf")
    with pytest.raises(CheckpointError, match="unknown format"):
        model.save(tmp_path / "c", format="onnx")


def test_top_level_api():
    assert allformers.load is load and allformers.Config is Config


def test_one_activation_table_both_ways():
    """checkpoints/maps.py: every HF spelling reads as one of ours and ours write back to a name HF reads the same."""
    from allformers.checkpoints.maps import HF_ACTIVATIONS, activation_from_hf, activation_to_hf
    from allformers.errors import CheckpointError

    for hf_name, ours in HF_ACTIVATIONS.items():
        assert activation_from_hf(activation_to_hf(ours)) == ours
        assert activation_from_hf(activation_to_hf(ours, "gelu_pytorch_tanh")) == ours
    assert activation_to_hf("gelu_tanh") == "gelu_new" and activation_to_hf("gelu_tanh", "gelu_pytorch_tanh") == "gelu_pytorch_tanh"
    with pytest.raises(CheckpointError, match="ff_activation='mish' is not supported"):
        activation_from_hf("mish", "ff_activation")
    with pytest.raises(CheckpointError, match="no Hugging Face name"):
        activation_to_hf("swiglu")


def test_t5_gated_gelu_is_tanh_and_plain_gelu_is_exact():
    """HF's T5Config reads feed_forward_proj="gated-gelu" as gelu_new but a plain "gelu" as the exact GELU."""
    from allformers.checkpoints.hf_seq2seq import _t5_to_hf, t5_config

    h = dict(vocab_size=32, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=1)
    assert t5_config({**h, "feed_forward_proj": "gated-gelu"})["activation"] == "gelu_tanh"
    assert t5_config({**h, "feed_forward_proj": "gelu"})["activation"] == "gelu"
    for proj in ("gated-gelu", "gelu", "relu", "gated-silu"):
        c = Config(**t5_config({**h, "feed_forward_proj": proj}))
        assert _t5_to_hf(c)["feed_forward_proj"] == proj
