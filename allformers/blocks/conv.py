"""Convolutional blocks of the image models (U-Net, image autoencoders): residual blocks with
GroupNorm and SiLU that can take a timestep embedding, down/up-sampling, attention over pixels,
and the sinusoidal timestep embedding.

Module names follow diffusers (norm1, conv1, time_emb_proj, ...) where nothing in allformers had a
name for the part already, so the diffusers key table stays a handful of rows. The attention and
the transformer layers inside are the same `Attention`, `Block` and `GLU` every text model uses."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AllformersError, ConfigError
from .attention import Attention
from .block import Block
from .feedforward import ACTIVATIONS, GLU


class ImageShapeError(AllformersError, ValueError):
    """An image model got an input of the wrong shape, or without the conditioning it was built for."""


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sinusoids at frequencies max_period^(-i / (dim/2 - freq_shift)),
    [sin | cos] (or [cos | sin] with flip_sin_to_cos, as Stable Diffusion has it)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """The MLP that turns the sinusoids (or any conditioning vector) into the embedding every
    residual block receives: linear -> SiLU -> linear."""

    def __init__(self, in_dim: int, dim: int, activation: str = "silu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResBlock(nn.Module):
    """x -> conv(act(norm(x))) [+ projected timestep embedding] -> conv(dropout(act(norm(.)))) + shortcut(x).

    `scale_shift` is GLIDE / ADM's adaptive group norm: the embedding gives a per-channel scale and
    shift applied after the second norm, instead of a bias added before it."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, temb_channels: Optional[int] = None, *,
                 groups: int = 32, groups_out: Optional[int] = None, eps: float = 1e-6, dropout: float = 0.0,
                 activation: str = "silu", scale_shift: bool = False, output_scale_factor: float = 1.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.scale_shift, self.output_scale_factor = scale_shift, output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = (nn.Linear(temb_channels, out_channels * (2 if scale_shift else 1))
                              if temb_channels is not None else None)
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = ACTIVATIONS[activation]
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:  # (B, C, H, W)
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ImageShapeError("this residual block takes a timestep embedding (temb); none was given")
            temb = self.time_emb_proj(self.act(temb))[:, :, None, None]  # (B, C or 2C, 1, 1)
        if self.scale_shift:
            scale, shift = temb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + temb if temb is not None else h)
        h = self.conv2(self.dropout(self.act(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv. padding=0 pads only right and bottom by one
    (the autoencoders' encoder), which is what the original latent-diffusion code does."""

    def __init__(self, channels: int, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (nearest neighbour), then a 3x3 conv. `size` forces the output size when the
    matching skip connection has an odd size."""

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class SpatialSelfAttention(nn.Module):
    """Self-attention over the H*W pixels of a feature map, with a residual: x + attn(groupnorm(x)).
    The attention in DDPM's U-Net and in the autoencoders' middle block."""

    def __init__(self, channels: int, heads: int = 1, *, groups: int = 32, eps: float = 1e-6,
                 output_scale_factor: float = 1.0):
        super().__init__()
        if channels % heads:
            raise ConfigError(f"{channels} channels do not split into {heads} attention heads; choose heads that divide the channels")
        self.output_scale_factor = output_scale_factor
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.attn = Attention(channels, heads, heads, channels // heads, bias=True, out_bias=True, causal=False)

    def forward(self, x: torch.Tensor, context=None, context_mask=None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x.view(B, C, H * W)).transpose(1, 2)  # (B, HW, C)
        h = self.attn(h).transpose(1, 2).reshape(B, C, H, W)
        return (h + x) / self.output_scale_factor


class SpatialTransformer(nn.Module):
    """Latent diffusion's transformer over pixels (diffusers' Transformer2DModel):
    groupnorm -> proj_in -> transformer layers (self-attention, cross-attention to the context,
    GEGLU feed-forward; pre-LayerNorm) -> proj_out, plus the input. proj_in/out are 1x1 convs, or
    linear layers over the flattened pixels (`linear_projection`, Stable Diffusion 2)."""

    def __init__(self, channels: int, heads: int, depth: int = 1, context_dim: Optional[int] = None, *,
                 groups: int = 32, linear_projection: bool = False, dropout: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        if channels % heads:
            raise ConfigError(f"{channels} channels do not split into {heads} attention heads; choose heads that divide the channels")
        head_dim = channels // heads
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear_projection else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()

        def layer():
            cross = context_dim is not None
            return Block(
                attn=Attention(channels, heads, heads, head_dim, bias=False, out_bias=True, causal=False),
                mlp=GLU(channels, 4 * channels, "gelu", bias=True, dropout=dropout),
                norm1=nn.LayerNorm(channels, eps=norm_eps), norm2=nn.LayerNorm(channels, eps=norm_eps),
                placement="pre", dropout=dropout,
                cross_attn=Attention(channels, heads, heads, head_dim, bias=False, out_bias=True, causal=False,
                                     cross=True, kv_dim=context_dim) if cross else None,
                norm_cross=nn.LayerNorm(channels, eps=norm_eps) if cross else None)

        self.blocks = nn.ModuleList(layer() for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.blocks:
            h = block(h, context=context, context_mask=context_mask) if block.cross_attn is not None else block(h)
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
        if not self.linear_projection:
            h = self.proj_out(h)
        return h + x


class ConvLevel(nn.Module):
    """One resolution of a U-Net or an image autoencoder: residual blocks (each followed by its
    attention when the level has one), then the down- or up-sampler that leaves the level."""

    def __init__(self, resnets: list, attentions: list = (), downsample: Optional[nn.Module] = None,
                 upsample: Optional[nn.Module] = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.downsample, self.upsample = downsample, upsample

    def forward(self, h: torch.Tensor, temb=None, context=None, context_mask=None, skips: Optional[list] = None,
                size=None) -> tuple[torch.Tensor, list]:
        """-> (output, the feature maps it produced). A U-Net's up level passes `skips` (popped from the
        end, one per residual block, concatenated on channels); its down levels' outputs become them."""
        outs = []
        for i, res in enumerate(self.resnets):
            if skips is not None:
                h = torch.cat([h, skips.pop()], dim=1)
            h = res(h, temb)
            if len(self.attentions):
                h = self.attentions[i](h, context, context_mask)
            outs.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            outs.append(h)
        if self.upsample is not None:
            h = self.upsample(h, size)
        return h, outs


class MidBlock(nn.Module):
    """The lowest resolution: a residual block, then (attention, residual block) pairs; without
    attention the residual blocks simply follow each other."""

    def __init__(self, resnets: list, attentions: list = ()):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)

    def forward(self, h: torch.Tensor, temb=None, context=None, context_mask=None) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        for i, res in enumerate(self.resnets[1:]):
            if len(self.attentions):
                h = self.attentions[i](h, context, context_mask)
            h = res(h, temb)
        return h
