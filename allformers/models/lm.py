"""A stack of blocks with embeddings and an LM head: every decoder in the zoo is this class
with a different Config (and encoders are the same stack with `causal=False`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..blocks import (ATTENTION_CLASSES, Block, BlockSpec, CrossKV, KVCache, LearnedPositions, Rotary, SinusoidalPositions,
                      build_feedforward, build_norm, make_block)
from ..blocks.relative import build_relative
from ..blocks.moe import MoE
from ..blocks.sparse import WindowKVCache
from ..config import Config
from ..blocks.feedforward import ACTIVATIONS
from ..errors import AllformersError, ContextLengthError
from ..generation.checks import check_token_ids
from .init import init_weights
from .packed import context as packed_context, head_linear
from .packed import release as release_packed


def block_spec(c: Config) -> BlockSpec:
    """The layer-level switches of a Config (everything a Block needs to know)."""
    return BlockSpec(dim=c.n_embd, n_head=c.n_head, n_kv_head=c.n_kv_head, head_dim=c.head_dim,
                     intermediate_size=c.intermediate_size, causal=c.causal, attn_bias=c.attn_bias,
                     attn_out_bias=c.attn_out_bias, attn_scale=c.attn_scale, norm_class=c.norm_class,
                     norm_eps=c.norm_eps, norm_bias=c.norm_bias, norm_placement=c.norm_placement,
                     parallel_residual=c.parallel_residual, shared_parallel_norm=c.shared_parallel_norm,
                     mlp_class=c.mlp_class, activation=c.activation, mlp_bias=c.mlp_bias, dropout=c.dropout,
                     cross_attention=c.cross_attention)


def build_block(c: Config, shared_from: Optional[Block] = None, layer: int = 0) -> Block:
    """The parts of layer `layer`, chosen by the config's switches. With `share_layers`, parts are
    taken from `shared_from` (the first layer) instead of being built again (ALBERT)."""
    if shared_from is not None and c.share_layers == "all":
        return shared_from
    if shared_from is not None and c.share_layers == "attention":
        attn = shared_from.attn
    else:
        attn = ATTENTION_CLASSES[c.attention_class].from_config(c)
        if c.layer_attention(layer) != "global":  # local window / strided (blocks/sparse.py)
            attn.use_pattern(c.layer_attention(layer), c.window_size, c.attention_stride)
    if shared_from is not None and c.share_layers == "ffn":
        mlp = shared_from.mlp
    elif c.layer_is_moe(layer):  # experts behind a router (blocks/moe.py)
        mlp = MoE.from_config(c)
    else:
        mlp = build_feedforward(c.mlp_class, c.n_embd, c.intermediate_size, c.activation, c.mlp_bias, c.dropout)
    return make_block(block_spec(c), attn=attn, mlp=mlp)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids, each document a contiguous run -> position ids restarting at 0 at
    the first token of every run: [7, 7, 7, 2, 2] -> [0, 1, 2, 0, 1]."""
    B, T = document_ids.shape
    t = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # (B, T) start of each run
    return t - first


class _Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name, self.fn = name, ACTIVATIONS[name]

    def forward(self, x):
        return self.fn(x)


class Cache:
    """Per-layer KV caches plus what the model needs to continue a sequence: how many
    positions are filled and, for left-padded batches, which of them are real tokens."""

    def __init__(self, model: "TransformerLM", batch: int, max_len: int):
        c = model.config
        p = next(model.parameters())
        # a local layer keeps only its last window_size keys
        self.layers = [WindowKVCache(batch, c.n_kv_head, c.window_size, c.head_dim, p.dtype, p.device)
                       if c.layer_attention(i) == "local" and c.window_size < max_len
                       else KVCache(batch, c.n_kv_head, max_len, c.head_dim, p.dtype, p.device)
                       for i in range(c.n_layer)]
        self.cross = [CrossKV() for _ in range(c.n_layer)] if c.cross_attention else None
        self.context_mask: Optional[torch.Tensor] = None  # (B, 1, 1, S) bool, encoder padding
        self.max_len, self.pos = max_len, 0
        self.key_mask: Optional[torch.Tensor] = None  # (B, pos) bool, None while all tokens are real
        self.next_position: Optional[torch.Tensor] = None  # (B,) next position id per row

    @property
    def rewindable(self) -> bool:
        """A local layer's ring has overwritten the keys a rewind would need again."""
        return not any(isinstance(layer, WindowKVCache) for layer in self.layers)

    def rewind(self, pos: int):
        """Forget every position from `pos` on (speculative decoding drops rejected draft tokens).
        The keys stay in the buffers; the next write at `pos` overwrites them."""
        if not self.rewindable:
            raise AllformersError("this model's local attention layers keep only a window ring of keys, which cannot "
                                  "be rewound; decode without speculation (generate() without draft=)")
        if not 0 <= pos <= self.pos:
            raise AllformersError(f"cannot rewind a cache at position {self.pos} to {pos}; pass 0..{self.pos}")
        if self.next_position is not None:  # the dropped positions were all real tokens
            self.next_position = self.next_position - (self.pos - pos)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, :pos]
        self.pos = pos

    def reorder(self, index: torch.Tensor):
        for layer in self.layers + (self.cross or []):
            layer.reorder(index)
        if self.context_mask is not None:
            self.context_mask = self.context_mask.index_select(0, index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
        if self.next_position is not None:
            self.next_position = self.next_position.index_select(0, index)


class TransformerLM(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = c = config
        E = c.embedding_size
        self.wte = nn.Embedding(c.vocab_size, E)
        self.wpe = {"learned": LearnedPositions, "sinusoidal": SinusoidalPositions}.get(c.position)
        layout = {"layout": c.sinusoidal_layout} if c.position == "sinusoidal" else {}
        self.wpe = self.wpe(c.block_size + c.position_offset, E, **layout) if self.wpe else None
        self.wtt = nn.Embedding(c.type_vocab_size, E) if c.type_vocab_size else None  # segments / languages
        self.embed_norm = build_norm(c.norm_class, E, c.norm_eps, c.norm_bias) if c.embedding_norm else None
        self.embed_proj = nn.Linear(E, c.n_embd) if E != c.n_embd else None  # factorized embeddings
        self.drop = nn.Dropout(c.dropout) if c.dropout else nn.Identity()
        blocks = [build_block(c)]
        for i in range(1, c.n_layer):
            blocks.append(build_block(c, shared_from=blocks[0] if c.share_layers != "none" else None, layer=i))
        self.blocks = nn.ModuleList(blocks)
        self.norm = build_norm(c.norm_class, c.n_embd, c.norm_eps, c.norm_bias) if c.final_norm else None
        head_in = E if c.head_transform else c.n_embd
        self.head_transform = (nn.Sequential(nn.Linear(c.n_embd, E), _Activation(c.head_activation),
                                             build_norm(c.norm_class, E, c.norm_eps, c.norm_bias))
                               if c.lm_head and c.head_transform else None)
        self.lm_head = (nn.Linear(head_in, c.vocab_size, bias=c.lm_head_bias)
                        if c.lm_head and not c.tie_embeddings else None)
        self.lm_head_bias = (nn.Parameter(torch.zeros(c.vocab_size))
                             if c.lm_head and c.tie_embeddings and c.lm_head_bias else None)
        self.rotary = Rotary(c.rope_n_elem, c.rope_base) if c.position == "rotary" else None
        self.relative = build_relative(c)  # ALiBi or T5 bias: one (B, H, T, S) bias shared by all layers
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self):
        """A fresh model's weights, by the config's init scheme (models/init.py: gpt2, bert or t5)."""
        init_weights(self, self.config)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self):
        return self.wte.weight.device

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in (self.wte, self.wpe, self.wtt) if isinstance(m, (nn.Embedding, LearnedPositions)))
        return n

    def new_cache(self, batch: int, max_len: Optional[int] = None) -> Cache:
        max_len = max_len or self.config.block_size
        return Cache(self, batch, max_len)

    def train(self, mode: bool = True):
        if mode:  # training changes the weights: the packed copies (models/packed.py) would go stale
            release_packed(self)
        return super().train(mode)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.lm_head:
            raise AllformersError(f"{self.config.name or 'this model'} has no LM head (lm_head=False); "
                                  f"call it with return_hidden=True or put a task head on it")
        if self.head_transform is not None:
            x = self.head_transform(x)
        if self.config.head_input_scale is not None:
            x = x * self.config.head_input_scale
        if self.lm_head is not None:
            return self.lm_head(x)
        return head_linear(self, x, self.wte.weight, self.lm_head_bias)  # the Linears' path (models/packed.py)

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache: Optional[Cache] = None,
                last_only: bool = False, return_hidden: bool = False,
                token_type_ids: Optional[torch.Tensor] = None, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None, before_block: Optional[dict] = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab) (or (B, 1, vocab) with last_only).

        attention_mask (B, T): 1 for real tokens, 0 for padding (left padding for generation).
        cache: continue a sequence; its positions and padding are tracked for you.
        context (B, S, C), context_mask (B, S): the encoder output a decoder stack cross-attends to.
        inputs_embeds (B, T, E): vectors used in place of the token table's rows (pass idx=None), e.g.
        projected image features spliced between word embeddings (PaLM-E); scaling and positions still apply.
        document_ids (B, T): packed rows holding several documents (contiguous runs of one id); a
        token attends only inside its document, and positions restart at 0 in each one.
        before_block {layer index: fn(x (B, T, C)) -> x}: layers of a model around this one run on the residual
        stream before those blocks (Flamingo's gated cross-attention, models/flamingo.py)."""
        c = self.config
        if (idx is None) == (inputs_embeds is None):
            raise AllformersError("pass exactly one of idx (token ids) and inputs_embeds (B, T, embedding_size)")
        if idx is not None:
            check_token_ids(idx, c.vocab_size)
        B, T = idx.shape if idx is not None else inputs_embeds.shape[:2]
        if document_ids is not None and cache is not None:
            raise AllformersError("document_ids (packed training rows) cannot be used with a cache; "
                                  "generate from one document at a time")
        start = cache.pos if cache is not None else 0
        limit = cache.max_len if cache is not None else c.block_size
        if start + T > limit:
            raise ContextLengthError(
                f"sequence of {start + T} tokens does not fit: the {'cache' if cache else 'model'} holds "
                f"{limit} (block_size={c.block_size}); shorten the prompt or max_new_tokens")
        key_mask = self._key_mask(attention_mask, cache, B, T)  # (B, start+T) bool or None
        if position_ids is None and document_ids is not None:
            position_ids = document_positions(document_ids)
        elif position_ids is None:
            position_ids = self._positions(key_mask, cache, B, T, start, self.device)
        if self.wpe is not None and int(position_ids.max()) >= c.block_size:
            raise ContextLengthError(f"position {int(position_ids.max())} is past block_size={c.block_size}")

        x = self.embed(idx, position_ids, token_type_ids, inputs_embeds)  # (B, T, C)

        # Computed once, shared by every layer.
        rope = self.rotary(position_ids) if self.rotary is not None else None
        # Patterned layers (local / strided) build their own mask from key_mask; they take the dense
        # one only when it carries more (a relative bias, packed documents).
        patterned = [c.layer_attention(i) != "global" for i in range(c.n_layer)]
        dense_extra = self.relative is not None or document_ids is not None
        if all(patterned) and not dense_extra:
            mask, extra = None, {}
        else:
            mask, extra = self._attn_mask(key_mask, position_ids, cache, B, T, start, document_ids)
        if c.cross_attention:
            if context is None:
                raise AllformersError("this decoder stack cross-attends: pass context= (the encoder output)")
            extra["context"] = context
            extra["context_mask"] = self._context_mask(context_mask, cache)
        with packed_context(self):  # the Linears on oneDNN (models/packed.py): packed weights, or its autograd op
            for i, block in enumerate(self.blocks):
                if before_block and i in before_block:
                    x = before_block[i](x)
                if cache is not None and cache.cross is not None:
                    extra["cross_cache"] = cache.cross[i]
                layer_cache = cache.layers[i] if cache else None
                if patterned[i]:
                    x = block(x, rope=rope, mask=mask if dense_extra else None, cache=layer_cache, cache_start=start,
                              key_mask=key_mask, **extra)
                else:
                    x = block(x, rope=rope, mask=mask, cache=layer_cache, cache_start=start, **extra)
            if cache is not None:
                cache.pos = start + T
                cache.key_mask = key_mask
                cache.next_position = position_ids[:, -1] + 1
            if self.norm is not None:
                x = self.norm(x)
            if last_only:
                x = x[:, -1:]
            return x if return_hidden else self.head(x)

    def embed(self, idx: Optional[torch.Tensor], position_ids: torch.Tensor,
              token_type_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token ids (B, T) (or inputs_embeds (B, T, E)) at position_ids (B, T) -> the first
        block's input (B, T, C). Also used by the server's engine, which runs the blocks itself."""
        c = self.config
        x = self.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, E)
        if c.embed_scale is not None:
            x = x * c.embed_scale
        if self.wpe is not None:
            x = x + self.wpe(position_ids + c.position_offset)
        if self.wtt is not None and token_type_ids is not None:
            x = x + self.wtt(token_type_ids)
        elif self.wtt is not None and c.default_token_type is not None:  # BERT: one segment; XLM: no language
            x = x + self.wtt.weight[c.default_token_type]
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        if self.embed_proj is not None:
            x = self.embed_proj(x)  # (B, T, E) -> (B, T, C)
        return x

    @staticmethod
    def _key_mask(attention_mask, cache, B, T):
        """Bool (B, start+T) of real tokens, or None when every token is real.
        attention_mask covers the new tokens only; the cache remembers the past ones."""
        new = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        past = cache.key_mask if cache is not None else None
        if new is None and past is None:
            return None
        start = cache.pos if cache is not None else 0
        device = (new if new is not None else past).device
        new = new if new is not None else torch.ones(B, T, dtype=torch.bool, device=device)
        past = past if past is not None else torch.ones(B, start, dtype=torch.bool, device=device)
        return torch.cat([past, new], dim=1)

    @staticmethod
    def _context_mask(context_mask, cache):
        """(B, S) encoder padding -> (B, 1, 1, S) bool, remembered by the cache for later steps."""
        if context_mask is None:
            return cache.context_mask if cache is not None else None
        m = None if bool(context_mask.all()) else context_mask.bool()[:, None, None, :]
        if cache is not None:
            cache.context_mask = m
        return m

    @staticmethod
    def _positions(key_mask, cache, B, T, start, device):
        if cache is not None and cache.next_position is not None:  # continue each row
            return cache.next_position[:, None] + torch.arange(T, device=device)
        if key_mask is not None:  # left padding: count only real tokens (HF convention)
            pos = key_mask.long().cumsum(-1) - 1
            return pos.clamp(min=0)[:, -T:]
        return torch.arange(start, start + T, device=device).expand(B, T)

    def _attn_mask(self, key_mask, position_ids, cache, B, T, start, document_ids=None):
        """(mask, extra attention kwargs). The mask is None (fused causal kernel) when nothing
        but causality is needed; else a bool or float mask of shape (B, 1 or H, T, start+T).
        A relative scheme returns either a bias (added here) or kwargs for its attention class."""
        c = self.config
        if (key_mask is None and self.relative is None and document_ids is None
                and (not c.causal or start == 0 or T == 1)):
            return None, {}
        S = start + T
        device = position_ids.device
        allowed = torch.ones(B, 1, T, S, dtype=torch.bool, device=device)
        if c.causal:
            q_idx = torch.arange(start, S, device=device)[:, None]
            allowed = allowed & (torch.arange(S, device=device)[None, :] <= q_idx)
        if document_ids is not None:  # block-diagonal: queries see keys of their own document only
            allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :]
            # A padding query may see nothing; let it see itself so softmax stays finite.
            allowed = allowed | ~allowed.any(-1, keepdim=True)
        if self.relative is None:
            return allowed, {}
        if cache is not None and start:  # positions of the cached keys
            k_pos = torch.cat([self._cached_positions(cache, B, start, device), position_ids], dim=1)
        else:
            k_pos = position_ids
        rel = self.relative(position_ids, k_pos)  # (B, H, T, S) bias, or a dict of attention kwargs
        if isinstance(rel, dict):
            return allowed, rel
        return rel.masked_fill(~allowed, float("-inf")), {}

    @staticmethod
    def _cached_positions(cache, B, start, device):
        if cache.key_mask is None:
            return torch.arange(start, device=device).expand(B, start)
        return (cache.key_mask[:, :start].long().cumsum(-1) - 1).clamp(min=0)

    # ------------------------------------------------------------------ conveniences
    @classmethod
    def from_name(cls, name: str, **overrides) -> "TransformerLM":
        return cls(Config.from_name(name, **overrides))

    def save(self, path, format: str = "allformers", **kwargs):
        from ..checkpoints import save

        return save(self, path, format=format, **kwargs)

    def generate(self, *args, **kwargs):
        from ..generation import generate

        return generate(self, *args, **kwargs)
