"""Inference on oneDNN-packed weights (allformers/models/packed.py): the same function as torch's own
matmuls, and never stale after the weights change."""
import copy

import pytest
import torch

from allformers import Config, TransformerLM
from allformers.models import packed
from allformers.models.packed import enabled, packed_for, release

pytestmark = pytest.mark.skipif(not packed.onednn_available(), reason="this torch has no oneDNN")

SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=97, block_size=64)


def tiny(name="gpt2", **kw):
    torch.manual_seed(0)
    return TransformerLM(Config.from_name(name, **{**SMALL, **kw})).eval()


def ids(n=24, seed=1):
    return torch.randint(0, SMALL["vocab_size"], (2, n), generator=torch.Generator().manual_seed(seed))


def unpacked(model, x):
    with torch.no_grad(), enabled(False):
        return model(x)


@pytest.mark.parametrize("name", ["gpt2", "smollm2-135m", "pythia-70m"])  # tied; GQA + SwiGLU; untied + parallel
def test_packed_inference_is_the_same_function(name):
    model = tiny(name, **({"n_kv_head": 2, "intermediate_size": 128} if name == "smollm2-135m" else {}))
    with torch.no_grad():
        fast = model(ids())
    p = packed_for_no_grad(model)
    assert p is not None and p.n_packed == len([m for m in model.modules() if isinstance(m, torch.nn.Linear)]) + (
        model.lm_head is None)
    assert (fast - unpacked(model, ids())).abs().max().item() < 1e-4
    with torch.enable_grad():
        assert packed_for(model) is None  # training never runs on the packed copies


def packed_for_no_grad(model):
    with torch.no_grad():
        return packed_for(model)


def test_a_fused_optimizer_step_is_seen_by_the_next_inference():
    model = tiny()
    x = ids()
    with torch.no_grad():
        before = model(x)  # packs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)  # its kernel does not bump version counters
    model.train()
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert (after - unpacked(model, x)).abs().max().item() < 1e-4 and (after - before).abs().max().item() > 1e-3


def test_loaded_weights_are_seen_and_release_and_disable_work():
    model, other = tiny(), tiny("gpt2")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        model(ids())
        first = packed_for(model)
        model.load_state_dict(other.state_dict())
        assert packed_for(model) is not first  # the copy_ moved the version counters: packed again
        assert (model(ids()) - unpacked(other, ids())).abs().max().item() < 1e-4
        release(model)
        assert packed._CACHE.get(model) is None
        with enabled(False):
            model(ids())
            assert packed_for(model) is None and packed._CACHE.get(model) is None
    copy.deepcopy(model)  # the copies live in a weak table, not on the model


def test_other_dtypes_run_unpacked():
    model = tiny().to(torch.bfloat16)
    with torch.no_grad():
        assert packed_for(model) is None and model(ids()).dtype == torch.bfloat16


def test_training_through_onednn_gives_torchs_gradients():
    from allformers.models import LoRAConfig, apply_lora

    for name in ("gpt2", "pythia-70m"):  # tied head + biases; untied head, parallel blocks
        model = tiny(name).train()
        ref = copy.deepcopy(model)
        x = ids()
        model(x).logsumexp(-1).mean().backward()
        with enabled(False):
            ref(x).logsumexp(-1).mean().backward()
        for (n, a), b in zip(model.named_parameters(), ref.parameters()):
            assert (a.grad - b.grad).abs().max().item() <= 1e-5 * max(1.0, b.grad.abs().max().item()), n
    lora = tiny()
    apply_lora(lora, LoRAConfig(rank=2))  # frozen base weights: their gradient is never computed
    lora(ids()).mean().backward()
    assert all(p.grad is None for n, p in lora.named_parameters() if not p.requires_grad)


def test_the_onednn_linear_refuses_a_double_backward_and_leaves_other_dtypes_to_torch():
    from allformers.models.packed import onednn_linear

    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    (g,) = torch.autograd.grad(onednn_linear(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|does not require grad"):
        g.sum().backward()
    xb = x.detach().bfloat16().requires_grad_()
    assert onednn_linear(xb, w.detach().bfloat16()).grad_fn.name().startswith(("MmBackward", "AddmmBackward",
                                                                               "ViewBackward", "UnsafeView"))


def test_a_replaced_embedding_or_replaced_linears_are_never_run_from_old_copies():
    from allformers.models import LoRAConfig, apply_lora, merge_lora

    model = tiny()  # its head is tied to wte
    with torch.no_grad():
        model(ids())
        model.wte.weight = torch.nn.Parameter(model.wte.weight * 2)  # the tied table replaced, not written
        assert (model(ids()) - unpacked(model, ids())).abs().max().item() < 1e-4
        first = packed_for(model)
    apply_lora(model, LoRAConfig(rank=2))
    assert packed._CACHE.get(model) is None  # modules replaced: the copies are dropped
    with torch.no_grad():
        model(ids())
    merge_lora(model)
    assert packed._CACHE.get(model) is None and first is not None


def test_a_model_made_under_inference_mode_runs_unpacked():
    with torch.inference_mode():
        model = tiny()
        assert packed_for(model) is None and model(ids()).shape == (2, 24, SMALL["vocab_size"])


def test_autograd_inside_a_packed_context_still_gets_gradients():
    lin = torch.nn.Linear(16, 8)
    model = torch.nn.Sequential(lin)
    with torch.no_grad():
        ctx = packed.PackedLinears(model)
    with ctx:  # as another thread's server step would hold it
        x = torch.randn(3, 16, requires_grad=True)
        lin(x).sum().backward()  # autograd on: torch's own Linear, never the detached packed copy
        with torch.no_grad():
            assert torch.allclose(lin(input=x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5)
    assert x.grad is not None and lin.weight.grad is not None and "forward" not in lin.__dict__
