"""Text-to-image recipes on the synthetic captioned shapes (data/synthetic_shapes.py), sized for a
2-core CPU: a judge that reads pictures back into captions, the two image autoencoders, and the four
systems (DALL-E, GLIDE, latent diffusion, Imagen) trained on the training captions and scored by
the judge on captions none of them saw (the caption-disjoint test split).

    from allformers.recipes import run_recipe
    run_recipe("glide-shapes", out="runs/glide-shapes")     # judge + GLIDE, trained, scored, saved
    (or: allformers train --recipe glide-shapes; allformers imagine --model glide-shapes "a red circle")

Pieces, usable one by one (benchmarks/bench_text_to_image.py chains them, sharing data and judge):
  * `render_shapes`: a split drawn once into uint8 tensors at the sizes asked (32 and 16 pixels);
    `TensorBatches`: random rows of such tensors, the Trainer's data source.
  * `train_judge` / `judge_on`: the ShapesJudge trained on every caption (image hold-out: it is a
    measuring instrument, not a generator), its own accuracy on new pictures at both sizes.
  * `train_autoencoder` ("vq", "dvae" or "kl") with its held-out reconstruction MSE; `image_codes` and
    `posterior_stats` precompute what DALL-E and latent diffusion train on.
  * `train_caption_parser`: latent diffusion's caption encoder, pretrained on the training captions alone
    to read each into the scene's fields (a CaptionParser), then frozen.
  * `train_dalle`, `train_diffusion` (GLIDE / LDM / Imagen's base), `train_super_res` (Imagen's second
    stage), `pretrain_text_encoder` (Imagen's T5, span corruption on captions + State of the Union text).
  * `caption_match`: generate a picture per held-out caption, the judge's exact-caption accuracy.

The recipes (shapes-judge, dalle-shapes, glide-shapes, ldm-shapes, imagen-shapes) are
TextToImageRecipe entries of the one registry: every field of T2ISettings (sizes, each stage's
TrainConfig) is a setting `--set` can change (`--set glide.max_steps=500`, `--set quick=true`)."""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config
from ..data.synthetic_shapes import KINDS, SyntheticShapes, all_captions
from ..errors import AllformersError
from ..models.shapes_judge import JudgeConfig, ShapesJudge, fields_tensor, judge_report
from ..training.trainer import TrainConfig, Trainer
from .registry import Recipe, register


class TextToImageError(AllformersError, ValueError):
    """A text-to-image recipe setting is out of range or a needed part is missing."""


# ---------------------------------------------------------------------- data
@dataclass
class ShapesData:
    """A split drawn once: its scenes, captions (as written) and pictures per size, uint8 (N, 3, S, S)."""
    scenes: list
    captions: list
    images: dict  # size -> uint8 tensor

    def __len__(self):
        return len(self.scenes)


def render_shapes(n: int, split: str = "train", seed: int = 0, sizes: Sequence[int] = (32,),
                  holdout: str = "caption", kinds: Sequence[str] = KINDS) -> ShapesData:
    """n scenes of a split drawn at every size in `sizes` (the same scene at each: positions are fractions)."""
    data = SyntheticShapes(n, split=split, seed=seed, image_size=max(sizes), kinds=kinds, holdout=holdout)
    scenes = [data[i] for i in range(n)]
    images = {s: torch.from_numpy(np.stack([sc.image(s) for sc in scenes])).permute(0, 3, 1, 2).contiguous()
              for s in sizes}
    return ShapesData(scenes, [sc.caption for sc in scenes], images)


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 pictures -> float in [-1, 1] (what the autoencoders and the diffusion models read)."""
    return images.float() / 127.5 - 1.0


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 pictures -> float in [0, 1] (what the judge reads)."""
    return images.float() / 255.0


class TensorBatches:
    """The Trainer's data source over named tensors of equal length: sample(n) draws n random rows
    (with a transform applied to the batch), reproducibly from its own generator."""

    def __init__(self, tensors: dict, seed: int = 0, transform: Optional[Callable[[dict], dict]] = None,
                 weights: Optional[torch.Tensor] = None):
        lengths = {len(v) for v in tensors.values()}
        if len(lengths) != 1:
            raise TextToImageError(f"tensors of unequal lengths {sorted(lengths)}: every entry needs one row per example")
        self.tensors, self.n, self.transform = tensors, lengths.pop(), transform
        if weights is not None and (len(weights) != self.n or not (weights >= 0).all() or not weights.sum() > 0):
            raise TextToImageError(f"weights must be {self.n} non-negative numbers, not all 0 (one per row)")
        self.weights = weights.double() if weights is not None else None  # None: uniform rows; else drawn in
        # proportion to them (with replacement)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return self.n

    def rows(self, idx: torch.Tensor) -> dict:
        batch = {k: v[idx] for k, v in self.tensors.items()}
        return self.transform(batch) if self.transform else batch

    def sample(self, n: int) -> dict:
        if self.weights is not None:
            return self.rows(torch.multinomial(self.weights, n, replacement=True, generator=self.generator))
        return self.rows(torch.randint(0, self.n, (n,), generator=self.generator))

    def fixed_batches(self, batch_size: int, n_batches: int) -> list:
        """The first n_batches * batch_size rows in order (the same evaluation batches every time)."""
        return [self.rows(torch.arange(i * batch_size, min((i + 1) * batch_size, self.n)))
                for i in range(min(n_batches, -(-self.n // batch_size)))]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict):
        self.generator.set_state(state["generator"])


def caption_tokenizer():
    """One word per token over every word the captions use (<pad> = 0, </s> = 1)."""
    from ..tokenization import Tokenizer

    return Tokenizer.word_level(all_captions(canonical=False))


def caption_ids(tokenizer, captions: list, length: int) -> dict:
    ids, mask = tokenizer.encode_padded(captions, length)
    return {"input_ids": ids, "attention_mask": mask}


def fit(model, loss_fn, data, cfg: TrainConfig, *, eval_data=None, out=None, progress: bool = True,
        tokenizer=None, eval_metrics=None) -> dict:
    """One Trainer run; `loss_fn(model, batch)`. Returns its summary with the images/s it trained at."""
    trainer = Trainer(model, loss_fn, data, cfg, eval_data=eval_data, out=out, progress=progress,
                      tokenizer=tokenizer, eval_metrics=eval_metrics)
    summary = trainer.fit()
    summary["examples_per_s"] = cfg.max_steps * cfg.batch_size / summary["train_time_s"] if summary["train_time_s"] else None
    summary.pop("tokens_per_s", None)
    summary.pop("mfu", None)
    return summary


class ExamplesLoss:
    """A loss_fn whose 'tokens' are examples (the Trainer's counter: images per second, not pixels)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, model, batch):
        return self.fn(model, batch)

    @staticmethod
    def num_tokens(batch) -> int:
        return len(next(iter(batch.values())))


# ---------------------------------------------------------------------- the judge
JUDGE = JudgeConfig(image_size=32, channels=(16, 32, 64), hidden=256, dropout=0.1)
JUDGE_TRAIN = TrainConfig(max_steps=900, batch_size=64, lr=2e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.05,
                          beta2=0.99, grad_clip=1.0, eval_interval=0, eval_at_start=False, log_interval=25,
                          checkpoint=False)
JUDGE_SEED = 1000  # its own pictures: never the generators' training pictures


def judge_inputs(images32: torch.Tensor, images16: torch.Tensor, generator: torch.Generator,
                 low_res_share: float = 0.5, max_noise: float = 0.06) -> torch.Tensor:
    """What the judge trains on: the 32-pixel drawing, or (low_res_share of the time) the 16-pixel one
    upsampled as the judge upsamples, plus a little Gaussian noise, so generated pictures of either
    size and with a generator's grain read the same."""
    x = to_unit(images32)
    low = F.interpolate(to_unit(images16), size=x.shape[-2:], mode="bilinear", align_corners=False)
    pick = (torch.rand(len(x), generator=generator) < low_res_share)[:, None, None, None]
    x = torch.where(pick, low, x)
    sigma = torch.rand(len(x), 1, 1, 1, generator=generator) * max_noise
    return (x + sigma * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def train_judge(n_train: int = 20000, cfg: TrainConfig = JUDGE_TRAIN, *, config: JudgeConfig = JUDGE,
                seed: int = JUDGE_SEED, n_test: int = 1000, progress: bool = True, out=None) -> tuple:
    """Train the judge on n_train pictures of every caption; -> (judge, report with its own accuracy
    on n_test new pictures drawn at 32 and at 16 pixels)."""
    t0 = time.perf_counter()
    data = render_shapes(n_train, "train", seed, sizes=(32, 16), holdout="image")
    targets = fields_tensor(data.scenes)
    gen = torch.Generator().manual_seed(seed)
    batches = TensorBatches({"i32": data.images[32], "i16": data.images[16], **targets}, seed=seed,
                            transform=lambda b: {"images": judge_inputs(b.pop("i32"), b.pop("i16"), gen), **b})
    torch.manual_seed(seed)
    judge = ShapesJudge(config)
    summary = fit(judge, ExamplesLoss(lambda m, b: m.loss(b["images"], {k: b[k] for k in targets})), batches,
                  cfg.replace(seed=seed), progress=progress)
    judge.eval()
    report = {"params": judge.num_params(), "train_s": time.perf_counter() - t0, "fit": summary,
              **judge_on(judge, n_test, seed=seed)}
    if out is not None:
        judge.save(out)
    return judge, report


def judge_on(judge: ShapesJudge, n: int = 1000, seed: int = JUDGE_SEED) -> dict:
    """The judge's own accuracy on n new pictures (the test split, image hold-out) drawn at 32 and 16 pixels."""
    test = render_shapes(n, "test", seed, sizes=(32, 16), holdout="image")
    r32 = judge_report(judge, to_unit(test.images[32]), test.scenes)
    r16 = judge_report(judge, to_unit(test.images[16]), test.scenes)
    return {"accuracy_32": r32.pop("accuracy"), "accuracy_16": r16.pop("accuracy"), "n_test": n,
            **{f"{k}_32": v for k, v in r32.items() if k.startswith("accuracy_")},
            **{f"{k}_16": v for k, v in r16.items() if k.startswith("accuracy_")}}


# ---------------------------------------------------------------------- image autoencoders
def autoencoder_config(kind: str, **overrides):
    """The recipes' autoencoders: 32-pixel pictures -> an 8 x 8 grid (three levels, 4x downsampling):
    4 latent channels (kl), or one of num_codes codes per cell (vq, dvae)."""
    from ..models.autoencoders import AutoencoderConfig

    base = dict(kind=kind, block_channels=(16, 32, 64), layers_per_block=1, norm_groups=8, mid_attention=False,
                sample_size=32, latent_channels=4)
    if kind in ("vq", "dvae"):
        base.update(num_codes=256, code_dim=32, latent_channels=32)
    if kind == "dvae":
        base.update(temperature=1.0, straight_through=False)
    return AutoencoderConfig(**{**base, **overrides})


AE_TRAIN = TrainConfig(max_steps=700, batch_size=32, lr=2e-3, min_lr=1e-4, warmup_steps=30, weight_decay=0.0,
                       beta2=0.99, grad_clip=1.0, eval_interval=0, eval_at_start=False, log_interval=25,
                       checkpoint=False)
KL_WEIGHT = 1e-5  # latent diffusion keeps the KL small: a detailed latent, then rescaled to unit variance


@torch.no_grad()
def revive_codes(vq, images: torch.Tensor, generator: torch.Generator, min_use: int = 1) -> int:
    """Codes no encoder output chose over `images` are moved onto random encoder outputs (a standard
    fix for codebook collapse: otherwise most of a fresh codebook is never used). -> codes moved."""
    z = vq.encode(images).permute(0, 2, 3, 1).reshape(-1, vq.config.code_dim)
    q = vq.quantize
    counts = torch.bincount(torch.cdist(z, q.embedding.weight).argmin(1), minlength=q.num_codes)
    dead = (counts < min_use).nonzero().flatten()
    if len(dead):
        pick = torch.randint(0, len(z), (len(dead),), generator=generator)
        q.embedding.weight[dead] = z[pick] + 0.01 * torch.randn(len(dead), z.shape[1], generator=generator)
    return len(dead)


def _dvae_schedule(step: int, total: int) -> tuple[float, float]:
    """DALL-E's dVAE schedule, shortened: temperature 1 -> 1/16 and KL weight 0 -> 1 over the run."""
    frac = min(1.0, step / max(1, total))
    return float(16 ** -frac), frac


def train_autoencoder(kind: str, images: torch.Tensor, cfg: TrainConfig = AE_TRAIN, *, config=None,
                      heldout: Optional[torch.Tensor] = None, seed: int = 0, progress: bool = True,
                      revive_every: int = 100, out=None) -> tuple:
    """Train an autoencoder on uint8 pictures (N, 3, 32, 32) -> (model, {"mse": held-out reconstruction MSE in
    [-1, 1] units, "codes_used": ...}). VQ: dead codes are revived every `revive_every` steps (first half)."""
    from ..models.autoencoders import build_autoencoder

    config = config or autoencoder_config(kind)
    torch.manual_seed(seed)
    model = build_autoencoder(config)
    gen = torch.Generator().manual_seed(seed)
    data = TensorBatches({"images": images}, seed=seed, transform=lambda b: {"images": to_signed(b["images"])})
    state = {"step": 0}

    def loss_fn(m, batch):
        x = batch["images"]
        if kind == "kl":
            return m.loss(x, kl_weight=KL_WEIGHT)
        if kind == "vq":
            if m.training and revive_every and state["step"] % revive_every == 0 and state["step"] < cfg.max_steps // 2:
                revive_codes(m, x, gen)
            state["step"] += m.training
            return m.loss(x)
        temperature, kl_weight = _dvae_schedule(state["step"], cfg.max_steps)
        state["step"] += m.training
        return m.loss(x, kl_weight=kl_weight, temperature=temperature)

    t0 = time.perf_counter()
    summary = fit(model, ExamplesLoss(loss_fn), data, cfg.replace(seed=seed), progress=progress, out=out)
    model.eval()
    report = {"kind": kind, "params": model.num_params(), "train_s": time.perf_counter() - t0,
              "examples_per_s": summary["examples_per_s"], "final_loss": summary["loss"]}
    if heldout is not None:
        report.update(reconstruction(model, heldout))
    return model, report


@torch.no_grad()
def reconstruct(model, x: torch.Tensor) -> torch.Tensor:
    """Pictures in [-1, 1] -> the autoencoder's reconstruction (deterministic: posterior mean, nearest / argmax code)."""
    kind = model.config.kind
    if kind == "kl":
        return model.decode(model.encode(x).mode())
    if kind == "vq":
        return model.decode_ids(model.encode_ids(x))
    return model.decode(model.encode(x))


@torch.no_grad()
def reconstruction(model, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Held-out reconstruction MSE (pictures in [-1, 1]) and, for codes, how many of the codebook are used."""
    se, n, used = 0.0, 0, set()
    for i in range(0, len(images), batch_size):
        x = to_signed(images[i:i + batch_size])
        se += float(((reconstruct(model, x) - x) ** 2).sum())
        n += x.numel()
        if model.config.kind == "vq":
            used.update(model.encode_ids(x).unique().tolist())
        elif model.config.kind == "dvae":
            used.update(model.encode(x).unique().tolist())
    out = {"mse": se / n}
    if used:
        out["codes_used"] = len(used)
    return out


@torch.no_grad()
def image_codes(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 pictures -> (N, h, w) code ids of a "vq" or "dvae" autoencoder (what DALL-E models)."""
    enc = model.encode_ids if model.config.kind == "vq" else model.encode
    return torch.cat([enc(to_signed(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def posterior_stats(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pictures -> the KL autoencoder's posterior (mean, std), each (N, C, h, w), computed once so
    latent diffusion's training never runs the encoder."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        post = vae.encode(to_signed(images[i:i + batch_size]))
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling(vae, mean: torch.Tensor) -> float:
    """Latent diffusion's scaling factor: 1 / the standard deviation of the training latents, so the
    diffusion model sees unit-variance inputs (Stable Diffusion's 0.18215 came from the same rule)."""
    return float(1.0 / mean.float().std())


# ---------------------------------------------------------------------- DALL-E
def dalle_config(tokenizer, vq, **overrides):
    from ..models.dalle import DALLEConfig

    base = dict(text_vocab_size=tokenizer.vocab_size, text_length=12, pad_id=tokenizer.pad_id,
                image_vocab_size=vq.config.num_codes, grid=32 // vq.config.downsampling, n_layer=4, n_head=4,
                n_embd=128, dropout=0.0, autoencoder=vq.config)
    return DALLEConfig(**{**base, **overrides})


DALLE_TRAIN = TrainConfig(max_steps=2500, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.05,
                          beta2=0.98, grad_clip=1.0, eval_interval=0, eval_at_start=False, log_interval=50,
                          checkpoint=False)


def train_dalle(vq, tokenizer, data: ShapesData, cfg: TrainConfig = DALLE_TRAIN, *, config=None, seed: int = 0,
                progress: bool = True, codes: Optional[torch.Tensor] = None) -> tuple:
    """DALL-E over (caption, the VQ/dVAE codes of its picture) pairs -> (model, report)."""
    from ..models.dalle import DALLE

    config = config or dalle_config(tokenizer, vq)
    torch.manual_seed(seed)
    model = DALLE(config)
    model.vae.load_state_dict(vq.state_dict())
    t0 = time.perf_counter()
    codes = codes if codes is not None else image_codes(vq, data.images[32])
    text = caption_ids(tokenizer, data.captions, config.text_length)["input_ids"]
    batches = TensorBatches({"text": text, "codes": codes}, seed=seed)
    summary = fit(model, ExamplesLoss(lambda m, b: m.loss(b["text"], b["codes"], return_parts=True)), batches,
                  cfg.replace(seed=seed), progress=progress)
    model.eval()
    return model, {"params": model.num_params(), "train_s": time.perf_counter() - t0,
                   "examples_per_s": summary["examples_per_s"], "final_loss": summary["loss"]}


# ---------------------------------------------------------------------- diffusion: GLIDE, LDM, Imagen
def text_encoder_config(vocab_size: int, length: int = 12, n_layer: int = 2, n_embd: int = 64, n_head: int = 4) -> Config:
    """A small bidirectional transformer over caption tokens (GLIDE's and latent diffusion's, trained with the U-Net)."""
    return Config(name="caption-encoder", family="encoder", vocab_size=vocab_size, block_size=length,
                  n_layer=n_layer, n_head=n_head, n_embd=n_embd, causal=False, lm_head=False, dropout=0.0)


PARSER_TRAIN = TrainConfig(max_steps=1500, batch_size=256, lr=2e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.0,
                           beta2=0.99, grad_clip=1.0, eval_interval=0, eval_at_start=False, log_interval=50,
                           checkpoint=False)


def train_caption_parser(tokenizer, data: ShapesData, encoder: Config, cfg: TrainConfig = PARSER_TRAIN, *,
                         heldout: Optional[list] = None, length: int = 12, seed: int = 0,
                         progress: bool = True) -> tuple:
    """Pretrain a caption encoder on text alone: a CaptionParser reads each training caption into the
    scene's fields (kind, the top or left object's colour and shape, the relation, the other object,
    the count). -> (parser, report); `heldout` scenes give the share of their captions read exactly
    (captions no part of the run trained on). The pictures play no part."""
    from ..models.shapes_judge import CaptionParser

    t0 = time.perf_counter()
    targets = fields_tensor(data.scenes)
    batches = TensorBatches({**caption_ids(tokenizer, data.captions, length), **targets}, seed=seed)
    torch.manual_seed(seed)
    parser = CaptionParser(encoder)
    summary = fit(parser, ExamplesLoss(lambda m, b: m.loss(b["input_ids"], b["attention_mask"],
                                                           {k: b[k] for k in targets})),
                  batches, cfg.replace(seed=seed), progress=progress)
    parser.eval()
    report = {"params": parser.num_params(), "train_s": time.perf_counter() - t0, "final_loss": summary["loss"]}
    if heldout:
        b = caption_ids(tokenizer, [sc.caption for sc in heldout], length)
        read = parser.read(b["input_ids"], b["attention_mask"])
        report["heldout_parse_accuracy"] = sum(r == sc.canonical for r, sc in zip(read, heldout)) / len(heldout)
    return parser, report


def unet_config(in_channels: int, width: int, text_dim: int, *, levels: int = 2, pooled: bool = False,
                layers: int = 1, heads: int = 4, coordinates: bool = False, **overrides):
    """The recipes' U-Nets: `levels` resolutions of widths (width, 2 width, 2 width, ...), residual
    blocks only at full resolution, spatial transformers (self- and cross-attention to the text) below
    it and in the middle. GLIDE-style pooled text enters as the class vector when `pooled`; with
    `coordinates`, two more inputs take the pipeline's coordinate channels."""
    from ..models.text_to_image import COORDINATE_CHANNELS
    from ..models.unet import UNetConfig

    ch = tuple([width] + [2 * width] * (levels - 1))
    extra = COORDINATE_CHANNELS if coordinates else 0
    base = dict(in_channels=in_channels + extra, out_channels=in_channels, block_channels=ch,
                down_blocks=("res",) + ("cross",) * (levels - 1), up_blocks=("cross",) * (levels - 1) + ("res",),
                mid_block="cross", layers_per_block=layers, attention_heads=heads, cross_attention_dim=text_dim,
                norm_groups=8, class_embed_dim=text_dim if pooled else None)
    return UNetConfig(**{**base, **overrides})


# Each diffusion system's training target, measured by command (docs/text_to_image.md): latent
# diffusion learns epsilon far better than v (0.693 vs 0.527 held-out caption match, same
# autoencoder, `allformers train --recipe ldm-shapes --set prediction_type=epsilon`); the pixel
# models keep v-prediction, which a 1,000-step GLIDE probe preferred (not a committed command:
# `--recipe glide-shapes --set prediction_type=epsilon` compares). Min-SNR-5 weighting for all.
# No x_0 clipping when sampling: DDIM clips x_0 but keeps the unclipped noise estimate, and under
# guidance 3 the two disagree so much that GLIDE drew other shapes and colours than the caption's
# (with clipping, guidance 3 scored well under guidance 1 on the same trained model; without, above).
# coordinate_channels (CoordConv beside x_t): see TextToImageConfig.
DIFFUSION_CHOICES = {"glide": {"prediction_type": "v_prediction", "coordinate_channels": False, "caption_encoder": "joint"},
                     "ldm": {"prediction_type": "epsilon", "coordinate_channels": False, "caption_encoder": "parsed"},
                     "imagen": {"prediction_type": "v_prediction", "coordinate_channels": False}}
CAPTION_ENCODERS = ("joint", "parsed")  # trained with the U-Net / pretrained as a CaptionParser, then frozen
SCHEDULE = {"class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "v_prediction", "clip_sample": False}  # prediction_type: DIFFUSION_CHOICES
SNR_GAMMA = 5.0
CONDITION_DROPOUT = 0.2  # share of empty captions in training: guidance's unconditional side needs them
DIFFUSION_TRAIN = TrainConfig(max_steps=3000, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                              weight_decay=0.0, beta2=0.99, grad_clip=1.0, eval_interval=0, eval_at_start=False,
                              log_interval=50, checkpoint=False)


def kind_weights(scenes: list, pair_share: Optional[float]) -> Optional[torch.Tensor]:
    """Row weights that give two-shape scenes `pair_share` of the draws (the rest shared by the other
    kinds in proportion to their rows); None: uniform (each kind about a third)."""
    if pair_share is None:
        return None
    if not 0 < pair_share < 1:
        raise TextToImageError(f"pair_share={pair_share} must be between 0 and 1 (or None: uniform rows)")
    pair = torch.tensor([s.kind == "pair" for s in scenes])
    if pair.all() or not pair.any():
        raise TextToImageError("pair_share needs both two-shape and other scenes in the training pictures")
    return torch.where(pair, pair_share / pair.sum(), (1 - pair_share) / (~pair).sum()).double()


def diffusion_batches(model, tokenizer, data: ShapesData, *, seed: int = 0, latents: Optional[tuple] = None,
                      super_res: bool = False, pair_share: Optional[float] = None) -> TensorBatches:
    """Rows for TextToImage.loss: caption ids and masks, and the pictures at the pipeline's size (or the
    precomputed posterior of the latent pipeline's autoencoder); for super_res, both sizes. pair_share:
    see kind_weights."""
    c = model.config
    t = {**caption_ids(tokenizer, data.captions, c.text_length)}
    if super_res:
        t.update(images=data.images[c.super_res_size], low_res=data.images[c.image_size])
    elif latents is not None:
        t.update(latent_mean=latents[0], latent_std=latents[1])
    else:
        t["images"] = data.images[c.image_size]

    def transform(b):
        for k in ("images", "low_res"):
            if k in b:
                b[k] = to_signed(b[k])
        return b

    return TensorBatches(t, seed=seed, transform=transform, weights=kind_weights(data.scenes, pair_share))


def train_diffusion(model, tokenizer, data: ShapesData, cfg: TrainConfig = DIFFUSION_TRAIN, *, seed: int = 0,
                    progress: bool = True, latents: Optional[tuple] = None, super_res: bool = False,
                    pair_share: Optional[float] = None) -> dict:
    """Train a TextToImage's base U-Net (or, super_res=True, its super-resolution U-Net) in place."""
    t0 = time.perf_counter()
    batches = diffusion_batches(model, tokenizer, data, seed=seed, latents=latents, super_res=super_res,
                                pair_share=pair_share)
    loss = (lambda m, b: m.super_res_loss(b)) if super_res else (lambda m, b: m.loss(b))
    if super_res:  # only the second stage learns
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("super_res."))
    else:
        frozen = ("vae.", "super_res.") + (("text_encoder.",) if model.config.freeze_text_encoder else ())
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(frozen))
    summary = fit(model, ExamplesLoss(loss), batches, cfg.replace(seed=seed), progress=progress)
    model.eval()
    trained = "super_res" if super_res else "unet"
    return {"params": model.num_params(trained), "text_encoder_params": model.num_params("text_encoder"),
            "train_s": time.perf_counter() - t0, "examples_per_s": summary["examples_per_s"],
            "final_loss": summary["loss"]}


# ---------------------------------------------------------------------- Imagen's frozen T5
# Two sizes of the zoo's T5 (t5-small's layout: relative bias, pre-RMSNorm, ReLU, tied and scaled output),
# pretrained here with span corruption because no T5 weights exist offline, then frozen.
T5_SIZES = {"t5-s": dict(n_layer=2, n_decoder_layer=2, n_embd=64, n_head=4, head_dim=16, intermediate_size=256),
            "t5-l": dict(n_layer=4, n_decoder_layer=2, n_embd=128, n_head=4, head_dim=32, intermediate_size=512)}
T5_TRAIN = TrainConfig(max_steps=600, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=40, weight_decay=0.01,
                       beta2=0.99, grad_clip=1.0, eval_interval=0, eval_at_start=False, log_interval=25,
                       checkpoint=False)


def t5_corpus(tokenizer=None, *, data=None, sotu_chars: int = 2_000_000, caption_repeats: int = 20,
              vocab_size: int = 2048, seed: int = 0):
    """(tokenizer, token stream): the first `sotu_chars` of State of the Union text with every
    TRAINING caption (never a held-out one) mixed in `caption_repeats` times, shuffled by paragraph.
    The tokenizer (byte BPE with T5's sentinels last) is trained on the same text when not given."""
    from ..training.data import default_data_root
    from .seq2seq import SOTU, train_seq2seq_tokenizer

    root = Path(data) if data else default_data_root()
    if root is None or not (root / SOTU).is_file():
        raise TextToImageError(f"Imagen's T5 pretrains on {SOTU} under the data root ({root}); set ALLFORMERS_DATA")
    sotu = [p for p in (root / SOTU).read_text(encoding="utf-8")[:sotu_chars].split("\n") if p.strip()]
    captions = SyntheticShapes(1, "train").possible_captions(canonical=False)
    docs = sotu + captions * caption_repeats
    np.random.default_rng(seed).shuffle(docs)
    if tokenizer is None:
        tokenizer = train_seq2seq_tokenizer(sotu + captions, vocab_size)
    eos = tokenizer.eos_id
    stream = np.concatenate([np.asarray(ids + [eos], dtype=np.int64) for ids in tokenizer.encode_batch(docs)])
    return tokenizer, stream


def pretrain_text_encoder(size: str, tokenizer, stream: np.ndarray, cfg: TrainConfig = T5_TRAIN, *, seed: int = 0,
                          progress: bool = True) -> tuple:
    """A T5 of T5_SIZES[size] pretrained with span corruption (15% noise, mean span 3, 64-token inputs)
    -> (Seq2SeqLM, report with the final loss)."""
    from ..objectives.seq2seq import Seq2SeqLoss
    from ..objectives.span_corruption import SpanCorruptionData, sentinel_ids_from_tokenizer
    from .seq2seq import build

    if size not in T5_SIZES:
        raise TextToImageError(f"T5 size {size!r} is not one of {sorted(T5_SIZES)}")
    t0 = time.perf_counter()
    t5 = build("t5", tokenizer, seed=seed, block_size=128, **T5_SIZES[size])
    data = SpanCorruptionData(stream, sentinel_ids_from_tokenizer(tokenizer), tokenizer.eos_id, tokenizer.pad_id,
                              inputs_length=64, seed=seed)
    summary = fit(t5, Seq2SeqLoss(), data, cfg.replace(seed=seed), progress=progress)
    t5.eval()
    return t5, {"size": size, "params": t5.num_params(), "encoder_params": sum(p.numel() for p in t5.encoder.parameters()),
                "train_s": time.perf_counter() - t0, "final_loss": summary["loss"]}


def frozen_t5_encoder(t5):
    """(encoder Config, encoder state dict) of a pretrained T5, for TextToImageConfig(freeze_text_encoder=True)."""
    return t5.config.encoder_config(), t5.encoder.state_dict()


# ---------------------------------------------------------------------- scoring
def drawn(scenes: list, size: int = 32) -> torch.Tensor:
    """The scenes as the data draws them: (N, 3, size, size) uint8."""
    return torch.stack([torch.tensor(s.image(size)).permute(2, 0, 1) for s in scenes])


@torch.no_grad()
def text_state_cosine(model, tokenizer, captions: list) -> dict:
    """How alike a pipeline's text encoder makes different captions: the mean cosine between the pooled
    text states of every two of `captions`, as the encoder gives them ("encoder") and as the U-Net
    reads them ("unet_input": after standardize_text, when set). Near 1: the captions look the same to the U-Net."""
    from ..models.heads import pool

    b = caption_ids(tokenizer, captions, model.config.text_length)
    ids, mask = b["input_ids"].to(model.device), b["attention_mask"].to(model.device)

    def mean_cosine(raw: bool) -> float:  # the mean off-diagonal cosine of the pooled states
        pooled = F.normalize(pool(model.text_states(ids, mask, raw=raw), mask, "mean"), dim=-1)  # (N, D)
        n = len(pooled)
        return ((pooled @ pooled.T).sum() - n).item() / (n * (n - 1))

    return {"encoder": mean_cosine(raw=True), "unet_input": mean_cosine(raw=False)}


SEEN_SEED = 7919  # offset of seen_scenes' seed from the training pictures'


def heldout_scenes(n: int, seed: int = 0) -> list:
    """n scenes of the caption-disjoint test split: their captions are the prompts no generator trained on."""
    data = SyntheticShapes(n, "test", seed=seed)
    return [data[i] for i in range(n)]


def seen_scenes(n: int, seed: int = 0) -> list:
    """n new scenes of the training split (its own seed: not the training pictures, but their captions)."""
    data = SyntheticShapes(n, "train", seed=seed + SEEN_SEED)
    return [data[i] for i in range(n)]


def caption_match(generate: Callable[[list], torch.Tensor], judge: ShapesJudge, scenes: list, *,
                  batch_size: int = 50) -> dict:
    """Generate a picture for each scene's caption (`generate(captions) -> (B, 3, H, W)` in [0, 1]) and
    let the judge read it: the share whose reading equals the caption's canonical form (overall and
    per kind), seconds per picture, and the pictures."""
    t0 = time.perf_counter()
    captions = [s.caption for s in scenes]
    images = torch.cat([generate(captions[i:i + batch_size]).float().cpu() for i in range(0, len(captions), batch_size)])
    seconds = time.perf_counter() - t0
    read = judge.read(images)
    ok = [r == s.canonical for r, s in zip(read, scenes)]
    out = {"accuracy": sum(ok) / len(ok), "n": len(ok), "seconds_per_sample": seconds / len(ok)}
    for kind in KINDS:
        idx = [i for i, s in enumerate(scenes) if s.kind == kind]
        if idx:
            out[f"accuracy_{kind}"] = sum(ok[i] for i in idx) / len(idx)
    out["images"], out["read"] = images, read
    return out


def dalle_generator(model, tokenizer, *, temperature: float = 1.0, top_k: Optional[int] = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def generate(captions):
        text = caption_ids(tokenizer, captions, model.config.text_length)["input_ids"]
        return model.generate(text, temperature=temperature, top_k=top_k, generator=gen)
    return generate


def diffusion_generator(model, tokenizer, *, guidance_scale: float = 3.0, steps: int = 25, seed: int = 0,
                        super_res: bool = True, progress: bool = False, **generate_options):
    """captions -> pictures in [0, 1] from a TextToImage, seeded; generate_options go to model.generate
    (thresholding, guidance_rescale, ...)."""
    gen = torch.Generator().manual_seed(seed)

    def generate(captions):
        b = caption_ids(tokenizer, captions, model.config.text_length)
        return model.generate(b["input_ids"], b["attention_mask"], guidance_scale=guidance_scale,
                              num_inference_steps=steps, generator=gen, super_res=super_res, progress=progress,
                              **generate_options)
    return generate


def save_grid(rows: dict, captions: list, path, *, columns: Optional[int] = None, title: str = "") -> Path:
    """A picture grid: one row per entry of `rows` ({label: (N, 3, H, W) in [0, 1]}), one column per
    caption (written above its column)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = columns or len(captions)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.25 * n, 1.35 * len(rows) + 0.6), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for j in range(n):
            ax = axes[r][j]
            ax.imshow(images[j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(captions[j], 16)), fontsize=6)
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- the four systems, end to end
def _default(cfg: TrainConfig):
    return field(default_factory=lambda: cfg)


@dataclass(kw_only=True)
class T2ISettings:
    """Sizes and steps of one run of the four systems (the benchmark's full run, or --quick)."""
    n_train: int = 16000  # training pictures (train split: no held-out caption)
    n_val: int = 500  # autoencoder reconstruction pictures (val split)
    n_eval: int = 150  # held-out captions scored per system
    n_seen: int = 150  # ... and new pictures of training captions (0: none), for the generalisation gap
    judge_train: int = 16000
    judge_test: int = 1000
    judge: TrainConfig = _default(JUDGE_TRAIN)
    vq: TrainConfig = _default(AE_TRAIN)
    kl: TrainConfig = _default(AE_TRAIN)
    dalle: TrainConfig = _default(DALLE_TRAIN)
    # steps sized so the four systems fit 60 minutes on 2 cores: latent diffusion (the best of the first
    # full run) gets the most, Imagen's three base runs the fewest (they are compared with each other)
    glide: TrainConfig = _default(DIFFUSION_TRAIN.replace(max_steps=1800))
    ldm: TrainConfig = _default(DIFFUSION_TRAIN.replace(max_steps=3600))
    t5: TrainConfig = _default(T5_TRAIN)
    imagen: TrainConfig = _default(DIFFUSION_TRAIN.replace(max_steps=900, warmup_steps=50))
    imagen_large_unet: Optional[TrainConfig] = None  # None: the same as imagen
    imagen_large_width: int = 48  # the comparison's larger base U-Net (the baseline's is 32)
    super_res: TrainConfig = _default(DIFFUSION_TRAIN.replace(max_steps=400, warmup_steps=40))
    sample_steps: int = 25  # DDIM steps when scoring
    # None: each diffusion system's own (DIFFUSION_CHOICES); set, for all three
    prediction_type: Optional[str] = None  # the target: epsilon, v_prediction or sample
    coordinate_channels: Optional[bool] = None  # x and y channels beside x_t at the U-Net's input (CoordConv)
    standardize_text: bool = True  # Imagen: its frozen T5's states standardised per feature (TextToImageConfig)
    pair_share: Optional[float] = None  # latent diffusion: the share of two-shape scenes in its batches (None: ~1/3)
    caption_layers: int = 2  # GLIDE's and latent diffusion's caption encoder (trained with the U-Net): depth
    caption_width: int = 64  # ... and width
    # None: each system's own (DIFFUSION_CHOICES: GLIDE joint, latent diffusion parsed); set, for both
    caption_encoder: Optional[str] = None  # "joint": trained with the U-Net; "parsed": a frozen CaptionParser's
    parser: TrainConfig = _default(PARSER_TRAIN)  # the "parsed" encoder's pretraining on the training captions
    snr_gamma: Optional[float] = SNR_GAMMA  # min-SNR-gamma loss weighting; 0 (--set snr_gamma=0) or None: the plain mean
    guidance: float = 3.0
    sotu_chars: int = 2_000_000
    dalle_top_k: int = 32
    dalle_temperature: float = 1.0

    def replace(self, **changes) -> "T2ISettings":
        return dataclasses.replace(self, **changes)


def quick_settings(settings: Optional[T2ISettings] = None) -> T2ISettings:
    """A couple of minutes: every part runs, nothing is expected to be good (settings' other fields kept)."""
    few = lambda n, b=16: dataclasses.replace(DIFFUSION_TRAIN, max_steps=n, batch_size=b, warmup_steps=2,  # noqa: E731
                                              log_interval=max(1, n // 2))
    small = dict(n_train=256, n_val=32, n_eval=12, judge_train=512, judge_test=64, judge=few(20, 32), vq=few(6),
                 n_seen=8, kl=few(6), dalle=few(10), parser=few(10), glide=few(6), ldm=few(6), t5=few(6), imagen=few(4),
                 imagen_large_unet=None,
                 super_res=few(4), sample_steps=4, sotu_chars=60_000)
    return dataclasses.replace(settings, **small) if settings is not None else T2ISettings(**small)


class Workbench:
    """What the systems share in one process: the training pictures, the held-out prompts, the judge,
    the caption tokenizer and the autoencoders (each built the first time it is needed)."""

    def __init__(self, settings: Optional[T2ISettings] = None, *, seed: int = 0, progress: bool = True,
                 data=None, log: Callable[[str], None] = print):
        self.s = settings or T2ISettings()
        self.seed, self.progress, self.data, self.log = seed, progress, data, log
        self.times: dict = {}
        self._judge = self._vq = self._kl = self._t5_corpus = self._parser = None
        t0 = time.perf_counter()
        self.train = render_shapes(self.s.n_train, "train", seed, sizes=(32, 16))
        self.val = render_shapes(self.s.n_val, "val", seed, sizes=(32,))
        self.prompts = heldout_scenes(self.s.n_eval, seed)
        self.seen_prompts = seen_scenes(self.s.n_seen, seed)
        self.tokenizer = caption_tokenizer()
        self.times["data_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ shared parts
    def caption_encoder(self) -> Config:
        """GLIDE's and latent diffusion's caption encoder at the settings' size (heads of 16 dimensions)."""
        s = self.s
        return text_encoder_config(self.tokenizer.vocab_size, n_layer=s.caption_layers, n_embd=s.caption_width,
                                   n_head=max(1, s.caption_width // 16))

    def choice(self, system: str, name: str, value=None):
        """A diffusion system's `name` (prediction_type, coordinate_channels, caption_encoder): `value`
        when given, else the settings' when set, else the system's own."""
        value = getattr(self.s, name) if value is None else value
        value = DIFFUSION_CHOICES[system][name] if value is None else value
        if name == "caption_encoder" and value not in CAPTION_ENCODERS:
            raise TextToImageError(f"caption_encoder={value!r}: choose one of {CAPTION_ENCODERS} ('joint' trains "
                                   "the encoder with the U-Net, 'parsed' pretrains it as a caption parser and freezes it)")
        return value

    def caption_parser(self) -> tuple:
        """The "parsed" caption encoder: a CaptionParser pretrained on the training captions (built once)."""
        if self._parser is None:
            self.log("pretraining the caption encoder as a caption parser (text only)")
            self._parser = train_caption_parser(self.tokenizer, self.train, self.caption_encoder(), self.s.parser,
                                                heldout=self.prompts, seed=self.seed, progress=self.progress)
            self.times["caption_parser_s"] = self._parser[1]["train_s"]
        return self._parser

    def text_conditioning(self, system: str, caption_encoder: Optional[str] = None) -> dict:
        """The TextToImageConfig switches of GLIDE's or latent diffusion's caption encoder: "parsed"
        freezes it (its weights come from caption_parser) and pools its states as the class vector."""
        parsed = self.choice(system, "caption_encoder", caption_encoder) == "parsed"
        return {"freeze_text_encoder": parsed, "pooled_text": parsed or system == "glide"}

    def condition_on_captions(self, model, report: dict) -> None:
        """Load the parsed encoder into a frozen-encoder model built with text_conditioning; note the choice."""
        report["caption_encoder"] = "parsed" if model.config.freeze_text_encoder else "joint"
        if model.config.freeze_text_encoder:
            parser, parser_report = self.caption_parser()
            model.text_encoder.load_state_dict(parser.encoder.state_dict())
            report["caption_parser"] = parser_report

    def schedule(self, system: str, **extra) -> dict:
        """`system`'s training schedule with its prediction type."""
        return {**SCHEDULE, "prediction_type": self.choice(system, "prediction_type"), **extra}

    @property
    def judge(self) -> ShapesJudge:
        if self._judge is None:
            self.log("training the judge")
            self._judge, self.judge_report = train_judge(self.s.judge_train, self.s.judge, seed=JUDGE_SEED + self.seed,
                                                         n_test=self.s.judge_test, progress=self.progress)
            self.times["judge_s"] = self.judge_report["train_s"]
        return self._judge

    def autoencoder(self, kind: str):
        attr = "_kl" if kind == "kl" else "_vq"
        if getattr(self, attr) is None:
            self.log(f"training the {kind} autoencoder")
            model, report = train_autoencoder(kind, self.train.images[32], self.s.kl if kind == "kl" else self.s.vq,
                                              heldout=self.val.images[32], seed=self.seed, progress=self.progress)
            report["caption_match_reconstructed"] = self.reconstruction_match(model)
            setattr(self, attr, (model, report))
            self.times[f"{kind}_autoencoder_s"] = report["train_s"]
        return getattr(self, attr)

    def reconstruction_match(self, autoencoder) -> float:
        """The judge on the autoencoder's reconstructions of the held-out captions' own drawings: about
        the most a generator working in that autoencoder's codes or latents can score."""
        self.judge  # noqa: B018  (trained first, and with gradients, if nothing asked for it yet)
        return self._reconstruction_match(autoencoder)

    @torch.no_grad()
    def _reconstruction_match(self, autoencoder) -> float:
        pictures = ((reconstruct(autoencoder.eval(), to_signed(drawn(self.prompts))) + 1) / 2).clamp(0, 1)
        return judge_report(self.judge, pictures, self.prompts, per_kind=False)["accuracy"]

    def score(self, generate, name: str, seen: bool = False) -> dict:
        """The judge's caption match of `generate` on the held-out captions; with `seen`, also (under
        "seen", pictures left out) on new pictures of training captions: the gap between the two is
        what the system fails to carry over to new combinations, the seen figure what it fails to fit."""
        r = caption_match(generate, self.judge, self.prompts)
        self.log(f"{name}: caption match {r['accuracy']:.3f} on {r['n']} held-out captions "
                 f"({r['seconds_per_sample']:.3f} s per picture)")
        if seen and self.seen_prompts:
            r["seen"] = {k: v for k, v in caption_match(generate, self.judge, self.seen_prompts).items()
                         if k not in ("images", "read")}
            self.log(f"{name}: caption match {r['seen']['accuracy']:.3f} on {r['seen']['n']} training captions")
        return r

    # ------------------------------------------------------------------ DALL-E
    def dalle(self) -> tuple:
        vq, vq_report = self.autoencoder("vq")
        self.log("training DALL-E")
        model, report = train_dalle(vq, self.tokenizer, self.train, self.s.dalle, seed=self.seed, progress=self.progress)
        report["autoencoder"] = vq_report
        report["heldout"] = self.score(dalle_generator(model, self.tokenizer, temperature=self.s.dalle_temperature,
                                                       top_k=self.s.dalle_top_k, seed=self.seed), "dalle", seen=True)
        return model, report

    # ------------------------------------------------------------------ GLIDE
    def glide_config(self):
        from ..models.text_to_image import TextToImageConfig

        te = self.caption_encoder()
        coords = self.choice("glide", "coordinate_channels")
        text = self.text_conditioning("glide")
        how = "a frozen caption parser's encoder" if text["freeze_text_encoder"] else "a text transformer trained with the U-Net"
        return TextToImageConfig(text_encoder=te, unet=unet_config(3, 32, te.n_embd, pooled=True, coordinates=coords),
                                 scheduler=self.schedule("glide"), coordinate_channels=coords,
                                 image_size=16, text_length=12, pad_id=self.tokenizer.pad_id,
                                 eos_id=self.tokenizer.eos_id, condition_dropout=CONDITION_DROPOUT,
                                 snr_gamma=self.s.snr_gamma or None, **text,
                                 description=f"GLIDE: pixel diffusion (16 x 16), {how}, cross-attention + pooled "
                                             "text, classifier-free guidance")

    def glide(self) -> tuple:
        from ..models.text_to_image import TextToImage

        if self.choice("glide", "caption_encoder") == "parsed":
            self.caption_parser()  # pretrained first, so the seed below starts the U-Net as it would otherwise
        torch.manual_seed(self.seed)
        model = TextToImage(self.glide_config())
        report = {}
        self.condition_on_captions(model, report)
        self.log("training GLIDE")
        report.update(train_diffusion(model, self.tokenizer, self.train, self.s.glide, seed=self.seed,
                                      progress=self.progress))
        gen = lambda g: diffusion_generator(model, self.tokenizer, guidance_scale=g, steps=self.s.sample_steps,  # noqa: E731
                                            seed=self.seed)
        report["heldout_guidance_1"] = self.score(gen(1.0), "glide, guidance 1")
        report["heldout"] = self.score(gen(self.s.guidance), f"glide, guidance {self.s.guidance:g}", seen=True)
        report["guidance_gain"] = report["heldout"]["accuracy"] - report["heldout_guidance_1"]["accuracy"]
        return model, report

    # ------------------------------------------------------------------ latent diffusion
    def ldm_config(self, vae, caption_encoder: Optional[str] = None):
        """caption_encoder: "joint" or "parsed" (None: the settings' choice). Parsed, the frozen
        encoder's pooled states also enter as the U-Net's class vector."""
        from ..models.text_to_image import TextToImageConfig

        te = self.caption_encoder()
        ae = vae.config
        coords = self.choice("ldm", "coordinate_channels")
        text = self.text_conditioning("ldm", caption_encoder)
        unet = unet_config(ae.latent_channels, 64, te.n_embd, down_blocks=("cross", "cross"),
                           up_blocks=("cross", "cross"), coordinates=coords, pooled=text["pooled_text"])
        how = ("the caption by cross-attention and pooled, from a frozen encoder pretrained to parse captions"
               if text["freeze_text_encoder"] else "the caption by cross-attention, its encoder trained with the U-Net")
        return TextToImageConfig(text_encoder=te, unet=unet, scheduler=self.schedule("ldm"),
                                 image_size=32, text_length=12, pad_id=self.tokenizer.pad_id,
                                 eos_id=self.tokenizer.eos_id, autoencoder=ae, condition_dropout=CONDITION_DROPOUT,
                                 snr_gamma=self.s.snr_gamma or None, coordinate_channels=coords,
                                 **text,
                                 description=f"latent diffusion: the U-Net in the KL autoencoder's 8 x 8 x 4 latent "
                                             f"space; {how}")

    def ldm(self, caption_encoder: Optional[str] = None) -> tuple:
        """Latent diffusion; caption_encoder overrides the settings' choice ("joint" / "parsed")."""
        from ..models.text_to_image import TextToImage

        vae, vae_report = self.autoencoder("kl")
        if self.choice("ldm", "caption_encoder", caption_encoder) == "parsed":
            self.caption_parser()  # pretrained first, so the seed below starts the U-Net as it would otherwise
        t0 = time.perf_counter()
        mean, std = posterior_stats(vae, self.train.images[32])
        vae.config.scaling_factor = latent_scaling(vae, mean)
        torch.manual_seed(self.seed)
        model = TextToImage(self.ldm_config(vae, caption_encoder))
        model.vae.load_state_dict(vae.state_dict())
        report = {}
        self.condition_on_captions(model, report)
        self.log(f"training latent diffusion (latent scaling {vae.config.scaling_factor:.3f}, "
                 f"{report['caption_encoder']} caption encoder)")
        report.update(train_diffusion(model, self.tokenizer, self.train, self.s.ldm, seed=self.seed,
                                      progress=self.progress, latents=(mean, std), pair_share=self.s.pair_share))
        report["latents_s"] = time.perf_counter() - t0 - report["train_s"]
        report["autoencoder"] = vae_report
        report["heldout"] = self.score(diffusion_generator(model, self.tokenizer, guidance_scale=self.s.guidance,
                                                           steps=self.s.sample_steps, seed=self.seed), "ldm",
                                       seen=True)
        return model, report

    # ------------------------------------------------------------------ Imagen
    def t5(self, size: str):
        if self._t5_corpus is None:
            self._t5_corpus = t5_corpus(data=self.data, sotu_chars=self.s.sotu_chars, seed=self.seed)
            self._t5 = {}
        if size not in self._t5:
            self.log(f"pretraining Imagen's text encoder {size} (span corruption)")
            self._t5[size] = pretrain_text_encoder(size, *self._t5_corpus, self.s.t5, seed=self.seed,
                                                   progress=self.progress)
        return self._t5[size]

    def imagen_config(self, t5, unet_width: int = 32, super_res: bool = True):
        from ..models.text_to_image import TextToImageConfig

        enc, _ = frozen_t5_encoder(t5)
        sr = None
        if super_res:
            sr = unet_config(6, 32, enc.n_embd, out_channels=3, down_blocks=("res", "res"),
                             up_blocks=("res", "res"), mid_block="res", cross_attention_dim=None, class_embed_dim=32)
        coords = self.choice("imagen", "coordinate_channels")
        return TextToImageConfig(text_encoder=enc, unet=unet_config(3, unet_width, enc.n_embd, pooled=True,
                                                                    coordinates=coords),
                                 scheduler=self.schedule("imagen", thresholding=True, dynamic_thresholding_ratio=0.95),
                                 coordinate_channels=coords, standardize_text=self.s.standardize_text,
                                 image_size=16, text_length=16, pad_id=self._t5_corpus[0].pad_id,
                                 eos_id=self._t5_corpus[0].eos_id, freeze_text_encoder=True, pooled_text=True,
                                 condition_dropout=CONDITION_DROPOUT, snr_gamma=self.s.snr_gamma or None, super_res=sr,
                                 super_res_size=32,
                                 description="Imagen: a frozen T5 encoder (pretrained here) conditions a 16 x 16 "
                                             "pixel U-Net; dynamic thresholding; a 16 -> 32 super-resolution U-Net "
                                             "with noise-conditioning augmentation")

    def imagen_base(self, t5_size: str, unet_width: int, cfg: TrainConfig, super_res: bool = False) -> tuple:
        from ..models.text_to_image import TextToImage

        t5, t5_report = self.t5(t5_size)
        torch.manual_seed(self.seed)
        model = TextToImage(self.imagen_config(t5, unet_width, super_res))
        model.text_encoder.load_state_dict(frozen_t5_encoder(t5)[1])
        if model.config.standardize_text:  # over the training captions (each once), never a held-out one
            captions = sorted(set(self.train.captions))
            model.set_text_statistics(**caption_ids(self._t5_corpus[0], captions, model.config.text_length))
        self.log(f"training Imagen's base U-Net (width {unet_width}) on the frozen {t5_size}")
        report = train_diffusion(model, self._t5_corpus[0], self.train, cfg, seed=self.seed, progress=self.progress)
        report["text_encoder"] = t5_report
        report["text_state_cosine"] = text_state_cosine(model, self._t5_corpus[0], [p.caption for p in self.prompts])
        report["heldout_base"] = self.score(diffusion_generator(model, self._t5_corpus[0], guidance_scale=self.s.guidance,
                                                                steps=self.s.sample_steps, seed=self.seed,
                                                                super_res=False),
                                            f"imagen base ({t5_size}, U-Net width {unet_width})")
        return model, report

    def imagen(self) -> tuple:
        """The main system (larger T5, small U-Net, + super-resolution) and the two comparisons the paper
        makes: a larger text encoder vs a larger U-Net, each from the small-small baseline."""
        s = self.s
        main, report = self.imagen_base("t5-l", 32, s.imagen, super_res=True)
        self.log("training Imagen's super-resolution U-Net (16 -> 32)")
        report["super_res"] = train_diffusion(main, self._t5_corpus[0], self.train, s.super_res, seed=self.seed,
                                              progress=self.progress, super_res=True)
        report["heldout"] = self.score(diffusion_generator(main, self._t5_corpus[0], guidance_scale=s.guidance,
                                                           steps=s.sample_steps, seed=self.seed), "imagen (32 x 32)",
                                       seen=True)
        _, small = self.imagen_base("t5-s", 32, s.imagen)
        _, big_unet = self.imagen_base("t5-s", s.imagen_large_width, s.imagen_large_unet or s.imagen)
        base = small["heldout_base"]["accuracy"]
        report["comparison"] = {
            "baseline": {"text_encoder": "t5-s", "unet_width": 32, "accuracy": base,
                         "unet_params": small["params"], "text_encoder_params": small["text_encoder_params"]},
            "larger_text_encoder": {"text_encoder": "t5-l", "unet_width": 32, "accuracy": report["heldout_base"]["accuracy"],
                                    "text_encoder_params": report["text_encoder_params"]},
            "larger_unet": {"text_encoder": "t5-s", "unet_width": s.imagen_large_width, "accuracy": big_unet["heldout_base"]["accuracy"],
                            "unet_params": big_unet["params"]},
            "text_encoder_delta": report["heldout_base"]["accuracy"] - base,
            "unet_delta": big_unet["heldout_base"]["accuracy"] - base}
        report["comparison"]["larger_text_encoder_helps_more"] = (report["comparison"]["text_encoder_delta"]
                                                                  > report["comparison"]["unet_delta"])
        report["comparison_runs"] = {"small": small, "larger_unet": big_unet}
        return main, report


# ---------------------------------------------------------------------- named recipes
SYSTEMS = ("judge", "dalle", "glide", "ldm", "imagen")


@dataclass(kw_only=True)
class TextToImageRecipe(Recipe, T2ISettings):
    """One system trained end to end (with the judge and the autoencoder it needs), scored on held-out
    captions, saved with its tokenizer: `allformers.load(out)` reads it, `allformers imagine` samples it."""
    system: str = "glide"  # one of SYSTEMS: the Workbench method that trains it
    quick: bool = False  # smoke-sized settings (quick_settings) instead of the fields
    seed: int = 0
    kind = "text-to-image"

    def __post_init__(self):
        if self.system not in SYSTEMS:
            raise TextToImageError(f"recipe {self.name!r}: system {self.system!r} is not one of {SYSTEMS}")

    def run(self, *, out: Path, data=None, progress: bool = True, resume: bool = False, verbose: bool = True) -> dict:
        """`data`: the data root holding sotu/sotu.txt (Imagen's T5 text; default ../shared/data)."""
        result = run_t2i(self, out=out, data=data, progress=progress, log=print if verbose else (lambda m: None))
        result.pop("pictures")  # tensors stay out of the summary (the benchmark's grid takes them from run_t2i)
        return result

    def report(self, r: dict) -> str:
        rep = r["report"]
        lines = [f"--- {r['recipe']}: {r['wall_time_s']:.0f} s; judge accuracy {r['judge']['accuracy_32']:.3f} (32 px), "
                 f"{r['judge']['accuracy_16']:.3f} (16 px)"]
        if "heldout" in rep:
            h = rep["heldout"]
            lines.append(f"held-out caption match {h['accuracy']:.3f} on {h['n']} captions ("
                         + ", ".join(f"{k[9:]} {h[k]:.2f}" for k in h if k.startswith("accuracy_"))
                         + f"), {h['seconds_per_sample']:.3f} s per picture")
            if "seen" in h:
                lines.append(f"training captions (new pictures): {h['seen']['accuracy']:.3f} on {h['seen']['n']}")
        lines.append(f"model: {r['out_dir']}  (allformers imagine --model {r['out_dir']} \"a caption\")")
        return "\n".join(lines)


register(TextToImageRecipe(
    name="shapes-judge", system="judge", description="the caption judge: a 3-level CNN reading kind, colours, shapes, "
    "relation and count of a synthetic-shapes picture (32 or 16 pixels)",
    target="exact-caption accuracy >= 0.95 on new pictures"))
register(TextToImageRecipe(
    name="dalle-shapes", system="dalle", description="DALL-E: a VQ autoencoder (32 x 32 -> 8 x 8 codes of 256), then a "
    "4 x 128 decoder over caption words + image codes (row and column embeddings, loss 1/8 text + 7/8 image)"))
register(TextToImageRecipe(
    name="glide-shapes", system="glide", description="GLIDE: 16 x 16 pixel diffusion, a 2-layer text transformer "
    "trained with the U-Net (cross-attention + pooled text), classifier-free guidance (20% empty captions)"))
register(TextToImageRecipe(
    name="ldm-shapes", system="ldm", description="latent diffusion: a KL autoencoder (32 x 32 -> 8 x 8 x 4) and a "
    "caption encoder pretrained to parse captions (text only), frozen; then the U-Net in the latent space with the "
    "caption by cross-attention and pooled"))
register(TextToImageRecipe(
    name="imagen-shapes", system="imagen", description="Imagen: T5 span-corruption pretraining on captions + State of "
    "the Union text (two sizes), frozen; a 16 x 16 base U-Net on the larger encoder with dynamic thresholding; a "
    "16 -> 32 super-resolution U-Net; plus the text-encoder-vs-U-Net comparison"))
T2I_RECIPES = ("shapes-judge", "dalle-shapes", "glide-shapes", "ldm-shapes", "imagen-shapes")


def default_out(name: str) -> Path:
    return Path("runs") / name


def public_report(report: dict) -> dict:
    """A report without its tensors (the pictures), for JSON."""
    if isinstance(report, dict):
        return {k: public_report(v) for k, v in report.items() if not isinstance(v, torch.Tensor) and k != "read"}
    if isinstance(report, (list, tuple)):
        return [public_report(v) for v in report]
    return report


def run_t2i(recipe: TextToImageRecipe, *, out=None, progress: bool = True, data=None,
            bench: Optional[Workbench] = None, log: Callable[[str], None] = print) -> dict:
    """Train `recipe`'s system end to end (with the judge and autoencoder it needs), score it on held-out
    captions, save the model with its tokenizer to `out` (default runs/NAME) and summary.json beside it.
    A Workbench passed in is reused (the benchmark trains the four systems on one)."""
    name = recipe.name
    out = Path(out) if out else default_out(name)
    t0 = time.perf_counter()
    settings = quick_settings(recipe) if recipe.quick else recipe
    bench = bench or Workbench(settings, seed=recipe.seed, progress=progress, data=data, log=log)
    judge = bench.judge
    if recipe.system == "judge":
        model, report, tokenizer = judge, bench.judge_report, None
    else:
        model, report = getattr(bench, recipe.system)()
        tokenizer = bench._t5_corpus[0] if recipe.system == "imagen" else bench.tokenizer
    model.save(out, tokenizer=tokenizer) if tokenizer is not None else model.save(out)
    if recipe.system != "judge":
        judge.save(out / "judge")
    summary = {"recipe": name, "system": recipe.system, "report": public_report(report),
               "judge": public_report(bench.judge_report), "times": bench.times,
               "wall_time_s": time.perf_counter() - t0, "out_dir": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return {**summary, "model": model, "pictures": report.get("heldout", {}).get("images")}
