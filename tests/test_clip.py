"""CLIP and SigLIP: Hugging Face parity both ways for CLIPModel, SiglipModel and the text towers alone, with
padded texts and both of CLIP's end-of-text rules; the two losses by hand; our own format; CLIP's tokenizer
against transformers' CLIPTokenizer."""
import json

import pytest
import torch

import allformers
from allformers.config import Config, ConfigError
from allformers.errors import CheckpointError
from allformers.models.clip import (CLIP, CLIPConfig, TextTower, TextTowerConfig, contrastive_loss, sigmoid_loss)
from allformers.models.vit import ViTConfig

pytestmark = pytest.mark.usefixtures("one_thread")
T_ = pytest.importorskip("transformers")
ATOL = 1e-4
V = 99
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
            max_position_embeddings=16)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


def perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():  # the default init leaves biases and norms at 0 / 1: move every tensor
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def texts():
    """Three right-padded rows (CLIP's tokenizer pads with eos = V-1 on the right)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V - 2, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    ids[0, 5:] = V - 1
    mask[0, 6:] = 0
    ids[1, 8] = V - 1
    ids[2, 3:] = V - 1
    mask[2, 4:] = 0
    return ids, mask


def pixels(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def features(out):  # transformers 5 returns an output object whose pooler_output is the projection
    return out.pooler_output if hasattr(out, "pooler_output") else out


def close(a, b):
    return (a - b).abs().max().item() <= ATOL


@pytest.mark.parametrize("kind,eos", [("clip", V - 1), ("clip", 2), ("siglip", 1)])
def test_two_tower_models_both_ways(kind, eos, tmp_path):
    torch.manual_seed(0)
    if kind == "clip":  # eos_token_id=2: transformers' legacy rule, pool at the highest id
        hf = perturbed(T_.CLIPModel(T_.CLIPConfig(text_config={**TEXT, "eos_token_id": eos}, vision_config=VISION,
                                                  projection_dim=16)))
    else:
        hf = perturbed(T_.SiglipModel(T_.SiglipConfig(text_config=TEXT, vision_config=VISION)))
    hf.save_pretrained(tmp_path / "hf")
    ours = allformers.load(tmp_path / "hf")
    assert isinstance(ours, CLIP) and ours.config.text.pooling == {V - 1: "eos", 2: "argmax", 1: "last"}[eos]
    ids, mask = texts()
    x = pixels()
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=x, attention_mask=mask, return_loss=True)
        got = ours(ids, x, mask, return_loss=True)
        for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "loss"):
            assert close(getattr(got, name), getattr(want, name)), name
        assert close(got.text_model_output.last_hidden_state, want.text_model_output.last_hidden_state)
        assert close(got.vision_model_output.last_hidden_state, want.vision_model_output.last_hidden_state)
        assert close(ours.get_text_features(ids, mask), features(hf.get_text_features(input_ids=ids, attention_mask=mask)))
        assert close(ours.get_image_features(x), features(hf.get_image_features(pixel_values=x)))
    ours.save(tmp_path / "back", format="hf")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == [type(hf).__name__]
    back = type(hf).from_pretrained(tmp_path / "back").eval()
    assert set(back.state_dict()) == set(hf.state_dict())
    with torch.no_grad():
        assert close(back(input_ids=ids, pixel_values=x, attention_mask=mask).logits_per_text, want.logits_per_text)


@pytest.mark.parametrize("cls", ["CLIPTextModel", "SiglipTextModel"])
def test_text_towers_alone_both_ways(cls, tmp_path):
    torch.manual_seed(0)
    config_cls = getattr(T_, cls.replace("Model", "Config"))
    hf = perturbed(getattr(T_, cls)(config_cls(**TEXT, eos_token_id=V - 1)))
    hf.save_pretrained(tmp_path / "hf")
    ours = allformers.load(tmp_path / "hf")
    assert isinstance(ours, TextTower)
    ids, mask = texts()
    with torch.no_grad():
        want, got = hf(input_ids=ids, attention_mask=mask), ours(ids, mask)
    assert close(got.last_hidden_state, want.last_hidden_state) and close(got.pooler_output, want.pooler_output)
    ours.save(tmp_path / "back", format="hf")
    back = getattr(T_, cls).from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert close(back(input_ids=ids, attention_mask=mask).pooler_output, want.pooler_output)


def test_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])  # logits_per_text
    lse = torch.logsumexp
    by_text = (-(2.0 - lse(torch.tensor([2.0, 0.0]), 0)) - (3.0 - lse(torch.tensor([1.0, 3.0]), 0))) / 2
    by_image = (-(2.0 - lse(torch.tensor([2.0, 1.0]), 0)) - (3.0 - lse(torch.tensor([0.0, 3.0]), 0))) / 2
    assert torch.allclose(contrastive_loss(logits), (by_text + by_image) / 2)
    ls = torch.nn.functional.logsigmoid
    want = -((ls(torch.tensor(2.0)) + ls(torch.tensor(-0.0))) + (ls(torch.tensor(-1.0)) + ls(torch.tensor(3.0)))) / 2
    assert torch.allclose(sigmoid_loss(logits), want)


def test_own_format_with_tokenizer(tmp_path):
    from allformers.tokenization.clip import clip_tokenizer

    torch.manual_seed(0)
    model = CLIP.from_name("clip-tiny-shapes").eval()
    tok = clip_tokenizer(context_length=model.config.text.lm.block_size)
    model.save(tmp_path / "clip", tokenizer=tok)
    again = allformers.load(tmp_path / "clip")
    assert again.config == model.config and isinstance(again, CLIP)
    batch = again.tokenizer.batch(["a red circle", "two blue squares"])
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again(batch["input_ids"], x, batch["attention_mask"]).logits_per_image,
                       model(batch["input_ids"], x, batch["attention_mask"]).logits_per_image)
    with pytest.raises(CheckpointError, match="format='allformers'"):  # a mean-pooled ViT: no HF CLIP has that
        CLIP(CLIPConfig(model.config.text, ViTConfig(image_size=32, patch_size=8, width=64, heads=4, depth=1,
                                                     pooling="mean"), projection_dim=16)).save(tmp_path / "x", format="hf")


def test_config_errors():
    lm = Config(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, lm_head=False)
    with pytest.raises(ConfigError, match="pooling"):
        TextTowerConfig(lm, pooling="cls")
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        TextTowerConfig(lm, eos_token_id=50)
    with pytest.raises(ConfigError, match="LM head"):
        TextTowerConfig(lm.replace(lm_head=True), eos_token_id=3)
    vit = ViTConfig(image_size=32, patch_size=8, width=32, heads=2, depth=1)
    with pytest.raises(ConfigError, match="one width"):
        CLIPConfig(TextTowerConfig(lm, eos_token_id=3), vit, projection_dim=None)
    with pytest.raises(ConfigError, match="loss"):
        CLIPConfig(TextTowerConfig(lm, eos_token_id=3), vit, loss="hinge")


def test_clip_tokenizer_matches_transformers(tmp_path):
    from allformers.tokenization.clip import clip_tokenizer, vocab_and_merges

    vocab, merges = vocab_and_merges()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    hf = T_.CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    ours = clip_tokenizer()
    assert ours.vocab_size == len(hf) == 49408
    samples = ["a photo of a cat", "A RED circle above a blue square!", "it's   two\tgreen triangles",
               "Ünïcödé café naïve 😀", "numbers 12345 and 3.14, e-mail: x@y.z", "  trailing  ",
               "<|endoftext|> inside", "don't we'll they're I'm you've he'd"]
    assert ours.batch(samples[:1])["input_ids"][0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own
    for s in samples:
        ids = hf(s)["input_ids"]
        assert ours.batch([s])["input_ids"][0].tolist() == ids, s
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    want = hf(samples, padding=True, truncation=True, max_length=10, return_tensors="pt")
    got = ours.batch(samples, max_length=10)
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"], want["attention_mask"])
