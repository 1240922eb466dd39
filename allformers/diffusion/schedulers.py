"""Noise schedules as small swappable classes (diffusers' design): DDPM (Ho et al. 2020) and DDIM
(Song et al. 2021).

Both share the forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), with
abar_t = prod_{s<=t} (1 - beta_s), and the conversions between what a network predicts
(epsilon, v = sqrt(abar) eps - sqrt(1 - abar) x_0, or x_0 itself) and the clean sample.
They differ only in `step`, the reverse update from x_t to x_{t-1}.

Every operation is written in the order diffusers uses (0-dim float32 tensors for the schedule
values), so whole runs equal `DDPMScheduler` / `DDIMScheduler` to the last bit on CPU."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


def cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), as betas."""
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def make_betas(schedule: str, n: int, beta_start: float, beta_end: float) -> torch.Tensor:
    if schedule == "linear":  # DDPM's
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if schedule == "scaled_linear":  # latent diffusion's: linear in sqrt(beta)
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        return cosine_betas(n)
    raise ConfigError(f"beta_schedule {schedule!r} is not one of {BETA_SCHEDULES}")


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x_{t-1}
    pred_original_sample: torch.Tensor  # the model's x_0 estimate (after clipping / thresholding)


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022): per sample, s = the `ratio` quantile of
    |x0|, clamped to [1, max_value]; x0 is clipped to [-s, s] and divided by s, so saturated pixels
    are pulled inwards instead of piling up at +-1 under a large guidance weight."""
    dtype = x0.dtype
    B = x0.shape[0]
    flat = x0.float().reshape(B, -1)  # quantile needs float32/64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value)[:, None]  # (B, 1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) schedule values -> (B, 1, 1, ...) broadcastable against `like`."""
    values = values.flatten()
    return values.reshape(values.shape + (1,) * (like.dim() - 1))


class NoiseScheduler:
    """What DDPM and DDIM share: the betas, q(x_t | x_0), the training target and the x_0 estimate."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 clip_sample: bool = True, clip_sample_range: float = 1.0, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", steps_offset: int = 0):
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        if timestep_spacing not in SPACINGS:
            raise ConfigError(f"timestep_spacing {timestep_spacing!r} is not one of {SPACINGS}")
        self.num_train_timesteps, self.beta_start, self.beta_end = num_train_timesteps, beta_start, beta_end
        self.beta_schedule, self.prediction_type = beta_schedule, prediction_type
        self.clip_sample, self.clip_sample_range = clip_sample, clip_sample_range
        self.thresholding, self.dynamic_thresholding_ratio = thresholding, dynamic_thresholding_ratio
        self.sample_max_value, self.timestep_spacing, self.steps_offset = sample_max_value, timestep_spacing, steps_offset
        self.trained_betas = None if trained_betas is None else [float(b) for b in trained_betas]
        if trained_betas is not None:
            self.betas = torch.tensor(self.trained_betas, dtype=torch.float32)
            self.num_train_timesteps = len(self.betas)
        else:
            self.betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # abar_t
        self.num_inference_steps: Optional[int] = None
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    # ------------------------------------------------------------------ config
    _FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
               "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
               "timestep_spacing", "steps_offset")

    def to_dict(self) -> dict:
        return {"class_name": type(self).__name__, **{k: getattr(self, k) for k in self._FIELDS}}

    @staticmethod
    def from_dict(d: dict) -> "NoiseScheduler":
        d = dict(d)
        name = d.pop("class_name", "DDPMScheduler")
        if name not in SCHEDULERS:
            raise ConfigError(f"scheduler class_name {name!r} is not one of {sorted(SCHEDULERS)}")
        return SCHEDULERS[name](**d)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self._FIELDS if k != 'trained_betas')})"

    # ------------------------------------------------------------------ forward process
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, one timestep per sample."""
        abar = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)[timesteps.to(original_samples.device)]
        return _per_sample(abar ** 0.5, original_samples) * original_samples + \
            _per_sample((1 - abar) ** 0.5, original_samples) * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022), the v_prediction target."""
        abar = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[timesteps.to(sample.device)]
        return _per_sample(abar ** 0.5, sample) * noise - _per_sample((1 - abar) ** 0.5, sample) * sample

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network should output at x_t for this prediction_type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.get_velocity(x0, noise, timesteps)
        return x0

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The signal-to-noise ratio abar_t / (1 - abar_t) of each timestep: (B,)."""
        abar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return abar / (1 - abar)

    def min_snr_weight(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023), (B,): each timestep's loss counts as if its
        target were x_0 with weight min(SNR, gamma), so the many low-noise steps, whose x_0 is nearly
        given, stop dominating the gradient. Written for this prediction_type's MSE: / SNR for epsilon,
        / (SNR + 1) for v, 1 for x_0."""
        if gamma <= 0:
            raise ConfigError(f"snr_gamma={gamma} must be positive (5 is the paper's choice)")
        snr = self.snr(timesteps)
        if self.prediction_type == "epsilon":
            return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, finite where SNR is 0
        w = snr.clamp(max=gamma)
        return w / (snr + 1) if self.prediction_type == "v_prediction" else w

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample  # DDPM / DDIM feed x_t unscaled (kept for diffusers' interface)

    # ------------------------------------------------------------------ reverse process helpers
    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n, T = num_inference_steps, self.num_train_timesteps
        if n > T:
            raise ConfigError(f"num_inference_steps={n} is more than num_train_timesteps={T}; use at most {T}")
        if n < 1:
            raise ConfigError(f"num_inference_steps={n}: use at least 1")
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        if self.timestep_spacing == "leading":
            return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + self.steps_offset
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1  # trailing

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the `num_inference_steps` timesteps a sampling run visits (descending)."""
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(self._spaced_timesteps(num_inference_steps)).to(device)

    def _x0_and_eps(self, model_output, sample, alpha_prod_t):
        """The network's output -> (x_0 estimate, epsilon estimate)."""
        beta_prod_t = 1 - alpha_prod_t
        if self.prediction_type == "epsilon":
            x0 = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - alpha_prod_t ** 0.5 * x0) / beta_prod_t ** 0.5
        else:  # v_prediction
            x0 = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
            eps = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample
        return x0, eps

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        if self.thresholding:
            return dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        if self.clip_sample:
            return x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0

    def __len__(self):
        return self.num_train_timesteps


def _noise(shape, like: torch.Tensor, generator, noise):
    if noise is not None:
        return noise.to(device=like.device, dtype=like.dtype)
    # a CPU generator draws on the CPU (diffusers' randn_tensor), so seeds give the same noise on any device
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class DDPMScheduler(NoiseScheduler):
    """Ancestral sampling: x_{t-1} ~ q(x_{t-1} | x_t, x_0 = the model's estimate). `variance_type`
    "fixed_small" is the posterior variance beta~_t, "fixed_large" is beta_t (DDPM's two choices)."""
    VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")
    _FIELDS = NoiseScheduler._FIELDS + ("variance_type",)

    def __init__(self, *args, variance_type: str = "fixed_small", **kwargs):
        super().__init__(*args, **kwargs)
        if variance_type not in self.VARIANCES:
            raise ConfigError(f"variance_type {variance_type!r} is not one of {self.VARIANCES} (learned variances "
                              f"need a model that outputs them; none here does)")
        self.variance_type = variance_type
        self.one = torch.tensor(1.0)

    def previous_timestep(self, timestep: int) -> int:
        if self.num_inference_steps:
            index = int((self.timesteps == timestep).nonzero()[0, 0])
            return -1 if index == len(self.timesteps) - 1 else int(self.timesteps[index + 1])
        return int(timestep) - 1

    def _variance(self, t: int, prev_t: int) -> torch.Tensor:
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
        if self.variance_type == "fixed_small_log":  # (kept as diffusers has it: this is already the std)
            return torch.exp(0.5 * torch.log(variance))
        if self.variance_type == "fixed_large":
            return current_beta_t
        return variance

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             noise: Optional[torch.Tensor] = None) -> StepOutput:
        """x_t -> x_{t-1}. The added noise comes from `generator` (or is passed as `noise`)."""
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        x0, _ = self._x0_and_eps(model_output, sample, alpha_prod_t)
        x0 = self._clip(x0)
        # the mean of q(x_{t-1} | x_t, x_0), DDPM eq. 7
        x0_coeff = (alpha_prod_t_prev ** 0.5 * current_beta_t) / beta_prod_t
        xt_coeff = current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t
        prev = x0_coeff * x0 + xt_coeff * sample
        if t > 0:
            z = _noise(model_output.shape, model_output, generator, noise)
            std = self._variance(t, prev_t)
            prev = prev + (std if self.variance_type == "fixed_small_log" else std ** 0.5) * z
        return StepOutput(prev, x0)


class DDIMScheduler(NoiseScheduler):
    """DDIM's non-Markovian update: x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta * sqrt(beta~_t). eta = 0 is deterministic (the same x_T always gives the same image),
    eta = 1 has DDPM's variance."""
    _FIELDS = NoiseScheduler._FIELDS + ("set_alpha_to_one", "eta")

    def __init__(self, *args, set_alpha_to_one: bool = True, eta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_alpha_to_one, self.eta = set_alpha_to_one, eta
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def _variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: Optional[float] = None,
             use_clipped_model_output: bool = False, generator=None, noise: Optional[torch.Tensor] = None) -> StepOutput:
        if self.num_inference_steps is None:
            raise ConfigError("DDIMScheduler.step needs set_timesteps(num_inference_steps) first")
        eta = self.eta if eta is None else eta
        t = int(timestep)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        x0, eps = self._x0_and_eps(model_output, sample, alpha_prod_t)
        x0 = self._clip(x0)
        std_dev_t = eta * self._variance(t, prev_t) ** 0.5
        if use_clipped_model_output:  # re-derive eps from the clipped x0
            eps = (sample - alpha_prod_t ** 0.5 * x0) / beta_prod_t ** 0.5
        direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * eps
        prev = alpha_prod_t_prev ** 0.5 * x0 + direction
        if eta > 0:
            prev = prev + std_dev_t * _noise(model_output.shape, model_output, generator, noise)
        return StepOutput(prev, x0)


SCHEDULERS = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}
