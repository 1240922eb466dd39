"""Diffusion: noise schedules (DDPM, DDIM), the training loss, classifier-free guidance and the
sampling loop that GLIDE, latent diffusion and Imagen share. Sits above the models: a denoiser is
any `model(x_t, t, **cond)`."""
from .sampling import diffusion_loss, drop_condition, guided_prediction, rescale_guidance, sample
from .schedulers import (SCHEDULERS, DDIMScheduler, DDPMScheduler, NoiseScheduler, StepOutput, cosine_betas,
                         dynamic_threshold)

__all__ = ["DDPMScheduler", "DDIMScheduler", "NoiseScheduler", "SCHEDULERS", "StepOutput", "cosine_betas",
           "dynamic_threshold", "diffusion_loss", "drop_condition", "guided_prediction", "rescale_guidance",
           "sample"]
