"""Image autoencoders: the picture <-> a smaller grid the generative model works on.

All three share one convolutional encoder and decoder (residual blocks with GroupNorm and SiLU,
stride-2 downsampling, nearest upsampling, self-attention in the middle; latent diffusion's layout)
and differ in what sits between them:

  * `AutoencoderKL` (latent diffusion, Rombach et al. 2022): the encoder gives the mean and
    log-variance of a diagonal Gaussian per latent pixel; a KL term to N(0, I) keeps the latent
    space smooth. Parity with diffusers' AutoencoderKL.
  * `VQAutoencoder` (VQ-VAE / VQ-GAN): each latent vector is replaced by its nearest codebook
    entry; gradients pass straight through the rounding; a commitment loss pulls encoder outputs
    and codes together. Parity with diffusers' VQModel.
  * `DiscreteVAE` (DALL-E's dVAE, Ramesh et al. 2021): the encoder gives logits over K codes per
    cell; training relaxes the categorical choice with the Gumbel-softmax at a temperature, with a
    KL term to the uniform prior; the decoder reads the (soft or hard) one-hot codes through a
    codebook. The grid of code ids is what DALL-E's transformer models."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks.conv import ConvLevel, Downsample, ImageShapeError, MidBlock, ResBlock, SpatialSelfAttention, Upsample
from ..blocks.feedforward import ACTIVATIONS
from ..config import SavedConfig
from ..errors import ConfigError

KINDS = ("kl", "vq", "dvae")


@dataclass
class AutoencoderConfig(SavedConfig):
    kind: str = "kl"  # "kl" | "vq" | "dvae"
    in_channels: int = 3
    out_channels: int = 3
    block_channels: tuple = (64,)  # channels per level; the latent grid is 2^(levels-1) times smaller
    layers_per_block: int = 1  # residual blocks per encoder level (decoder levels have one more)
    latent_channels: int = 4  # kl: channels of the latent; vq: of the encoder output before quant_conv
    norm_groups: int = 32
    activation: str = "silu"
    mid_attention: bool = True  # self-attention in the middle block of encoder and decoder
    sample_size: int = 32  # the image size it is meant for (documentation)
    scaling_factor: float = 0.18215  # latents for a diffusion model: (z - shift_factor) * scaling_factor
    shift_factor: Optional[float] = None
    quant_conv: bool = True  # kl: the 1x1 convs around the latent (use_quant_conv / use_post_quant_conv)
    post_quant_conv: bool = True
    num_codes: int = 256  # vq / dvae: codebook size K
    code_dim: Optional[int] = None  # vq / dvae: width of a code vector (derived: latent_channels)
    commitment: float = 0.25  # vq: weight of the commitment term (VQ-VAE's beta)
    temperature: float = 1.0  # dvae: Gumbel-softmax temperature (DALL-E anneals 1 -> 1/16)
    straight_through: bool = False  # dvae: hard one-hot codes forward, soft gradients backward

    def __post_init__(self):
        self.block_channels = tuple(self.block_channels)
        if self.kind not in KINDS:
            raise ConfigError(f"autoencoder kind {self.kind!r} is not one of {KINDS}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        for c in self.block_channels:
            if c % self.norm_groups:
                raise ConfigError(f"block_channels {c} is not divisible by norm_groups={self.norm_groups}")
        if self.code_dim is None:
            self.code_dim = self.latent_channels
        if self.kind != "kl" and self.num_codes < 2:
            raise ConfigError(f"num_codes={self.num_codes}: a codebook needs at least 2 codes")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_channels) - 1)


# ---------------------------------------------------------------------- the shared encoder / decoder
def _mid(channels: int, c: AutoencoderConfig) -> MidBlock:
    res = [ResBlock(channels, channels, groups=c.norm_groups, eps=1e-6, activation=c.activation) for _ in range(2)]
    attn = [SpatialSelfAttention(channels, 1, groups=c.norm_groups, eps=1e-6)] if c.mid_attention else []
    return MidBlock(res, attn)


class ConvEncoder(nn.Module):
    """(B, in_channels, H, W) -> (B, out_channels, H / 2^(levels-1), W / 2^(levels-1))."""

    def __init__(self, c: AutoencoderConfig, out_channels: int):
        super().__init__()
        ch = c.block_channels
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        out = ch[0]
        for i in range(len(ch)):
            inp, out = out, ch[i]
            res = [ResBlock(inp if j == 0 else out, out, groups=c.norm_groups, eps=1e-6, activation=c.activation)
                   for j in range(c.layers_per_block)]
            down = Downsample(out, out, padding=0) if i < len(ch) - 1 else None
            self.down_blocks.append(ConvLevel(res, downsample=down))
        self.mid_block = _mid(ch[-1], c)
        self.conv_norm_out = nn.GroupNorm(c.norm_groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h, _ = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class ConvDecoder(nn.Module):
    """(B, in_channels, h, w) -> (B, out_channels, h * 2^(levels-1), w * 2^(levels-1))."""

    def __init__(self, c: AutoencoderConfig, in_channels: int):
        super().__init__()
        rev = list(reversed(c.block_channels))
        self.conv_in = nn.Conv2d(in_channels, rev[0], 3, padding=1)
        self.mid_block = _mid(rev[0], c)
        self.up_blocks = nn.ModuleList()
        out = rev[0]
        for i in range(len(rev)):
            prev, out = out, rev[i]
            res = [ResBlock(prev if j == 0 else out, out, groups=c.norm_groups, eps=1e-6, activation=c.activation)
                   for j in range(c.layers_per_block + 1)]
            up = Upsample(out, out) if i < len(rev) - 1 else None
            self.up_blocks.append(ConvLevel(res, upsample=up))
        self.conv_norm_out = nn.GroupNorm(c.norm_groups, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h, _ = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class _Autoencoder(nn.Module):
    def _check(self, x: torch.Tensor):
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels or any(s % c.downsampling for s in x.shape[2:]):
            raise ImageShapeError(f"images have shape {tuple(x.shape)}; this autoencoder takes (B, {c.in_channels}, H, W) "
                                  f"with H and W multiples of {c.downsampling}")

    @property
    def device(self):
        return next(self.parameters()).device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path, format: str = "allformers"):
        """An allformers folder, or `format="diffusers"` (AutoencoderKL / VQModel) for the 'kl' and 'vq' kinds."""
        if format == "diffusers":
            from ..checkpoints.diffusers import save_diffusers

            return save_diffusers(self, path)
        from ..checkpoints.io import save

        return save(self, path)


# ---------------------------------------------------------------------- KL
class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, exp(logvar)) of a KL autoencoder; `parameters` is
    (B, 2 * latent, h, w): mean and log-variance stacked on channels."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, self.logvar = parameters.chunk(2, dim=1)
        self.logvar = self.logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """mean + std * eps (the reparameterisation trick: differentiable in mean and std)."""
        gdev = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=gdev, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> torch.Tensor:
        """KL(q || N(0, I)) (or || other), summed over the latent: (B,).
        Per element: 0.5 (mean^2 + var - 1 - logvar)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:
            return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar
                               + other.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """-log q(sample), summed over the latent: (B,)."""
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean) ** 2 / self.var, dim=[1, 2, 3])


class AutoencoderKL(_Autoencoder):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        z = c.latent_channels
        self.encoder = ConvEncoder(c, 2 * z)
        self.decoder = ConvDecoder(c, z)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if c.quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if c.post_quant_conv else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check(x)
        h = self.encoder(x)
        return DiagonalGaussian(self.quant_conv(h) if self.quant_conv is not None else h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator=None) -> torch.Tensor:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())

    def to_latents(self, x: torch.Tensor, sample: bool = True, generator=None) -> torch.Tensor:
        """Images -> the scaled latents a diffusion model is trained on."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents / self.config.scaling_factor + (self.config.shift_factor or 0.0))

    def loss(self, x: torch.Tensor, kl_weight: float = 1e-6, generator=None) -> tuple[torch.Tensor, dict]:
        """Reconstruction MSE of a posterior sample + kl_weight * KL per latent element
        (latent diffusion trains with a small weight, ~1e-6, so the latent stays detailed)."""
        posterior = self.encode(x)
        recon = self.decode(posterior.sample(generator))
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return mse + kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}


# ---------------------------------------------------------------------- VQ
class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, D, h, w): the codes, with the straight-through gradient to the encoder
    loss: torch.Tensor  # codebook + commitment loss (a scalar)
    ids: torch.Tensor  # (B, h, w) code ids


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation (van den Oord et al. 2017).

    loss = ||sg[z] - e||^2 (moves the codes) + beta ||z - sg[e]||^2 (commits the encoder), and the
    decoder sees z + sg[e - z]: the value of e with the gradient of z (straight through)."""

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        B, D, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, D)
        ids = torch.argmin(torch.cdist(z.view(-1, D), self.embedding.weight), dim=1)
        zq = self.embedding(ids).view(z.shape)
        loss = torch.mean((zq - z.detach()) ** 2) + self.beta * torch.mean((zq.detach() - z) ** 2)
        zq = z + (zq - z).detach()
        return QuantizerOutput(zq.permute(0, 3, 1, 2).contiguous(), loss, ids.view(B, h, w))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids -> (B, D, h, w) code vectors."""
        return self.embedding(ids).permute(0, 3, 1, 2).contiguous()


class VQAutoencoder(_Autoencoder):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        self.encoder = ConvEncoder(c, c.latent_channels)
        self.quant_conv = nn.Conv2d(c.latent_channels, c.code_dim, 1)
        self.quantize = VectorQuantizer(c.num_codes, c.code_dim, c.commitment)
        self.post_quant_conv = nn.Conv2d(c.code_dim, c.latent_channels, 1)
        self.decoder = ConvDecoder(c, c.latent_channels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the latents before quantisation (B, code_dim, h, w), as VQModel.encode gives them."""
        self._check(x)
        return self.quant_conv(self.encoder(x))

    def encode_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> (B, h, w) code ids."""
        return self.quantize(self.encode(x)).ids

    def decode(self, h: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        if quantize:
            h = self.quantize(h).quantized
        return self.decoder(self.post_quant_conv(h))

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantize.lookup(ids), quantize=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        q = self.quantize(self.encode(x))
        mse = F.mse_loss(self.decode(q.quantized, quantize=False), x)
        return mse + q.loss, {"mse": mse.item(), "vq": q.loss.item()}


# ---------------------------------------------------------------------- DALL-E's dVAE
def gumbel_softmax(logits: torch.Tensor, temperature: float = 1.0, hard: bool = False, dim: int = 1,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """softmax((logits + Gumbel noise) / temperature) over `dim`: a differentiable sample of a
    categorical. hard: the one-hot of its argmax forward, with the soft sample's gradient."""
    gdev = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, device=gdev, dtype=logits.dtype).to(logits.device)
    e = (-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20)  # Exp(1) noise
    g = -torch.log(e)  # Gumbel(0, 1)
    soft = F.softmax((logits + g) / temperature, dim=dim)
    if not hard:
        return soft
    index = soft.argmax(dim=dim, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return one_hot - soft.detach() + soft


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(q || uniform over K codes) per image, summed over the grid: (B,).
    Per cell: sum_k q_k log(q_k K) = log K - H(q)."""
    logq = F.log_softmax(logits, dim=dim)
    per_cell = (logq.exp() * (logq + math.log(logits.shape[dim]))).sum(dim)  # (B, h, w)
    return per_cell.flatten(1).sum(1)


class DVAEOutput(NamedTuple):
    sample: torch.Tensor  # (B, C, H, W) the reconstruction
    logits: torch.Tensor  # (B, K, h, w) the encoder's logits over codes
    codes: torch.Tensor  # (B, K, h, w) the relaxed (or straight-through hard) one-hot codes the decoder read
    kl: torch.Tensor  # (B,) KL to the uniform prior


class DiscreteVAE(_Autoencoder):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        self.encoder = ConvEncoder(c, c.num_codes)  # logits over the K codes per cell
        self.codebook = nn.Embedding(c.num_codes, c.code_dim)
        self.decoder = ConvDecoder(c, c.code_dim)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.encoder(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> (B, h, w) code ids: the most likely code of each cell (what DALL-E's transformer reads)."""
        return self.logits(x).argmax(dim=1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) one-hot or relaxed codes -> images: each cell reads its mixture of codebook vectors."""
        return self.decoder(torch.einsum("bkhw,kd->bdhw", codes, self.codebook.weight))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code ids -> (B, C, H, W) images."""
        return self.decoder(self.codebook(ids).permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor, temperature: Optional[float] = None, hard: Optional[bool] = None,
                generator=None) -> DVAEOutput:
        c = self.config
        logits = self.logits(x)
        codes = gumbel_softmax(logits, c.temperature if temperature is None else temperature,
                               c.straight_through if hard is None else hard, dim=1, generator=generator)
        return DVAEOutput(self.decode_codes(codes), logits, codes, kl_to_uniform(logits))

    def loss(self, x: torch.Tensor, kl_weight: float = 1.0, temperature: Optional[float] = None,
             generator=None) -> tuple[torch.Tensor, dict]:
        """Reconstruction MSE + kl_weight * KL to the uniform prior per image pixel (the ELBO's terms;
        DALL-E raises kl_weight to 6.6 over training and anneals the temperature to 1/16)."""
        out = self(x, temperature=temperature, generator=generator)
        mse = F.mse_loss(out.sample, x)
        kl = out.kl.mean() / x[0].numel()
        return mse + kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}


MODELS = {"kl": AutoencoderKL, "vq": VQAutoencoder, "dvae": DiscreteVAE}


def build_autoencoder(config: AutoencoderConfig) -> _Autoencoder:
    return MODELS[config.kind](config)
