"""Multimodal-CoT: gated fusion, vision blocks, feature files, the PaLM-E decoder, ScienceQA prompts and
scoring, the synthetic set, and the two-stage pipeline end to end on a tiny model."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from allformers.blocks.fusion import GatedFusion
from allformers.blocks.vision import (ConvBackbone, DETREncoder, ViTEncoder, VisionError, load_image_features)
from allformers.config import Config
from allformers.data import scienceqa as sqa
from allformers.data.synthetic_science import WITH_IMAGE, generate, load_image
from allformers.models import TransformerLM
from allformers.models.multimodal import (MultimodalConfig, MultimodalDecoderLM, MultimodalSeq2Seq, load_multimodal,
                                          save_multimodal)

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = {"kind": "vit", "image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "heads": 2}
SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "scienceqa_subset"


def t5_config(**kw):
    return Config.from_name("t5-small", vocab_size=61, n_layer=2, n_decoder_layer=2, n_embd=32, n_head=2, head_dim=16,
                            intermediate_size=64, block_size=64, head_input_scale=32 ** -0.5, **kw)


def llama_config():
    return Config(vocab_size=61, n_layer=2, n_head=2, n_embd=32, block_size=64, position="rotary", norm_class="RMSNorm",
                  mlp_class="GLU", activation="silu", attn_bias=False, mlp_bias=False)


def batch(B=3, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 61, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 3:] = 0
    images = torch.rand(B, 3, 16, 16, generator=g)
    has = torch.tensor([True, False, True][:B])
    return ids, mask, images, has


def mm_t5(vision=VIT, seed=0):
    torch.manual_seed(seed)
    model = MultimodalSeq2Seq(MultimodalConfig(text=t5_config(), vision=vision)).eval()
    with torch.no_grad():  # a gate far from 0.5 and non-trivial attention, so the checks have teeth
        for p in model.fusion.parameters():
            p.normal_(0, 0.5)
    return model


# ---------------------------------------------------------------------- acceptance 3: fusion
def test_gate_forced_to_zero_is_the_text_only_t5_exactly():
    model = mm_t5()
    ids, mask, images, has = batch()
    dec = torch.randint(3, 61, (3, 5))
    fused = model(ids, dec, mask, images=images, has_image=has)
    model.fusion.force_gate = 0.0
    gated_off = model(ids, dec, mask, images=images, has_image=has)
    text_only = model.t5(ids, dec, attention_mask=mask)
    assert torch.equal(gated_off, text_only)
    assert not torch.allclose(fused, text_only, atol=1e-3)  # the image does change things when the gate is open
    # the same weights in a plain Seq2SeqLM (the text-only T5) generate the same tokens
    from allformers.models import Seq2SeqLM

    plain = Seq2SeqLM(model.t5.config).eval()
    plain.load_state_dict(model.t5.state_dict())
    a = model.generate(ids, mask, images=images, has_image=has, max_new_tokens=6, eos_id=1)
    b = plain.generate(ids, mask, max_new_tokens=6, eos_id=1)
    assert torch.equal(a, b)


def test_padding_in_image_features_changes_nothing():
    torch.manual_seed(0)
    fusion = GatedFusion(32, 12).eval()
    h = torch.randn(2, 7, 32)
    feats = torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out, gate = fusion(h, feats, mask)
    # change what sits in the padded slots, and add more padded slots: nothing moves
    noisy = feats.clone()
    noisy[0, 3:] = 1e3 * torch.randn(2, 12)
    longer = torch.cat([noisy, 50 * torch.randn(2, 4, 12)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    out2, gate2 = fusion(h, longer, longer_mask)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-6)
    torch.testing.assert_close(gate2, gate, rtol=0, atol=1e-6)
    # and the real slots do matter
    changed = feats.clone()
    changed[0, 0] += 1.0
    assert not torch.allclose(fusion(h, changed, mask)[0][0], out[0], atol=1e-4)


def test_questions_without_an_image():
    torch.manual_seed(0)
    fusion = GatedFusion(32, 12).eval()
    h = torch.randn(3, 4, 32)
    feats = torch.randn(3, 6, 12)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False  # row 1 has no picture
    out, gate = fusion(h, feats, mask)
    assert torch.isfinite(out).all()
    expected = (1 - gate[1]) * h[1]  # H_att = 0 for a question without an image
    torch.testing.assert_close(out[1], expected)
    alone, _ = fusion(h[1:2], None)  # no features at all: the same
    torch.testing.assert_close(alone[0], out[1], rtol=0, atol=1e-6)
    # in the T5 wrapper, a no-image row is unaffected by the other rows' pictures
    model = mm_t5()
    ids, m, images, has = batch()
    dec = torch.randint(3, 61, (3, 4))
    full = model(ids, dec, m, images=images, has_image=has)
    single = model(ids[1:2], dec[1:2], m[1:2], images=torch.zeros(1, 3, 16, 16), has_image=torch.tensor([False]))
    torch.testing.assert_close(full[1:2], single, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- acceptance 3: feature files
def test_feature_file_shapes_are_checked(tmp_path):
    good = tmp_path / "detr.npy"
    np.save(good, np.random.default_rng(0).standard_normal((3, 100, 256)).astype(np.float32))
    (tmp_path / "name_map.json").write_text(json.dumps({"7": 0, "9": 2}))
    bank = load_image_features(good, kind="detr")
    feats, mask = bank.lookup(["9", "8", "7"])
    assert feats.shape == (3, 100, 256) and mask.tolist() == [[True] * 100, [False] * 100, [True] * 100]
    assert torch.equal(feats[0], torch.from_numpy(np.load(good)[2]))

    with pytest.raises(VisionError, match=r"\(145, 1024\)"):
        load_image_features(good, kind="vit")  # a DETR file read as ViT features
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((3, 256), dtype=np.float32))
    with pytest.raises(VisionError, match="3-D"):
        load_image_features(flat, name_map={"1": 0})
    with pytest.raises(VisionError, match="outside the 3 rows"):
        load_image_features(good, name_map={"1": 3})
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.npy").write_bytes(good.read_bytes())  # no name_map.json beside it
    with pytest.raises(VisionError, match="no name map"):
        load_image_features(tmp_path / "sub" / "x.npy")
    with pytest.raises(VisionError, match="does not exist"):
        load_image_features(tmp_path / "missing.npy")
    # a model built for DETR features refuses features of another width
    model = MultimodalSeq2Seq(MultimodalConfig(text=t5_config(), vision={"kind": "features", "patch_dim": 256}))
    ids, mask, _, _ = batch()
    with pytest.raises(VisionError, match="dim 1024"):
        model.encode(ids, mask, image_features=torch.zeros(3, 145, 1024))
    feats, feat_mask = bank.lookup(["9", "8", "7"])
    assert model.encode(ids, mask, image_features=feats, image_mask=feat_mask).shape == (3, 9, 32)


# ---------------------------------------------------------------------- acceptance 3: answer parser
@pytest.mark.parametrize("text,n,expected", [
    ("The answer is (B).", 3, 1),
    ("Solution: magnets. The answer is (A). BECAUSE: like poles repel", 2, 0),
    ("", 2, None),
    ("The answer is B.", 2, None),  # no parentheses
    ("the answer is (a).", 2, None),  # lower case is not the trained phrase
    ("The answer is (C).", 2, None),  # only A and B exist
    ("The answer is ( ().", 4, None),
    ("The answer is (Z).", 5, None),
    ("The answer is (D", 4, None),
    (None, 2, None),
])
def test_answer_parser_on_malformed_outputs(text, n, expected):
    assert sqa.parse_answer(text, n) == expected


def test_unparseable_answers_count_as_wrong_and_are_reported():
    problems = {"1": {"subject": "natural science", "hint": "", "image": "image.png", "grade": "grade3", "answer": 0},
                "2": {"subject": "language science", "hint": "a hint", "image": None, "grade": "grade9", "answer": 1},
                "3": {"subject": "social science", "hint": "", "image": None, "grade": "grade7", "answer": 1}}
    s = sqa.score(problems, {"1": 0, "2": None, "3": 1})
    assert s["unparseable"] == 1 and s["total"] == 3
    assert s["Avg"] == pytest.approx(200 / 3) and s["LAN"] == 0 and s["NAT"] == 100 and s["SOC"] == 100
    assert s["IMG"] == 100 and s["TXT"] == 0 and s["NO"] == 100 and s["G1-6"] == 100 and s["G7-12"] == 50
    table = sqa.format_table({"mine": s, **sqa.PAPER})
    assert table.splitlines()[0].split()[1:] == list(sqa.COLUMNS) and "84.91" in table


def test_prompt_formats_follow_the_reference():
    p = {"question": "Which is hotter?", "choices": ["tea", "ice"], "answer": 0, "hint": "Two cups.",
         "caption": "A cup.", "lecture": "Heat\nflows.", "solution": "Tea is hot."}
    ctx = "Question: Which is hotter? Context: Two cups. A cup. Options: (A) tea (B) ice"
    assert sqa.build_pair(p, "QCM-LE") == (ctx + " Solution:", "Solution: Heat\\nflows. Tea is hot..")
    assert sqa.build_pair(p, "QCM-A") == (ctx + " Answer:", "The answer is (A).")
    assert sqa.build_pair(p, "QCMG-A", rationale="Solution: it is tea.") == (
        ctx + " Solution: it is tea. Answer:", "The answer is (A).")
    assert sqa.build_pair(p, "QCMG-A")[0] == ctx + " Solution: Heat\\nflows. Tea is hot. Answer:"  # gold rationale
    assert sqa.build_pair(p, "QCM-ALE")[1] == "The answer is (A). BECAUSE: Heat\\nflows. Tea is hot."
    assert sqa.build_pair({**p, "hint": "", "caption": ""}, "QCM-A", use_caption=False)[0].startswith(
        "Question: Which is hotter? Context: N/A")
    with pytest.raises(sqa.ScienceQAError):
        sqa.build_pair(p, "QCM-XYZ")


@pytest.mark.skipif(not (SUBSET / "problems.json").is_file(), reason="the ScienceQA subset is not here")
def test_scienceqa_subset_loads():
    problems, splits = sqa.load_scienceqa(SUBSET)
    assert len(splits["train"]) == 1041 and len(splits["val"]) == 371
    with_caption = [q for q in splits["train"] if problems[q]["caption"]]
    assert with_caption and all(problems[q]["image"] for q in with_caption)


# ---------------------------------------------------------------------- the synthetic set
def test_synthetic_generator_is_deterministic_and_split():
    a, b, c = generate(40, 10, 10, seed=3), generate(40, 10, 10, seed=3), generate(40, 10, 10, seed=4)
    assert a.problems == b.problems and a.splits == b.splits
    assert a.images.keys() == b.images.keys() and all(np.array_equal(a.images[q], b.images[q]) for q in a.images)
    assert a.problems != c.problems
    assert [len(a.splits[s]) for s in ("train", "val", "test")] == [40, 10, 10]
    assert sorted(sum(a.splits.values(), []), key=int) == [str(i) for i in range(1, 61)]
    for q, p in a.problems.items():
        assert (q in a.images) == bool(p["image"]) == (p["kind"] in WITH_IMAGE)
        assert 0 <= p["answer"] < len(p["choices"]) and p["lecture"] and p["solution"]
        assert p["split"] in ("train", "val", "test")


def test_synthetic_answers_need_the_image():
    data = generate(600, 0, 0, seed=0)
    answers = {}
    for q, p in data.problems.items():
        if p["kind"] in WITH_IMAGE:  # the answer text, for one question wording
            answers.setdefault((p["kind"], p["question"]), set()).add(p["choices"][p["answer"]])
    for kind in WITH_IMAGE:
        assert any(len(v) > 1 for (k, _), v in answers.items() if k == kind), kind
    # and the drawn pictures agree with the labels: the thermometer with more red shows the higher temperature
    red = np.array([220, 40, 40])
    for q, p in data.problems.items():
        if p["kind"] == "thermometers":
            img = data.images[q].astype(int)
            is_red = (np.abs(img - red).sum(-1) < 30)
            left, right = is_red[:, :16].sum(), is_red[:, 16:].sum()
            hotter = "the left thermometer" if left > right else "the right thermometer"
            colder = "the right thermometer" if left > right else "the left thermometer"
            want = hotter if "higher" in p["question"] else colder
            assert p["choices"][p["answer"]] == want, q


def test_synthetic_save_writes_the_scienceqa_layout(tmp_path):
    data = generate(12, 2, 2, seed=1)
    data.save(tmp_path)
    problems, splits = sqa.load_scienceqa(tmp_path)
    assert problems.keys() == data.problems.keys() and splits == data.splits
    q = next(iter(data.images))
    path = sqa.image_path(tmp_path, q, problems[q])
    assert np.array_equal(load_image(path, 32), data.images[q])


# ---------------------------------------------------------------------- vision blocks
def test_vision_encoders_shapes_and_errors():
    vit = ViTEncoder(image_size=16, patch_size=4, width=16, depth=1, heads=2)
    assert vit(torch.rand(2, 3, 16, 16)).shape == (2, 16, 16)
    with pytest.raises(VisionError, match=r"\(B, 3, 16, 16\)"):
        vit(torch.rand(2, 3, 32, 32))
    detr = DETREncoder(ConvBackbone(width=16, layers=2), 16, width=16, num_queries=5, heads=2)
    assert detr(torch.rand(2, 3, 16, 16)).shape == (2, 5, 16)
    detr_vit = DETREncoder(vit, 16, width=16, num_queries=3, heads=2)
    assert detr_vit(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16)


# ---------------------------------------------------------------------- the decoder-only variant
def test_inputs_embeds_equal_token_ids():
    torch.manual_seed(0)
    lm = TransformerLM(llama_config()).eval()
    ids = torch.randint(0, 61, (2, 7))
    torch.testing.assert_close(lm(None, inputs_embeds=lm.wte(ids)), lm(ids), rtol=0, atol=0)
    with pytest.raises(Exception, match="exactly one"):
        lm(ids, inputs_embeds=lm.wte(ids))


def test_palm_e_splice_and_no_image_rows():
    torch.manual_seed(0)
    model = MultimodalDecoderLM(MultimodalConfig(text=llama_config(), vision=VIT, image_pos=2)).eval()
    ids, mask, images, has = batch()
    s = model.splice(ids, mask, images=images, has_image=has)
    n_img = model.vision.num_tokens
    assert s["inputs_embeds"].shape == (3, 9 + n_img, 32)
    # row 0: two prompt tokens, then the projected image, then the rest
    proj = model.proj(model.vision(images[:1]))[0]
    torch.testing.assert_close(s["inputs_embeds"][0, 2:2 + n_img], proj)
    torch.testing.assert_close(s["inputs_embeds"][0, :2], model.lm.wte(ids[0, :2]))
    assert not s["attention_mask"][1, 2:2 + n_img].any()  # row 1 has no picture: its slots are masked
    # a row without a picture gives the text-only LM's logits on its text
    logits, _ = model(ids, mask, images=images, has_image=has)
    text_pos = torch.cat([torch.arange(2), torch.arange(2 + n_img, 9 + n_img - 3)])
    plain = model.lm(ids[1:2, :6])
    torch.testing.assert_close(logits[1, text_pos], plain[0], rtol=0, atol=1e-5)
    # generation from left-padded prompts agrees with teacher forcing on the first token
    out = model.generate(ids, mask, images=images, has_image=has, max_new_tokens=3)
    s_left = model.splice(ids, mask, side="left", images=images, has_image=has)
    first = model.lm(None, attention_mask=s_left["attention_mask"].long(), inputs_embeds=s_left["inputs_embeds"])[:, -1]
    assert torch.equal(out[:, 0], first.argmax(-1))


# ---------------------------------------------------------------------- save / load and the pipeline
def test_multimodal_save_load_round_trip(tmp_path):
    model = mm_t5()
    save_multimodal(model, tmp_path / "m")
    back = load_multimodal(tmp_path / "m")
    import allformers

    assert isinstance(allformers.load(tmp_path / "m"), MultimodalSeq2Seq)  # config_class routes the generic loader
    ids, mask, images, has = batch()
    dec = torch.randint(3, 61, (3, 4))
    assert torch.equal(back(ids, dec, mask, images=images, has_image=has), model(ids, dec, mask, images=images, has_image=has))
    assert isinstance(back, MultimodalSeq2Seq) and back.config.vision == VIT
