"""LoRA: a fresh adapter changes nothing, training moves only the adapters, merging keeps the
outputs, lora_disabled gives the base model back, and a merged model saves like any other."""
import pytest
import torch

from allformers import Config, TransformerLM, load
from allformers.models import (LoRAConfig, LoRAError, LoRALinear, apply_lora, load_lora_state_dict, lora_disabled,
                               lora_parameters, lora_state_dict, merge_lora)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(**overrides) -> TransformerLM:
    """SmolLM2's switches (rotary, RMSNorm, SwiGLU, GQA 4:2, tied embeddings), shrunk."""
    c = Config.from_name("smollm2-135m").replace(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=None,
                                                 intermediate_size=48, vocab_size=61, block_size=64, **overrides)
    torch.manual_seed(0)
    return TransformerLM(c).eval()


def ids(B=2, T=12, seed=0):
    return torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_fresh_adapter_changes_nothing_and_wraps_the_right_linears():
    model = tiny_llama()
    x = ids()
    with torch.no_grad():
        before = model(x)
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert sorted(names) == sorted(f"blocks.{i}.{p}" for i in range(2)
                                   for p in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))
    assert not any("lm_head" in n or "wte" in n for n in names)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(lora_parameters(model)) == 2 * len(names)


def test_training_moves_only_the_adapters():
    model = tiny_llama()
    x = ids()
    with torch.no_grad():
        before = model(x)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all(n.endswith((".lora_A", ".lora_B")) for n in grads)
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        assert (model(x) - before).abs().max() > 1e-4
        with lora_disabled(model):  # the base weights did not move: the frozen model is intact
            assert torch.equal(model(x), before)
    for k, v in model.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, frozen[k.replace(".base.", ".")]), k


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"attn_bias": True}])
def test_merge_keeps_outputs(overrides):
    model = tiny_llama(**overrides)
    apply_lora(model, LoRAConfig(rank=4, alpha=16))
    randomize_adapters(model)
    x = ids(seed=3)
    with torch.no_grad():
        adapted = model(x)
        with lora_disabled(model):
            base = model(x)
    assert (adapted - base).abs().max() > 1e-3  # the adapters do something
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        assert (model(x) - adapted).abs().max() <= 1e-5
    assert all(p.requires_grad for p in model.parameters())  # a plain trainable model again


def test_lora_disabled_restores_and_nests():
    model = tiny_llama()
    x = ids()
    with torch.no_grad():
        base = model(x)
    apply_lora(model, LoRAConfig(rank=2, targets=("qkv",)))
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(x)
        with lora_disabled(model):
            assert torch.equal(model(x), base)
            with lora_disabled(model):
                assert torch.equal(model(x), base)
            assert torch.equal(model(x), base)  # the inner block does not re-enable early
        assert torch.equal(model(x), adapted)


def test_targets_that_match_nothing_name_the_real_linears():
    model = tiny_llama()
    with pytest.raises(LoRAError, match=r"no nn.Linear matches.*q_proj.*'fc'.*'proj'.*'qkv'"):
        apply_lora(model, LoRAConfig(targets=("q_proj", "v_proj")))
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen by the failed call


@pytest.mark.parametrize("bad, match", [({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
                                        ({"targets": ()}, "empty"), ({"targets": ("lm_head",)}, "LM head")])
def test_config_validation(bad, match):
    with pytest.raises(LoRAError, match=match):
        LoRAConfig(**bad)


def test_untied_lm_head_is_never_wrapped():
    model = tiny_llama(tie_embeddings=False)
    names = apply_lora(model, LoRAConfig(targets=("qkv", "proj", "fc")))
    assert isinstance(model.lm_head, torch.nn.Linear) and "lm_head" not in names
    with pytest.raises(LoRAError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())


def test_adapter_state_dict_round_trip():
    cfg = LoRAConfig(rank=3, alpha=6, targets=("qkv", "fc"))
    a, b = tiny_llama(), tiny_llama()
    apply_lora(a, cfg)
    apply_lora(b, cfg)
    randomize_adapters(a)
    state = lora_state_dict(a)
    assert sorted(state) == sorted(f"blocks.{i}.{p}.lora_{m}" for i in range(2) for p in ("attn.qkv", "mlp.fc")
                                   for m in "AB")
    load_lora_state_dict(b, state)
    x = ids()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    with pytest.raises(LoRAError, match="different rank"):
        c = tiny_llama()
        apply_lora(c, LoRAConfig(rank=2, alpha=6, targets=("qkv", "fc")))
        load_lora_state_dict(c, state)


def test_merged_model_saves_and_loads(tmp_path):
    model = tiny_llama()
    keys = sorted(model.state_dict())
    apply_lora(model, LoRAConfig(rank=4))
    randomize_adapters(model)
    merge_lora(model)
    assert sorted(model.state_dict()) == keys  # the original checkpoint layout
    model.save(tmp_path / "merged")
    back = load(tmp_path / "merged")
    x = ids(seed=5)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
