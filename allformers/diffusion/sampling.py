"""The diffusion core every text-to-image system here shares: the training loss, condition dropout
for classifier-free guidance, and the sampling loop.

A denoiser is any callable `model(x_t, t, **cond) -> prediction` with x_t (B, C, H, W) and t (B,)
integer timesteps; `cond` is a dict of keyword tensors whose first dimension is the batch
(e.g. {"encoder_hidden_states": (B, S, D), "encoder_attention_mask": (B, S)} for the U-Net).
The "null" condition (the empty caption, or a learned null embedding) has the same keys, with
rows of shape (1, ...) or (...) that broadcast over the batch.

Classifier-free guidance (Ho & Salimans 2021): train one model on both, replacing the condition
by the null one with probability p; sample with eps = eps(x, null) + w (eps(x, c) - eps(x, null)).
w = 1 is the conditional model alone (and costs one forward pass, not two)."""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from .schedulers import NoiseScheduler

Cond = Optional[dict]


def _rows(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A null-condition entry (1, ...) or (...) -> the shape of the batch entry `like` (B, ...)."""
    if value.dim() == like.dim() - 1:
        value = value[None]
    return value.to(device=like.device, dtype=like.dtype).expand_as(like)


def _check_keys(cond: dict, null: dict):
    if set(cond) != set(null):
        raise ConfigError(f"the null condition has keys {sorted(null)} but the condition has {sorted(cond)}; "
                          f"give both the same entries")


def drop_condition(cond: dict, null_cond: dict, p: float, generator: Optional[torch.Generator] = None) -> dict:
    """For training with classifier-free guidance: each row's condition becomes the null condition with
    probability p (the same rows for every entry of the dict, so a caption and its mask go together)."""
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"condition dropout p={p} must be in [0, 1]")
    _check_keys(cond, null_cond)
    B = next(iter(cond.values())).shape[0]
    drop = torch.rand(B, generator=generator, device=generator.device if generator is not None else "cpu") < p
    out = {}
    for k, v in cond.items():
        keep = drop.to(v.device).reshape(B, *(1,) * (v.dim() - 1))
        out[k] = torch.where(keep, _rows(null_cond[k], v), v)
    return out


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023 (sec. 3.4): a large guidance scale inflates the prediction's scale and saturates
    the picture; rescale each sample's guided prediction to the conditional one's standard deviation,
    and blend: phi * rescaled + (1 - phi) * guided (phi = 0 is plain guidance, the paper uses 0.7)."""
    dims = tuple(range(1, guided.dim()))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def guided_prediction(model: Callable, x: torch.Tensor, t: torch.Tensor, cond: Cond = None, null_cond: Cond = None,
                      guidance_scale: float = 1.0, guidance_rescale: float = 0.0) -> torch.Tensor:
    """The classifier-free-guided prediction. Conditional and null passes run as one batch of 2B.
    guidance_rescale > 0: rescale_guidance with that phi."""
    cond = cond or {}
    if guidance_scale == 1.0 or null_cond is None:
        return model(x, t, **cond)
    _check_keys(cond, null_cond)
    both = {k: torch.cat([v, _rows(null_cond[k], v)]) for k, v in cond.items()}
    c, u = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
    guided = u + guidance_scale * (c - u)
    return rescale_guidance(guided, c, guidance_rescale) if guidance_rescale else guided


def diffusion_loss(model: Callable, scheduler: NoiseScheduler, x0: torch.Tensor, cond: Cond = None, *,
                   generator: Optional[torch.Generator] = None, timesteps: Optional[torch.Tensor] = None,
                   noise: Optional[torch.Tensor] = None, snr_gamma: Optional[float] = None) -> torch.Tensor:
    """DDPM's simple loss: t ~ U{0..T-1}, eps ~ N(0, I), x_t = q(x_t | x_0), MSE between the model's
    output and the target of the scheduler's prediction_type (eps, v or x_0). With snr_gamma, each
    sample's MSE is weighted by the scheduler's min-SNR-gamma weight (a mean over the batch still)."""
    B = x0.shape[0]
    gdev = generator.device if generator is not None else x0.device
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (B,), generator=generator, device=gdev)
    timesteps = timesteps.to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype)
    noise = noise.to(x0.device)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    pred = model(x_t, timesteps, **(cond or {}))
    target = scheduler.training_target(x0, noise, timesteps).float()
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target)
    per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)  # (B,)
    return (scheduler.min_snr_weight(timesteps, snr_gamma).float() * per_sample).mean()


@torch.no_grad()
def sample(model: Callable, scheduler: NoiseScheduler, shape, *, cond: Cond = None, null_cond: Cond = None,
           guidance_scale: float = 1.0, num_inference_steps: int = 50, generator: Optional[torch.Generator] = None,
           latents: Optional[torch.Tensor] = None, device=None, progress: bool = True,
           callback: Optional[Callable] = None, guidance_rescale: float = 0.0,
           use_clipped_model_output: bool = False) -> torch.Tensor:
    """Run the reverse process from pure noise (or `latents`) to x_0: (B, C, H, W).

    The starting noise and every step's noise come from `generator`, so a seed fixes the picture.
    `callback(i, t, x)` sees the sample after each step (for pictures of the trajectory).
    guidance_rescale in [0, 1]: see rescale_guidance (0: plain classifier-free guidance).
    use_clipped_model_output (DDIM only): each step re-derives the noise estimate from the clipped or
    thresholded x_0, so the step's two halves agree (diffusers' DDIMScheduler.step option)."""
    device = torch.device(device) if device is not None else (latents.device if latents is not None else torch.device("cpu"))
    if guidance_scale != 1.0 and null_cond is None:
        raise ConfigError(f"guidance_scale={guidance_scale} needs a null_cond (the unconditional input); "
                          f"pass null_cond or use guidance_scale=1")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ConfigError(f"guidance_rescale={guidance_rescale} must be in [0, 1] (0: off; 0.7 is Lin et al.'s)")
    step_options = {}
    if use_clipped_model_output:
        if "use_clipped_model_output" not in inspect.signature(scheduler.step).parameters:
            raise ConfigError(f"use_clipped_model_output is a DDIM option; {type(scheduler).__name__}.step has none "
                              f"(sample with a DDIMScheduler or leave it False)")
        step_options["use_clipped_model_output"] = True
    if latents is None:
        gdev = generator.device if generator is not None else device
        latents = torch.randn(tuple(shape), generator=generator, device=gdev)
    x = latents.to(device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    cond = {k: v.to(device) for k, v in (cond or {}).items()}
    null_cond = {k: v.to(device) for k, v in null_cond.items()} if null_cond is not None else None
    B = x.shape[0]
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False)):
        tt = torch.full((B,), int(t), device=device, dtype=torch.long)
        out = guided_prediction(model, scheduler.scale_model_input(x, t), tt, cond, null_cond, guidance_scale,
                                 guidance_rescale)
        x = scheduler.step(out, t, x, generator=generator, **step_options).prev_sample
        if callback is not None:
            callback(i, int(t), x)
    return x
