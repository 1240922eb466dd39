"""CoCa (models/coca.py): the unimodal half never sees the picture, the loss is its two parts as written by
hand with the paper's weights, greedy captions agree with the model's own argmax, zero-shot probabilities,
the zoo entries, and its folder loads back."""
import math

import pytest
import torch
import torch.nn.functional as F

import allformers
from allformers import Config, ConfigError
from allformers.errors import UnknownModelError
from allformers.models.clip import zero_shot
from allformers.models.coca import CoCa, CoCaConfig
from allformers.models.vit import ViTConfig
from allformers.tokenization import Tokenizer

CAPTIONS = ["a red circle", "three blue squares", "a green triangle above a yellow diamond"]


def tokenizer():
    tok = Tokenizer.word_level(CAPTIONS + ["two one purple orange"], special_tokens=("<pad>", "</s>", "<s>"))
    tok.bos_token = "<s>"
    return tok


def tiny(tok, **kw):
    torch.manual_seed(0)
    return CoCa(CoCaConfig.from_name("coca-tiny-shapes", text=CoCaConfig.from_name("coca-tiny-shapes").text.replace(
        vocab_size=tok.vocab_size), caption_queries=4, **kw)).eval()


def test_the_unimodal_half_never_sees_the_picture():
    tok = tokenizer()
    model = tiny(tok)
    ids, mask = model.text_inputs(tok, CAPTIONS)
    a, b = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out_a, out_b = model(ids, a, mask), model(ids, b, mask)
        alone = F.normalize(model.get_text_features(ids, mask), dim=-1)
    assert torch.equal(out_a.text_embeds, out_b.text_embeds)  # bit for bit: no path from the picture
    assert torch.equal(out_a.text_embeds, alone)
    # ... while the captioner does read it, and so do the image embeddings
    assert (out_a.logits - out_b.logits).abs().max() > 1e-3
    assert not torch.allclose(out_a.image_embeds, out_b.image_embeds)
    # and the text embedding reads only up to </s>: changing the padding after it changes nothing
    padded = torch.cat([ids, torch.full((3, 2), tok.token_id("red"))], dim=1)
    with torch.no_grad():
        assert torch.allclose(F.normalize(model.get_text_features(padded), dim=-1), alone, atol=1e-6)


def test_loss_is_the_two_parts_by_hand():
    tok = tokenizer()
    model = tiny(tok)
    ids, mask = model.text_inputs(tok, CAPTIONS)
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(ids, px, mask, return_loss=True)
    # contrastive: cross-entropy of each text over the pictures and of each picture over the texts
    s = out.logits_per_text.double()
    n = s.shape[0]
    by_text = -sum(s[i, i] - torch.logsumexp(s[i], 0) for i in range(n)) / n
    by_image = -sum(s[i, i] - torch.logsumexp(s[:, i], 0) for i in range(n)) / n
    contrastive = (by_text + by_image) / 2
    # captioning: -log p(next token) over every real target after <s>, through </s>
    logp = out.logits.double().log_softmax(-1)
    terms = [-logp[b, t, ids[b, t + 1]] for b in range(n) for t in range(ids.shape[1] - 1) if mask[b, t + 1]]
    caption = sum(terms) / len(terms)
    assert len(terms) == sum(len(c.split()) + 1 for c in CAPTIONS)  # the words and </s>
    assert math.isclose(out.contrastive_loss.item(), contrastive.item(), rel_tol=1e-5)
    assert math.isclose(out.caption_loss.item(), caption.item(), rel_tol=1e-5)
    assert math.isclose(out.loss.item(), 1.0 * contrastive.item() + 2.0 * caption.item(), rel_tol=1e-5)
    c = model.config
    assert (c.contrastive_weight, c.caption_weight) == (1.0, 2.0)


def test_greedy_caption_is_the_models_own_argmax():
    tok = tokenizer()
    model = tiny(tok)
    px = torch.randn(2, 3, 32, 32)
    ids = model.generate(px, max_new_tokens=6)
    assert ids.shape[1] <= 7 and bool((ids[:, 0] == model.config.bos_token_id).all())
    with torch.no_grad():
        _, tokens = model.encode_image(px)
        _, hidden = model.encode_text(ids)
        logits = model.decode(hidden, tokens)
    eos = model.config.eos_token_id
    for b in range(2):
        for t in range(ids.shape[1] - 1):
            if eos in ids[b, 1:t + 1].tolist():
                break  # after </s> the row is only filled with </s>
            assert int(logits[b, t].argmax()) == int(ids[b, t + 1])
    words = model.caption(tok, px, max_new_tokens=6)
    assert len(words) == 2 and all(isinstance(w, str) for w in words)


def test_zero_shot_probabilities():
    tok = tokenizer()
    model = tiny(tok)
    px = torch.randn(2, 3, 32, 32)
    probs = zero_shot(model, tok, px, CAPTIONS)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))
    ids, mask = model.text_inputs(tok, CAPTIONS)
    with torch.no_grad():  # 3 labels, 2 pictures: the towers apart (forward pairs row b with picture b)
        text = F.normalize(model.encode_text(ids, mask)[0], dim=-1)
        image = F.normalize(model.encode_image(px)[0], dim=-1)
        want = (image @ text.t() * model.logit_scale.exp()).softmax(-1)
    assert torch.allclose(probs, want, atol=1e-6)


def test_zoo_entries_and_config_errors():
    c = CoCaConfig.from_name("coca-vit-b-32")
    assert (c.unimodal_layers, c.multimodal_layers, c.caption_queries) == (12, 12, 256)
    tiny_c = CoCaConfig.from_name("coca-tiny-shapes")
    assert tiny_c.unimodal_layers == tiny_c.multimodal_layers == 2
    with pytest.raises(UnknownModelError):
        CoCaConfig.from_name("coca-nope")
    with pytest.raises(ConfigError, match="unimodal_layers"):
        CoCaConfig.from_name("coca-tiny-shapes", unimodal_layers=4)
    with pytest.raises(ConfigError, match="pooling"):
        CoCaConfig(tiny_c.text, ViTConfig.from_name("vit-tiny-shapes"))
    with pytest.raises(ConfigError, match="causal"):
        CoCaConfig(tiny_c.text.replace(causal=False), tiny_c.vision)
    for position in ("rotary", "alibi"):  # its multimodal blocks would silently get no positions
        with pytest.raises(ConfigError, match="absolute positions"):
            CoCaConfig(tiny_c.text.replace(position=position), tiny_c.vision)


def test_folder_loads_back(tmp_path):
    tok = tokenizer()
    model = tiny(tok)
    model.save(tmp_path / "coca", tokenizer=tok)
    again = allformers.load(tmp_path / "coca")
    assert isinstance(again, CoCa) and again.config == model.config
    assert not again.load_report.missing and not again.load_report.unexpected
    ids, mask = model.text_inputs(again.tokenizer, CAPTIONS)
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(ids, px, mask).logits, model(ids, px, mask).logits)
