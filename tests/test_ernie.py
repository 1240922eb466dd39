"""ERNIE (Zhang et al. 2019): T-Encoder + aggregators that fuse token-aligned entity embeddings; MLM, NSP and dEA
heads; entity locality, parameter share, training on a toy dEA task, and our checkpoint format."""
import pytest
import torch

from allformers.config import Config
from allformers.errors import ConfigError
from allformers.models import TransformerLM
from allformers.checkpoints.composite import load_saved
from allformers.models.ernie import ErnieConfig, ErnieModel, add_dea, ernie_loss, ernie_losses
from allformers.objectives import NO_ENTITY, ObjectiveError

VOCAB, N_ENT = 40, 12
BERT = dict(causal=False, norm_placement="post", embedding_norm=True, head_transform=True, lm_head_bias=True,
            type_vocab_size=2, vocab_size=VOCAB, block_size=32, n_head=4, n_embd=32, intermediate_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _config(n_text=1, n_agg=2, **kw):
    return ErnieConfig(text=Config(n_layer=n_text, **BERT), n_aggregator_layer=n_agg, n_entities=N_ENT, entity_dim=8,
                       entity_n_head=2, **kw)


def _far_from_init(model):
    """Weights bigger than BERT's N(0, 0.02), so every path's effect is large and differences are unambiguous."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and name != "entities.weight":
                p.normal_(0, 0.2)
    return model


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (2, 10), generator=g)
    ents = torch.full((2, 10), NO_ENTITY)
    ents[0, 2], ents[0, 6], ents[1, 1] = 3, 7, 3
    ents[1, 8] = 5  # at a padded position: must be ignored
    ents[1, 9] = 10 ** 6  # even out of range
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, ents, mask


def test_ernie_shapes_heads_and_config_json():
    torch.manual_seed(0)
    model = ErnieModel(_config()).eval()
    ids, ents, mask = _inputs()
    cands = torch.tensor([3, 5, 7])
    with torch.no_grad():
        out = model(ids, ents, attention_mask=mask, candidates=cands)
        per_row = model(ids, ents, attention_mask=mask, candidates=cands[None].expand(2, -1)).entity_scores
    assert out.hidden.shape == (2, 10, 32) and out.entity_hidden.shape == (2, 10, 8)
    assert out.mlm_logits.shape == (2, 10, VOCAB) and out.pair_logits.shape == (2, 2)
    assert out.entity_scores.shape == (2, 10, 3)
    assert torch.allclose(per_row, out.entity_scores, atol=1e-6)  # (K,) shared == (B, K) rows
    aligned = (ents != NO_ENTITY) & mask.bool()
    assert out.entity_hidden[~aligned].abs().max() == 0 and out.entity_hidden[aligned].abs().min() > 0
    # the entity table takes pretrained (TransE) vectors; scores follow them
    vectors = torch.randn(N_ENT, 8)
    model.load_entity_embeddings(vectors)
    assert torch.equal(model.entities.weight, vectors) and not model.entities.weight.requires_grad
    with pytest.raises(ConfigError, match="do not fit"):
        model.load_entity_embeddings(torch.randn(N_ENT, 9))
    with pytest.raises(ObjectiveError, match="entity ids must be in"):
        model(ids, ents.masked_fill(ents == 7, N_ENT))
    # one JSON object that nests the text encoder's config
    c = _config(fusion_output="activation", nsp=False)
    assert ErnieConfig.from_dict(c.to_dict()) == c and c.to_dict()["config_class"] == "ErnieConfig"
    assert c.n_layer == 3 and c.n_head == 4 and c.head_dim == 8  # what FLOP counting reads
    with pytest.raises(ConfigError, match="unknown ErnieConfig field"):
        ErnieConfig.from_dict({**c.to_dict(), "entity_size": 3})
    with pytest.raises(ConfigError, match="causal=False"):
        _config().replace(text=Config(n_layer=1, **{**BERT, "causal": True}))
    with pytest.raises(ConfigError, match="norm_placement"):
        _config().replace(text=Config(n_layer=1, **{**BERT, "norm_placement": "pre"}))
    with pytest.raises(ConfigError, match="entity_n_head"):
        _config().replace(entity_n_head=3)
    with pytest.raises(ConfigError, match="fusion_output"):
        _config().replace(fusion_output="gated")
    assert ErnieModel(c).pair_head is None


@pytest.mark.parametrize("fusion_output", ["residual", "activation"])
def test_entities_reach_only_aligned_tokens_through_fusion(fusion_output):
    """Change one entity's vector: with one aggregator, tokens not aligned to an entity keep their states (their
    fusion has no entity term) and aligned ones change; a second aggregator's token attention then spreads the
    knowledge to every token."""
    ids, ents, mask = _inputs()
    aligned = (ents != NO_ENTITY) & mask.bool()
    real_unaligned = ~aligned & mask.bool()
    for n_agg in (1, 2):
        torch.manual_seed(0)
        model = _far_from_init(ErnieModel(_config(n_agg=n_agg, fusion_output=fusion_output))).eval()
        with torch.no_grad():
            base = model(ids, ents, attention_mask=mask)
            model.entities.weight[3] += 1.0  # entity 3: aligned in both rows
            moved = model(ids, ents, attention_mask=mask)
            model.entities.weight[11] += 1.0  # an entity no token is aligned to
            untouched = model(ids, ents, attention_mask=mask)
        delta = (moved.hidden - base.hidden).abs().amax(-1)  # (B, T)
        mlm_delta = (moved.mlm_logits - base.mlm_logits).abs().amax(-1)
        assert delta[aligned].min() > 1e-3
        if n_agg == 1:
            assert delta[real_unaligned].max() <= 1e-6 and mlm_delta[real_unaligned].max() <= 1e-6
        else:
            assert delta[real_unaligned].min() > 1e-4  # the second aggregator's token attention mixes it in
        assert torch.equal(untouched.hidden, moved.hidden)
    # inside one aggregator: both attentions leave the token states free of entities; fusion brings them in
    agg = model.aggregators[0]
    w = torch.randn(2, 10, 32)
    a = aligned[..., None].float()
    e1, e2 = torch.randn(2, 10, 8) * a, torch.randn(2, 10, 8) * a
    with torch.no_grad():
        (w1, _), (w2, _) = agg.attend(w, e1, a), agg.attend(w, e2, a)
        (f1, _), (f2, _) = agg.fuse(w1, e1, a), agg.fuse(w2, e2, a)
    assert torch.equal(w1, w2)
    assert (f1 - f2).abs().amax(-1)[~aligned].max() <= 1e-6 and (f1 - f2).abs().amax(-1)[aligned].min() > 1e-4


def test_aggregator_parameter_share_bert_base():
    """BERT-base-like ERNIE (N = 6 text layers, M = 6 aggregators, hidden 768, entities of dimension 100 with 4
    heads): the entity side of the aggregators is a few percent of the body; built on the meta device (no memory)."""
    c = ErnieConfig(n_entities=1)
    with torch.device("meta"):
        model = ErnieModel(c)
        bert = TransformerLM(c.text.replace(n_layer=12))  # BERT-base with its MLM head
    n = lambda params: sum(p.numel() for p in params)  # noqa: E731
    body = n(bert.parameters())
    entity_side = n(p for name, p in model.aggregators.named_parameters() if ".ent_" in name)
    dea_head = n(model.entity_head.parameters())
    total = n(p for name, p in model.named_parameters() if name != "entities.weight")
    aggregators = n(model.aggregators.parameters())
    print(f"BERT-base body {body / 1e6:.2f}M; aggregator entity side {entity_side / 1e6:.3f}M "
          f"({100 * entity_side / body:.2f}% of the body), +dEA head {dea_head / 1e3:.1f}k; aggregators in all "
          f"{aggregators / 1e6:.2f}M ({100 * aggregators / total:.1f}% of ERNIE without the entity table)")
    # ERNIE = BERT-base + NSP head + the entity side + the dEA head, nothing else
    assert total == body + n(model.pair_head.parameters()) + entity_side + dea_head
    assert 0.02 < entity_side / body < 0.05
    assert 6 * (100 * 100 * 4 + 2 * 100 * 3072) < entity_side  # entity attention + W_e + W'_e per aggregator


def test_ernie_without_entities_is_the_bert_it_starts_from():
    torch.manual_seed(0)
    bert = _far_from_init(TransformerLM(Config(n_layer=3, **BERT))).eval()
    model = _far_from_init(ErnieModel(_config(n_text=1, n_agg=2))).init_from_encoder(bert).eval()
    ids, ents, mask = _inputs()
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    with torch.no_grad():
        ref = bert(ids, attention_mask=mask, token_type_ids=types)
        out = model(ids, attention_mask=mask, token_type_ids=types)
        with_ents = model(ids, ents, attention_mask=mask, token_type_ids=types)
    keep = mask.bool()
    assert (out.mlm_logits - ref)[keep].abs().max() <= 1e-5
    assert (with_ents.mlm_logits - ref)[keep].abs().max() > 1e-3
    with pytest.raises(ConfigError, match="n_layer"):
        model.init_from_encoder(TransformerLM(Config(n_layer=2, **BERT)))


class _ToyDEA:
    """Random sentences where tokens 20..31 mention entity token - 20 (one-token mentions); every sample is
    freshly noised by dea_noise (5% wrong entity, 15% masked, 80% kept)."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)

    def batch(self, n, g=None):
        g = g or self.g
        ids = torch.randint(4, VOCAB, (n, 12), generator=g)
        ents = torch.where((ids >= 20) & (ids < 20 + N_ENT), ids - 20, torch.full_like(ids, NO_ENTITY))
        return add_dea({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ents,
                       candidates=torch.arange(N_ENT), generator=g)

    def sample(self, n):
        return self.batch(n)


def test_dea_training_reduces_the_loss():
    from allformers.training import TrainConfig, Trainer

    torch.manual_seed(0)
    model = ErnieModel(_config(n_text=1, n_agg=1, nsp=False))
    table = model.entities.weight.detach().clone()
    held_out = _ToyDEA().batch(32, torch.Generator().manual_seed(123))
    assert held_out["candidates"].shape == (32, N_ENT)
    assert ernie_loss.num_tokens(held_out) == 32 * 12
    with torch.no_grad():
        before = ernie_losses(model.eval(), held_out)["dea"].item()
    cfg = TrainConfig(max_steps=40, batch_size=16, grad_accum=2, lr=3e-3, min_lr=3e-3, warmup_steps=0,
                      eval_interval=0, eval_at_start=False, log_interval=1000, device="cpu", weight_decay=0.0)
    Trainer(model.train(), ernie_loss, _ToyDEA(), cfg, progress=False).fit()
    with torch.no_grad():
        after = ernie_losses(model.eval(), held_out)["dea"].item()
    print(f"dEA loss {before:.3f} -> {after:.3f} (uniform over {N_ENT}: {torch.log(torch.tensor(N_ENT)):.3f})")
    assert after < 0.5 * before
    assert torch.equal(model.entities.weight, table)  # TransE vectors stay fixed (freeze_entities)


def test_ernie_losses_sum_and_refuse_missing_targets():
    torch.manual_seed(0)
    model = ErnieModel(_config())
    batch = _ToyDEA().batch(4)
    batch["labels"] = batch["input_ids"].masked_fill(torch.rand(4, 12) > 0.3, -100)
    batch["next_sentence_label"] = torch.tensor([0, 1, 0, 1])
    losses = ernie_losses(model, batch)
    assert set(losses) == {"mlm", "nsp", "dea", "loss"}
    assert torch.allclose(losses["loss"], losses["mlm"] + losses["nsp"] + losses["dea"])
    with pytest.raises(ObjectiveError, match="candidates"):
        ernie_loss(model, {k: v for k, v in batch.items() if k != "candidates"})
    with pytest.raises(ObjectiveError, match="no targets"):
        ernie_loss(model, {"input_ids": batch["input_ids"]})


def test_ernie_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ErnieModel(_config(fusion_output="activation")).eval()
    model.load_entity_embeddings(torch.randn(N_ENT, 8))
    ids, ents, mask = _inputs()
    model.save(tmp_path / "ernie")
    back = load_saved(tmp_path / "ernie")
    assert back.config == model.config and not back.load_report.missing
    assert not back.entities.weight.requires_grad
    cands = torch.tensor([3, 5, 7])
    with torch.no_grad():
        a, b = model(ids, ents, attention_mask=mask, candidates=cands), back(ids, ents, attention_mask=mask,
                                                                            candidates=cands)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert back.text.lm_head is None  # the MLM decoder is still tied to the word embeddings


def test_allformers_load_opens_an_ernie_folder(tmp_path):
    """The generic loader follows config.json's config_class to ERNIE's own loader."""
    import allformers
    from allformers.models.ernie import ErnieModel

    folder = tmp_path / "ernie"
    torch.manual_seed(0)
    model = ErnieModel(_config()).eval()
    model.save(folder)
    back = allformers.load(folder)
    assert isinstance(back, ErnieModel) and back.load_report.loaded
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
