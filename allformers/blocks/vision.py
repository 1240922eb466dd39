"""Parts of image encoders, and the encoders that are not a plain ViT (the ViT itself is a model:
models/vit.py), plus the loader for features someone computed already.

  * `patch_embedding`: one strided convolution (a linear map per patch), or a small convolution stack.
  * `sincos_2d` / `interpolate_grid`: fixed 2-D sine-cosine positions, and a learned position grid
    resized (bicubic, as Hugging Face's ViTs do) for a picture with another number of patches.
  * `AttentionPool`: learned queries that cross-attend to the tokens (SigLIP's MAP head, CoCa's pooler).
  * `DETREncoder`: a backbone (a small CNN, or a ViT) gives a grid of features; a transformer encoder
    mixes them; N learned object queries then cross-attend to them through decoder blocks and come
    out as N feature vectors, one per "slot" (DETR's object queries, without the box heads).
  * `load_image_features`: the precomputed arrays of the Multimodal-CoT release, (images, patches,
    dim) in a .npy file plus a name map {question id: row}, with the shapes checked up front.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AllformersError
from .attention import Attention
from .block import BlockSpec, make_block

# Shapes (patches, dim) of the feature files the Multimodal-CoT reference code reads.
REFERENCE_SHAPES = {"detr": (100, 256), "vit": (145, 1024), "clip": (49, 2048)}


class VisionError(AllformersError, ValueError):
    """An image or a feature file does not have the shape the encoder or the model expects."""


def vit_block_spec(width: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0, cross: bool = False) -> BlockSpec:
    """A bidirectional pre-LayerNorm block (ViT's layout: GELU MLP, biases, eps 1e-6)."""
    if width % heads:
        raise VisionError(f"width={width} is not divisible by heads={heads}")
    return BlockSpec(dim=width, n_head=heads, intermediate_size=mlp_ratio * width, causal=False, norm_eps=1e-6,
                     activation="gelu", dropout=dropout, cross_attention=cross)


def check_images(images: torch.Tensor, channels: int, size: Optional[int]):
    if images.dim() != 4 or images.shape[1] != channels or (size and tuple(images.shape[2:]) != (size, size)):
        want = f"(B, {channels}, {size}, {size})" if size else f"(B, {channels}, H, W)"
        raise VisionError(f"images have shape {tuple(images.shape)}; this encoder takes {want} "
                          f"(resize them with allformers.data.synthetic_science.load_image(path, size))")


def patch_embedding(channels: int, width: int, patch_size: int, bias: bool = True, conv_stem: bool = False) -> nn.Module:
    """(B, C, H, W) -> (B, width, H/p, W/p). conv_stem=True: log2(p) - 1 stride-2 3x3 convolutions, then a
    2x2 stride-2 one (Xiao et al. 2021, "Early convolutions help transformers see better": it trains faster)."""
    if not conv_stem:
        return nn.Conv2d(channels, width, patch_size, stride=patch_size, bias=bias)  # one linear map per patch
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise VisionError(f"conv_stem needs a power-of-two patch_size >= 2, got {patch_size}")
    layers, c = [], channels
    for _ in range(patch_size.bit_length() - 2):
        layers += [nn.Conv2d(c, width // 2, 3, stride=2, padding=1), nn.GELU()]
        c = width // 2
    return nn.Sequential(*layers, nn.Conv2d(c, width, 2, stride=2, bias=bias))


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (MAE's ViT): half the channels encode the row, half the column -> (h*w, dim)."""
    def axis(n, d):  # (n, d)
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        return torch.cat([torch.sin(pos * inv), torch.cos(pos * inv)], dim=1)[:, :d]

    rows = axis(h, dim // 2)[:, None].expand(h, w, -1)
    cols = axis(w, dim - dim // 2)[None, :].expand(h, w, -1)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, dim)


def interpolate_grid(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Learned positions of a square n x n patch grid, (1, n*n, D) -> (1, h*w, D) for an h x w grid:
    bicubic, align_corners=False, in float32 (Hugging Face's interpolate_pos_encoding for CLIP, SigLIP, DINOv2)."""
    n = int(round(grid.shape[1] ** 0.5))
    if n * n != grid.shape[1]:
        raise VisionError(f"{grid.shape[1]} learned positions are not a square grid; cannot resize them to {h}x{w}")
    D = grid.shape[-1]
    g = grid.reshape(1, n, n, D).permute(0, 3, 1, 2)  # (1, D, n, n)
    g = F.interpolate(g.float(), size=(h, w), mode="bicubic", align_corners=False).to(grid.dtype)
    return g.permute(0, 2, 3, 1).reshape(1, h * w, D)


class AttentionPool(nn.Module):
    """(B, N, D) tokens -> (B, Q, D): Q learned queries cross-attend to the tokens, then (optionally) a
    norm + MLP residual on the result. SigLIP's MAP head is one query with the MLP (its output row 0 is the
    image embedding); CoCa's attentional pooler is Q queries without it."""

    def __init__(self, dim: int, heads: int, n_queries: int = 1, mlp: Optional[nn.Module] = None,
                 norm: Optional[nn.Module] = None):
        super().__init__()
        if dim % heads:
            raise VisionError(f"width={dim} is not divisible by heads={heads}")
        self.probe = nn.Parameter(torch.randn(1, n_queries, dim) * dim ** -0.5)
        self.attn = Attention(dim, heads, heads, dim // heads, causal=False, cross=True)
        self.norm, self.mlp = norm, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.probe.expand(x.shape[0], -1, -1), context=x)  # (B, Q, D)
        if self.mlp is not None:
            h = h + self.mlp(self.norm(h))
        return h


class ConvBackbone(nn.Module):
    """A small CNN for DETREncoder: `layers` 3x3 convolutions, each halving the grid."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        mods, c = [], channels
        for _ in range(layers):
            mods += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.GroupNorm(1, width), nn.GELU()]
            c = width
        self.net, self.channels, self.out_dim = nn.Sequential(*mods), channels, width

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, width, H/2^l, W/2^l)
        check_images(images, self.channels, None)
        return self.net(images - 0.5)


class DETREncoder(nn.Module):
    """backbone grid -> transformer encoder -> `num_queries` learned queries decoded against it ->
    (B, num_queries, width). The backbone returns a grid (B, C, h, w) (gets learned row + column
    positions, as DETR's PositionEmbeddingLearned) or tokens (B, N, C) (a ViT: already positioned)."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, width: int = 128, num_queries: int = 16,
                 encoder_depth: int = 1, decoder_depth: int = 2, heads: int = 4, mlp_ratio: int = 4,
                 max_grid: int = 32, dropout: float = 0.0):
        super().__init__()
        self.backbone, self.out_dim, self.num_tokens = backbone, width, num_queries
        self.input_proj = nn.Linear(backbone_dim, width)
        self.row_embed = nn.Parameter(torch.randn(max_grid, width // 2) * 0.02)
        self.col_embed = nn.Parameter(torch.randn(max_grid, width - width // 2) * 0.02)
        enc = vit_block_spec(width, heads, mlp_ratio, dropout)
        dec = vit_block_spec(width, heads, mlp_ratio, dropout, cross=True)
        self.encoder = nn.ModuleList(make_block(enc) for _ in range(encoder_depth))
        self.decoder = nn.ModuleList(make_block(dec) for _ in range(decoder_depth))
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)  # DETR's object queries
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def _grid_positions(self, h: int, w: int) -> torch.Tensor:  # (h*w, width)
        if max(h, w) > self.row_embed.shape[0]:
            raise VisionError(f"the backbone grid is {h}x{w}, larger than max_grid={self.row_embed.shape[0]}")
        rows = self.row_embed[:h, None].expand(h, w, -1)
        cols = self.col_embed[None, :w].expand(h, w, -1)
        return torch.cat([rows, cols], dim=-1).reshape(h * w, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(images)
        if feats.dim() == 4:  # (B, C, h, w) grid -> (B, h*w, C) tokens with 2-D positions
            B, C, h, w = feats.shape
            memory = self.input_proj(feats.flatten(2).transpose(1, 2)) + self._grid_positions(h, w)
        else:
            memory = self.input_proj(feats)  # (B, N, width)
        for block in self.encoder:
            memory = block(memory)
        x = self.queries.expand(memory.shape[0], -1, -1)  # (B, Q, width)
        for block in self.decoder:  # self-attention among queries, cross-attention to the image
            x = block(x, context=memory)
        return self.norm(x)


# ---------------------------------------------------------------------- precomputed features
@dataclass
class ImageFeatureBank:
    """Rows of a feature array looked up by question id; questions without a row get no image."""

    features: np.ndarray  # (images, patches, dim), possibly memory-mapped
    name_map: dict  # question id (str) -> row
    source: str = ""

    @property
    def patch_num(self) -> int:
        return int(self.features.shape[1])

    @property
    def patch_dim(self) -> int:
        return int(self.features.shape[2])

    def __contains__(self, qid) -> bool:
        return str(qid) in self.name_map

    def lookup(self, qids: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """-> features (B, patches, dim) float32, mask (B, patches) bool (all False for no image)."""
        out = torch.zeros(len(qids), self.patch_num, self.patch_dim)
        mask = torch.zeros(len(qids), self.patch_num, dtype=torch.bool)
        for i, q in enumerate(qids):
            row = self.name_map.get(str(q))
            if row is not None:
                out[i] = torch.from_numpy(np.array(self.features[row], dtype=np.float32))  # a copy: the file may be mapped read-only
                mask[i] = True
        return out, mask


def load_image_features(path, name_map=None, kind: Optional[str] = None) -> ImageFeatureBank:
    """Load a (images, patches, dim) .npy feature file and its {question id: row} name map (a dict, or a
    JSON file; default: name_map.json beside the features). kind ("detr", "vit", "clip") checks the
    per-image shape against the reference's; every row named in the map must exist."""
    path = Path(path)
    if not path.is_file():
        raise VisionError(f"feature file {path} does not exist")
    try:
        feats = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise VisionError(f"{path} is not a .npy array ({e}); save features with numpy.save") from None
    if feats.ndim != 3:
        raise VisionError(f"{path} has shape {feats.shape}; image features must be 3-D (images, patches, dim), "
                          f"e.g. (n, 100, 256) for DETR, (n, 145, 1024) for ViT, (n, 49, 2048) for CLIP")
    if kind is not None:
        if kind not in REFERENCE_SHAPES:
            raise VisionError(f"kind={kind!r} is not one of {sorted(REFERENCE_SHAPES)}")
        if tuple(feats.shape[1:]) != REFERENCE_SHAPES[kind]:
            raise VisionError(f"{path} has per-image shape {tuple(feats.shape[1:])}, but {kind} features are "
                              f"{REFERENCE_SHAPES[kind]} (patches, dim); is this the {kind} file? Pass the right kind, "
                              f"or kind=None to accept any (patches, dim)")
    if name_map is None:
        name_map = path.with_name("name_map.json")
        if not name_map.is_file():
            raise VisionError(f"no name map for {path}: pass name_map= (a dict or JSON file of question id -> row); "
                              f"{name_map} does not exist")
    source = str(name_map) if not isinstance(name_map, dict) else "name_map"
    if not isinstance(name_map, dict):
        name_map = json.loads(Path(name_map).read_text())
    try:
        name_map = {str(k): int(v) for k, v in name_map.items()}
    except (TypeError, ValueError):
        raise VisionError(f"{source}: the name map must be {{question id: integer row}}") from None
    bad = {k: v for k, v in name_map.items() if not 0 <= v < feats.shape[0]}
    if bad:
        shown = ", ".join(f"{k}->{v}" for k, v in list(bad.items())[:5])
        raise VisionError(f"{source} names {len(bad)} row(s) outside the {feats.shape[0]} rows of {path}: {shown}")
    return ImageFeatureBank(feats, name_map, str(path))
