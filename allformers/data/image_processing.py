"""Pictures -> the normalised pixel tensor a vision tower reads, with the numbers Hugging Face's image
processors give (CLIPImageProcessor, SiglipImageProcessor, BitImageProcessor as DINOv2 uses it).

The steps, in their order and with their arithmetic:
  1. RGB: a picture with transparency is composited onto white, any other mode converted with PIL;
  2. resize with PIL (`Image.resize`, the processor's filter, default bicubic) either so that the shorter
     side becomes `shortest_edge` (the longer one int(shortest_edge * long / short), truncated) or to
     exactly (height, width);
  3. centre crop to `crop` (top = (H - h) // 2, left = (W - w) // 2; a smaller picture is padded with 0);
  4. rescale: float64 * rescale_factor (1/255), then float32;
  5. normalise: (x - mean) / std per channel, in float32.
Using PIL the same way as the reference means the resampling agrees exactly, not approximately.

    proc = ImageProcessor.from_name("clip")
    pixel_values = proc([Image.open("cat.jpg"), np_array_uint8])  # (B, 3, 224, 224) float32
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import AllformersError

OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}  # PIL's numbers


class ImageProcessingError(AllformersError, ValueError):
    """A picture cannot be read, or a processor setting is out of range."""


@dataclass(frozen=True)
class ImageProcessor:
    shortest_edge: Optional[int] = 224  # resize so the shorter side has this length ...
    size: Optional[tuple] = None  # ... or to exactly (height, width)
    crop: Optional[tuple] = (224, 224)  # centre crop (height, width); None: no crop
    resample: str = "bicubic"
    rescale_factor: Optional[float] = 1 / 255  # None: no rescaling
    mean: Optional[tuple] = OPENAI_CLIP_MEAN  # None: no normalisation
    std: Optional[tuple] = OPENAI_CLIP_STD
    convert_rgb: bool = True

    def __post_init__(self):
        if self.resample not in RESAMPLE:
            raise ImageProcessingError(f"resample={self.resample!r} is not one of {list(RESAMPLE)}")
        if self.shortest_edge is not None and self.size is not None:
            raise ImageProcessingError("give shortest_edge (keep the aspect ratio) or size (height, width), not both")
        if (self.mean is None) != (self.std is None):
            raise ImageProcessingError("normalising needs both mean and std (or neither)")
        for name in ("size", "crop"):
            v = getattr(self, name)
            if v is not None and (len(v) != 2 or min(v) <= 0):
                raise ImageProcessingError(f"{name}={v!r} must be (height, width), both positive")

    # ---------------------------------------------------------------- the steps
    def resize_to(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the picture after the resize step."""
        if self.size is not None:
            return int(self.size[1]), int(self.size[0])
        if self.shortest_edge is None:
            return width, height
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def process_one(self, image) -> np.ndarray:
        """One picture (PIL image, (H, W, C) uint8 array or a file path) -> (C, H, W) float32."""
        img = to_pil(image)
        if self.convert_rgb:
            img = to_rgb(img)
        new = self.resize_to(*img.size)
        if new != img.size:
            img = img.resize(new, resample=RESAMPLE[self.resample])
        x = np.asarray(img)
        x = (x[..., None] if x.ndim == 2 else x).transpose(2, 0, 1)  # (C, H, W)
        if self.crop is not None:
            x = center_crop(x, *self.crop)
        if self.rescale_factor is not None:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.mean is not None:
            if len(self.mean) != x.shape[0] or len(self.std) != x.shape[0]:
                raise ImageProcessingError(f"mean/std have {len(self.mean)} values for a {x.shape[0]}-channel picture")
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            mean, std = np.asarray(self.mean, dtype=x.dtype), np.asarray(self.std, dtype=x.dtype)
            x = ((x.T - mean) / std).T
        return x

    def __call__(self, images) -> "torch.Tensor":  # noqa: F821
        """One picture or a list of them -> pixel_values (B, C, H, W) float32 (all must come out one size)."""
        import torch

        if not isinstance(images, (list, tuple)):
            images = [images]
        arrays = [self.process_one(im) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ImageProcessingError(f"the pictures come out in different sizes {sorted(shapes)}; give the processor "
                                       f"a crop or a fixed size to batch them")
        return torch.from_numpy(np.stack(arrays).astype(np.float32))

    # ---------------------------------------------------------------- presets and HF files
    @classmethod
    def from_name(cls, name: str, **overrides) -> "ImageProcessor":
        if name not in PRESETS:
            raise ImageProcessingError(f"no image processor preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, d: Union[dict, str, Path]) -> "ImageProcessor":
        """From a preprocessor_config.json (a path, its folder or the dict)."""
        if not isinstance(d, dict):
            p = Path(d)
            d = json.loads((p / "preprocessor_config.json" if p.is_dir() else p).read_text())
        size, crop = d.get("size") or {}, d.get("crop_size") or {}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        names = {v: k for k, v in RESAMPLE.items()}
        return cls(shortest_edge=size.get("shortest_edge") if d.get("do_resize", True) else None,
                   size=(size["height"], size["width"]) if d.get("do_resize", True) and "height" in size else None,
                   crop=(crop["height"], crop["width"]) if d.get("do_center_crop") and crop else None,
                   resample=names[int(d.get("resample", 3))],
                   rescale_factor=d.get("rescale_factor", 1 / 255) if d.get("do_rescale", True) else None,
                   mean=tuple(d["image_mean"]) if d.get("do_normalize", True) else None,
                   std=tuple(d["image_std"]) if d.get("do_normalize", True) else None,
                   convert_rgb=d.get("do_convert_rgb", True))

    def to_hf(self) -> dict:
        """A preprocessor_config.json dict with the same numbers (for the given HF image processor class)."""
        size = ({"shortest_edge": self.shortest_edge} if self.shortest_edge is not None else
                {"height": self.size[0], "width": self.size[1]} if self.size is not None else None)
        d = {"do_resize": size is not None, "size": size, "resample": RESAMPLE[self.resample],
             "do_center_crop": self.crop is not None, "do_rescale": self.rescale_factor is not None,
             "rescale_factor": self.rescale_factor if self.rescale_factor is not None else 1 / 255,
             "do_normalize": self.mean is not None, "do_convert_rgb": self.convert_rgb}
        if self.crop is not None:
            d["crop_size"] = {"height": self.crop[0], "width": self.crop[1]}
        if self.mean is not None:
            d.update(image_mean=list(self.mean), image_std=list(self.std))
        return d

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS = {
    "clip": dict(),  # CLIPImageProcessor: shorter side 224, centre crop 224, bicubic, OpenAI's mean/std
    "siglip": dict(shortest_edge=None, size=(224, 224), crop=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "dinov2": dict(shortest_edge=256, crop=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD),  # BitImageProcessor
    # the synthetic 32x32 / 64x64 shapes: no resize, CLIP's normalisation
    "shapes": dict(shortest_edge=None, crop=None),
}


# ---------------------------------------------------------------------- helpers
def to_pil(image):
    """A PIL image, an (H, W[, C]) uint8 array or a file path -> PIL image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        p = Path(image)
        if not p.is_file():
            raise ImageProcessingError(f"picture {p} does not exist")
        try:
            with Image.open(p) as im:
                im.load()
                return im
        except (UnidentifiedImageError, OSError) as e:
            raise ImageProcessingError(f"{p} is not a picture PIL can read ({e})") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ImageProcessingError(f"an array picture must be (H, W) or (H, W, 1|3|4) uint8, got {image.shape} "
                                       f"{image.dtype}")
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    raise ImageProcessingError(f"cannot read a picture from {type(image).__name__}; pass a PIL image, a uint8 array "
                               f"or a file path")


def to_rgb(img):
    """Transparency composited onto white (as transformers' convert_to_rgb), any other mode converted."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) -> (C, height, width) from the middle; a picture smaller than the crop is padded with 0 first."""
    C, H, W = x.shape
    if H < height or W < width:
        ph, pw = max(height, H), max(width, W)
        padded = np.zeros((C, ph, pw), dtype=x.dtype)
        top, left = -(-(ph - H) // 2), -(-(pw - W) // 2)  # ceil, as the reference
        padded[:, top:top + H, left:left + W] = x
        x, H, W = padded, ph, pw
    top, left = (H - height) // 2, (W - width) // 2
    return x[:, top:top + height, left:left + width]
