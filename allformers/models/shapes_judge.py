"""The judge of the text-to-image benchmark: a small CNN that reads a synthetic-shapes picture
(data/synthetic_shapes.py) back into its canonical caption, so a generated picture can be scored
against the caption it was drawn for.

It reads the caption as fields, one classifier head each:

    kind      single / pair / count
    colour_a  shape_a   the object (single), the objects (count), the top or left one (pair)
    relation            pair: "above" or "to the left of" (the canonical relations)
    colour_b  shape_b   pair: the other object
    count               count: 1 to 4

and writes them back as a caption with the generator's own grammar, so "a green circle below a red
square" is read as "a red square above a green circle". A generated picture matches its caption
when the judge's caption equals the caption's canonical form, every field right.

Heads that a kind does not use are not trained on it (their target is -100).

CaptionParser is the same reading done from the caption's words instead of its picture: the
latent diffusion recipe pretrains its caption encoder that way (text only), then freezes it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, SavedConfig
from ..data.synthetic_shapes import (COLOUR_NAMES, KINDS, MAX_COUNT, SHAPES, Scene, canonical_of, count_caption,
                                     pair_caption, single_caption)
from ..errors import ConfigError
from ..blocks.conv import ImageShapeError
from .heads import pool
from .lm import TransformerLM

IGNORE = -100
CANONICAL_RELATIONS = ("above", "to the left of")
FIELDS = {"kind": KINDS, "colour_a": COLOUR_NAMES, "shape_a": SHAPES, "relation": CANONICAL_RELATIONS,
          "colour_b": COLOUR_NAMES, "shape_b": SHAPES, "count": tuple(range(1, MAX_COUNT + 1))}


def scene_fields(scene: Scene) -> dict:
    """A scene -> {field: class index} of its canonical caption (-100 for fields its kind lacks)."""
    f = {name: IGNORE for name in FIELDS}
    f["kind"] = KINDS.index(scene.kind)
    first = scene.objects[0]
    if scene.kind == "pair":
        flipped = scene.relation in ("below", "to the right of")
        first, second = (scene.objects[1], scene.objects[0]) if flipped else (scene.objects[0], scene.objects[1])
        f["relation"] = 0 if scene.relation in ("above", "below") else 1
        f["colour_b"], f["shape_b"] = COLOUR_NAMES.index(second.colour), SHAPES.index(second.shape)
    if scene.kind == "count":
        f["count"] = len(scene.objects) - 1
    f["colour_a"], f["shape_a"] = COLOUR_NAMES.index(first.colour), SHAPES.index(first.shape)
    return f


def caption_of_fields(f: dict) -> str:
    """{field: class index} -> the canonical caption they spell (the inverse of scene_fields)."""
    kind = KINDS[f["kind"]]
    a = f"{COLOUR_NAMES[f['colour_a']]} {SHAPES[f['shape_a']]}"
    if kind == "single":
        return single_caption(COLOUR_NAMES[f["colour_a"]], SHAPES[f["shape_a"]])
    if kind == "count":
        return count_caption(f["count"] + 1, COLOUR_NAMES[f["colour_a"]], SHAPES[f["shape_a"]])
    b = f"{COLOUR_NAMES[f['colour_b']]} {SHAPES[f['shape_b']]}"
    return pair_caption(a, CANONICAL_RELATIONS[f["relation"]], b)


@dataclass
class JudgeConfig(SavedConfig):
    image_size: int = 32  # pictures of another size are resized to this (bilinear) before reading
    channels: tuple = (32, 64, 64)  # conv widths; each level after the first halves the resolution
    hidden: int = 256  # the MLP between the flattened features and the heads
    dropout: float = 0.1

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ConfigError(f"image_size={self.image_size} must be divisible by 2^{len(self.channels) - 1} "
                              f"(one halving per conv level after the first)")


class ShapesJudge(nn.Module):
    """(B, 3, H, W) pictures in [0, 1] -> {field: (B, classes) logits}. The features are flattened,
    not pooled: where an object is (top / left) is part of the answer."""

    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = c = config
        layers, inp = [], 3
        for i, ch in enumerate(c.channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(inp, ch, 3, stride=stride, padding=1), nn.GroupNorm(8, ch), nn.SiLU(),
                       nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(8, ch), nn.SiLU()]
            inp = ch
        self.features = nn.Sequential(*layers)
        side = c.image_size // 2 ** (len(c.channels) - 1)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Dropout(c.dropout), nn.Linear(inp * side * side, c.hidden), nn.SiLU(),
                                 nn.Dropout(c.dropout))
        self.heads = nn.ModuleDict({name: nn.Linear(c.hidden, len(classes)) for name, classes in FIELDS.items()})

    @property
    def device(self):
        return next(self.parameters()).device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, images: torch.Tensor) -> dict:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ImageShapeError(f"the judge reads (B, 3, H, W) pictures in [0, 1]; got shape {tuple(images.shape)}")
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        h = self.mlp(self.features(images * 2 - 1))
        return {name: head(h) for name, head in self.heads.items()}

    def loss(self, images: torch.Tensor, targets: dict) -> torch.Tensor:
        """Summed cross-entropy of the heads, each over the pictures whose kind uses it."""
        return _fields_loss(self(images), targets)

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 256) -> list[str]:
        """Pictures -> the canonical caption the judge reads in each."""
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(images), batch_size):
            out += _captions_of_logits(self(images[i:i + batch_size].to(self.device).float()))
        self.train(was)
        return out

    def match(self, images: torch.Tensor, captions: list[str]) -> list[bool]:
        """Does each picture show its caption (any of the generator's wordings)?"""
        return [r == canonical_of(c) for r, c in zip(self.read(images), captions)]

    def accuracy(self, images: torch.Tensor, captions: list[str]) -> float:
        m = self.match(images, captions)
        return sum(m) / max(1, len(m))

    def save(self, path):
        from ..checkpoints.io import save

        return save(self, path)


class CaptionParser(nn.Module):
    """The judge's text-side twin: caption ids (B, L) -> {field: (B, classes) logits}, read from the
    masked mean of a bidirectional TransformerLM's states (the pooled vector TextToImage gives its
    U-Net with pooled_text). Trained on captions alone, it teaches the encoder to put each word's
    role in its state: "red" in "a blue square below a red circle" is the top object's colour. The
    latent diffusion recipe then freezes that encoder and conditions on it."""

    def __init__(self, encoder: Config):
        super().__init__()
        if encoder.causal or encoder.lm_head:
            raise ConfigError("the caption parser reads a bidirectional encoder's states: set causal=False, lm_head=False")
        self.encoder = TransformerLM(encoder)
        self.heads = nn.ModuleDict({name: nn.Linear(encoder.n_embd, len(classes)) for name, classes in FIELDS.items()})

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        states = self.encoder(input_ids, attention_mask=attention_mask, return_hidden=True)  # (B, L, D)
        pooled = pool(states, attention_mask, "mean")  # (B, D) over the real tokens
        return {name: head(pooled) for name, head in self.heads.items()}

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: dict) -> torch.Tensor:
        """Summed cross-entropy of the heads, each over the captions whose kind uses it."""
        return _fields_loss(self(input_ids, attention_mask), targets)

    @torch.no_grad()
    def read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """Caption ids -> the canonical caption the parser reads in each."""
        was = self.training
        self.eval()
        out = _captions_of_logits(self(input_ids, attention_mask))
        self.train(was)
        return out


def _fields_loss(logits: dict, targets: dict) -> torch.Tensor:
    total = next(iter(logits.values())).new_zeros(())
    for name, lg in logits.items():
        t = targets[name]
        if bool((t != IGNORE).any()):
            total = total + F.cross_entropy(lg.float(), t, ignore_index=IGNORE)
    return total


def _captions_of_logits(logits: dict) -> list[str]:
    best = {k: v.argmax(-1).tolist() for k, v in logits.items()}
    return [caption_of_fields({k: best[k][j] for k in FIELDS}) for j in range(len(best["kind"]))]


def fields_tensor(scenes: list) -> dict:
    """Scenes -> {field: (B,) long targets} for ShapesJudge.loss."""
    rows = [scene_fields(s) for s in scenes]
    return {name: torch.tensor([r[name] for r in rows], dtype=torch.long) for name in FIELDS}


def judge_report(judge: ShapesJudge, images: torch.Tensor, scenes: list, per_kind: bool = True) -> dict:
    """Exact-caption accuracy (and per field, and per kind) of the judge on pictures with known scenes."""
    read = judge.read(images)
    truth = [s.canonical for s in scenes]
    out = {"accuracy": sum(r == t for r, t in zip(read, truth)) / len(truth), "n": len(truth)}
    if per_kind:
        for kind in KINDS:
            idx = [i for i, s in enumerate(scenes) if s.kind == kind]
            if idx:
                out[f"accuracy_{kind}"] = sum(read[i] == truth[i] for i in idx) / len(idx)
    return out
