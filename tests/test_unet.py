"""The diffusion U-Net against diffusers' UNet2DConditionModel on tiny random configs, both ways (a diffusers
folder -> allformers.load; our model -> save(format="diffusers") -> from_pretrained), plus its blocks, the key
table and the errors."""
import json

import pytest
import torch

import allformers
from allformers.blocks.conv import ImageShapeError, timestep_embedding
from allformers.checkpoints.diffusers import from_diffusers_state, to_diffusers_state
from allformers.errors import CheckpointError, ConfigError
from allformers.models.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=8,
            attention_head_dim=4)
CASES = {
    # latent diffusion's layout: cross-attention on top, plain residual blocks below, cross-attention in the middle
    "cross+res": dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # two layers per block, two transformer layers, per-level head counts, linear projections (SD 2)
    "cross-deep": dict(layers_per_block=2, attention_head_dim=(2, 4), use_linear_projection=True,
                       transformer_layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 2,
                       up_block_types=("CrossAttnUpBlock2D",) * 2),
    # no cross-attention at all: pixel self-attention at the low resolution (DDPM's U-Net)
    "self-attn": dict(attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D"),
    # ADM / GLIDE's scale-shift norm, a class embedding and a projected context
    "scale-shift+classes": dict(resnet_time_scale_shift="scale_shift", num_class_embeds=3, encoder_hid_dim=12,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # a vector condition (Imagen-style pooled text) added to the time embedding; no mid block; other sinusoids
    "pooled-vector": dict(class_embed_type="projection", projection_class_embeddings_input_dim=6, flip_sin_to_cos=False,
                          freq_shift=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                          mid_block_type=None),
    # three levels, odd input size (the upsamplers follow the skips' sizes), all three kinds
    "three-levels": dict(block_out_channels=(16, 32, 32), attention_head_dim=8,
                         down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D")),
}


def reference(**kw):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**{**BASE, **kw}).eval()
    with torch.no_grad():  # move every weight off its init (zero-init out projections would hide mistakes)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def inputs(kw, size=16):
    g = torch.Generator().manual_seed(1)
    B = 2
    x = torch.randn(B, 4, size, size, generator=g)
    ctx = torch.randn(B, 5, kw.get("encoder_hid_dim") or BASE["cross_attention_dim"], generator=g)
    mask = torch.ones(B, 5)
    mask[1, 3:] = 0  # padding in the second caption
    extra = {}
    if kw.get("num_class_embeds"):
        extra["class_labels"] = torch.tensor([1, 2])
    if kw.get("class_embed_type") == "projection":
        extra["class_labels"] = torch.randn(B, kw["projection_class_embeddings_input_dim"], generator=g)
    return dict(sample=x, timestep=torch.tensor([3, 700]), encoder_hidden_states=ctx, encoder_attention_mask=mask, **extra)


@pytest.mark.parametrize("name", list(CASES))
def test_unet_parity_both_ways(name, tmp_path):
    kw = CASES[name]
    ref = reference(**kw)
    ref.save_pretrained(tmp_path / "theirs")
    ours = allformers.load(tmp_path / "theirs")
    assert isinstance(ours, UNet) and not ours.load_report.missing and not ours.load_report.unexpected
    args = inputs(kw, size=10 if name == "three-levels" else 16)
    with torch.no_grad():
        want = ref(**args).sample
        got = ours(**args)
    assert want.abs().mean() > 0.05
    assert (got - want).abs().max() <= 1e-4
    ours.save(tmp_path / "ours", format="diffusers")
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(**args).sample - want).abs().max() <= 1e-4
    # and through our own format
    ours.save(tmp_path / "native")
    again = allformers.load(tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["config_class"] == "UNetConfig"
    with torch.no_grad():
        assert torch.equal(again(**args), got)


def test_mask_and_timestep_forms_matter():
    c = UNetConfig(block_channels=(16, 32), norm_groups=8, attention_heads=2, cross_attention_dim=8, layers_per_block=1)
    model = UNet(c).eval()
    args = inputs({}, 16)
    with torch.no_grad():
        a = model(**args)
        unmasked = model(**{**args, "encoder_attention_mask": None})
        # a number, a 0-dim tensor and a (B,) tensor of the same timestep are the same thing
        same_t = [model(args["sample"], t, args["encoder_hidden_states"]) for t in (5, torch.tensor(5), torch.tensor([5, 5]))]
    assert not torch.allclose(a, unmasked)
    assert torch.equal(same_t[0], same_t[1]) and torch.equal(same_t[0], same_t[2])


def test_timestep_embedding_equals_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 999])
    for flip, shift, dim in ((True, 0, 32), (False, 1, 16), (True, 1, 7)):
        assert torch.equal(timestep_embedding(t, dim, flip, shift), get_timestep_embedding(t, dim, flip, shift))
    # hand values: dim 4, no flip, no shift: [sin(t), sin(t / 10000^(1/2)), cos(t), cos(t / 100)]
    e = timestep_embedding(torch.tensor([2]), 4, flip_sin_to_cos=False)
    want = torch.tensor([[torch.sin(torch.tensor(2.0)), torch.sin(torch.tensor(0.02)),
                          torch.cos(torch.tensor(2.0)), torch.cos(torch.tensor(0.02))]])
    assert torch.allclose(e, want, atol=1e-6)


def test_key_table_both_ways():
    model = UNet(UNetConfig(block_channels=(16, 32), norm_groups=8, attention_heads=2, cross_attention_dim=8,
                            down_blocks=("cross", "attn"), up_blocks=("attn", "cross"), layers_per_block=1))
    state = model.state_dict()
    theirs = to_diffusers_state(state)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in theirs
    assert "down_blocks.1.attentions.0.to_v.bias" in theirs and "down_blocks.0.downsamplers.0.conv.weight" in theirs
    back = from_diffusers_state(theirs)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    # GEGLU: diffusers' proj rows are [value; gate], ours [gate; value]
    fc = state["down_blocks.0.attentions.0.blocks.0.mlp.fc.weight"]
    proj = theirs["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"]
    half = fc.shape[0] // 2
    assert torch.equal(proj[:half], fc[half:]) and torch.equal(proj[half:], fc[:half])
    with pytest.raises(CheckpointError, match="to_k"):
        from_diffusers_state({k: v for k, v in theirs.items() if not k.endswith("attn1.to_k.weight")})


def test_unet_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        UNetConfig(block_channels=(16, 32), norm_groups=8)  # "cross" levels by default, no context width
    with pytest.raises(ConfigError, match="up_blocks"):
        UNetConfig(block_channels=(16, 32, 64), norm_groups=8, cross_attention_dim=8)
    with pytest.raises(ConfigError, match="heads"):
        UNetConfig(block_channels=(16, 32), norm_groups=8, cross_attention_dim=8, attention_heads=3)
    with pytest.raises(ConfigError, match="kind"):
        UNetConfig(block_channels=(16,), down_blocks=("conv",), up_blocks=("res",), mid_block=None, norm_groups=8)
    model = UNet(UNetConfig(block_channels=(16, 32), norm_groups=8, attention_heads=2, cross_attention_dim=8))
    with pytest.raises(ImageShapeError, match="encoder_hidden_states"):
        model(torch.randn(1, 4, 8, 8), 1)
    with pytest.raises(ImageShapeError, match=r"\(B, 4, H, W\)"):
        model(torch.randn(1, 3, 8, 8), 1, torch.randn(1, 2, 8))
    # a self-attention-only middle has no UNet2DConditionModel block
    plain = UNet(UNetConfig(block_channels=(16, 32), norm_groups=8, down_blocks=("res", "attn"),
                            up_blocks=("attn", "res"), mid_block="attn", attention_heads=2))
    with pytest.raises(CheckpointError, match="mid block"):
        plain.save(tmp_path / "x", format="diffusers")
    # head counts diffusers' attention_head_dim cannot express (a head count here, a head size there)
    odd = UNet(UNetConfig(block_channels=(16, 32), norm_groups=8, down_blocks=("cross", "attn"),
                          up_blocks=("attn", "cross"), attention_heads=(2, 2), cross_attention_dim=8))
    with pytest.raises(CheckpointError, match="attention_head_dim"):
        odd.save(tmp_path / "y", format="diffusers")


def test_unsupported_diffusers_options_are_named(tmp_path):
    ref = reference(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, mid_block_type=None,
                    time_embedding_act_fn="silu")
    ref.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="time_embedding_act_fn"):
        allformers.load(tmp_path / "m")
