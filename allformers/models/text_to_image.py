"""Text-conditioned diffusion as a few named parts (diffusers' pipelines): a text encoder, a U-Net
denoiser, a noise schedule, and optionally an image autoencoder and a super-resolution U-Net.
GLIDE, latent diffusion and Imagen are three settings of the same switches:

    GLIDE (Nichol et al. 2021)      pixels; a small text transformer trained with the U-Net; its
                                    states enter by cross-attention, their pooled vector like a
                                    class embedding (pooled_text); classifier-free guidance
    latent diffusion (Rombach 2022) the same U-Net in a KL autoencoder's latent space (autoencoder);
                                    the text by cross-attention
    Imagen (Saharia et al. 2022)    a frozen pretrained T5 encoder (freeze_text_encoder), dynamic
                                    thresholding in the sampler, and a super-resolution U-Net
                                    (super_res) that reads the noised low-resolution picture

    caption ids -> text_encoder -> states (B, S, D) [+ pooled (B, D)]
    x_T ~ N(0, I) -> U-Net(x_t, t, states) x steps -> x_0  [-> autoencoder.decode]  [-> super-res U-Net]

Classifier-free guidance: training replaces a caption by the empty one (just EOS) with probability
condition_dropout, before the text encoder, so the "null" condition is the encoder's reading of the
empty caption; sampling mixes eps(x, caption) and eps(x, empty) with the guidance scale.

Pictures are (B, 3, H, W) in [-1, 1] inside, [0, 1] at the edges (`generate` returns [0, 1])."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks.conv import timestep_embedding
from ..config import Config, SavedConfig
from ..diffusion import DDIMScheduler, NoiseScheduler, diffusion_loss, drop_condition, sample
from ..errors import ConfigError
from .autoencoders import AutoencoderConfig, build_autoencoder
from .heads import pool
from .lm import TransformerLM
from .unet import UNet, UNetConfig

SAMPLERS = {"ddim": DDIMScheduler}
COORDINATE_CHANNELS = 2  # coordinate_channels: x and y


def _schedule(d: Optional[dict]) -> dict:
    return dict(d) if d else {"class_name": "DDPMScheduler", "num_train_timesteps": 1000,
                              "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}


@dataclass
class TextToImageConfig(SavedConfig):
    text_encoder: Config = None  # a bidirectional TransformerLM without head (causal=False, lm_head=False)
    unet: UNetConfig = None
    scheduler: dict = field(default_factory=lambda: _schedule(None))  # NoiseScheduler.to_dict() of training
    image_size: int = 16  # the side of the pictures the U-Net makes (before super-resolution)
    text_length: int = 12  # caption tokens (padded with pad_id; EOS last)
    pad_id: int = 0
    eos_id: int = 1
    freeze_text_encoder: bool = False  # Imagen: the pretrained encoder never changes
    pooled_text: bool = False  # the masked mean of the text states also enters as the U-Net's class vector
    condition_dropout: float = 0.1  # training: share of captions replaced by the empty one
    snr_gamma: Optional[float] = None  # set: min-SNR-gamma weighting of the diffusion loss (Hang et al. 2023; 5)
    autoencoder: Optional[AutoencoderConfig] = None  # set: diffusion runs in its ("kl") latent space
    super_res: Optional[UNetConfig] = None  # Imagen's second stage: in_channels 6 (noisy picture + low-res)
    super_res_size: int = 32
    super_res_scheduler: Optional[dict] = None  # None: the base schedule
    noise_augmentation: float = 0.25  # super-res training: the low-res picture is noised to t ~ U[0, this * T]
    sample_augmentation: float = 0.1  # ... and at sampling to this fixed fraction of T
    # CoordConv (Liu et al. 2018): two fixed channels, x and y in [-1, 1], beside x_t at the base U-Net's
    # input. Convolutions and attention alone barely know where they are, and "A above B" names places.
    coordinate_channels: bool = False
    # A frozen encoder's states, feature by feature, minus their mean and over their std across the
    # training captions' tokens (set_text_statistics). A small T5's states share one large direction
    # (cosine 0.9 between "red" and "blue"), which hides the caption from a U-Net learning to read it.
    standardize_text: bool = False
    description: str = ""

    def __post_init__(self):
        if isinstance(self.text_encoder, dict):
            self.text_encoder = Config.from_dict(self.text_encoder)
        for name in ("unet", "super_res"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, UNetConfig.from_dict(getattr(self, name)))
        if isinstance(self.autoencoder, dict):
            self.autoencoder = AutoencoderConfig.from_dict(self.autoencoder)
        self.scheduler = _schedule(self.scheduler)
        if self.text_encoder is None or self.unet is None:
            raise ConfigError("a TextToImageConfig needs text_encoder (a Config) and unet (a UNetConfig)")
        t, u = self.text_encoder, self.unet
        if t.causal or t.lm_head:
            raise ConfigError("text_encoder must be a bidirectional stack without LM head: "
                              "use config.encoder_config() or causal=False, lm_head=False")
        if u.cross_attention_dim is not None and (u.encoder_hid_dim or u.cross_attention_dim) != t.n_embd:
            raise ConfigError(f"the U-Net reads {u.encoder_hid_dim or u.cross_attention_dim}-wide text states but the "
                              f"text encoder is {t.n_embd} wide; set unet.cross_attention_dim (or encoder_hid_dim) "
                              f"to {t.n_embd}")
        if self.pooled_text and u.class_embed_dim != t.n_embd:
            raise ConfigError(f"pooled_text feeds the {t.n_embd}-wide pooled text vector as the U-Net's class vector: "
                              f"set unet.class_embed_dim={t.n_embd}")
        if self.autoencoder is not None:
            ae = self.autoencoder
            if ae.kind != "kl":
                raise ConfigError(f"latent diffusion runs in a KL autoencoder's latent space, not {ae.kind!r}")
            if u.in_channels != ae.latent_channels + self.extra_channels or u.out_channels != ae.latent_channels:
                raise ConfigError(f"the U-Net has {u.in_channels} -> {u.out_channels} channels but the latents have "
                                  f"{ae.latent_channels}; make them {ae.latent_channels + self.extra_channels} -> "
                                  f"{ae.latent_channels}{self._coordinates_note}")
            if self.image_size % ae.downsampling:
                raise ConfigError(f"image_size={self.image_size} is not a multiple of the autoencoder's "
                                  f"downsampling {ae.downsampling}")
        elif u.in_channels != u.out_channels + self.extra_channels:
            raise ConfigError(f"the U-Net has {u.in_channels} -> {u.out_channels} channels; a pixel pipeline's "
                              f"U-Net must be {u.out_channels + self.extra_channels} -> {u.out_channels}"
                              f"{self._coordinates_note}")
        if self.super_res is not None:
            s = self.super_res
            if s.in_channels != 6 or s.out_channels != 3:
                raise ConfigError("the super-resolution U-Net reads the noisy picture and the upsampled low-res one "
                                  "(in_channels=6) and predicts 3 channels (out_channels=3)")
            if s.class_embed_dim is None:
                raise ConfigError("the super-resolution U-Net takes the low-res picture's noise level as its class "
                                  "vector: set super_res.class_embed_dim (e.g. its block_channels[0])")
            if s.cross_attention_dim is not None and (s.encoder_hid_dim or s.cross_attention_dim) != t.n_embd:
                raise ConfigError(f"super_res reads {s.cross_attention_dim}-wide text states; the encoder is {t.n_embd}")
        if self.standardize_text and not self.freeze_text_encoder:
            raise ConfigError("standardize_text fixes statistics of the text states, which only hold while the "
                              "encoder is frozen: set freeze_text_encoder=True or standardize_text=False")
        if not 0 <= self.condition_dropout <= 1:
            raise ConfigError(f"condition_dropout={self.condition_dropout} must be in [0, 1]")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ConfigError(f"snr_gamma={self.snr_gamma} must be positive (5 is the paper's choice) or None "
                              f"(unweighted loss)")

    @property
    def extra_channels(self) -> int:
        """Inputs of the base U-Net beyond x_t (the coordinate channels)."""
        return COORDINATE_CHANNELS if self.coordinate_channels else 0

    @property
    def _coordinates_note(self) -> str:
        return f" ({COORDINATE_CHANNELS} inputs are the coordinate channels)" if self.coordinate_channels else ""

    @property
    def latent_shape(self) -> tuple:
        """(C, h, w) of what the U-Net denoises."""
        if self.autoencoder is None:
            return (self.unet.out_channels, self.image_size, self.image_size)
        side = self.image_size // self.autoencoder.downsampling
        return (self.autoencoder.latent_channels, side, side)


class TextToImage(nn.Module):
    def __init__(self, config: TextToImageConfig):
        super().__init__()
        self.config = c = config
        self.text_encoder = TransformerLM(c.text_encoder)
        self.unet = UNet(c.unet)
        self.vae = build_autoencoder(c.autoencoder) if c.autoencoder is not None else None
        self.super_res = UNet(c.super_res) if c.super_res is not None else None
        self.scheduler = NoiseScheduler.from_dict(c.scheduler)
        self.sr_scheduler = NoiseScheduler.from_dict(c.super_res_scheduler or c.scheduler)
        if self.vae is not None:  # trained before, fixed here
            self.vae.requires_grad_(False)
        if c.freeze_text_encoder:
            self.text_encoder.requires_grad_(False)
        null = torch.full((1, c.text_length), c.pad_id, dtype=torch.long)
        null[0, 0] = c.eos_id
        self.register_buffer("null_ids", null, persistent=False)  # the empty caption: EOS only
        if c.standardize_text:  # saved with the weights: set_text_statistics fills them
            D = c.text_encoder.n_embd
            self.register_buffer("text_mean", torch.zeros(D))
            self.register_buffer("text_std", torch.ones(D))

    @property
    def device(self):
        return self.unet.device

    def num_params(self, part: Optional[str] = None) -> int:
        mod = self if part is None else getattr(self, part)
        return sum(p.numel() for p in mod.parameters()) if mod is not None else 0

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.vae, self.text_encoder if self.config.freeze_text_encoder else None):
            if frozen is not None:
                frozen.eval()  # no dropout in what does not learn
        return self

    # ------------------------------------------------------------------ the condition
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Caption ids (B, L) with mask -> the U-Net's keyword condition: text states (B, L, D) and
        their mask, plus the pooled vector as class_labels when pooled_text."""
        mask = attention_mask.to(input_ids.device)
        states = self.text_states(input_ids, mask)
        cond = {}
        if self.unet.config.cross_attention_dim is not None:
            cond = {"encoder_hidden_states": states, "encoder_attention_mask": mask.to(states.dtype)}
        if self.config.pooled_text:
            cond["class_labels"] = pool(states, mask, "mean")  # (B, D) over the real tokens
        return cond

    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """Caption ids (B, L) -> the encoder's states (B, L, D), standardised when standardize_text
        (raw: as the encoder gives them)."""
        c = self.config
        with torch.set_grad_enabled(torch.is_grad_enabled() and not c.freeze_text_encoder):
            states = self.text_encoder(input_ids, attention_mask=attention_mask, return_hidden=True)  # (B, L, D)
        if c.standardize_text and not raw:
            states = (states - self.text_mean) / self.text_std
        return states

    @torch.no_grad()
    def set_text_statistics(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 256):
        """standardize_text: the frozen encoder's per-feature mean and std over these captions' tokens
        (the real ones: padding is left out). Returns (mean, std), each (D,)."""
        if not self.config.standardize_text:
            raise ConfigError("set_text_statistics is for a pipeline with standardize_text=True")
        was = self.text_encoder.training
        self.text_encoder.eval()
        rows = []
        for i in range(0, len(input_ids), batch_size):
            ids = input_ids[i:i + batch_size].to(self.device)
            mask = attention_mask[i:i + batch_size].to(self.device)
            rows.append(self.text_states(ids, mask, raw=True)[mask.bool()])  # (real tokens, D)
        self.text_encoder.train(was)
        tokens = torch.cat(rows).float()
        if len(tokens) < 2:
            raise ConfigError(f"set_text_statistics needs at least 2 real tokens to take a std from, got {len(tokens)}")
        self.text_mean.copy_(tokens.mean(0))
        self.text_std.copy_(tokens.std(0).clamp(min=1e-3))  # a near-constant feature is not blown up
        return self.text_mean.clone(), self.text_std.clone()

    def null_condition(self) -> dict:
        """The empty caption's condition (one row, broadcast over a batch): guidance's unconditional side."""
        ids = self.null_ids
        return self.encode_text(ids, (torch.arange(ids.shape[1], device=ids.device) == 0).long()[None])

    def drop_captions(self, input_ids, attention_mask, generator=None):
        """Classifier-free guidance training: each caption becomes the empty one with probability condition_dropout."""
        null_mask = (torch.arange(input_ids.shape[1], device=input_ids.device) == 0).long()
        out = drop_condition({"input_ids": input_ids, "attention_mask": attention_mask},
                             {"input_ids": self.null_ids[0], "attention_mask": null_mask},
                             self.config.condition_dropout, generator=generator)
        return out["input_ids"], out["attention_mask"]

    # ------------------------------------------------------------------ training
    def latents_of(self, batch: dict, generator=None) -> torch.Tensor:
        """What the U-Net learns to make: the pictures in [-1, 1], or (latent diffusion) their scaled latents,
        from precomputed posterior mean / std (batch["latent_mean"], ["latent_std"]) or by encoding."""
        if self.vae is None:
            return batch["images"]
        ae = self.vae.config
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
            gdev = generator.device if generator is not None else mean.device
            z = mean + std * torch.randn(mean.shape, generator=generator, device=gdev, dtype=mean.dtype).to(mean.device)
            return (z - (ae.shift_factor or 0.0)) * ae.scaling_factor
        with torch.no_grad():
            return self.vae.to_latents(batch["images"], generator=generator)

    def loss(self, batch: dict, generator=None) -> torch.Tensor:
        """The diffusion loss of the base U-Net on a batch {"input_ids", "attention_mask", "images" (or latents)}."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.training and self.config.condition_dropout:
            ids, mask = self.drop_captions(ids, mask, generator)
        return diffusion_loss(self.denoiser, self.scheduler, self.latents_of(batch, generator), self.encode_text(ids, mask),
                              generator=generator, snr_gamma=self.config.snr_gamma)

    def denoiser(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """The base U-Net on x_t (B, C, h, w), with the coordinate channels beside it when configured."""
        if self.config.coordinate_channels:
            B, _, h, w = x.shape
            ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)[:, None].expand(h, w)
            xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)[None, :].expand(h, w)
            x = torch.cat([x, torch.stack([xs, ys]).expand(B, 2, h, w)], dim=1)  # (B, C + 2, h, w)
        return self.unet(x, t, **cond)

    def _sr_condition(self, low_res: torch.Tensor, aug_t: torch.Tensor, text: dict) -> dict:
        """The super-res U-Net's inputs besides x_t: the (noised) low-res picture, its noise level as the
        class vector, and the text states when it cross-attends."""
        s = self.super_res.config
        cond = {"low_res": low_res, "class_labels": timestep_embedding(aug_t, s.class_embed_dim)}
        if s.cross_attention_dim is not None:
            cond.update({k: v for k, v in text.items() if k.startswith("encoder_")})
        return cond

    def sr_denoiser(self, x, t, low_res, class_labels, **text):
        return self.super_res(torch.cat([x, low_res], dim=1), t, class_labels=class_labels, **text)

    def augment_low_res(self, low: torch.Tensor, aug_t: torch.Tensor, generator=None) -> torch.Tensor:
        """Upsample the low-res picture to the super-res size (bilinear) and noise it to level aug_t
        (Imagen's noise-conditioning augmentation: the second stage learns to ignore the first's artefacts)."""
        size = self.config.super_res_size
        up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        gdev = generator.device if generator is not None else up.device
        noise = torch.randn(up.shape, generator=generator, device=gdev, dtype=up.dtype).to(up.device)
        return self.sr_scheduler.add_noise(up, noise, aug_t)

    def super_res_loss(self, batch: dict, generator=None) -> torch.Tensor:
        """The super-res U-Net's diffusion loss: batch["images"] at super_res_size, batch["low_res"] at image_size."""
        if self.super_res is None:
            raise ConfigError("this pipeline has no super-resolution stage (TextToImageConfig.super_res)")
        x0, low = batch["images"], batch["low_res"]
        B, T = x0.shape[0], self.sr_scheduler.num_train_timesteps
        gdev = generator.device if generator is not None else x0.device
        top = max(1, int(self.config.noise_augmentation * T))
        aug_t = torch.randint(0, top, (B,), generator=generator, device=gdev).to(x0.device)
        text = {}
        if self.super_res.config.cross_attention_dim is not None:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            text = self.encode_text(ids, mask)
        cond = self._sr_condition(self.augment_low_res(low, aug_t, generator), aug_t, text)
        return diffusion_loss(self.sr_denoiser, self.sr_scheduler, x0, cond, generator=generator,
                              snr_gamma=self.config.snr_gamma)

    # ------------------------------------------------------------------ sampling
    def sampler(self, schedule: NoiseScheduler, thresholding: Optional[bool] = None) -> DDIMScheduler:
        """A deterministic DDIM sampler (eta 0) over the training schedule's betas."""
        d = schedule.to_dict()
        d.pop("class_name")
        d.pop("variance_type", None)
        if thresholding is not None:
            d["thresholding"] = thresholding
        return DDIMScheduler(**d)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, guidance_scale: float = 3.0,
                 num_inference_steps: int = 25, generator: Optional[torch.Generator] = None, progress: bool = True,
                 super_res: bool = True, super_res_steps: Optional[int] = None, thresholding: Optional[bool] = None,
                 return_low_res: bool = False, guidance_rescale: float = 0.0,
                 use_clipped_model_output: Optional[bool] = None):
        """Captions (B, L) -> pictures (B, 3, H, W) in [0, 1] (H = super_res_size when the pipeline has a
        second stage and super_res is True, else image_size). With return_low_res, (pictures, first stage).
        guidance_rescale: the base stage's guided prediction rescaled (diffusion.sampling.rescale_guidance).
        use_clipped_model_output: DDIM's noise estimate re-derived from the thresholded / clipped x_0.
        None: when the sampler thresholds, as Imagen's sampler uses the thresholded x_0 throughout (plain
        x_0 clipping keeps diffusers' DDIM default, the unclipped noise estimate)."""
        c = self.config
        was = self.training
        self.eval()
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        text, null = self.encode_text(ids, mask), self.null_condition()
        B = ids.shape[0]
        base = self.sampler(self.scheduler, thresholding)

        def consistent(sampler) -> bool:
            if use_clipped_model_output is not None:
                return use_clipped_model_output
            return bool(sampler.thresholding)

        x = sample(self.denoiser, base, (B, *c.latent_shape), cond=text,
                   null_cond=null, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                   generator=generator, device=self.device, progress=progress, guidance_rescale=guidance_rescale,
                   use_clipped_model_output=consistent(base))
        if self.vae is not None:
            x = self.vae.from_latents(x)
        low = x.clamp(-1, 1)
        out = low
        if super_res and self.super_res is not None:
            aug_t = torch.full((B,), int(c.sample_augmentation * self.sr_scheduler.num_train_timesteps),
                               device=self.device, dtype=torch.long)
            cond = self._sr_condition(self.augment_low_res(low, aug_t, generator), aug_t, text)
            null_sr = None
            if guidance_scale != 1.0 and self.super_res.config.cross_attention_dim is not None:
                null_sr = {**cond, **{k: v for k, v in null.items() if k.startswith("encoder_")}}
            second = self.sampler(self.sr_scheduler, thresholding)
            out = sample(self.sr_denoiser, second,
                         (B, 3, c.super_res_size, c.super_res_size), cond=cond, null_cond=null_sr,
                         guidance_scale=guidance_scale if null_sr is not None else 1.0,
                         num_inference_steps=super_res_steps or num_inference_steps, generator=generator,
                         device=self.device, progress=progress, use_clipped_model_output=consistent(second)).clamp(-1, 1)
        self.train(was)
        to01 = lambda t: ((t.float() + 1) / 2).clamp(0, 1)  # noqa: E731
        return (to01(out), to01(low)) if return_low_res else to01(out)

    def save(self, path, tokenizer=None):
        from ..checkpoints.io import save

        return save(self, path, tokenizer=tokenizer)
