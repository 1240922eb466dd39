"""The diffusion U-Net (Ronneberger et al. 2015; DDPM, ADM/GLIDE and latent diffusion's version),
the denoiser of the text-to-image systems.

    x_t -> conv_in -> down levels -> middle -> up levels (each taking the skips of its level) -> conv_out
              ^ every residual block receives the timestep embedding (+ a class / pooled-text vector)
              ^ attention levels attend over their pixels; "cross" levels also attend to the context
                (e.g. a text encoder's states: latent diffusion's conditioning by cross-attention)

The structure is diffusers' UNet2DConditionModel, so its checkpoints load (checkpoints/diffusers.py)
and ours export to it. Levels are described by kind:
  "res"   residual blocks only                 (DownBlock2D / UpBlock2D)
  "attn"  each followed by pixel self-attention (AttnDownBlock2D / AttnUpBlock2D)
  "cross" each followed by a spatial transformer: self-attention, cross-attention, GEGLU
          (CrossAttnDownBlock2D / CrossAttnUpBlock2D)
and the middle by "cross" (UNetMidBlock2DCrossAttn), "attn", "res" (UNetMidBlock2D) or None."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from ..blocks.conv import (ConvLevel, Downsample, ImageShapeError, MidBlock, ResBlock, SpatialSelfAttention,
                           SpatialTransformer, TimestepEmbedding, Upsample, timestep_embedding)
from ..blocks.feedforward import ACTIVATIONS
from ..config import SavedConfig
from ..errors import ConfigError

LEVEL_KINDS = ("res", "attn", "cross")
MID_KINDS = ("cross", "attn", "res", None)
IntOrTuple = Union[int, tuple]


def per_level(value, n: int, name: str) -> tuple:
    """An int for every level, or one value per level."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ConfigError(f"{name} has {len(value)} entries for {n} levels; give one per level or a single int")
    return value


@dataclass
class UNetConfig(SavedConfig):
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 32  # the H = W it is meant for (documentation; any multiple of 2^(levels-1) runs)
    block_channels: tuple = (32, 64)  # channels per level, top (full resolution) first
    down_blocks: tuple = ("cross", "res")  # kind per level, top first
    up_blocks: tuple = ("res", "cross")  # kind per level, deepest first (the order they run in)
    mid_block: Optional[str] = "cross"
    layers_per_block: IntOrTuple = 2  # residual blocks per down level (up levels have one more)
    attention_heads: IntOrTuple = 8  # heads of the attention at each level (head dim = channels // heads)
    transformer_layers: IntOrTuple = 1  # transformer layers in each spatial transformer, per level
    cross_attention_dim: Optional[int] = None  # the context's width ("cross" levels need it)
    encoder_hid_dim: Optional[int] = None  # set: the context is projected from this width to cross_attention_dim
    linear_projection: bool = False  # spatial transformers' proj_in/out as Linear (SD 2) instead of 1x1 conv
    norm_groups: int = 32
    norm_eps: float = 1e-5
    activation: str = "silu"
    dropout: float = 0.0  # in the residual blocks
    time_embed_dim: Optional[int] = None  # derived: 4 * block_channels[0]
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_scale_shift: bool = False  # ADM / GLIDE's adaptive group norm instead of adding the embedding
    downsample_padding: int = 1
    mid_scale_factor: float = 1.0
    num_classes: Optional[int] = None  # class-conditional: a learned embedding per class is added to the time embedding
    class_embed_dim: Optional[int] = None  # vector-conditional (e.g. pooled text): an MLP of it is added instead

    def __post_init__(self):
        self.block_channels = tuple(self.block_channels)
        self.down_blocks, self.up_blocks = tuple(self.down_blocks), tuple(self.up_blocks)
        n = len(self.block_channels)
        if len(self.down_blocks) != n or len(self.up_blocks) != n:
            raise ConfigError(f"{n} block_channels but {len(self.down_blocks)} down_blocks and {len(self.up_blocks)} "
                              f"up_blocks; give one of each per level")
        for kind in self.down_blocks + self.up_blocks:
            if kind not in LEVEL_KINDS:
                raise ConfigError(f"level kind {kind!r} is not one of {LEVEL_KINDS}")
        if self.mid_block not in MID_KINDS:
            raise ConfigError(f"mid_block {self.mid_block!r} is not one of {MID_KINDS}")
        uses_cross = "cross" in self.down_blocks + self.up_blocks + (self.mid_block,)
        if uses_cross and self.cross_attention_dim is None:
            raise ConfigError("'cross' levels attend to a context: set cross_attention_dim (the context's width)")
        if self.encoder_hid_dim is not None and self.cross_attention_dim is None:
            raise ConfigError("encoder_hid_dim projects the context to cross_attention_dim: set cross_attention_dim too")
        if self.num_classes is not None and self.class_embed_dim is not None:
            raise ConfigError("num_classes and class_embed_dim are two ways to condition on a class; set one")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        for c in self.block_channels:
            if c % self.norm_groups:
                raise ConfigError(f"block_channels {c} is not divisible by norm_groups={self.norm_groups}")
        for name in ("layers_per_block", "attention_heads", "transformer_layers"):
            v = getattr(self, name)
            setattr(self, name, v if isinstance(v, int) else per_level(v, n, name))
        heads = per_level(self.attention_heads, n, "attention_heads")
        for level, (c, h) in enumerate(zip(self.block_channels, heads)):
            if c % h:
                raise ConfigError(f"level {level}: {c} channels do not split into {h} attention heads")
        if self.time_embed_dim is None:
            self.time_embed_dim = 4 * self.block_channels[0]

    @property
    def levels(self) -> int:
        return len(self.block_channels)

    def at(self, name: str, level: int) -> int:
        """A per-level setting (layers_per_block, attention_heads, transformer_layers) at `level` (0 = top)."""
        return per_level(getattr(self, name), self.levels, name)[level]


def _attention(kind: str, channels: int, heads: int, depth: int, c: UNetConfig, eps: float, scale: float = 1.0):
    if kind == "cross":
        return SpatialTransformer(channels, heads, depth, c.cross_attention_dim, groups=c.norm_groups,
                                  linear_projection=c.linear_projection)
    return SpatialSelfAttention(channels, heads, groups=c.norm_groups, eps=eps, output_scale_factor=scale)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch, L, temb = c.block_channels, c.levels, c.time_embed_dim
        res = dict(groups=c.norm_groups, eps=c.norm_eps, dropout=c.dropout, activation=c.activation,
                   scale_shift=c.time_scale_shift)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb, c.activation)
        self.encoder_hid_proj = nn.Linear(c.encoder_hid_dim, c.cross_attention_dim) if c.encoder_hid_dim else None
        if c.num_classes is not None:
            self.class_embedding = nn.Embedding(c.num_classes, temb)
        elif c.class_embed_dim is not None:
            self.class_embedding = TimestepEmbedding(c.class_embed_dim, temb, "silu")
        else:
            self.class_embedding = None

        self.down_blocks = nn.ModuleList()
        out = ch[0]
        for i, kind in enumerate(c.down_blocks):
            inp, out = out, ch[i]
            n = c.at("layers_per_block", i)
            resnets = [ResBlock(inp if j == 0 else out, out, temb, **res) for j in range(n)]
            attns = ([_attention(kind, out, c.at("attention_heads", i), c.at("transformer_layers", i), c, c.norm_eps)
                      for _ in range(n)] if kind != "res" else [])
            down = Downsample(out, out, c.downsample_padding) if i < L - 1 else None
            self.down_blocks.append(ConvLevel(resnets, attns, downsample=down))

        self.mid_block = None
        if c.mid_block is not None:
            mid_res = dict(res, output_scale_factor=c.mid_scale_factor)
            resnets = [ResBlock(ch[-1], ch[-1], temb, **mid_res)]
            attns = []
            if c.mid_block != "res":
                attns = [_attention(c.mid_block, ch[-1], c.at("attention_heads", L - 1), c.at("transformer_layers", L - 1),
                                    c, c.norm_eps, c.mid_scale_factor)]
                resnets.append(ResBlock(ch[-1], ch[-1], temb, **mid_res))
            self.mid_block = MidBlock(resnets, attns)

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(ch))
        out = rev[0]
        for i, kind in enumerate(c.up_blocks):
            level = L - 1 - i
            prev, out, skip_in = out, rev[i], rev[min(i + 1, L - 1)]
            n = c.at("layers_per_block", level) + 1
            # the last block of a level takes the skip that entered the level from above (skip_in channels)
            resnets = [ResBlock((prev if j == 0 else out) + (skip_in if j == n - 1 else out), out, temb, **res)
                       for j in range(n)]
            attns = ([_attention(kind, out, c.at("attention_heads", level), c.at("transformer_layers", level), c,
                                 c.norm_eps) for _ in range(n)] if kind != "res" else [])
            up = Upsample(out, out) if i < L - 1 else None
            self.up_blocks.append(ConvLevel(resnets, attns, upsample=up))

        self.conv_norm_out = nn.GroupNorm(c.norm_groups, ch[0], eps=c.norm_eps)
        self.act = ACTIVATIONS[c.activation]
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    @property
    def device(self):
        return self.conv_in.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def time_embed(self, timestep, batch: int, device, dtype, class_labels=None) -> torch.Tensor:
        """int / float / (B,) timesteps [+ class ids (B,) or vectors (B, class_embed_dim)] -> (B, time_embed_dim)."""
        t = torch.as_tensor(timestep, device=device)
        if t.dim() == 0:
            t = t[None]
        t = t.expand(batch)
        emb = self.time_embedding(timestep_embedding(t, self.config.block_channels[0], self.config.flip_sin_to_cos,
                                                     self.config.freq_shift).to(dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ImageShapeError("this U-Net is class-conditional (num_classes / class_embed_dim): pass class_labels")
            emb = emb + self.class_embedding(class_labels).to(dtype)
        return emb

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None,
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sample (B, in_channels, H, W), timestep (B,) or a number, context (B, S, D) with mask (B, S)
        (1 = a real token) -> (B, out_channels, H, W): the prediction (epsilon, v or x_0)."""
        c = self.config
        if sample.dim() != 4 or sample.shape[1] != c.in_channels:
            raise ImageShapeError(f"sample has shape {tuple(sample.shape)}; this U-Net takes (B, {c.in_channels}, H, W)")
        context, mask = encoder_hidden_states, None
        if c.cross_attention_dim is not None:
            if context is None:
                raise ImageShapeError("this U-Net cross-attends to a context: pass encoder_hidden_states (B, S, D)")
            if self.encoder_hid_proj is not None:
                context = self.encoder_hid_proj(context)
            if encoder_attention_mask is not None:  # (B, S) -> an additive bias (B, 1, 1, S), as diffusers builds it
                mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0)[:, None, None, :]
        B = sample.shape[0]
        temb = self.time_embed(timestep, B, sample.device, sample.dtype, class_labels)
        # odd sizes: upsample to each skip's size instead of doubling
        factor = 2 ** (c.levels - 1)
        forward_size = any(s % factor for s in sample.shape[-2:])

        h = self.conv_in(sample)
        skips = [h]
        for level in self.down_blocks:
            h, outs = level(h, temb, context, mask)
            skips += outs
        if self.mid_block is not None:
            h = self.mid_block(h, temb, context, mask)
        for i, level in enumerate(self.up_blocks):
            n = len(level.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if forward_size and i < len(self.up_blocks) - 1 else None
            h, _ = level(h, temb, context, mask, skips=level_skips, size=size)
        return self.conv_out(self.act(self.conv_norm_out(h)))

    def save(self, path, format: str = "allformers"):
        """An allformers folder, or `format="diffusers"`: a folder UNet2DConditionModel.from_pretrained reads."""
        if format == "diffusers":
            from ..checkpoints.diffusers import save_diffusers

            return save_diffusers(self, path)
        from ..checkpoints.io import save

        return save(self, path)
