"""A synthetic captioned-image set drawn on the fly: coloured shapes, their counts and where they sit,
with a caption and questions for every picture. It serves the vision-language models (captions for
CLIP / CoCa, questions for VQA, captions of one kind as zero-shot labels) and text-to-image (caption ->
picture, and a judge that reads colour, shape and position back from `Scene.objects`).

Three kinds of scene:
  single  one shape                      "a red circle"
  pair    two different shapes, one      "a red circle above a blue square"
          beside or above the other      "a green triangle to the left of a yellow diamond"
  count   1 to 4 shapes of one kind      "three purple squares"

Every scene is a pure function of (seed, split, index): `SyntheticShapes(...)[i]` is the same picture on
every machine, in any order, and `scene.image(32)` / `scene.image(64)` draw the same scene at two sizes
(positions and sizes are stored as fractions of the picture). Splits:
  holdout="caption"  a caption (in its canonical form) is either a training caption or a held-out one,
                     decided by a hash of its text: the test split shares no caption with train (new
                     combinations of colours, shapes and relations that were seen separately);
  holdout="image"    the splits draw from separate random streams: new pictures, captions may repeat.

"A below B" and "B above A" describe the same picture; `Scene.canonical` rewrites every caption with
"above" / "to the left of" so that retrieval can count either as right.

    data = SyntheticShapes(1000, split="train", seed=0, image_size=32)
    scene = data[0]; scene.caption, scene.questions, scene.objects, data.image(0)  # (32, 32, 3) uint8
    batch = data.batch(range(8))  # {"images": (8, 3, 32, 32) float in [0, 1], "captions": [...]}
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .synthetic_science import COLOURS, NUMBER_WORDS, SyntheticDataError, canvas, draw_shape

SHAPES = ("circle", "square", "triangle", "diamond")
COLOUR_NAMES = tuple(COLOURS)  # red, green, blue, yellow, purple, orange
RELATIONS = ("above", "below", "to the left of", "to the right of")
KINDS = ("single", "pair", "count")
SPLITS = {"train": 0, "val": 1, "test": 2}
MAX_COUNT = 4


class ShapesError(SyntheticDataError):
    """A setting of the synthetic shapes set is out of range."""


@dataclass(frozen=True)
class Shape:
    """One drawn object: centre (x, y) and half-width r as fractions of the picture side (y grows downwards)."""
    shape: str
    colour: str
    x: float
    y: float
    r: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    kind: str
    objects: list  # [Shape]
    caption: str
    canonical: str  # the caption with "below" / "to the right of" turned round
    questions: list = field(default_factory=list)  # [(question, one-word answer)]
    relation: Optional[str] = None  # pair: how objects[0] sits relative to objects[1]
    background_seed: int = 0

    def image(self, size: int = 32) -> np.ndarray:
        """Draw the scene -> (size, size, 3) uint8 RGB."""
        if size < 16:
            raise ShapesError(f"image_size={size}: pictures need at least 16 pixels a side")
        img, draw = canvas(np.random.default_rng(self.background_seed), size)
        for o in self.objects:
            draw_shape(draw, o.shape, round(o.x * size), round(o.y * size), max(2, round(o.r * size)), COLOURS[o.colour])
        return np.asarray(img, dtype=np.uint8)


# ---------------------------------------------------------------------- captions
def _a(obj: str) -> str:
    return f"{'an' if obj[0] in 'aeiou' else 'a'} {obj}"


def single_caption(colour: str, shape: str) -> str:
    return _a(f"{colour} {shape}")


def plural(shape: str) -> str:
    return shape + "s"


def count_caption(n: int, colour: str, shape: str) -> str:
    return f"{NUMBER_WORDS[n]} {colour} {shape if n == 1 else plural(shape)}"


def pair_caption(first: str, relation: str, second: str) -> str:
    return f"{_a(first)} {relation} {_a(second)}"


def canonical_pair(first: str, relation: str, second: str) -> str:
    """One caption per picture: "B below A" -> "A above B", "B to the right of A" -> "A to the left of B"."""
    flip = {"below": "above", "to the right of": "to the left of"}
    if relation in flip:
        return pair_caption(second, flip[relation], first)
    return pair_caption(first, relation, second)


def all_captions(kinds: Sequence[str] = KINDS, canonical: bool = True) -> list[str]:
    """Every caption the generator can write for `kinds` (sorted), in canonical form by default:
    the candidate texts for retrieval and the label sets for zero-shot classification."""
    _check_kinds(kinds)
    objects = [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]
    out = set()
    if "single" in kinds:
        out.update(_a(o) for o in objects)
    if "pair" in kinds:
        rels = ("above", "to the left of") if canonical else RELATIONS
        out.update(pair_caption(a, r, b) for a in objects for b in objects if a != b for r in rels)
    if "count" in kinds:
        out.update(count_caption(n, c, s) for n in range(1, MAX_COUNT + 1) for c in COLOUR_NAMES for s in SHAPES)
    return sorted(out)


def shapes_tokenizer():
    """One token per caption word: <pad> = 0, </s> = 1 (end of text), <s> = 2 (start, for decoders)."""
    from ..tokenization import Tokenizer

    tok = Tokenizer.word_level(all_captions(canonical=False), special_tokens=("<pad>", "</s>", "<s>"))
    tok.bos_token = "<s>"
    return tok


# the words of the questions and of the VQA prompt formats (models/vqa.py: LLaVA-1.5's and BLIP-2's) captions lack
VQA_WORDS = "USER ASSISTANT Question Answer : ? . what colour is which shape how many shapes are there or"


def shapes_vqa_tokenizer():
    """One token per word of the captions, questions and VQA prompts, punctuation split off ("circle?" -> circle ?):
    <pad> 0, </s> 1, <s> 2, <image> 3 (the image placeholder)."""
    from tokenizers import pre_tokenizers

    from ..tokenization import Tokenizer

    tok = Tokenizer.word_level(all_captions(canonical=False) + [VQA_WORDS],
                               special_tokens=("<pad>", "</s>", "<s>", "<image>"))
    tok.backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def is_held_out(caption: str, share: float) -> bool:
    """A fixed hash of the text (zlib.crc32: the same in every process) puts `share` of all captions aside."""
    return zlib.crc32(caption.encode()) % 10_000 < share * 10_000


# ---------------------------------------------------------------------- scenes
def _single(rng) -> Scene:
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(COLOUR_NAMES))
    r = float(rng.uniform(0.16, 0.24))
    x, y = (float(rng.uniform(r + 0.04, 1 - r - 0.04)) for _ in range(2))
    o = Shape(shape, colour, x, y, r)
    caption = _a(o.name)
    qs = [(f"what colour is the {shape}?", colour), (f"which shape is {colour}?", shape),
          ("how many shapes are there?", "one")]
    return Scene("single", [o], caption, caption, qs)


def _pair(rng) -> Scene:
    names = [(str(c), str(s)) for c in COLOUR_NAMES for s in SHAPES]
    i, j = rng.choice(len(names), size=2, replace=False)
    (ca, sa), (cb, sb) = names[i], names[j]
    relation = str(rng.choice(RELATIONS))
    ra, rb = (float(rng.uniform(0.11, 0.16)) for _ in range(2))
    near, far = (float(rng.uniform(0.18, 0.34)), float(rng.uniform(0.66, 0.82)))  # along the relation's axis
    mid = float(rng.uniform(0.3, 0.7))
    off = float(rng.uniform(-0.12, 0.12))  # across it: small, so only one relation is true
    first_near = relation in ("above", "to the left of")
    pa, pb = (near, far) if first_near else (far, near)
    if relation in ("above", "below"):
        a, b = Shape(sa, ca, mid, pa, ra), Shape(sb, cb, mid + off, pb, rb)
    else:
        a, b = Shape(sa, ca, pa, mid, ra), Shape(sb, cb, pb, mid + off, rb)
    caption = pair_caption(a.name, relation, b.name)
    qs = [("how many shapes are there?", "two")]
    if sa != sb:
        qs += [(f"what colour is the {sa}?", ca), (f"what colour is the {sb}?", cb)]
    if ca != cb:
        qs += [(f"which shape is {ca}?", sa), (f"which shape is {cb}?", sb)]
    if relation in ("above", "below"):
        qs.append((f"is the {a.name} above or below the {b.name}?", relation))
    else:
        qs.append((f"is the {a.name} left or right of the {b.name}?", relation.split()[-2]))
    return Scene("pair", [a, b], caption, canonical_pair(a.name, relation, b.name), qs, relation=relation)


def _count(rng) -> Scene:
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(COLOUR_NAMES))
    n = int(rng.integers(1, MAX_COUNT + 1))
    r = float(rng.uniform(0.09, 0.13))
    cells = rng.choice(4, size=n, replace=False)  # one object per quarter of the picture
    objs = [Shape(shape, colour, float(0.25 + 0.5 * (c % 2) + rng.uniform(-0.06, 0.06)),
                  float(0.25 + 0.5 * (c // 2) + rng.uniform(-0.06, 0.06)), r) for c in sorted(cells)]
    caption = count_caption(n, colour, shape)
    qs = [(f"how many {plural(shape)} are there?", NUMBER_WORDS[n]), ("how many shapes are there?", NUMBER_WORDS[n]),
          (f"what colour {'is the ' + shape if n == 1 else 'are the ' + plural(shape)}?", colour)]
    return Scene("count", objs, caption, caption, qs)


MAKERS = {"single": _single, "pair": _pair, "count": _count}


def _check_kinds(kinds):
    unknown = [k for k in kinds if k not in MAKERS]
    if unknown or not kinds:
        raise ShapesError(f"kinds {list(kinds)}: each must be one of {list(KINDS)} (at least one)")


def make_scene(seed: int, split: str, index: int, kinds: Sequence[str] = KINDS, holdout: str = "caption",
               holdout_share: float = 0.2) -> Scene:
    """Scene number `index` of a split: a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    want_held_out = split == "test"
    kind = str(rng.choice(list(kinds)))  # first, so that every split has the kinds in the same shares
    for _ in range(1000):  # rejection: about 1 in 5 draws is a held-out caption
        scene = MAKERS[kind](rng)
        if holdout == "image" or is_held_out(scene.canonical, holdout_share) == want_held_out:
            scene.background_seed = int(rng.integers(2 ** 31))
            return scene
    raise ShapesError(f"no {split} caption among 1000 draws of kinds {list(kinds)} with holdout_share={holdout_share}")


class SyntheticShapes:
    """n scenes of one split. Indexing returns a Scene; `image(i)` draws it at this set's size."""

    def __init__(self, n: int, split: str = "train", seed: int = 0, image_size: int = 32,
                 kinds: Sequence[str] = KINDS, holdout: str = "caption", holdout_share: float = 0.2):
        if n < 1:
            raise ShapesError(f"n={n}: a set needs at least one scene")
        if split not in SPLITS:
            raise ShapesError(f"split={split!r} is not one of {list(SPLITS)}")
        if holdout not in ("caption", "image"):
            raise ShapesError(f"holdout={holdout!r} is not 'caption' (no caption shared with test) or 'image'")
        if not 0.0 < holdout_share < 1.0:
            raise ShapesError(f"holdout_share={holdout_share} must be in (0, 1)")
        if image_size < 16:
            raise ShapesError(f"image_size={image_size}: pictures need at least 16 pixels a side")
        _check_kinds(kinds)
        self.n, self.split, self.seed, self.image_size = n, split, seed, image_size
        self.kinds, self.holdout, self.holdout_share = tuple(kinds), holdout, holdout_share
        self._cache: dict = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Scene:
        if not -self.n <= i < self.n:
            raise IndexError(f"scene {i} of a set of {self.n}")
        i %= self.n
        if i not in self._cache:
            self._cache[i] = make_scene(self.seed, self.split, i, self.kinds, self.holdout, self.holdout_share)
        return self._cache[i]

    def image(self, i: int) -> np.ndarray:
        return self[i].image(self.image_size)

    def captions(self, canonical: bool = True) -> list[str]:
        """The distinct captions of this set's scenes, sorted."""
        return sorted({(s.canonical if canonical else s.caption) for s in (self[i] for i in range(self.n))})

    def possible_captions(self, canonical: bool = True) -> list[str]:
        """Every caption this split can hold (with holdout="caption", only this side of the hash)."""
        caps = all_captions(self.kinds, canonical=canonical)
        if self.holdout == "image":
            return caps
        held = self.split == "test"
        return [c for c in caps if is_held_out(canonical_of(c), self.holdout_share) == held]

    def batch(self, indices) -> dict:
        """{"images": (B, 3, S, S) float32 in [0, 1], "captions": [str], "scenes": [Scene]}."""
        import torch

        idx = list(indices)
        scenes = [self[i] for i in idx]
        pixels = np.stack([s.image(self.image_size) for s in scenes])  # (B, S, S, 3)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        return {"images": images, "captions": [s.caption for s in scenes], "scenes": scenes}


@functools.lru_cache(maxsize=1)
def _canonical_map() -> dict:
    objects = [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]
    return {pair_caption(a, r, b): canonical_pair(a, r, b) for a in objects for b in objects if a != b for r in RELATIONS}


def canonical_of(caption: str) -> str:
    """The canonical form of any caption the generator writes ("a b below a c" -> "a c above a b")."""
    return _canonical_map().get(caption, caption)
