"""The one ViT: Hugging Face parity both ways for the CLIP, SigLIP and DINOv2 vision towers (also on a
picture of another size, where the learned positions are resized), DINOv2's mask token, LayerScale, the
block spec, sin-cos positions, our own format, and the errors."""
import pytest
import torch

import allformers
from allformers.blocks import BlockSpec, LayerScale, make_block
from allformers.blocks.vision import VisionError, interpolate_grid
from allformers.checkpoints.hf_vision import hf_layout
from allformers.errors import CheckpointError, ConfigError, UnknownModelError
from allformers.models.vit import ViT, ViTConfig, ViTEncoder

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-4
SIZES = dict(num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def tiny_hf(kind):
    import transformers as T

    torch.manual_seed(0)
    if kind == "clip":
        model = T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, **SIZES))
    elif kind == "siglip":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, **SIZES))
    else:  # LayerScale away from 1 so that it is checked
        model = T.Dinov2Model(T.Dinov2Config(hidden_size=32, mlp_ratio=2, layerscale_value=0.5, **SIZES))
    with torch.no_grad():  # the default init leaves biases and norms at 0 / 1: move every tensor
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_hf_vision_towers_both_ways(kind, tmp_path):
    hf = tiny_hf(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours = allformers.load(tmp_path / "hf")
    assert isinstance(ours, ViT) and not ours.load_report.missing
    assert hf_layout(ours.config) == hf.config.model_type
    g = torch.Generator().manual_seed(1)
    for size in (32, 48):  # 48 px: a 6x6 grid, positions resized from 4x4 (bicubic, as HF)
        x = torch.randn(2, 3, size, size, generator=g)
        extra = {} if kind == "dinov2" else {"interpolate_pos_encoding": size != 32}  # DINOv2 resizes always
        with torch.no_grad():
            want, got = hf(x, **extra), ours(x, **extra)
        assert got.last_hidden_state.shape == want.last_hidden_state.shape
        assert (got.last_hidden_state - want.last_hidden_state).abs().max() <= ATOL
        assert (got.pooler_output - want.pooler_output).abs().max() <= ATOL
    ours.save(tmp_path / "back", format="hf")
    back = type(hf).from_pretrained(tmp_path / "back").eval()
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert (back(x).last_hidden_state - hf(x).last_hidden_state).abs().max() <= ATOL
    assert {k for k in back.state_dict()} == {k for k in hf.state_dict()}


def test_dinov2_mask_token_and_refusals(tmp_path):
    hf = tiny_hf("dinov2")
    hf.save_pretrained(tmp_path)
    ours = allformers.load(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[0, 3:7] = True
    with torch.no_grad():
        want = hf(x, bool_masked_pos=masked).last_hidden_state
        got = ours(x, bool_masked_pos=masked).last_hidden_state
    assert (got - want).abs().max() <= ATOL
    clip = ViT(ViTConfig.from_name("clip-vit-base-patch32", depth=1, width=32, heads=4, image_size=64))
    with pytest.raises(VisionError, match="interpolate_pos_encoding=True"):
        clip(torch.randn(1, 3, 96, 96))
    with pytest.raises(VisionError, match="mask token"):
        clip(torch.randn(1, 3, 64, 64), bool_masked_pos=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(CheckpointError, match="format='allformers'"):
        ViT(ViTConfig(width=32, heads=4, depth=1, image_size=32, patch_size=8, conv_stem=False,
                      pooling="mean")).save(tmp_path / "x", format="hf")


def test_own_format_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ViT(ViTConfig.from_name("vit-tiny-shapes")).eval()
    model.save(tmp_path / "vit")
    again = allformers.load(tmp_path / "vit")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again(x).pooler_output, model(x).pooler_output)
    assert again.config == model.config


def test_layer_scale_and_block_spec():
    spec = BlockSpec(dim=16, n_head=2, layer_scale=1e-5)
    assert (spec.head_dim, spec.n_kv_head, spec.intermediate_size, spec.attn_out_bias) == (8, 2, 64, True)
    block = make_block(spec)
    assert isinstance(block.ls1, LayerScale) and torch.all(block.ls1.gamma == 1e-5)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # both branches scaled by 1e-5: the block is nearly the identity
        assert (block(x) - x).abs().max() < 1e-3
        block.ls1.gamma.zero_()
        block.ls2.gamma.zero_()
        assert torch.equal(block(x), x)
    assert not hasattr(make_block(BlockSpec(dim=16, n_head=2)).ls1, "gamma")  # no LayerScale: nothing stored
    with pytest.raises(ConfigError, match="divisible"):
        BlockSpec(dim=10, n_head=3)


def test_positions_sincos_and_interpolation():
    cfg = ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=4, position="sincos", pooling="mean")
    model = ViT(cfg).eval()
    assert model(torch.randn(1, 3, 48, 32)).last_hidden_state.shape == (1, 1 + 6 * 4, 32)  # any grid
    grid = torch.randn(1, 16, 8)
    assert torch.equal(interpolate_grid(grid, 4, 4), grid)  # same grid: unchanged
    assert interpolate_grid(grid, 6, 2).shape == (1, 12, 8)
    with pytest.raises(VisionError, match="square"):
        interpolate_grid(torch.randn(1, 15, 8), 4, 4)


def test_config_errors():
    for kw, msg in (({"image_size": 30, "patch_size": 8}, "multiple"), ({"width": 30, "heads": 4}, "divisible"),
                    ({"class_token": False}, "pooling='cls'"), ({"pooling": "none", "final_norm": "pooled"}, "pooled"),
                    ({"position": "sincos", "interpolate_positions": True}, "learned"),
                    ({"activation": "swish"}, "activation")):
        with pytest.raises(VisionError, match=msg):
            ViTConfig(**kw)
    with pytest.raises(UnknownModelError):
        ViTConfig.from_name("vit-huge-nope")
    with pytest.raises(ConfigError, match="unknown ViTConfig field"):
        ViTConfig.from_dict({"widht": 3})


def test_vit_encoder_keeps_multimodal_cots_layout():
    enc = ViTEncoder(image_size=16, patch_size=4, width=16, depth=1, heads=2)
    assert {k for k in enc.state_dict() if not k.startswith("blocks.")} == {
        "norm.bias", "norm.weight", "patch.bias", "patch.weight", "pos"}  # the keys saved MM-CoT folders hold
    assert enc(torch.rand(2, 3, 16, 16)).shape == (2, 16, 16) and enc.num_tokens == 16
