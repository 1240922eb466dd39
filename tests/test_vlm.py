"""The PaLM-E / LLaVA image + text decoder (models/vlm.py): parity with transformers' LlavaForConditionalGeneration on
tiny random configs (CLIP and SigLIP towers, vision_feature_layer / select strategy, padding, several images per row),
import and export; greedy generation equal to transformers.generate; chat with images in the prompt; frozen parts
bit-identical after training."""
import json

import pytest
import torch
import transformers as T

from allformers import Config, load
from allformers.checkpoints.hf import read_hf_weights
from allformers.models.vit import ViTConfig
from allformers.models.vlm import (VLM_CONFIGS, ImageTokenError, VisionLanguageLM, VLMConfig, expand_image_tokens,
                                   left_padded, with_image_tokens)
from allformers.tokenization import Tokenizer

TOL = 1e-4
IMG, PAD = 100, 0
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, image_size=16, patch_size=4)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, image_size=16, patch_size=4)
LLAMA = dict(model_type="llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=48,
             intermediate_size=64, vocab_size=120, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
             pad_token_id=PAD)


def _hf(vision=CLIP, **kw):
    torch.manual_seed(0)
    cfg = T.LlavaConfig(vision_config=vision, text_config=LLAMA, image_token_index=IMG, **kw)
    model = T.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch(n_img: int, pad_side: str = "right"):
    """Row 0: text, an image, text; row 1: an image, text, a second image, text (3 images in all)."""
    a = [5, 6] + [IMG] * n_img + [7, 8, 9]
    b = [IMG] * n_img + [10, 11] + [IMG] * n_img + [12]
    n = max(len(a), len(b))
    rows = [[PAD] * (n - len(r)) + r if pad_side == "left" else r + [PAD] * (n - len(r)) for r in (a, b)]
    masks = [[0] * (n - len(r)) + [1] * len(r) if pad_side == "left" else [1] * len(r) + [0] * (n - len(r)) for r in (a, b)]
    px = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return torch.tensor(rows), torch.tensor(masks), px


def _diff(a, b, mask=None):
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


CASES = {"clip": dict(), "last-layer-full": dict(vision_feature_layer=-1, vision_feature_select_strategy="full"),
         "two-layers": dict(vision_feature_layer=[-3, -1]), "siglip": dict(vision=SIGLIP, vision_feature_layer=-1)}


@pytest.mark.parametrize("case", CASES)
def test_llava_matches_transformers_both_ways(case, tmp_path):
    hf = _hf(**CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    assert isinstance(ours, VisionLanguageLM) and not ours.load_report.missing
    n = ours.config.image_seq_length
    ids, mask, px = _batch(n)
    labels = ids.masked_fill((ids == IMG) | (mask == 0), -100)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, attention_mask=mask, labels=labels)
        got = ours(ids, px, attention_mask=mask, labels=labels)
        feats = torch.stack(list(hf.get_image_features(pixel_values=px).pooler_output))
        diffs = {"logits": _diff(ref.logits, got.logits, mask), "loss": abs(ref.loss.item() - got.loss.item()),
                 "image features": _diff(feats, got.image_features)}
    print(f"LLaVA {case} import", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs

    ours.save(tmp_path / "out", format="hf")
    back = T.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert _diff(back(input_ids=ids, pixel_values=px, attention_mask=mask).logits, ref.logits, mask) <= TOL
    a, b = read_hf_weights(tmp_path / "hf"), read_hf_weights(tmp_path / "out")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["vision_feature_layer"] == hf.config.vision_feature_layer
    assert saved["image_seq_length"] == n


def test_llava_generation_equals_transformers(tmp_path):
    hf = _hf()
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    ids, mask, px = _batch(ours.config.image_seq_length, pad_side="left")
    ref = hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                      do_sample=False)
    assert torch.equal(ours.generate(ids, px, mask, max_new_tokens=12), ref[:, ids.shape[1]:])
    right, rmask, _ = _batch(ours.config.image_seq_length, pad_side="right")
    assert torch.equal(ours.generate(right, px, rmask, max_new_tokens=12), ref[:, ids.shape[1]:])


def test_left_padding_and_placeholders():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    ids = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 10]])
    m, x = left_padded(mask, ids)
    assert m.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]] and x[0, 2:].tolist() == [5, 6] and x[1].tolist() == [7, 8, 9, 10]
    assert with_image_tokens([5, 6], 3, 9) == [9, 9, 9, 5, 6]
    assert expand_image_tokens([5, 9, 6], 2, 9) == [5, 9, 9, 6]


def _tiny(**kw) -> VisionLanguageLM:
    text = Config(vocab_size=40, block_size=128, n_layer=2, n_head=4, n_embd=32, position="rotary", norm_class="RMSNorm",
                  mlp_class="GLU", activation="silu", attn_bias=False, mlp_bias=False, tie_embeddings=False)
    vision = ViTConfig(image_size=16, patch_size=8, width=32, depth=2, heads=4)
    torch.manual_seed(0)
    return VisionLanguageLM(VLMConfig(text, vision, **{"image_token_id": 3, **kw})).eval()


def test_placeholders_must_match_the_images():
    model = _tiny()
    ids = torch.tensor([[5] + [3] * 3 + [6]])  # 3 placeholders, the image gives 4 vectors
    with pytest.raises(ImageTokenError, match="placeholder"):
        model(ids, torch.rand(1, 3, 16, 16))
    with pytest.raises(ImageTokenError, match="no pixel_values"):
        model(torch.tensor([[5, 3, 6]]))


def test_chat_with_an_image_in_the_prompt():
    """A user message with a picture part renders with LLaVA-1.5's template; the picture becomes image_seq_length
    placeholders where it stood, and the reply is decoded with the KV cache."""
    words = ["USER:", "ASSISTANT:", "what", "colour", "is", "it", "red", "blue"]
    tok = Tokenizer.word_level(words, special_tokens=("<pad>", "</s>", "<image>"))
    img = tok.token_id("<image>")
    model = _tiny(vision_feature_layer=None, image_token_id=img)  # PaLM-E: the ViT's normed output
    assert model.config.image_seq_length == 4  # 2 x 2 patches, the class token dropped
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it"}]}]
    ids = model.chat_ids(tok, messages)
    assert ids == [tok.token_id("USER:")] + [img] * 4 + [tok.token_id(w) for w in ("what", "colour", "is", "it",
                                                                                    "ASSISTANT:")]
    reply = model.chat(tok, messages, torch.rand(1, 3, 16, 16), max_new_tokens=4)
    assert isinstance(reply, str)
    out = model.generate(torch.tensor([ids]), torch.rand(1, 3, 16, 16), max_new_tokens=4)
    assert out.shape == (1, 4)


def test_palme_linear_projector_trains_and_frozen_parts_stay_bit_identical():
    """LLaVA's stage 1: ViT and LM frozen, the projector trains; PaLM-E's frozen-LM variant: the ViT trains too."""
    for freeze, trained in ((dict(vision=True, lm=True), {"projector"}), (dict(vision=False, lm=True), {"projector", "vision"})):
        model = _tiny(projector="linear").freeze(**freeze)
        ids = torch.tensor([[5] + [3] * 4 + [6, 7, 8]] * 2)
        batch = dict(input_ids=ids, pixel_values=torch.rand(2, 3, 16, 16), labels=ids.masked_fill(ids == 3, -100))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        model.train()
        for _ in range(3):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == trained
        assert not model.lm.training


def test_allformers_folder_round_trip(tmp_path):
    model = _tiny(vision_feature_layer=[-2, -1])
    model.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert again.config == model.config
    ids = torch.tensor([[5] + [3] * 4 + [6]])
    px = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(ids, px).logits, model(ids, px).logits)


def test_zoo_llava_size_equals_transformers():
    """llava-1.5-7b's shapes hold exactly the parameters of transformers' class for the same config (meta device)."""
    from allformers.checkpoints.hf_blip2 import lm_config_to_hf
    from allformers.checkpoints.hf_vision import vit_config_to_hf

    c = VLMConfig.from_name("llava-1.5-7b")
    assert "llava-1.5-13b" in VLM_CONFIGS and c.image_seq_length == 576
    with torch.device("meta"):
        ours = VisionLanguageLM(c)
        hf = T.LlavaForConditionalGeneration(T.LlavaConfig(
            vision_config=vit_config_to_hf(c.vision, "clip_vision_model"), text_config=lm_config_to_hf(c.text)[1],
            image_token_index=c.image_token_id))
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
