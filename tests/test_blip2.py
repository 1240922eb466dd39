"""BLIP-2: parity with transformers' Blip2ForConditionalGeneration (OPT and T5 language models), Blip2Model,
Blip2ForImageTextRetrieval (ITC / ITM), Blip2QFormerModel and Blip2VisionModel on tiny random configs, import and
export; cached generation equal to transformers.generate; the Q-Former's three attention masks; frozen parts
bit-identical after training steps."""
import json

import pytest
import torch
import transformers as T

from allformers import load
from allformers.checkpoints.hf import read_hf_weights
from allformers.models.blip2 import BLIP2, BLIP2_CONFIGS, BLIP2Config
from allformers.models.qformer import QFormerConfig, attention_mask
from allformers.models.vit import ViTConfig
from allformers.models.vlm import ImageTokenError, with_image_tokens

TOL = 1e-4
Q, IMG = 5, 98  # queries; the LM's image placeholder id
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4)
QFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=50,
               max_position_embeddings=32, use_qformer_text_input=True)
OPT = dict(model_type="opt", num_hidden_layers=2, num_attention_heads=4, hidden_size=48, ffn_dim=64, vocab_size=99,
           max_position_embeddings=64, word_embed_proj_dim=48, bos_token_id=2, eos_token_id=2, pad_token_id=1)
T5 = dict(model_type="t5", vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
          feed_forward_proj="gated-gelu", decoder_start_token_id=0, tie_word_embeddings=False, pad_token_id=0,
          eos_token_id=1)


def _randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _hf(cls="Blip2ForConditionalGeneration", text=OPT, **kw):
    torch.manual_seed(0)
    cfg = T.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text, num_query_tokens=Q,
                        **{"image_token_index": IMG, "image_text_hidden_size": 16, **kw})
    return _randomise(getattr(T, cls)(cfg))


def _inputs(batch=2, text=7, pad_last=2):
    g = torch.Generator().manual_seed(1)
    px = torch.randn(batch, 3, 16, 16, generator=g)
    ids = torch.cat([torch.full((batch, Q), IMG), torch.randint(3, 90, (batch, text), generator=g)], 1)
    mask = torch.ones_like(ids)
    mask[-1, ids.shape[1] - pad_last:] = 0
    return px, ids, mask


def _diff(a, b, mask=None):
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    hf = _hf()
    path = tmp_path_factory.mktemp("blip2") / "hf"
    hf.save_pretrained(path)
    return hf, path


def test_blip2_opt_matches_transformers_both_ways(opt_folder, tmp_path):
    hf, path = opt_folder
    ours = load(path)
    assert isinstance(ours, BLIP2) and not ours.load_report.missing and not ours.load_report.unexpected
    assert ours.config.text.position_offset == 2 and ours.config.image_token_id == IMG
    px, ids, mask = _inputs()
    labels = ids.masked_fill((ids == IMG) | (mask == 0), -100)
    with torch.no_grad():
        ref = hf(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(px, ids, attention_mask=mask, labels=labels)
        assert got.logits.shape == ref.logits.shape
        diffs = {"logits": _diff(ref.logits, got.logits, mask), "loss": abs(ref.loss.item() - got.loss.item()),
                 "queries": _diff(ref.qformer_outputs.last_hidden_state, got.query_output),
                 "vision": _diff(ref.vision_outputs.last_hidden_state, got.image_embeds),
                 "vision pooled": _diff(ref.vision_outputs.pooler_output, ours.vision(px).pooler_output)}
    print("BLIP-2 OPT import", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs

    ours.save(tmp_path / "out", format="hf")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Blip2ForConditionalGeneration"]
    back = T.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert _diff(back(pixel_values=px, input_ids=ids, attention_mask=mask).logits, ref.logits, mask) <= TOL
    # every tensor comes back unchanged (the tied OPT head is written once, as transformers does)
    a, b = read_hf_weights(path), read_hf_weights(tmp_path / "out")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_blip2_generation_equals_transformers(opt_folder):
    """A caption from the image alone ([queries] + bos), and a left-padded batch of prompts, greedy with a KV cache."""
    hf, path = opt_folder
    ours = load(path)
    px, _, _ = _inputs()
    ref = hf.generate(pixel_values=px, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(px, max_new_tokens=12), ref[:, Q + 1:])
    prompts = [with_image_tokens([5, 6, 7, 8], Q, IMG), with_image_tokens([9, 10], Q, IMG)]
    n = max(map(len, prompts))
    ids = torch.tensor([[1] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                      do_sample=False)
    assert torch.equal(ours.generate(px, ids, mask, max_new_tokens=10), ref[:, n:])
    # the same prompts padded on the right give the same answers
    right = torch.tensor([p + [1] * (n - len(p)) for p in prompts])
    assert torch.equal(ours.generate(px, right, mask.flip(1), max_new_tokens=10), ref[:, n:])


def test_blip2_model_and_qformer_features(opt_folder, tmp_path):
    """Blip2Model (same weights) gives the same logits; get_qformer_features and get_image_features are ours."""
    hf_gen, path = opt_folder
    hf = T.Blip2Model.from_pretrained(path).eval()
    ours = load(path)
    px, ids, mask = _inputs()
    with torch.no_grad():
        assert _diff(hf(pixel_values=px, input_ids=ids, attention_mask=mask).logits,
                     ours(px, ids, attention_mask=mask).logits, mask) <= TOL
        image = ours.image_embeds(px)
        assert _diff(hf.get_qformer_features(pixel_values=px), ours.queries(image)) <= TOL
        assert _diff(hf_gen.get_image_features(pixel_values=px).pooler_output,
                     ours.language_projection(ours.queries(image))) <= TOL


def test_blip2_t5_matches_transformers(tmp_path):
    hf = _hf(text=T5)
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    assert ours.config.text.is_encoder_decoder
    px, ids, mask = _inputs()
    dec = torch.randint(3, 90, (2, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=px, input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert _diff(ref, ours(px, ids, attention_mask=mask, decoder_input_ids=dec).logits) <= TOL
    g = hf.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                    do_sample=False)
    assert torch.equal(ours.generate(px, ids, mask, max_new_tokens=8), g[:, 1:])
    ours.save(tmp_path / "out", format="hf")
    back = T.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert _diff(back(pixel_values=px, input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ref) <= TOL


def test_blip2_retrieval_itc_itm_both_ways(tmp_path):
    """Stage 1 as Blip2ForImageTextRetrieval: ITM logits (queries and text together) and ITC similarities (the best
    query per pair), with padded texts; exported back with our temperature beside HF's keys."""
    hf = _hf("Blip2ForImageTextRetrieval", image_token_index=None)
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    assert ours.lm is None and ours.config.stage1
    g = torch.Generator().manual_seed(3)
    px, ids = torch.randn(3, 3, 16, 16, generator=g), torch.randint(3, 50, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0

    def check(model):
        with torch.no_grad():
            image = ours.image_embeds(px)
            itm = model(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
            itc = model(pixel_values=px, input_ids=ids, attention_mask=mask)
            image_feats, text_feat = ours.itc(image, ids, mask)
            return max(_diff(itm.logits_per_image, ours.itm(image, ids, mask)),
                       _diff(itc.logits_per_image, ours.itc_similarity(image_feats, text_feat)),
                       _diff(itc.text_embeds, text_feat), _diff(itc.image_embeds, image_feats))

    assert check(hf) <= TOL
    with torch.no_grad():
        ours.temperature.fill_(0.05)
    ours.save(tmp_path / "out", format="hf")
    back = T.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "out").eval()
    assert check(back) <= TOL
    assert abs(float(load(tmp_path / "out").temperature) - 0.05) < 1e-7


def test_qformer_and_vision_models_alone(tmp_path):
    torch.manual_seed(0)
    q = _randomise(T.Blip2QFormerModel(T.Blip2QFormerConfig(**QFORMER, encoder_hidden_size=24)))
    q.save_pretrained(tmp_path / "q")
    ours = load(tmp_path / "q")
    emb, image = torch.randn(2, Q, 32), torch.randn(2, 9, 24)
    with torch.no_grad():
        ref = q(query_embeds=emb, encoder_hidden_states=image).last_hidden_state
        assert _diff(ref, ours(emb, Q, image)) <= TOL
    v = _randomise(T.Blip2VisionModel(T.Blip2VisionConfig(**VISION)))
    v.save_pretrained(tmp_path / "v")
    vit = load(tmp_path / "v")
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref, got = v(pixel_values=px), vit(px)
        assert _diff(ref.last_hidden_state, got.last_hidden_state) <= TOL
        assert _diff(ref.pooler_output, got.pooler_output) <= TOL  # its post-LN applied twice to the class token


def test_blip2_export_refuses_what_no_hf_class_holds(opt_folder):
    from allformers.errors import CheckpointError

    _, path = opt_folder
    ours = load(path)
    both = BLIP2(BLIP2Config(ours.config.vision, ours.config.qformer, ours.config.text, image_token_id=IMG,
                             itg_head=False))  # stage-1 heads and a language model
    with pytest.raises(CheckpointError, match="without_stage1"):
        both.save("unused", format="hf")
    assert not both.without_stage1().config.stage1


# ---------------------------------------------------------------------- the Q-Former's attention masks
def test_qformer_masks_by_hand():
    """2 queries then 3 text tokens, the last one padding. Rows: who attends; columns: to whom."""
    text = torch.tensor([[1, 1, 0]])
    m = {k: attention_mask(k, 2, text)[0, 0].int().tolist() for k in ("unimodal", "bidirectional", "causal")}
    assert m["unimodal"] == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]
    assert m["bidirectional"] == [[1, 1, 1, 1, 0]] * 5
    assert m["causal"] == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]


@pytest.fixture(scope="module")
def stage1():
    torch.manual_seed(0)
    vision = ViTConfig(image_size=16, patch_size=4, width=32, depth=1, heads=4, final_norm="tokens+pooled")
    qf = QFormerConfig(width=32, depth=2, heads=4, intermediate_size=64, vision_width=32, num_query_tokens=4,
                       vocab_size=40, max_positions=16, cross_attention_frequency=1)
    return BLIP2(BLIP2Config(vision, qf, None, embed_dim=16, cls_token_id=1, dec_token_id=2)).eval()


def test_qformer_masks_are_what_the_objectives_see(stage1):
    """ITC: queries and text never meet (one pass with the unimodal mask equals queries alone + text alone);
    ITG: queries never see the text, text token t sees every query and only text up to t;
    ITM: queries do read the text."""
    m = stage1
    g = torch.Generator().manual_seed(0)
    px, ids = torch.randn(2, 3, 16, 16, generator=g), torch.randint(3, 40, (2, 6), generator=g)
    other = ids.clone()
    other[:, 4:] = torch.randint(3, 40, (2, 2), generator=g)  # the same text up to position 3
    with torch.no_grad():
        image = m.image_embeds(px)
        qtok = m.query_tokens.expand(2, -1, -1)
        joint = m.qformer(m.text_embeds(ids, qtok), 4, image, mask="unimodal")
        assert torch.allclose(joint[:, :4], m.queries(image), atol=1e-6)
        assert torch.allclose(joint[:, 4:], m.qformer(m.text_embeds(ids), 0), atol=1e-6)

        def run(kind, text, img):
            return m.qformer(m.text_embeds(text, qtok), 4, img, mask=kind)

        a, b = run("causal", ids, image), run("causal", other, image)
        assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6) and torch.allclose(a[:, :4], m.queries(image), atol=1e-6)
        assert torch.allclose(a[:, 4:8], b[:, 4:8], atol=1e-6)  # text before the change: unaffected
        assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-4)
        c = run("causal", ids, image.flip(0))  # another image: the text sees it through the queries
        assert not torch.allclose(a[:, 4:], c[:, 4:], atol=1e-4)
        d, e = run("bidirectional", ids, image), run("bidirectional", other, image)
        assert not torch.allclose(d[:, :4], e[:, :4], atol=1e-4)
        assert not torch.allclose(d[:, 4:8], e[:, 4:8], atol=1e-4)


def _frozen_after_training(model, loss_fn, batch, parts, steps=3):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
    after = dict(model.named_parameters())
    frozen = [n for n in before if n.split(".")[0] in parts]
    trained = [n for n in before if n.split(".")[0] not in parts]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in trained)
    return loss


def test_stage1_trains_the_qformer_and_leaves_the_vit_bit_identical(stage1):
    from allformers.objectives.blip2 import Stage1

    m = BLIP2(stage1.config)
    m.load_state_dict(stage1.state_dict())
    m.freeze(1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (4, 6), generator=g)
    ids[:, 0] = 1
    batch = {"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "input_ids": ids,
             "attention_mask": torch.ones_like(ids)}
    obj = Stage1(generator=torch.Generator().manual_seed(0))
    loss = _frozen_after_training(m, obj, batch, ("vision",))
    assert set(obj.last) == {"itc", "itm", "itg"} and torch.isfinite(loss)
    assert not m.vision.training and m.qformer.training


def test_stage2_trains_the_queries_and_leaves_vit_and_lm_bit_identical(opt_folder):
    from allformers.objectives.blip2 import stage2_loss

    _, path = opt_folder
    m = load(path).freeze(2)
    px, ids, mask = _inputs()
    batch = {"pixel_values": px, "input_ids": ids, "attention_mask": mask,
             "labels": ids.masked_fill((ids == IMG) | (mask == 0), -100)}
    _frozen_after_training(m, stage2_loss, batch, ("vision", "lm"))


def test_placeholders_must_match_the_queries(opt_folder):
    _, path = opt_folder
    ours = load(path)
    px, ids, mask = _inputs()
    with pytest.raises(ImageTokenError, match="placeholder"):
        ours(px, ids[:, 1:], attention_mask=mask[:, 1:])


@pytest.mark.parametrize("name", ["blip2-opt-2.7b", "blip2-opt-6.7b"])
def test_zoo_sizes_equal_transformers(name):
    """The zoo's BLIP-2 shapes hold exactly the parameters of transformers' class for the same config (meta device;
    not the T5 ones: transformers 5 builds every T5 tied and unties it only when a checkpoint has an lm_head)."""
    from allformers.checkpoints.hf_blip2 import hf_config

    c = BLIP2Config.from_name(name)
    _, hf_cfg, _ = hf_config(c)
    with torch.device("meta"):
        ours = BLIP2(c)
        hf = T.Blip2ForConditionalGeneration(T.Blip2Config(**{k: v for k, v in hf_cfg.items() if k != "model_type"}))
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    assert name in BLIP2_CONFIGS
