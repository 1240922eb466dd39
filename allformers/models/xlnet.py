"""Transformer-XL and XLNet: one stack of post-norm blocks with relative attention and memory.

Transformer-XL (Dai et al. 2019, `causal=True`) reads text in segments. Each layer keeps the hidden
states it was given for the last `mem_len` tokens (its memory, detached: no gradient flows into the
past) and the next segment's keys/values are [memory ; segment]. Post-norm is the paper's layout;
pre-norm is its `pre_lnorm` option. Positions are relative (sinusoids of
the distance, blocks/relative_xl.py), so a remembered token keeps its meaning when the window moves.

XLNet (Yang et al. 2019, `causal=False`) is the same core pretrained by permutation language modelling:
`perm_mask` says which tokens each token may see (a factorisation order), and a second stream, the
query stream, starts from one learned vector (`mask_emb`) at the positions of `target_mapping` and
predicts tokens it never sees — there is no [MASK] token in the input. `objectives/permutation_lm.py`
builds the masks; Hugging Face's XLNetLMHeadModel loads both ways (checkpoints/hf_xlnet.py).

The class is a TransformerLM (embeddings, blocks, tied head, save/generate) with its own forward."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..blocks.relative_xl import NEG, XLPositions
from ..config import Config
from ..errors import AllformersError
from .lm import TransformerLM


class XLMemory:
    """Per layer, the hidden states that layer was given for the last `mem_len` tokens (None: all of them,
    as a KV cache keeps them), detached; `key_mask` (B, M) marks real tokens when a batch was padded.
    Pass the same object to consecutive calls (`model(x, cache=memory)`): each call reads it, then
    replaces it with what the next segment should remember."""

    def __init__(self, n_layer: int, mem_len: Optional[int] = None, reuse_len: int = 0):
        if mem_len is not None and mem_len < 0:
            raise AllformersError(f"mem_len={mem_len} must be >= 0 (None keeps every past token)")
        self.layers: list = [None] * n_layer  # (B, M, C) each
        self.key_mask: Optional[torch.Tensor] = None
        self.mem_len, self.reuse_len = mem_len, reuse_len

    @property
    def length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0].shape[1]

    @property
    def batch(self) -> Optional[int]:
        return None if self.layers[0] is None else self.layers[0].shape[0]

    def keep(self, past: Optional[torch.Tensor], new: torch.Tensor) -> Optional[torch.Tensor]:
        """What to remember of past (B, M, ...) followed by new (B, T, ...): the first reuse_len new
        tokens (0: all) appended, then the last mem_len of everything; detached."""
        if self.reuse_len:
            new = new[:, :self.reuse_len]
        both = new if past is None else torch.cat([past, new], dim=1)
        if self.mem_len is not None:
            both = both[:, both.shape[1] - min(self.mem_len, both.shape[1]):]
        return both.detach() if both.shape[1] else None

    def reorder(self, index: torch.Tensor):
        """Keep batch rows `index` (beam search)."""
        self.layers = [m.index_select(0, index) if m is not None else None for m in self.layers]
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)


def segment_recurrence_mask(lengths: Sequence[int], mem_len: int) -> torch.Tensor:
    """What memory computes, written as one mask: (T, T) bool, True = blocked, for a causal pass over
    segments of `lengths` read one after another with `mem_len` tokens of memory. Token p of a segment
    starting at s sees keys s - mem_len .. p; the remembered states saw their own windows the same way,
    so one pass with this mask (as perm_mask) gives the logits of the recurrent run."""
    T = sum(lengths)
    starts = torch.repeat_interleave(torch.tensor([sum(lengths[:k]) for k in range(len(lengths))]),
                                     torch.tensor(list(lengths)))
    keys = torch.arange(T)
    return (keys[None, :] < (starts - mem_len)[:, None]) | (keys[None, :] > torch.arange(T)[:, None])


class TransformerXL(TransformerLM):
    def __init__(self, config: Config):
        super().__init__(config)
        self.positions = XLPositions.from_config(config)  # sinusoids of the distances, shared by every layer
        # XLNet's query stream starts from this one vector at every predicted position (C numbers).
        self.mask_emb = nn.Parameter(torch.empty(1, 1, config.n_embd).normal_(0.0, 0.02))

    def new_memory(self, mem_len: Optional[int] = None, reuse_len: Optional[int] = None) -> XLMemory:
        """Memory for segment-by-segment reading, by default the config's mem_len / reuse_len."""
        c = self.config
        return XLMemory(c.n_layer, c.mem_len if mem_len is None else mem_len,
                        c.reuse_len if reuse_len is None else reuse_len)

    def new_cache(self, batch: int = 0, max_len: Optional[int] = None) -> XLMemory:
        """Generation's cache is the memory: every past token (or the last mem_len when the config sets it)."""
        return XLMemory(self.config.n_layer, self.config.mem_len or None)

    # ------------------------------------------------------------------ forward
    def forward(self, idx: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[XLMemory] = None, last_only: bool = False, return_hidden: bool = False,
                token_type_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, perm_mask: Optional[torch.Tensor] = None,
                target_mapping: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab), or (B, P, vocab) for the P query-stream rows of target_mapping.

        cache: an XLMemory read before and updated after the call (segment recurrence, or generation).
        attention_mask (B, T): 1 real, 0 padding. token_type_ids (B, T): segments (relative_segments=True;
        remembered tokens count as segment 0). perm_mask (B, T, T): 1 where token i may NOT see token j.
        target_mapping (B, P, T): row p is one-hot on the position the p-th query-stream row predicts."""
        c = self.config
        if (idx is None) == (inputs_embeds is None):
            raise AllformersError("pass exactly one of idx (token ids) and inputs_embeds (B, T, C)")
        if position_ids is not None:
            raise AllformersError("Transformer-XL / XLNet positions are relative distances; position_ids are not used")
        x = self.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if c.embed_scale is not None:
            x = x * c.embed_scale
        B, T = x.shape[:2]
        M = cache.length if cache is not None else 0
        memories = cache.layers if cache is not None else [None] * c.n_layer
        pad = None if attention_mask is None or bool(attention_mask.all()) else ~attention_mask.bool()  # (B, T)
        key_pad = self._key_pad(pad, cache, B, T, x.device)  # (B, M + T) or None
        mask_h, mask_g = self._masks(B, T, M, key_pad, perm_mask, x.device)
        kwargs = dict(pos_emb=self.drop(self.positions(T, M + T, B, x.device)), mask=mask_h,
                      seg_diff=self._segments(token_type_ids, B, M))
        x = self.drop(x)
        if target_mapping is not None:  # two streams in one tensor: [h ; g]
            P = target_mapping.shape[1]
            g = self.drop(self.mask_emb.expand(B, P, -1))
            x = torch.cat([x, g], dim=1)
            kwargs.update(n_query=P, query_mask=mask_g, target_mapping=target_mapping.to(x.dtype))
        remembered = []
        for i, block in enumerate(self.blocks):
            if cache is not None:  # what this layer's attention reads of the segment joins its memory:
                # post-norm the layer input, pre-norm its normalised input (Transformer-XL's pre_lnorm
                # normalises [memory ; segment], the same thing token by token)
                seen = x[:, :T] if c.norm_placement == "post" else block.norm1(x[:, :T])
                remembered.append(cache.keep(memories[i], seen))
            x = block(x, memory=memories[i], **kwargs)
        if cache is not None:
            cache.layers = remembered
            if key_pad is not None:  # which remembered tokens are real, kept like the states themselves
                real = cache.keep(~key_pad[:, :M], ~key_pad[:, M:])
                cache.key_mask = None if real is None or bool(real.all()) else real
        x = self.drop(x[:, T:] if target_mapping is not None else x)
        if self.norm is not None:
            x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return x if return_hidden else self.head(x)

    @staticmethod
    def _key_pad(pad, cache, B, T, device):
        """(B, M + T) True at padded keys (remembered ones included), or None when every key is real."""
        past = cache.key_mask if cache is not None else None
        if pad is None and past is None:
            return None
        M = cache.length if cache is not None else 0
        past_pad = ~past if past is not None else torch.zeros(B, M, dtype=torch.bool, device=device)
        new_pad = pad if pad is not None else torch.zeros(B, T, dtype=torch.bool, device=device)
        return torch.cat([past_pad, new_pad], dim=1)

    def _masks(self, B, T, M, key_pad, perm_mask, device):
        """Additive masks (B or 1, 1, T, M + T) for the content stream and the query stream, or (None, None).
        Both block: future keys (causal), padding, and what perm_mask forbids; the content stream then
        sees its own token again (XLNet: the query stream never does)."""
        c = self.config
        S = M + T
        q = torch.arange(T, device=device)[:, None]
        k = torch.arange(S, device=device)[None, :]
        blocked = None  # (B or 1, T, S) bool
        if c.causal:
            blocked = k > M + q
            if c.same_length:  # every query sees M + 1 keys
                blocked = blocked | (k < q)
            blocked = blocked[None]
        if key_pad is not None:
            blocked = key_pad[:, None, :] if blocked is None else blocked | key_pad[:, None, :]
        if perm_mask is not None:
            perm = torch.cat([torch.zeros(B, T, M, dtype=torch.bool, device=device), perm_mask > 0], dim=2)
            blocked = perm if blocked is None else blocked | perm
        if blocked is None:
            return None, None
        content = blocked & (k != M + q)
        as_bias = lambda b: torch.zeros(b.shape, device=device).masked_fill(b, NEG)[:, None]  # noqa: E731
        return as_bias(content), as_bias(blocked)

    def _segments(self, token_type_ids, B, M):
        """(B, T, M + T) bool: query and key in different segments (XLNet's relative segment encoding)."""
        if token_type_ids is None:
            return None
        if not self.config.relative_segments:
            raise AllformersError("this model has no segment encodings (relative_segments=False); "
                                  "drop token_type_ids or build it with relative_segments=True")
        keys = torch.cat([torch.zeros(B, M, dtype=token_type_ids.dtype, device=token_type_ids.device),
                          token_type_ids], dim=1)
        return token_type_ids[:, :, None] != keys[:, None, :]
