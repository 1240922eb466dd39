"""Config: registry, JSON round trip, derived fields, validation messages."""
import json

import pytest

from allformers import Config, ConfigError, UnknownModelError
from allformers.config import REGISTRY


def test_every_zoo_entry_round_trips_through_json(tmp_path):
    for name in REGISTRY:
        c = Config.from_name(name)
        c.to_json(tmp_path / "c.json")
        assert Config.from_json(tmp_path / "c.json") == c
        json.loads(c.to_json())  # plain JSON: class choices are strings


def test_derived_fields():
    c = Config.from_name("smollm2-135m")
    assert (c.head_dim, c.n_kv_head, c.rope_n_elem) == (64, 3, 64)
    neox = Config.from_name("pythia-70m")
    assert neox.rope_n_elem == 16 and neox.final_norm  # a quarter of 64 dims rotate
    assert Config(mlp_class="GLU", activation="silu", n_embd=4096, n_head=32).intermediate_size == 11008
    assert not Config(norm_placement="post").final_norm


def test_replace_recomputes_derived_fields_but_keeps_explicit_ones():
    c = Config.from_name("gpt2").replace(n_embd=256, n_head=4)
    assert c.head_dim == 64 and c.intermediate_size == 1024
    s = Config.from_name("smollm2-135m").replace(n_layer=2)
    assert s.intermediate_size == 1536 and s.n_kv_head == 3


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownModelError) as e:
        Config.from_name("gpt-2")
    assert "gpt2" in str(e.value) and "allformers zoo" in str(e.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_embd=100, n_head=12), ["n_embd=100", "n_head=12"]),
    (dict(n_head=12, n_kv_head=5), ["n_head=12", "n_kv_head=5", "[1, 2, 3, 4, 6, 12]"]),
    (dict(position="learned", rotary_pct=0.5), ["rotary_pct", "position='rotary'"]),
    (dict(parallel_residual=True, norm_placement="post"), ["parallel_residual", "norm_placement='pre'"]),
    (dict(shared_parallel_norm=True), ["shared_parallel_norm", "parallel_residual"]),
    (dict(position="rotary", rotary_pct=0.1, n_embd=64, n_head=2), ["even"]),
    (dict(norm_class="BatchNorm"), ["norm_class", "RMSNorm"]),
    (dict(vocab_size=0), ["vocab_size", "positive"]),
    (dict(dropout=1.5), ["dropout"]),
])
def test_validation_names_the_fields_and_the_fix(kwargs, words):
    with pytest.raises(ConfigError) as e:
        Config(**kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_unknown_json_field_is_named(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"n_layers": 3}))
    with pytest.raises(ConfigError, match="n_layers"):
        Config.from_json(tmp_path / "c.json")
