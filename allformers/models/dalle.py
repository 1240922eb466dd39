"""DALL-E (Ramesh et al. 2021): one decoder-only transformer over a caption's tokens followed by
the picture's tokens, the grid of codes an image autoencoder (the dVAE, or a VQ model) gives.

    [BOS] t_1 ... t_L  i_1 ... i_N        L caption slots (padded), N = grid x grid image codes
      |    |      |     |        |        each input: its token embedding + a position embedding:
      v    v      v     v        v          text slots a learned one per slot, image codes the
    t_1  t_2 ...  i_1  i_2 ... i_N          embedding of their row plus that of their column

The stack is the zoo's TransformerLM (causal, positions "none": the embeddings above are added
here and passed as inputs_embeds). Text and image tokens share one vocabulary table; each position
predicts only among its own kind (text logits over the caption vocabulary, image logits over the
codebook). The loss weights the mean text cross-entropy by 1/8 and the mean image cross-entropy by
7/8, the paper's weighting: the model is an image model that also keeps the caption's statistics.

Sampling fills the caption, then draws the N codes one by one (temperature, top-k) through the KV
cache, and the autoencoder decodes the grid to pixels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import Config, SavedConfig
from ..errors import ConfigError
from .autoencoders import AutoencoderConfig, build_autoencoder
from .lm import TransformerLM


@dataclass
class DALLEConfig(SavedConfig):
    text_vocab_size: int = 64  # caption tokens (padding included)
    text_length: int = 12  # caption slots; shorter captions are padded with pad_id
    pad_id: int = 0
    image_vocab_size: int = 256  # the autoencoder's codebook size
    grid: int = 8  # image codes per side (the autoencoder's latent grid)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    text_loss_weight: float = 1 / 8  # the image's weight is 1 - this (DALL-E: 1/8 and 7/8)
    autoencoder: Optional[AutoencoderConfig] = None  # the image tokenizer ("vq" or "dvae"), kept in the same folder

    def __post_init__(self):
        if isinstance(self.autoencoder, dict):
            self.autoencoder = AutoencoderConfig.from_dict(self.autoencoder)
        if self.autoencoder is not None:
            ae = self.autoencoder
            if ae.kind not in ("vq", "dvae"):
                raise ConfigError(f"DALL-E reads discrete codes: its autoencoder must be 'vq' or 'dvae', not {ae.kind!r}")
            if ae.num_codes != self.image_vocab_size:
                raise ConfigError(f"image_vocab_size={self.image_vocab_size} but the autoencoder has {ae.num_codes} "
                                  f"codes; make them equal")
        if not 0.0 <= self.text_loss_weight <= 1.0:
            raise ConfigError(f"text_loss_weight={self.text_loss_weight} must be in [0, 1]")
        if not 0 <= self.pad_id < self.text_vocab_size:
            raise ConfigError(f"pad_id={self.pad_id} is not a caption token (text_vocab_size={self.text_vocab_size})")

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def bos_id(self) -> int:
        """The start token: the last id of the joint vocabulary (after the text ids and the codes)."""
        return self.text_vocab_size + self.image_vocab_size

    def lm_config(self) -> Config:
        return Config(name="dalle", family="decoder", vocab_size=self.bos_id + 1,
                      block_size=self.text_length + self.image_tokens, n_layer=self.n_layer, n_head=self.n_head,
                      n_embd=self.n_embd, position="none", dropout=self.dropout, tie_embeddings=True)


class DALLE(nn.Module):
    def __init__(self, config: DALLEConfig):
        super().__init__()
        self.config = c = config
        self.transformer = TransformerLM(c.lm_config())
        self.text_pos = nn.Embedding(c.text_length + 1, c.n_embd)  # BOS + the caption slots
        self.row_pos = nn.Embedding(c.grid, c.n_embd)
        self.col_pos = nn.Embedding(c.grid, c.n_embd)
        for emb in (self.text_pos, self.row_pos, self.col_pos):
            nn.init.normal_(emb.weight, 0.0, 0.02)
        self.vae = build_autoencoder(c.autoencoder) if c.autoencoder is not None else None
        if self.vae is not None:  # a fixed tokenizer of pictures: never trained with the transformer
            self.vae.requires_grad_(False)

    @property
    def device(self):
        return self.transformer.device

    def num_params(self, transformer_only: bool = True) -> int:
        mods = [self.transformer, self.text_pos, self.row_pos, self.col_pos]
        n = sum(p.numel() for m in mods for p in m.parameters())
        return n if transformer_only or self.vae is None else n + self.vae.num_params()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    # ------------------------------------------------------------------ the sequence
    def positions(self, T: int) -> torch.Tensor:
        """(T, D) position embeddings of the first T inputs: BOS and the text slots, then the image
        codes in raster order, each its row's embedding plus its column's."""
        grid = (self.row_pos.weight[:, None, :] + self.col_pos.weight[None, :, :]).flatten(0, 1)  # (N, D)
        return torch.cat([self.text_pos.weight, grid])[:T]

    def inputs(self, text_ids: torch.Tensor, image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L) caption ids [+ (B, n) image codes] -> (B, 1 + L + n) joint ids, BOS first."""
        c = self.config
        if text_ids.dim() != 2 or text_ids.shape[1] != c.text_length:
            raise ConfigError(f"captions must be padded to (B, text_length={c.text_length}); got {tuple(text_ids.shape)}")
        bos = torch.full_like(text_ids[:, :1], c.bos_id)
        parts = [bos, text_ids]
        if image_ids is not None:
            parts.append(image_ids.flatten(1) + c.text_vocab_size)
        return torch.cat(parts, dim=1)

    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Joint ids (B, T) at sequence positions start.. -> (B, T, D) input vectors."""
        pos = self.positions(start + ids.shape[1])[start:]
        return self.transformer.wte(ids) + pos

    def forward(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing -> (text logits (B, L, text_vocab), image logits (B, N, image_vocab)): each
        position's prediction of the next token, among its own kind."""
        c = self.config
        ids = self.inputs(text_ids, image_ids)[:, :-1]  # the last code is only predicted
        logits = self.transformer(None, inputs_embeds=self.embed(ids))  # (B, L + N, V)
        L = c.text_length
        return logits[:, :L, :c.text_vocab_size], logits[:, L:, c.text_vocab_size:c.bos_id]

    def loss(self, text_ids: torch.Tensor, image_ids: torch.Tensor, return_parts: bool = False):
        """text_loss_weight * mean text cross-entropy + (1 - text_loss_weight) * mean image cross-entropy."""
        text_logits, image_logits = self(text_ids, image_ids)
        text = F.cross_entropy(text_logits.flatten(0, 1).float(), text_ids.flatten())
        image = F.cross_entropy(image_logits.flatten(0, 1).float(), image_ids.flatten())
        w = self.config.text_loss_weight
        total = w * text + (1 - w) * image
        return (total, {"text_loss": text.item(), "image_loss": image.item()}) if return_parts else total

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate_codes(self, text_ids: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                       top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                       progress: bool = False) -> torch.Tensor:
        """(B, L) padded captions -> (B, grid, grid) image codes drawn one by one under the caption."""
        from ..generation.generate import process_logits

        c = self.config
        B, N = text_ids.shape[0], c.image_tokens
        prompt = self.inputs(text_ids.to(self.device))
        cache = self.transformer.new_cache(B, c.text_length + N)
        logits = self.transformer(None, inputs_embeds=self.embed(prompt), cache=cache, last_only=True)
        codes = torch.empty(B, N, dtype=torch.long, device=self.device)
        for k in tqdm(range(N), desc="image tokens", disable=not progress, leave=False):
            lg = logits[:, -1, c.text_vocab_size:c.bos_id].float()
            if temperature == 0:
                nxt = lg.argmax(-1)
            else:
                lg = process_logits(lg, codes[:, :k], temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=1.0)
                probs = lg.softmax(-1)
                nxt = torch.multinomial(probs.cpu() if generator is not None else probs, 1,
                                        generator=generator).squeeze(1).to(self.device)
            codes[:, k] = nxt
            if k < N - 1:  # the last code needs no forward pass
                x = self.embed((nxt + c.text_vocab_size)[:, None], start=1 + c.text_length + k)
                logits = self.transformer(None, inputs_embeds=x, cache=cache)
        return codes.view(B, c.grid, c.grid)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, grid, grid) codes -> (B, 3, H, W) pictures in [0, 1] through the bundled autoencoder."""
        if self.vae is None:
            raise ConfigError("this DALL-E has no autoencoder (DALLEConfig.autoencoder): decode the codes with yours")
        images = self.vae.decode_ids(codes) if self.vae.config.kind == "vq" else self.vae.decode(codes)
        return ((images.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def generate(self, text_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """(B, L) padded captions -> (B, 3, H, W) pictures in [0, 1]."""
        return self.decode(self.generate_codes(text_ids, **kwargs))

    def save(self, path, tokenizer=None):
        from ..checkpoints.io import save

        return save(self, path, tokenizer=tokenizer)
