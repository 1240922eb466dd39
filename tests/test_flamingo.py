"""Flamingo (models/flamingo.py): gates at 0 give the frozen LM exactly; the media mask on a hand example and against
transformers' Idefics processor; the resampler's output size whatever the input's; frozen parts bit-identical after
training; cached generation equal to recomputation and to transformers.generate; parity with transformers'
IdeficsForVisionText2Text on tiny random configs (resampler or not, qk norms, decoupled vocabulary, vector gates,
padding), import and export."""
import json

import pytest
import torch
import transformers as T
from transformers.models.idefics.processing_idefics import (image_attention_mask_for_packed_input_ids_pt,
                                                             incremental_to_binary_attention_mask)

from allformers import Config, load
from allformers.checkpoints.hf import read_hf_weights
from allformers.errors import CheckpointError
from allformers.models.flamingo import (Flamingo, FlamingoConfig, PerceiverResampler, few_shot_prompt, media_index,
                                        media_mask)
from allformers.models.vit import ViTConfig
from allformers.models.vlm import ImageTokenError
from allformers.tokenization import Tokenizer

TOL = 1e-4
PAD, EOS, IMG = 0, 2, 3


def _tiny(vocab_size=40, **kw) -> Flamingo:
    text = Config(vocab_size=vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=32, position="rotary", norm_class="RMSNorm",
                  mlp_class="GLU", activation="silu", attn_bias=False, mlp_bias=False, tie_embeddings=False)
    vision = ViTConfig(image_size=16, patch_size=8, width=24, depth=2, heads=4)
    torch.manual_seed(0)
    cfg = dict(image_token_id=IMG, end_of_chunk_id=EOS, cross_attn_every=2, n_latents=3, resampler_depth=2,
               resampler_heads=2, resampler_head_dim=8)
    return Flamingo(FlamingoConfig(text, vision, **{**cfg, **kw})).eval()


def _open_gates(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for x in model.xattn:
            x.attn_gate.copy_(torch.randn(x.attn_gate.shape, generator=g))
            x.ff_gate.copy_(torch.randn(x.ff_gate.shape, generator=g))
    return model


def _batch(pad_side="right"):
    """Row 0: text, an image, text, end of chunk, a second image, text; row 1: an image and text (padded)."""
    a = [5, IMG, 6, 7, EOS, 8, IMG, 9, 10]
    b = [IMG, 11, 12, 13]
    n = len(a)
    pad = [PAD] * (n - len(b))
    rows = [a, pad + b if pad_side == "left" else b + pad]
    masks = [[1] * n, [0] * len(pad) + [1] * len(b) if pad_side == "left" else [1] * len(b) + [0] * len(pad)]
    px = torch.randn(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return torch.tensor(rows), torch.tensor(masks), px


def test_gates_at_zero_equal_the_frozen_lm_exactly():
    model = _tiny().freeze()
    ids, mask, px = _batch()
    with torch.no_grad():
        got = model(ids, px, attention_mask=mask).logits
        lm = model.lm(ids, attention_mask=mask)
        assert torch.equal(got, lm)
        opened = _open_gates(model)(ids, px, attention_mask=mask).logits
    assert not torch.allclose(opened, lm)  # the same inputs do reach the layers once the gates open


def test_media_mask_on_a_hand_example():
    #          0  1    2  3  4    5  6    7    8  9
    ids = [[5, 6, IMG, 7, 8, IMG, 9, EOS, 10, IMG]]
    idx = media_index(torch.tensor(ids), IMG, EOS)
    assert idx.tolist() == [[-1, -1, 0, 0, 0, 1, 1, 1, -1, 2]]
    m = media_mask(idx, 3)
    assert not m[0, :2].any()  # before the first image: none
    assert m[0, 2:5, 0].all() and not m[0, 2:5, 1:].any()  # the placeholder itself and what follows: image 1 only
    assert m[0, 5:8, 1].all() and not m[0, 5:8, [0, 2]].any()  # after image 2 (to its chunk's end): image 2 only
    assert not m[0, 8].any() and m[0, 9].tolist() == [False, False, True]  # after the end of chunk: none till image 3
    assert media_index(torch.tensor(ids), IMG).tolist() == [[-1, -1, 0, 0, 0, 1, 1, 1, 1, 2]]  # no reset id
    with pytest.raises(ImageTokenError, match="image placeholders"):
        media_mask(idx, 2)


def test_media_mask_equals_the_idefics_processor():
    class Tok:
        eos_token_id = EOS

        def convert_tokens_to_ids(self, t):
            return IMG

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 8, (6, 30), generator=g)  # ids 2 (end of chunk) and 3 (image) are frequent
    ref, _ = image_attention_mask_for_packed_input_ids_pt(ids, Tok())
    n = int((ids == IMG).sum(1).max())
    ref = incremental_to_binary_attention_mask(ref, "pt", num_classes=n)
    assert torch.equal(media_mask(media_index(ids, IMG, EOS), n), ref.bool())


def test_resampler_output_size_does_not_depend_on_the_input():
    model = _tiny()
    r = model.resampler
    assert isinstance(r, PerceiverResampler)
    for n in (1, 5, 17, 64):
        assert r(torch.randn(2, n, 24)).shape == (2, 3, 24)


def test_images_reach_only_tokens_after_them():
    model = _open_gates(_tiny())
    ids, mask, px = _batch()
    other = px.clone()
    other[0, 1] = torch.randn(3, 16, 16)  # row 0's second image
    with torch.no_grad():
        a, b = model(ids, px, attention_mask=mask).logits, model(ids, other, attention_mask=mask).logits
    assert torch.equal(a[0, :6], b[0, :6]) and not torch.allclose(a[0, 6:], b[0, 6:])
    assert torch.equal(a[1], b[1])  # the other row's images are its own


def test_frozen_parts_stay_bit_identical_after_training():
    model = _tiny().freeze()
    ids, mask, px = _batch()
    labels = ids.masked_fill((ids == IMG) | (mask == 0), -100)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(ids, px, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"resampler", "xattn"}
    assert not model.lm.training and not model.vision.training and model.xattn.training
    assert all(float(x.attn_gate.detach().abs().sum()) > 0 for x in model.xattn)  # the gates opened


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_cached_generation_equals_recomputation(pad_side):
    model = _open_gates(_tiny())
    ids, mask, px = _batch(pad_side)
    out = model.generate(ids, px, mask, max_new_tokens=8)
    assert out.shape == (2, 8)
    with torch.no_grad():
        for r in range(2):  # one row at a time, no padding: argmax of the whole sequence, recomputed at every step
            seq = ids[r][mask[r].bool()][None]
            for i in range(8):
                nxt = model(seq, px[r:r + 1]).logits[0, -1].argmax()
                assert int(nxt) == int(out[r, i]), (r, i)
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)


def test_few_shot_prompt_and_answer():
    words = ["what", "colour", "red", "blue", "answer:"]
    tok = Tokenizer.word_level(words, special_tokens=("<pad>", "<eoc>", "<image>"))
    eoc, img = tok.token_id("<eoc>"), tok.token_id("<image>")
    images = torch.rand(3, 3, 16, 16)
    shots = [(images[0], "what colour answer: red"), (images[1], "what colour answer: blue")]
    ids, stacked = few_shot_prompt(tok, shots, (images[2], "what colour answer:"), img, eoc)
    enc = lambda s: tok.encode(s, add_bos=False)  # noqa: E731
    assert ids == [img, *enc("what colour answer: red"), eoc, img, *enc("what colour answer: blue"), eoc, img,
                   *enc("what colour answer:")]
    assert torch.equal(stacked, images)
    model = _tiny(tok.vocab_size, image_token_id=img, end_of_chunk_id=eoc)
    assert isinstance(model.few_shot(tok, shots, (images[2], "what colour answer:"), max_new_tokens=3), str)


def test_bad_inputs_are_refused():
    model = _tiny()
    ids = torch.tensor([[IMG, 5, IMG, 6]])
    with pytest.raises(ImageTokenError, match="no pixel_values"):
        model(ids)
    with pytest.raises(ImageTokenError, match="placeholders"):
        model(ids, torch.rand(1, 1, 3, 16, 16))  # two placeholders, one image


def test_allformers_folder_round_trip(tmp_path):
    model = _open_gates(_tiny(gate_type="vector", use_resampler=False))
    model.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert isinstance(again, Flamingo) and again.config == model.config
    ids, mask, px = _batch()
    with torch.no_grad():
        assert torch.equal(again(ids, px, mask).logits, model(ids, px, mask).logits)


# ---------------------------------------------------------------------- parity with transformers' Idefics
def _hf(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, additional_vocab_size=0, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
               num_attention_heads=4, cross_layer_interval=2, use_resampler=True, max_position_embeddings=64,
               pad_token_id=PAD, eos_token_id=EOS, image_token_id=IMG,
               vision_config=dict(embed_dim=24, image_size=16, patch_size=8, intermediate_size=40, num_hidden_layers=2,
                                  num_attention_heads=4),
               perceiver_config=dict(resampler_n_latents=3, resampler_depth=2, resampler_n_heads=2,
                                     resampler_head_dim=8))
    pc = {**cfg.pop("perceiver_config"), **kw.pop("perceiver", {})}
    model = T.IdeficsForVisionText2Text(T.IdeficsConfig(**{**cfg, **kw}, perceiver_config=pc)).eval()
    with torch.no_grad():  # random everything, the gates included
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.3)
    return model


CASES = {"resampler": dict(), "qk-norms-vector-gates": dict(qk_layer_norms=True, alpha_type="vector",
                                                            perceiver=dict(qk_layer_norms_perceiver=True)),
         "decoupled-vocab": dict(additional_vocab_size=2, cross_layer_interval=1),
         "no-resampler": dict(use_resampler=False), "tied": dict(tie_word_embeddings=True, additional_vocab_size=2)}


def _hf_image_mask(ids, mask, n):
    class Tok:
        eos_token_id = EOS

        def convert_tokens_to_ids(self, t):
            return IMG

    m, _ = image_attention_mask_for_packed_input_ids_pt(ids.masked_fill(mask == 0, PAD), Tok())
    return incremental_to_binary_attention_mask(m, "pt", num_classes=n)


@pytest.mark.parametrize("case", CASES)
def test_idefics_matches_transformers_both_ways(case, tmp_path):
    hf = _hf(**CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    assert isinstance(ours, Flamingo) and not ours.load_report.missing
    ids, mask, px = _batch()
    labels = ids.masked_fill((ids == IMG) | (mask == 0), -100)
    # transformers' loss reshapes the logits to vocab_size columns, which fails with additional rows: then the
    # reference loss is the cross-entropy of its logits
    decoupled = hf.config.additional_vocab_size > 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px, image_attention_mask=_hf_image_mask(ids, mask, 2),
                 labels=None if decoupled else labels)
        ref_loss = (torch.nn.functional.cross_entropy(ref.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
                    if decoupled else ref.loss)
        got = ours(ids, px, attention_mask=mask, labels=labels)
        real = mask.bool()
        diffs = {"logits": (ref.logits[real] - got.logits[real]).abs().max().item(),
                 "loss": abs(ref_loss.item() - got.loss.item())}
    print(f"Idefics {case} import", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs

    ours.save(tmp_path / "out", format="hf")
    back = T.IdeficsForVisionText2Text.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask, pixel_values=px, image_attention_mask=_hf_image_mask(ids, mask, 2))
        assert (again.logits[real] - ref.logits[real]).abs().max().item() <= TOL
    a, b = read_hf_weights(tmp_path / "hf"), read_hf_weights(tmp_path / "out")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["cross_layer_interval"] == hf.config.cross_layer_interval
    assert saved["additional_vocab_size"] == hf.config.additional_vocab_size


def test_idefics_generation_equals_transformers(tmp_path):
    hf = _hf()
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    ids, mask, px = _batch("left")
    ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, image_attention_mask=_hf_image_mask(ids, mask, 2),
                      max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(ids, px, mask, max_new_tokens=8), ref[:, ids.shape[1]:])


def test_what_idefics_cannot_hold_is_refused(tmp_path):
    model = _tiny(resampler_activation="gelu", cross_attn_every=3)
    with pytest.raises(CheckpointError, match="ReLU") as e:
        model.save(tmp_path / "x", format="hf")
    assert "multiple of cross_attn_every" in str(e.value)
