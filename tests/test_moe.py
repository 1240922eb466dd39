"""Mixture of experts (blocks/moe.py): routing against a hand-computed example, the losses, the
training objective and its statistics, GLaM's alternating layers, Mixtral parity beyond conftest's."""
import math

import pytest
import torch
import transformers as T

from allformers import Config, ConfigError, TransformerLM, load
from allformers.blocks.moe import MoE, routing_losses
from allformers.generation import generate
from allformers.objectives import CausalLM

from .conftest import VOCAB, padded_logits_diff, recompute_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

# Four tokens in 2 dimensions; the router's logits are (x0, x1, 0) for experts 0, 1, 2.
X = torch.tensor([[2.0, 1.0], [1.0, 2.0], [3.0, 1.0], [0.5, 1.5]])
SCALE = [1.0, 10.0, 100.0]  # expert e computes SCALE[e] * relu(x)


def hand_moe(capacity_factor=None) -> MoE:
    m = MoE(2, 2, n_expert=3, top_k=2, activation="relu", glu=False, capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor)
    with torch.no_grad():
        m.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        m.experts.fc.weight.copy_(torch.eye(2).expand(3, 2, 2))
        m.experts.proj.weight.copy_(torch.stack([s * torch.eye(2) for s in SCALE]))
    return m.eval()


def softmax(v):
    e = [math.exp(a) for a in v]
    return [a / sum(e) for a in e]


def hand_routing():
    """Per token: (first expert, its gate), (second expert, its gate), all three probabilities."""
    out = []
    for x0, x1 in X.tolist():
        p = softmax([x0, x1, 0.0])
        a, b = sorted(range(3), key=lambda e: -p[e])[:2]
        out.append(((a, p[a] / (p[a] + p[b])), (b, p[b] / (p[a] + p[b])), p))
    return out


def expected_output(kept):
    """kept[t] = the experts whose assignment survived for token t."""
    rows = []
    for t, ((a, ga), (b, gb), _) in enumerate(hand_routing()):
        y = torch.zeros(2)
        for e, g in ((a, ga), (b, gb)):
            if e in kept[t]:
                y += g * SCALE[e] * X[t]
        rows.append(y)
    return torch.stack(rows)


def test_top2_choice_and_renormalised_gates():
    """Without a capacity limit each token gets its two most probable experts, gates summing to 1."""
    m = hand_moe()
    routing = hand_routing()
    assert [(r[0][0], r[1][0]) for r in routing] == [(0, 1), (1, 0), (0, 1), (1, 0)]
    _, _, experts, gates = m.route(X)
    assert experts.tolist() == [[0, 1], [1, 0], [0, 1], [1, 0]]
    assert torch.allclose(gates, torch.tensor([[r[0][1], r[1][1]] for r in routing]), atol=1e-6)
    assert math.isclose(routing[0][0][1], 1 / (1 + math.exp(-1)), rel_tol=1e-9)  # softmax over two logits 2, 1
    with torch.no_grad():
        y = m(X)
    assert torch.allclose(y, expected_output([{0, 1}] * 4), atol=1e-5)
    assert m.stats.dropped.item() == 0.0


def test_capacity_drops_second_choices_first():
    """cf 0.75: C = ceil(0.75 * 2 * 4 / 3) = 2 slots per expert. First choices fill experts 0 and 1
    (tokens 0, 2 and 1, 3); every second choice finds its expert full and is dropped (half of all)."""
    m = hand_moe(capacity_factor=0.75)
    with torch.no_grad():
        y = m(X)
    assert torch.allclose(y, expected_output([{0}, {1}, {0}, {1}]), atol=1e-5)
    assert m.stats.dropped.item() == 0.5


def test_a_token_that_loses_every_expert_passes_unchanged():
    """cf 0.375: one slot per expert. Tokens 0 and 1 take them; tokens 2 and 3 get nothing from the
    block (zeros), so the layer's residual carries them through unchanged."""
    m = hand_moe(capacity_factor=0.375)
    with torch.no_grad():
        y = m(X)
    assert torch.allclose(y, expected_output([{0}, {1}, set(), set()]), atol=1e-5)
    assert torch.equal(y[2:], torch.zeros(2, 2))
    assert m.stats.dropped.item() == 0.75


def test_aux_and_z_loss_values():
    """Load balancing E * sum_i f_i P_i with f = (4, 4, 0) / 4 tokens, P the mean probabilities;
    z-loss the mean squared logsumexp of the logits."""
    m = hand_moe()
    with torch.no_grad():
        m(X)
    probs = [r[2] for r in hand_routing()]
    P = [sum(p[e] for p in probs) / 4 for e in range(3)]
    aux = 3 * (1.0 * P[0] + 1.0 * P[1] + 0.0 * P[2])
    z = sum(math.log(math.exp(x0) + math.exp(x1) + 1.0) ** 2 for x0, x1 in X.tolist()) / 4
    assert math.isclose(m.stats.aux_loss.item(), aux, rel_tol=1e-5)
    assert math.isclose(m.stats.z_loss.item(), z, rel_tol=1e-5)
    assert m.stats.tokens_per_expert.tolist() == [4, 4, 0]


def test_router_runs_in_fp32_under_autocast():
    m = hand_moe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs, _, gates = m.route(X)
    assert logits.dtype == probs.dtype == gates.dtype == torch.float32


def glam_tiny(**kw):
    c = Config(**{**dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=32, vocab_size=61, block_size=64, position="rotary",
                         norm_class="RMSNorm", mlp_class="GLU", activation="gelu", intermediate_size=48, n_expert=4,
                         n_expert_per_token=2, moe_every=2, moe_capacity_factor=1.25), **kw})
    torch.manual_seed(0)
    model = TransformerLM(c)
    with torch.no_grad():
        model.wte.weight.mul_(20)
    return model


def test_glam_alternates_moe_and_dense_layers():
    model = glam_tiny()
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == [True, False, True, False]
    glam = glam_tiny(moe_mlp_class="MLP")  # GLaM: gated dense layers, plain two-matrix experts
    assert not glam.blocks[0].mlp.experts.glu and glam.blocks[1].mlp.hidden == 48


def test_objective_adds_router_losses_and_reports_statistics():
    model = glam_tiny().train()
    x = torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = (x, torch.roll(x, -1, 1))
    loss, metrics = CausalLM()(model, batch)
    ce = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), batch[1].flatten())
    layers = [b.mlp for b in model.blocks if isinstance(b.mlp, MoE)]
    router = sum(0.01 * m.stats.aux_loss + 0.001 * m.stats.z_loss for m in layers) / 2
    assert torch.allclose(loss, ce + router, atol=1e-6)
    assert {"moe_aux", "moe_z", "moe_dropped", "moe_load_max", "moe_load_min", "moe_load_e3"} <= set(metrics)
    assert math.isclose(sum(metrics[f"moe_load_e{i}"] for i in range(4)), 1.0, rel_tol=1e-6)
    assert 0.0 <= metrics["moe_dropped"] < 1.0
    loss.backward()  # the balancing loss reaches the routers
    assert layers[0].router.weight.grad.abs().sum() > 0
    model.eval()  # in eval the loss is the language-model loss alone
    with torch.no_grad():
        eval_loss, _ = CausalLM()(model, batch)
        assert torch.allclose(eval_loss, torch.nn.functional.cross_entropy(model(x).flatten(0, 1), batch[1].flatten()))


def test_trainer_logs_routing_statistics(tmp_path):
    from allformers.training import TrainConfig, Trainer
    from allformers.training.data import RandomWindows

    data = torch.randint(0, 61, (2000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(max_steps=4, batch_size=4, log_interval=2, eval_interval=0, lr=1e-3)
    trainer = Trainer(glam_tiny(), CausalLM(), RandomWindows(data, 16, seed=0), cfg, out=tmp_path, progress=False)
    trainer.fit()
    import json
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "moe_dropped" in r]
    assert train_rows and all(0.0 <= r["moe_dropped"] < 1.0 and r["moe_aux"] > 0 for r in train_rows)


def test_cached_decoding_equals_recomputation():
    model = glam_tiny().eval()
    prompt = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(model, prompt, max_new_tokens=20), recompute_greedy(model, prompt, 20))


def test_moe_config_errors():
    with pytest.raises(ConfigError, match="n_expert_per_token"):
        Config(n_expert=4, n_expert_per_token=5)
    with pytest.raises(ConfigError, match="moe_capacity_factor"):
        Config(n_expert=4, moe_capacity_factor=0.0)
    with pytest.raises(ConfigError, match="share_layers"):
        Config(n_expert=4, share_layers="all")


def tiny_mixtral(**kw):
    torch.manual_seed(0)
    cfg = T.MixtralConfig(**{**dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=32,
                                    intermediate_size=40, vocab_size=VOCAB, max_position_embeddings=128,
                                    num_local_experts=3, num_experts_per_tok=2, sliding_window=None), **kw})
    model = T.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    return model


@pytest.mark.parametrize("window", [None, 5])
def test_mixtral_parity_with_padding_mqa_and_window(window, tmp_path):
    """MQA (4 heads on 1 kv head), 3 experts, sliding window off and on (5 divides no length),
    left padding; export reloads in transformers."""
    hf = tiny_mixtral(sliding_window=window)
    hf.save_pretrained(tmp_path / "hf")
    model = load(tmp_path / "hf")
    x = torch.randint(0, VOCAB, (3, 29), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(x)
    mask[0, :4], mask[2, :11] = 0, 0
    assert padded_logits_diff(hf, model, x, mask) <= 1e-4
    model.save(tmp_path / "out", format="hf")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.sliding_window == window
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max().item() <= 1e-4
    ref = hf.generate(x[:1, -9:], max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, x[:1, -9:], max_new_tokens=30), ref)


def test_load_balancing_loss_equals_transformers():
    """One MoE layer: our E * sum f_i P_i is transformers' Mixtral aux_loss."""
    hf = tiny_mixtral(num_hidden_layers=1, num_local_experts=4)
    from allformers.checkpoints.hf import FAMILIES, config_from_hf, hf_to_ours

    config = config_from_hf(hf.config.to_dict())
    model = TransformerLM(config).eval()
    model.load_state_dict(hf_to_ours(hf.state_dict(), config, FAMILIES["mixtral"])[0])
    x = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf(x, output_router_logits=True).aux_loss
        model(x)
    assert abs(routing_losses(model).metrics["moe_aux"] - ref.item()) < 1e-5


def test_the_server_engine_routes_each_token_alone():
    """The batching engine flattens every running sequence into one row (serve/engine.py); with no
    capacity limit in eval, each token's experts are its own, so its greedy tokens are generate()'s."""
    from .serve_util import engine_greedy, tiny_chat_model

    model, tok = tiny_chat_model("mixtral-8x7b", n_kv_head=2, window_size=5, attention_pattern=["local"])
    prompts = [tok.encode(t) for t in ("experts, two of eight", "ab", "every token is routed on its own")]
    for p, got in zip(prompts, engine_greedy(model, tok, prompts, 8)):
        assert got == generate(model, torch.tensor([p]), max_new_tokens=8)[0, len(p):].tolist()
