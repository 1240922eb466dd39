"""Continuous batching: one background thread runs a decoder for many requests at once.

Every step takes the sequences that hold a slot, feeds each one what it needs next (a chunk of
its prompt, or the token it sampled last) as one flat token list, runs the model once, and
samples a token for every sequence whose input is used up. Requests join (a free slot) and
leave (finished or cancelled: the slot is freed) between any two steps, so prefills and
decodes of different requests share every forward pass.

The KV cache has one slot per running sequence: (slots, H_kv, max_len, D) per layer. Rows sit
at different positions, so attention runs per sequence over its own keys (`SlotLayer.attend`),
while every matmul (qkv, MLP, head) runs on all tokens together.

Batch invariance (fp32 on CPU): a request's tokens do not depend on what else is running.
- Attention for a sequence is one call whose shapes depend only on that sequence, and its
  prompt is cut into the same chunks whether it runs alone or not.
- Norms, activations, rotary and embeddings work row by row.
- Matmuls run through oneDNN with packed weights (models/packed.py), which gives a row the
  same bits whatever the number of rows. Without oneDNN (or not fp32), MKL's GEMM is used
  with inputs padded to a multiple of ROW_MULTIPLE rows, a best effort only: on AVX2 it computes
  rows in blocks of 4 and only a ragged tail (or a single row: GEMV) sums in another order, but on
  AVX-512 / AMX Xeons small row counts of large weights (576 x 576 and up) take other kernels, so
  there the guarantee holds on the oneDNN path alone (docs/serving.md).
- Sampling, logprobs and penalties run per sequence, with the sequence's own generator
  when it has a seed, so seeded sampling is batch-invariant too.
tests/test_serve_engine.py checks that greedy outputs are token-identical alone and in a
batch of 16 (and that the logits are bit-identical)."""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..blocks.attention import Attention
from ..blocks.relative import AlibiBias
from ..blocks.sparse import pattern_allowed
from ..errors import AllformersError
from ..generation.generate import process_logits
from ..models.packed import enabled as packing_enabled
from ..models.packed import packed_for, packing_available
from .text import TextOut

log = logging.getLogger("allformers.serve")

ROW_MULTIPLE = 8  # MKL's fallback (module docstring): the rows of a ragged tail sum in another order


class QueueFullError(AllformersError):
    """Every slot is busy and the waiting queue is at its bound."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict] = None  # token id -> added to its logit
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    logprobs: Optional[int] = None  # None: no logprobs; k: the sampled token's and the k most likely
    stop_token_ids: Sequence[int] = ()


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    offset: int  # where the token's text starts in the generated text
    top: list  # [(token_id, token, logprob)], most likely first


@dataclass
class Event:
    """What the engine hands a request: new text (with the logprobs of its tokens), and at the
    end a finish reason ("stop", "length", "cancelled" or "error")."""
    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    n_tokens: int = 0  # tokens generated so far (eos included)


class Seq:
    """One choice being generated: its prompt, the slot it holds, what it produced."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams, tokenizer, on_event: Callable[[Event], None]):
        self.prompt, self.params, self.on_event = list(prompt), params, on_event
        self.out = TextOut(tokenizer, params.stop)
        self.generated: list[int] = []
        self.counts: dict = {}  # token -> times generated (presence/frequency penalties)
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.slot: Optional[int] = None
        self.pos = 0  # tokens in the cache
        self.next_token: Optional[int] = None
        self.cancelled = False
        self.finish_reason: Optional[str] = None
        self.pending: list = []  # logprobs of tokens whose text is still held back
        self.t_submit = time.perf_counter()
        self.t_first: Optional[float] = None

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt)


class SlotLayer:
    """Keys/values of one layer, (slots, H_kv, max_len, D). `ragged` tells Attention to hand
    its q, k, v here (blocks/attention.py) instead of attending itself."""
    ragged = True

    def __init__(self, owner: "SlotCache", k: torch.Tensor, v: torch.Tensor):
        self.owner, self.k, self.v = owner, k, v
        self.k_slot = [k[i:i + 1] for i in range(len(k))]  # (1, H_kv, max_len, D) views, made once: fewer ops a step
        self.v_slot = [v[i:i + 1] for i in range(len(v))]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale=None, pattern=None) -> torch.Tensor:
        """q (1, H, N, D), k, v (1, H_kv, N, D) for the step's flat tokens -> (1, H, N, D).
        pattern: (kind, window, stride) of a local / strided layer (blocks/sparse.py), None for dense."""
        plan = self.owner
        n = q.shape[2] - plan.n_pad
        self.k[plan.slot_idx, :, plan.pos_idx] = k[0, :, :n].transpose(0, 1)  # (n, H_kv, D) into the slots
        self.v[plan.slot_idx, :, plan.pos_idx] = v[0, :, :n].transpose(0, 1)
        gqa = q.shape[1] != k.shape[1]
        ks, vs, sdpa = self.k_slot, self.v_slot, F.scaled_dot_product_attention
        outs = []
        for a, b, slot, end, mask, causal in plan.segments:
            if pattern is not None:  # the layer's band on top of causality (and ALiBi's bias)
                band = pattern_allowed(pattern[0], torch.arange(end - (b - a), end, device=q.device),
                                       torch.arange(end, device=q.device), pattern[1], pattern[2])  # (b-a, end)
                mask = band if mask is None or mask.dtype == torch.bool else mask.masked_fill(~band, float("-inf"))
                causal = False
            outs.append(sdpa(q.narrow(2, a, b - a), ks[slot].narrow(2, 0, end), vs[slot].narrow(2, 0, end),
                             attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa))
        if plan.n_pad:  # rows that only pad the matmuls: their attention output is never used
            outs.append(q.new_zeros(1, q.shape[1], plan.n_pad, q.shape[3]))
        return torch.cat(outs, dim=2)


class SlotCache:
    """The slots of every layer plus the current step's plan: which slot and position each token
    of the flat batch has, and each sequence's attention mask."""

    def __init__(self, model, slots: int, max_len: int):
        c = model.config
        p = next(model.parameters())
        shape = (slots, c.n_kv_head, max_len, c.head_dim)
        # empty, not zeros: only positions a sequence wrote are read, and memory never touched costs nothing
        self.layers = [SlotLayer(self, torch.empty(shape, dtype=p.dtype, device=p.device),
                                 torch.empty(shape, dtype=p.dtype, device=p.device)) for _ in range(c.n_layer)]
        self.relative, self.device = model.relative, p.device
        self.segments: list = []
        self.n_pad = 0
        self.slot_idx = self.pos_idx = None

    def plan(self, rows: list, n_pad: int):
        """rows: (slot, start, n) per sequence, in the order of the flat token list."""
        dev = self.device
        self.slot_idx = torch.tensor([s for s, _, n in rows for _ in range(n)], device=dev)
        self.pos_idx = torch.tensor([a + i for _, a, n in rows for i in range(n)], device=dev)
        self.segments, self.n_pad, off = [], n_pad, 0
        for slot, start, n in rows:
            end = start + n
            mask, causal = None, False
            if self.relative is not None or (n > 1 and start > 0):
                q_pos = torch.arange(start, end, device=dev)
                k_pos = torch.arange(end, device=dev)
                allowed = k_pos[None, :] <= q_pos[:, None]  # (n, end)
                mask = allowed
                if self.relative is not None:  # ALiBi: (1, H, n, end) bias, -inf where not allowed
                    mask = self.relative(q_pos[None], k_pos[None]).masked_fill(~allowed, float("-inf"))
            elif n > 1:  # a prompt from its first token: queries and keys start together
                causal = True
            self.segments.append((off, off + n, slot, end, mask, causal))
            off += n


def check_servable(model):
    """The engine runs decoder-only LMs whose attention is the plain Attention block."""
    c = model.config
    name = c.name or "this model"
    if getattr(c, "is_encoder_decoder", False) or c.cross_attention:
        raise AllformersError(f"{name} is an encoder-decoder; the server's batching engine runs decoder-only models")
    if not c.causal or c.task != "lm" or not c.lm_head:
        raise AllformersError(f"{name} is not a causal language model (causal={c.causal}, task={c.task!r}); "
                              f"serve an encoder for /v1/embeddings or a decoder for completions")
    if any(type(b.attn) is not Attention for b in model.blocks):
        raise AllformersError(f"{name} uses attention_class={c.attention_class!r}; the engine batches the plain Attention")
    if model.relative is not None and not isinstance(model.relative, AlibiBias):
        raise AllformersError(f"{name} uses position={c.position!r}; the engine supports learned, sinusoidal, "
                              f"rotary and ALiBi positions")


class Engine:
    """Runs `model` for every submitted sequence in a background thread (start() / stop()).

    slots: sequences decoded together; max_len: tokens per slot (prompt + completion);
    max_queue: sequences that may wait for a slot before submit() raises QueueFullError;
    prefill_chunk: prompt tokens a sequence feeds per step; step_tokens: tokens per step
    (decodes first, then prompt chunks while they fit; at least one chunk always runs);
    pack: run the matmuls on oneDNN-packed weights (models/packed.py; default: where available)."""

    def __init__(self, model, tokenizer, *, slots: int = 16, max_len: Optional[int] = None, max_queue: int = 64,
                 prefill_chunk: int = 256, step_tokens: int = 512, seed: Optional[int] = None,
                 pack: Optional[bool] = None):
        check_servable(model)
        if slots < 1 or max_queue < 0 or prefill_chunk < 1:
            raise AllformersError(f"slots={slots} and prefill_chunk={prefill_chunk} must be >= 1, max_queue >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_len = min(max_len or model.config.block_size, model.config.block_size)
        self.slots, self.max_queue = slots, max_queue
        self.prefill_chunk, self.step_tokens = prefill_chunk, max(step_tokens, prefill_chunk)
        self.cache = SlotCache(model, slots, self.max_len)
        pack = packing_available(model) if pack is None else pack
        with torch.inference_mode():  # the model's cached packed weights (the ones its forward uses too)
            self.packed = packed_for(model) if pack else None
        self.row_multiple = 1 if self.packed is not None else ROW_MULTIPLE
        self.free = list(range(slots - 1, -1, -1))
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self.cond = threading.Condition()
        self.rng = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        self.stats = collections.Counter()  # steps, mixed_steps, prompt_tokens, generated_tokens, finished_<reason>
        self.step_time = 0.0
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # ------------------------------------------------------------------ the API side (any thread)
    def submit(self, seqs: list):
        with self.cond:
            busy = len(self.running) + len(self.waiting)
            if busy + len(seqs) > self.slots + self.max_queue:
                raise QueueFullError(f"the server is at capacity: {len(self.running)} sequences are running in "
                                     f"{self.slots} slots and {len(self.waiting)} wait (bound {self.max_queue}); "
                                     f"retry later")
            for s in seqs:
                if len(s.prompt) + s.params.max_tokens > self.max_len:
                    raise AllformersError(f"{len(s.prompt)} prompt tokens + max_tokens={s.params.max_tokens} "
                                          f"do not fit a slot of {self.max_len} tokens")
            self.waiting.extend(seqs)
            self.cond.notify()

    def cancel(self, seqs):
        with self.cond:
            for s in seqs:
                s.cancelled = True
            self.cond.notify()

    @property
    def n_running(self) -> int:
        return len(self.running)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="allformers-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        with self.cond:
            self._stopping = True
            self.cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for s in list(self.running) + list(self.waiting):
            self._finish(s, "cancelled")
        self.waiting.clear()

    # ------------------------------------------------------------------ the engine thread
    def _loop(self):
        while True:
            with self.cond:
                while not self._stopping and not self.waiting and not self.running:
                    self.cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug or out of memory: fail what is running, keep serving
                log.exception("engine step failed")
                for s in list(self.running):
                    self._finish(s, "error", error=f"{type(e).__name__}: {e}")

    def _admit(self):
        with self.cond:
            for seq in [s for s in self.waiting if s.cancelled]:  # gone before they got a slot
                self.waiting.remove(seq)
                self._finish(seq, "cancelled")
            while self.free and self.waiting:
                seq = self.waiting.popleft()
                seq.slot = self.free.pop()
                self.running.append(seq)

    @torch.inference_mode()
    def step(self):
        """One forward pass over every running sequence; returns the number of tokens fed."""
        for seq in [s for s in self.running if s.cancelled]:  # first, so that their slots are reused at once
            self._finish(seq, "cancelled")
        self._admit()
        feeds, budget = [], self.step_tokens
        for seq in self.running:  # decodes first: they are what keeps streams flowing
            if not seq.prefilling:
                feeds.append((seq, [seq.next_token]))
                budget -= 1
        for seq in self.running:
            if seq.prefilling:
                chunk = seq.prompt[seq.pos:seq.pos + self.prefill_chunk]  # the same cuts alone or batched
                if len(chunk) > budget and any(len(t) > 1 or s.prefilling for s, t in feeds):
                    continue
                feeds.append((seq, chunk))
                budget -= len(chunk)
        if not feeds:
            return 0
        if any(not s.prefilling for s, _ in feeds) and any(s.prefilling for s, _ in feeds):
            self.stats["mixed_steps"] += 1  # a prompt chunk and decodes in one forward pass
        t0 = time.perf_counter()
        sample = [i for i, (s, t) in enumerate(feeds) if s.pos + len(t) >= len(s.prompt)]
        logits = self._forward(feeds, sample)  # (len(sample), V) float32
        for seq, tokens in feeds:
            if seq.prefilling:
                self.stats["prompt_tokens"] += len(tokens)
            seq.pos += len(tokens)
        for r, i in enumerate(sample):
            self._sample(feeds[i][0], logits[r])
        self.stats["steps"] += 1
        self.step_time += time.perf_counter() - t0
        return sum(len(t) for _, t in feeds)

    def _forward(self, feeds, sample) -> Optional[torch.Tensor]:
        if self.packed is None:  # pack=False: torch's own matmuls, padded rows (ROW_MULTIPLE)
            with packing_enabled(False):
                return self._run_model(feeds, sample)
        packed = packed_for(self.model)  # repacked if a weight changed
        if packed is None:  # the path no longer applies (ALLFORMERS_PACKED, dtype, device): never a stale copy
            with packing_enabled(False):
                return self._run_model(feeds, sample)
        self.packed = packed
        with packed:
            return self._run_model(feeds, sample)

    def _run_model(self, feeds, sample) -> Optional[torch.Tensor]:
        model, dev = self.model, self.cache.device
        ids = [t for _, tokens in feeds for t in tokens]
        pos = [s.pos + i for s, tokens in feeds for i in range(len(tokens))]
        n_pad = -len(ids) % self.row_multiple
        self.cache.plan([(s.slot, s.pos, len(t)) for s, t in feeds], n_pad)
        ids_t = torch.tensor(ids + [0] * n_pad, device=dev)[None]  # (1, N)
        pos_t = torch.tensor(pos + [0] * n_pad, device=dev)[None]
        x = model.embed(ids_t, pos_t)  # (1, N, C)
        rope = model.rotary(pos_t) if model.rotary is not None else None
        for block, layer in zip(model.blocks, self.cache.layers):
            x = block(x, rope=rope, mask=None, cache=layer)
        if not sample:  # only prompt chunks that are not the last: nothing to sample yet
            return None
        ends = list(itertools.accumulate(len(t) for _, t in feeds))
        rows = [ends[i] - 1 for i in sample]
        rows = rows + [rows[0]] * (-len(rows) % self.row_multiple)
        h = x[0, rows]  # (R, C): the last position of each sequence that samples
        if model.norm is not None:
            h = model.norm(h)
        logits = model.head(h)  # a tied head uses the packed table itself (TransformerLM.head)
        return logits[:len(sample)].float()

    def _sample(self, seq: Seq, logits: torch.Tensor):
        """logits (V,) raw -> the next token of `seq`, its logprobs, and maybe the end of seq."""
        p = seq.params
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
        lp = None
        if p.logprobs is not None:
            lp = torch.log_softmax(logits, -1)  # the model's own distribution, before any processing
        if p.logit_bias:
            idx = torch.tensor(list(p.logit_bias), device=logits.device)
            logits = logits.index_add(0, idx, torch.tensor(list(p.logit_bias.values()), device=logits.device))
        if (p.presence_penalty or p.frequency_penalty) and seq.counts:
            idx = torch.tensor(list(seq.counts), device=logits.device)
            cnt = torch.tensor(list(seq.counts.values()), dtype=logits.dtype, device=logits.device)
            logits = logits.index_add(0, idx, -(p.frequency_penalty * cnt + p.presence_penalty))
        if p.temperature == 0:
            tok = int(logits.argmax())
        else:
            top_k = p.top_k if p.top_k and p.top_k > 0 else None
            logits = process_logits(logits[None], logits.new_zeros(1, 0, dtype=torch.long), temperature=p.temperature,
                                    top_k=top_k, top_p=p.top_p, repetition_penalty=1.0)
            gen = seq.generator or self.rng
            tok = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen))
        seq.generated.append(tok)
        seq.counts[tok] = seq.counts.get(tok, 0) + 1
        self.stats["generated_tokens"] += 1
        if tok in p.stop_token_ids:
            return self._finish(seq, "stop")
        text = seq.out.add(tok)
        if lp is not None:
            top = []
            if p.logprobs:
                vals, ids = lp.topk(p.logprobs)
                top = [(int(i), self.tokenizer.decode([int(i)], skip_special_tokens=False), float(v))
                       for v, i in zip(vals, ids)]
            seq.pending.append(TokenLogprob(tok, self.tokenizer.decode([tok], skip_special_tokens=False),
                                            float(lp[tok]), seq.out.offsets[-1], top))
        if seq.out.stopped:
            return self._finish(seq, "stop", text)
        if len(seq.generated) >= p.max_tokens:
            return self._finish(seq, "length", text)
        seq.next_token = tok
        if text:
            self._emit(seq, Event(text=text, logprobs=seq.pending, n_tokens=len(seq.generated)))
            seq.pending = []

    def _finish(self, seq: Seq, reason: str, text: str = "", error: Optional[str] = None):
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.free.append(seq.slot)
        if reason in ("stop", "length"):
            text += seq.out.flush()
        lps = [t for t in seq.pending if t.offset < len(seq.out.text)] if seq.out.stopped else seq.pending
        self.stats[f"finished_{reason}"] += 1
        self._emit(seq, Event(text=text, logprobs=lps, finish_reason=reason, error=error, n_tokens=len(seq.generated)))

    @staticmethod
    def _emit(seq: Seq, event: Event):
        if event.finish_reason is not None:
            seq.finish_reason = event.finish_reason
        try:
            seq.on_event(event)
        except Exception:  # the client's side is gone (its loop closed): nothing to tell it
            log.debug("could not deliver an event", exc_info=True)

