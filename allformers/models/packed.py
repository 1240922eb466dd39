"""Inference matmuls on oneDNN, each nn.Linear weight packed once into its blocked layout.

Why not torch's default (MKL's sgemm) on the CPU:
- speed. On this machine (an AMD EPYC) MKL runs fp32 GEMMs at about half the rate oneDNN's packed
  matmul reaches, and its few-row paths (a decode step) read the weights at a fraction of the memory
  bandwidth (benchmarks/bench_decoder.py measures both);
- batch invariance. With MKL a row's result depends on how many rows come with it (one row takes
  a GEMV path; the 1-3 rows of a ragged tail another kernel). oneDNN's packed matmul gives every row
  the same bits for any number of rows and threads (tests/test_serve_engine.py checks it where it
  runs), which the server needs.

The cost: a packed copy of every Linear weight (the model's weight memory, once more), made the
first time a model runs without autograd and kept (in a weak table, not on the model) until it may be
stale: a forward with autograd on, model.train(), or a weight whose version counter or storage moved
(load_state_dict, an in-place update). A fused optimizer step does not move the version counter,
which is why a training forward drops the copy; after changing weights by other untracked means
(`p.data.copy_(...)`), call `release(model)`. `enabled(False)` turns the path off. Training
(autograd on) always runs torch's own matmuls.

TransformerLM.forward enters `packed_for(self)` (so generation, prefill, perplexity and the encoder-
decoders' two stacks use it); the serving engine, which runs the blocks itself, enters it around its
steps."""
from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Optional

import torch

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> PackedLinears
_STATE = threading.local()


def _enabled() -> bool:
    flag = getattr(_STATE, "enabled", None)
    return flag if flag is not None else os.environ.get("ALLFORMERS_PACKED", "1") != "0"


@contextlib.contextmanager
def enabled(flag: bool):
    """`with enabled(False):` runs the models on torch's own matmuls (this thread); ALLFORMERS_PACKED=0
    sets the default for the process."""
    before = getattr(_STATE, "enabled", None)
    _STATE.enabled = bool(flag)
    try:
        yield
    finally:
        _STATE.enabled = before


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def packing_available(model) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype == torch.float32 and onednn_available()


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)


def packed_linear(x, packed, bias):  # without autograd only: with it on, its 1-row path differs
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _stamp(w: torch.Tensor) -> tuple:
    return w._version, w.data_ptr()


class PackedLinears:
    """`with packed:` runs every nn.Linear of `model` on its packed weight (their forward is swapped
    for the duration: no per-op dispatch cost; re-entrant); `packed.tied(x, bias)` is an LM head tied to
    the embedding (a bare F.linear(x, wte.weight)) on its packed table."""

    def __init__(self, model):
        self.layers = [(m, m.weight, _stamp(m.weight), pack_weight(m.weight)) for m in model.modules()
                       if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32]
        c = getattr(model, "config", None)
        tied = getattr(model, "lm_head", "none") is None and getattr(c, "lm_head", False) and getattr(c, "tie_embeddings", False)
        wte = model.wte.weight if tied else None
        self._tied = None if wte is None else (wte, _stamp(wte), pack_weight(wte))
        self._depth = 0

    @property
    def n_packed(self) -> int:
        return len(self.layers) + (self._tied is not None)

    def fresh(self) -> bool:
        """Whether every packed weight is still the module's, unchanged since it was packed."""
        if self._tied is not None and _stamp(self._tied[0]) != self._tied[1]:
            return False
        return all(m.weight is w and _stamp(w) == s for m, w, s, _ in self.layers)

    def __enter__(self):
        if self._depth == 0:
            for m, _, _, p in self.layers:
                m.__dict__["forward"] = lambda x, p=p, b=m.bias: packed_linear(x, p, b)
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for m, *_ in self.layers:
                m.__dict__.pop("forward", None)

    def tied(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The tied head's logits on the packed table, or None when the model has no tied head."""
        return None if self._tied is None else packed_linear(x, self._tied[2], bias)


def packed_for(model) -> Optional[PackedLinears]:
    """The model's PackedLinears (packed now, or cached and still fresh), or None where the packed path
    does not apply: autograd on, the path disabled, weights not fp32 on the CPU, no oneDNN."""
    if torch.is_grad_enabled():  # a training forward: the weights are about to change
        _CACHE.pop(model, None)
        return None
    if not _enabled():
        return None
    packed = _CACHE.get(model)
    if packed is not None and packed.fresh():
        return packed
    _CACHE.pop(model, None)  # stale: free its copies before packing again
    if not packing_available(model) or any(p.dtype != torch.float32 or p.device.type != "cpu"
                                            for p in model.parameters()):
        return None
    packed = _CACHE[model] = PackedLinears(model)
    return packed


def release(model) -> None:
    """Drop the packed copies of `model`'s weights (they are made again on the next inference call)."""
    _CACHE.pop(model, None)


def context(model):
    """packed_for(model) as a context manager (a null one where the path does not apply)."""
    packed = packed_for(model)
    return packed if packed is not None else contextlib.nullcontext()

