"""Encoder-decoder: two TransformerLM stacks from one config. The encoder is bidirectional
with no head; the decoder is causal, cross-attends to the encoder output in every block, and
owns the LM head. Token embeddings are shared between the two (T5, BART, Marian)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..config import Config
from .lm import Cache, TransformerLM


class Seq2SeqLM(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.encoder = TransformerLM(config.encoder_config())
        self.decoder = TransformerLM(config.decoder_config())
        self.decoder.wte = self.encoder.wte  # one shared vocabulary table

    @property
    def device(self):
        return self.encoder.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, S) -> encoder states (B, S, C)."""
        return self.encoder(input_ids, attention_mask=attention_mask, return_hidden=True)

    def new_cache(self, batch: int, max_len: Optional[int] = None) -> Cache:
        return self.decoder.new_cache(batch, max_len)

    def forward(self, input_ids: Optional[torch.Tensor], decoder_input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, encoder_out: Optional[torch.Tensor] = None,
                cache: Optional[Cache] = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for decoder_input_ids (B, T) given the source (B, S).
        Pass encoder_out to skip the encoder (generation runs it once)."""
        if encoder_out is None:
            encoder_out = self.encode(input_ids, attention_mask)
        return self.decoder(decoder_input_ids, cache=cache, last_only=last_only, context=encoder_out,
                            context_mask=attention_mask)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: decoder inputs are the labels moved one step right after the start token."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, 0)

    def save(self, path, format: str = "allformers", **kwargs):
        from ..checkpoints import save

        return save(self, path, format=format, **kwargs)

    def generate(self, *args, **kwargs):
        from ..generation.seq2seq import generate_seq2seq

        return generate_seq2seq(self, *args, **kwargs)
