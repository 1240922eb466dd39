"""The vision transformer (Dosovitskiy et al. 2020): one tower for every image model in the zoo.

pixels (B, C, H, W) -> patches (one strided convolution) -> [class token] + positions -> [pre-LN (CLIP)] ->
pre-norm Blocks, the same ones the text models use, with LayerScale when DINOv2 asks for it -> final norm
over every token (DINOv2, SigLIP) or over the pooled vector only (CLIP) -> pooled: the class token, an
attention-pooling probe (SigLIP's MAP head) or the mean of the patch tokens.

    ViT(ViTConfig.from_name("dinov2-small"))(pixel_values) -> VisionOutput(last_hidden_state, pooler_output)

What each Hugging Face vision tower sets (checkpoints/hf_vision.py holds their key tables):
  CLIPVisionModel     class token, no patch bias, pre-LN, quick-GELU, post-LN on the pooled class token
  SiglipVisionModel   no class token, post-LN on every token, MAP head, tanh GELU
  Dinov2Model         class token (+ mask token), LayerScale, LN on every token, positions resized always

`ViTEncoder` is the Multimodal-CoT configuration (no class token, [0, 1] pixels centred, every token out).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..blocks import BlockSpec, build_feedforward, build_norm, make_block
from ..blocks.vision import AttentionPool, VisionError, check_images, interpolate_grid, patch_embedding, sincos_2d
from ..config import ACTIVATIONS, SavedConfig

POSITIONS = ("learned", "sincos", "none")
FINAL_NORMS = ("tokens", "pooled", "tokens+pooled", "none")
POOLINGS = ("cls", "map", "mean", "none")


@dataclass
class ViTConfig(SavedConfig):
    name: str = ""
    description: str = ""
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    width: int = 768
    depth: int = 12
    heads: int = 12
    intermediate_size: Optional[int] = None  # None -> 4 * width
    activation: str = "gelu"
    norm_eps: float = 1e-6
    attn_bias: bool = True
    patch_bias: bool = True  # CLIP's patch convolution has no bias
    class_token: bool = True
    position: str = "learned"  # learned (started from 2-D sin-cos) | sincos (fixed) | none
    # a picture with another patch grid: resize the learned grid bicubically (DINOv2: always; CLIP and
    # SigLIP only when asked, forward(interpolate_pos_encoding=True)), else refuse
    interpolate_positions: bool = False
    pre_norm: bool = False  # LayerNorm on the embeddings before the first block (CLIP's pre_layrnorm)
    layer_scale: Optional[float] = None  # LayerScale on both residual branches, this initial value (DINOv2)
    # LayerNorm over every output token | over the pooled vector only | over every token and then again over the
    # pooled one (BLIP-2's vision tower applies its post-LN twice to the class token) | none
    final_norm: str = "tokens"
    pooling: str = "cls"  # class token | "map" attention-pooling probe (SigLIP) | mean of patch tokens | none
    mask_token: bool = False  # a learned vector that replaces masked patches (DINOv2's bool_masked_pos)
    conv_stem: bool = False  # a small convolution stack instead of one strided convolution
    dropout: float = 0.0

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.width
        self.validate()

    def validate(self):
        for fname, allowed in (("position", POSITIONS), ("final_norm", FINAL_NORMS), ("pooling", POOLINGS),
                               ("activation", ACTIVATIONS)):
            if getattr(self, fname) not in allowed:
                raise VisionError(f"{fname}={getattr(self, fname)!r} is not one of {list(allowed)}")
        for fname in ("image_size", "patch_size", "channels", "width", "depth", "heads", "intermediate_size"):
            if not isinstance(getattr(self, fname), int) or getattr(self, fname) <= 0:
                raise VisionError(f"{fname} must be a positive integer, got {getattr(self, fname)!r}")
        if self.image_size % self.patch_size:
            raise VisionError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.width % self.heads:
            raise VisionError(f"width={self.width} is not divisible by heads={self.heads}")
        if self.pooling == "cls" and not self.class_token:
            raise VisionError("pooling='cls' needs class_token=True; pool by 'mean' or 'map' without a class token")
        if self.final_norm in ("pooled", "tokens+pooled") and self.pooling == "none":
            raise VisionError(f"final_norm={self.final_norm!r} normalises the pooled vector: it needs pooling != 'none'")
        if self.interpolate_positions and self.position != "learned":
            raise VisionError(f"interpolate_positions resizes learned positions; position={self.position!r} has none "
                              f"(sin-cos positions are computed for any grid)")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2 + int(self.class_token)

    def block_spec(self) -> BlockSpec:
        return BlockSpec(dim=self.width, n_head=self.heads, intermediate_size=self.intermediate_size, causal=False,
                         attn_bias=self.attn_bias, norm_eps=self.norm_eps, activation=self.activation,
                         dropout=self.dropout, layer_scale=self.layer_scale)

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ViTConfig":
        from ..errors import UnknownModelError

        if name not in VIT_CONFIGS:
            raise UnknownModelError(name, VIT_CONFIGS)
        return cls(**{**VIT_CONFIGS[name], "name": name, **overrides})


# Named vision towers (the shapes of the released checkpoints; sizes from their config.json files).
VIT_CONFIGS = {
    "vit-base-patch16-224": dict(description="ViT-B/16 (2020): class token, learned positions, LayerNorm eps 1e-12",
                                 patch_size=16, norm_eps=1e-12),
    "clip-vit-base-patch32": dict(description="CLIP ViT-B/32 image tower: pre-LN, quick GELU, post-LN on the class token",
                                  patch_size=32, activation="quick_gelu", norm_eps=1e-5, patch_bias=False,
                                  pre_norm=True, final_norm="pooled"),
    "siglip-base-patch16-224": dict(description="SigLIP B/16 image tower: no class token, MAP attention pooling",
                                    patch_size=16, activation="gelu_tanh", class_token=False, pooling="map"),
    "dinov2-small": dict(description="DINOv2 ViT-S/14: LayerScale, 37x37 positions resized to any grid",
                         image_size=518, patch_size=14, width=384, heads=6, layer_scale=1.0, interpolate_positions=True,
                         mask_token=True),
    "vit-tiny-shapes": dict(description="a 2x64 ViT for the 32x32 synthetic shapes (trains on a CPU)",
                            image_size=32, patch_size=4, width=64, depth=2, heads=4),
}


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor  # (B, N, width): every token (after the final norm when it covers tokens)
    pooler_output: Optional[torch.Tensor] = None  # (B, width), or None with pooling="none"


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        self.patch = patch_embedding(c.channels, c.width, c.patch_size, bias=c.patch_bias, conv_stem=c.conv_stem)
        self.cls = nn.Parameter(torch.randn(1, 1, c.width) * 0.02) if c.class_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, c.width)) if c.mask_token else None
        n = c.grid
        if c.position == "learned":  # started from sin-cos values: the first steps already know where each patch is
            table = sincos_2d(n, n, c.width)
            if c.class_token:  # the class token's position starts at 0 (MAE)
                table = torch.cat([torch.zeros(1, c.width), table])
            self.pos = nn.Parameter(table[None].clone())  # (1, N, width)
        self.pre_norm = nn.LayerNorm(c.width, eps=c.norm_eps) if c.pre_norm else None
        self.drop = nn.Dropout(c.dropout) if c.dropout else nn.Identity()
        spec = c.block_spec()
        self.blocks = nn.ModuleList(make_block(spec) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps) if c.final_norm != "none" else None
        self.pool = None
        if c.pooling == "map":
            mlp = build_feedforward("MLP", c.width, c.intermediate_size, c.activation, True, 0.0)
            self.pool = AttentionPool(c.width, c.heads, 1, mlp=mlp, norm=build_norm("LayerNorm", c.width, c.norm_eps))

    @property
    def device(self):
        return next(self.patch.parameters()).device

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def out_dim(self) -> int:
        return self.config.width

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def positions(self, h: int, w: int, interpolate: bool) -> Optional[torch.Tensor]:
        """Position vectors for an h x w patch grid (class token first) -> (1, N, width) or None."""
        c = self.config
        if c.position == "none":
            return None
        if c.position == "sincos":
            table = sincos_2d(h, w, c.width).to(self.device)
            return torch.cat([table.new_zeros(int(c.class_token), c.width), table])[None]
        if (h, w) == (c.grid, c.grid):
            return self.pos
        if not interpolate:
            raise VisionError(f"a {h}x{w} patch grid ({h * c.patch_size}x{w * c.patch_size} pixels), but the positions "
                              f"were learned for {c.grid}x{c.grid} ({c.image_size} pixels); resize the images to "
                              f"{c.image_size} or pass interpolate_pos_encoding=True")
        k = int(c.class_token)
        return torch.cat([self.pos[:, :k], interpolate_grid(self.pos[:, k:], h, w)], dim=1)

    def embed(self, pixel_values: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None,
              interpolate_pos_encoding: Optional[bool] = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, width) token vectors with positions."""
        c = self.config
        check_images(pixel_values, c.channels, None)
        x = self.patch(pixel_values.to(next(self.patch.parameters()).dtype))
        B, _, h, w = x.shape  # (B, width, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, width)
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise VisionError("bool_masked_pos needs a mask token (ViTConfig(mask_token=True))")
            x = torch.where(bool_masked_pos[..., None].bool(), self.mask_token.to(x.dtype), x)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)
        interpolate = c.interpolate_positions if interpolate_pos_encoding is None else interpolate_pos_encoding
        pos = self.positions(h, w, interpolate)
        return self.drop(x if pos is None else x + pos)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None,
                interpolate_pos_encoding: Optional[bool] = None) -> VisionOutput:
        """pixel_values (B, C, H, W), already normalised (allformers.data.image_processing) ->
        VisionOutput(last_hidden_state (B, N, width), pooler_output (B, width) or None)."""
        c = self.config
        x = self.embed(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        if c.final_norm in ("tokens", "tokens+pooled"):
            x = self.norm(x)
        if c.pooling == "cls":
            pooled = x[:, 0]
        elif c.pooling == "mean":
            pooled = x[:, int(c.class_token):].mean(dim=1)
        elif c.pooling == "map":
            pooled = self.pool(x)[:, 0]
        else:
            pooled = None
        if c.final_norm in ("pooled", "tokens+pooled"):
            pooled = self.norm(pooled)
        return VisionOutput(x, pooled)

    def hidden_state(self, pixel_values: torch.Tensor, index: int = -1,
                     interpolate_pos_encoding: Optional[bool] = None) -> torch.Tensor:
        """Hugging Face's hidden_states[index] -> (B, N, width): 0 is the embeddings (after the pre-LN), i the output
        of block i, -1 the last block's, -2 the one before (LLaVA's vision_feature_layer); never the final norm.
        Only the blocks up to it run."""
        depth = self.config.depth
        if not -(depth + 1) <= index <= depth:
            raise VisionError(f"hidden state {index} of a {depth}-block ViT: pick one in [-{depth + 1}, {depth}]")
        x = self.embed(pixel_values, None, interpolate_pos_encoding)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks[:index % (depth + 1)]:
            x = block(x)
        return x

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ViT":
        return cls(ViTConfig.from_name(name, **overrides))

    def save(self, path, format: str = "allformers"):
        """An allformers folder, or format="hf": the Hugging Face class whose layout this config has
        (CLIPVisionModel, SiglipVisionModel, Dinov2Model)."""
        if format == "hf":
            from ..checkpoints.hf_vision import save_hf_vision

            return save_hf_vision(self, path)
        from ..checkpoints import save

        return save(self, path, format=format)


class ViTEncoder(ViT):
    """Multimodal-CoT's image encoder: (B, C, H, W) images in [0, 1] -> (B, (H/p) * (W/p), width) patch
    features. No class token; learned positions started from 2-D sine-cosine values; every token normalised.
    conv_stem=True embeds patches with a small convolution stack instead of one strided convolution."""

    def __init__(self, image_size: int = 32, patch_size: int = 8, channels: int = 3, width: int = 128,
                 depth: int = 2, heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0, conv_stem: bool = False):
        super().__init__(ViTConfig(name="vit-encoder", image_size=image_size, patch_size=patch_size, channels=channels,
                                   width=width, depth=depth, heads=heads, intermediate_size=mlp_ratio * width,
                                   dropout=dropout, conv_stem=conv_stem, class_token=False, pooling="none"))
        self.image_size, self.channels = image_size, channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.channels, self.image_size)
        return super().forward(images - 0.5).last_hidden_state  # centred pixels
