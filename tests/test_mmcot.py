"""Multimodal-CoT: gated fusion, vision blocks, feature files, the PaLM-E decoder, ScienceQA prompts and
scoring, the synthetic set, and the two-stage pipeline end to end on a tiny model."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from allformers.blocks.fusion import GatedFusion
from allformers.blocks.vision import ConvBackbone, DETREncoder, VisionError, load_image_features
from allformers.config import Config
from allformers.data import scienceqa as sqa
from allformers.data.synthetic_science import WITH_IMAGE, generate, load_image
from allformers.models import TransformerLM
from allformers.models.vit import ViTEncoder
from allformers.checkpoints.composite import load_multimodal, save_multimodal
from allformers.models.multimodal import MultimodalConfig, MultimodalDecoderLM, MultimodalSeq2Seq

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
    stem = ViTEncoder(image_size=16, patch_size=4, width=16, depth=1, heads=2, conv_stem=True)
    assert stem(torch.rand(2, 3, 16, 16)).shape == (2, 16, 16)
    with pytest.raises(VisionError, match="power-of-two"):
        ViTEncoder(image_size=18, patch_size=6, conv_stem=True)
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


@pytest.mark.parametrize("variant", ["t5", "decoder"])
def test_two_stage_pipeline_runs_end_to_end(tmp_path, variant):
    from allformers.recipes.mmcot import (MMCoTData, ModelFactory, ModelSpec, PipelineConfig, ask, load_pipeline,
                                           run_pipeline, save_pipeline, train_tokenizer)
    from allformers.training.trainer import TrainConfig

    data = MMCoTData.synthetic(48, 0, 12, seed=0)
    data.tokenizer = train_tokenizer([s + " " + t for s, t in data.texts(data.splits["train"], "QCM-LE")], 600)
    vit = {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 16, "depth": 1, "heads": 2}
    size = dict(n_embd=32, head_dim=16, n_head=2, intermediate_size=64) if variant == "t5" else \
        dict(n_embd=32, n_head=2, n_layer=2, intermediate_size=64)
    tc = TrainConfig(max_steps=4, batch_size=8, lr=3e-3, warmup_steps=1, eval_interval=0, eval_at_start=False,
                     log_interval=2)
    cfg = PipelineConfig(rationale_train=tc, answer_train=tc, max_rationale_tokens=12)
    factory = ModelFactory(ModelSpec(variant=variant, vision=vit, size=size), data)
    start = factory()
    result = run_pipeline(factory, data, data.splits["train"], data.splits["test"], cfg, progress=False)
    assert result.scores["total"] == 12 and len(result.rationales) == 12 and result.rouge_l is not None
    assert 0 <= result.scores["unparseable"] <= 12
    # stage 2 started from stage 1's starting weights, not from stage 1's trained ones
    trained = dict(result.models["answer"].named_parameters())
    moved = [n for n, p in start.named_parameters() if not torch.equal(p, trained[n])]
    assert moved
    if variant == "t5":
        assert set(result.gate["answer"]) >= {"image", "no_image"}
    save_pipeline(result, tmp_path / "p", data, cfg)
    r_model, a_model, meta = load_pipeline(tmp_path / "p")
    q = data.splits["test"][0]
    p = data.problems[q]
    out = ask(r_model, a_model, meta, p["question"], p["choices"], image=data.picture(q), context=p["hint"])
    assert set(out) == {"rationale", "answer", "choice", "choice_text"} and isinstance(out["rationale"], str)


def test_pretrained_frozen_vision_encoder_moves_between_models():
    """PaLM-E's setting in the benchmark: a ViT trained inside one model (the T5 row) starts another
    (a decoder with its own tokenizer), frozen: identical weights, and training leaves them as they were."""
    from allformers.recipes.mmcot import MMCoTData, ModelFactory, ModelSpec, MMCoTError, train_stage, train_tokenizer
    from allformers.training.trainer import TrainConfig

    data = MMCoTData.synthetic(16, 0, 0, seed=0)
    data.tokenizer = train_tokenizer([s + " " + t for s, t in data.texts(data.splits["train"], "QCM-LE")], 500)
    other = data.with_tokenizer(train_tokenizer([s for s, _ in data.texts(data.splits["train"], "QCM-A")], 400),
                                chat=False)
    assert other.tokenizer is not data.tokenizer and other.pixels is data.pixels and data.tokenizer.vocab_size == 500
    vit = {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 16, "depth": 1, "heads": 2}
    donor = ModelFactory(ModelSpec(vision=vit, size=dict(n_embd=32, head_dim=16, n_head=2, intermediate_size=64),
                                   seed=1), data)()
    state = {k: v.clone() for k, v in donor.vision.state_dict().items()}
    spec = ModelSpec(variant="decoder", vision=vit, size=dict(n_embd=32, n_head=2, n_layer=1, intermediate_size=64),
                     train_vision=False, seed=2)
    model = ModelFactory(spec, other, vision_state=state)()
    assert all(torch.equal(v, state[k]) for k, v in model.vision.state_dict().items())
    assert not any(p.requires_grad for p in model.vision.parameters())
    tc = TrainConfig(max_steps=2, batch_size=4, lr=1e-2, warmup_steps=1, eval_interval=0, eval_at_start=False,
                     log_interval=1)
    before = {k: v.clone() for k, v in model.named_parameters()}
    train_stage(model, other, other.splits["train"], "QCM-A", tc, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.vision.state_dict().items())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if not n.startswith("vision."))
    with pytest.raises(MMCoTError, match="no vision encoder"):
        ModelFactory(ModelSpec(vision=None, size=dict(n_embd=32, head_dim=16, n_head=2, intermediate_size=64)),
                     data, vision_state=state)()


def test_cli_train_eval_ask(tmp_path, capsys):
    from allformers.cli.main import main

    out = tmp_path / "run"
    common = ["--n-train", "40", "--n-val", "0", "--n-test", "8", "--no-progress"]
    assert main(["mmcot", "train", "--data", "synthetic", *common, "--rationale-steps", "2", "--answer-steps", "2",
                 "--batch-size", "8", "--vocab-size", "400", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "two-stage t5" in table and "NAT" in table and "gate (answer model)" in table
    assert main(["mmcot", "eval", "--model", str(out), "--no-progress", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)["scores"]
    assert scores["total"] == 8  # regenerated the same synthetic test split from mmcot.json
    generate(0, 0, 3, seed=5).save(tmp_path / "pics")
    png = next((tmp_path / "pics" / "images").glob("*/image.png"))
    assert main(["mmcot", "ask", "--model", str(out), "--image", str(png), "--question", "Which bar is longer?",
                 "--choices", "the top bar", "the bottom bar"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Rationale: ") and "\nAnswer: " in printed and "\nChoice: " in printed
    assert main(["mmcot", "ask", "--model", str(out), "--image", str(tmp_path / "nope.png"), "--question", "q",
                 "--choices", "a", "b"]) == 2  # a clear one-line error, no traceback
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_palm_e_lora_saves_only_its_new_weights_and_reloads(tmp_path):
    """The decoder-only variant on the real SmolLM2-135M-Instruct: chat-template prompts, the picture after
    the template's header, LoRA on the top 2 blocks; the saved folder holds only the new weights."""
    from allformers.cli.common import load_any
    from allformers.recipes.mmcot import (MMCoTData, ModelFactory, ModelSpec, PipelineConfig, load_pipeline,
                                           run_pipeline, save_pipeline)
    from allformers.training.trainer import TrainConfig

    lm = load_any("smollm2")
    data = MMCoTData.synthetic(8, 0, 2, seed=0, chat=True, max_source=96, max_target=48)
    data.tokenizer = lm.tokenizer
    vit = {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 16, "depth": 1, "heads": 2, "conv_stem": True}
    spec = ModelSpec(variant="decoder", vision=vit, base="smollm2", lora={"rank": 4, "alpha": 8, "top_layers": 2})
    tc = TrainConfig(max_steps=1, batch_size=2, lr=1e-3, warmup_steps=1, eval_interval=0, eval_at_start=False)
    cfg = PipelineConfig(two_stage=False, answer_train=tc, max_answer_tokens=4)
    result = run_pipeline(ModelFactory(spec, data, lm=lm), data, data.splits["train"], data.splits["test"], cfg,
                          progress=False)
    model = result.models["answer"]
    assert model.config.image_pos == len(data.chat_parts()[0]) > 0
    save_pipeline(result, tmp_path / "p", data, cfg)
    stored = (tmp_path / "p" / "answer" / "model.safetensors").stat().st_size
    assert stored < 5_000_000  # adapters + projection + ViT, not the 135M base
    _, back, meta = load_pipeline(tmp_path / "p")
    q = data.splits["test"][:2]
    src, _ = data.encode(q, "QCM-A")
    from allformers.generation.generate import left_pad

    ids, mask = left_pad(src, data.tokenizer.pad_id)
    with torch.no_grad():
        a = model.eval()(ids, mask, **data.image_batch(q))[0]
        b = back(ids, mask, **data.image_batch(q))[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
