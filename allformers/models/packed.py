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
(`p.data.copy_(...)`), call `release(model)`. `enabled(False)` turns both paths off.

TransformerLM.forward enters `packed_for(self)` (so generation, prefill, perplexity and the encoder-
decoders' two stacks use it); the serving engine, which runs the blocks itself, enters it around its
steps.

Training (a forward with autograd on) runs each nn.Linear (and a tied LM head) through `onednn_linear`,
an autograd Function whose forward and both backward GEMMs are oneDNN matmuls on the plain weights
(no packed copy: they change every step); outside fp32 on the CPU, or under autocast, it is F.linear."""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

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


# How a Linear's forward is swapped. One dispatcher per module, installed while any context (of any thread)
# holds the module and removed when the last one leaves; what it runs is decided per call from this thread's
# state: its packed weights (without autograd), the oneDNN autograd op (a training forward), else F.linear.
# So a thread that trains never meets another thread's packed copies, and contexts never undo each other.
_LOCK = threading.Lock()
_INSTALLED: dict = {}  # id(module) -> [module, holders]


def _thread_packs() -> dict:
    packs = getattr(_STATE, "packs", None)
    if packs is None:
        packs = _STATE.packs = {}  # id(module) -> [weight, packed weight, depth]
    return packs


def _dispatch(m, input):
    if not torch.is_grad_enabled():
        entry = getattr(_STATE, "packs", {}).get(id(m))
        if entry is not None and entry[0] is m.weight:
            return packed_linear(input, entry[1], m.bias)
    elif getattr(_STATE, "training", 0):
        return onednn_linear(input, m.weight, m.bias)
    return torch.nn.functional.linear(input, m.weight, m.bias)


def _swappable(m) -> bool:
    """A plain nn.Linear whose forward is its class's: no instance forward of someone else's, no hooks that
    set its weight before each call (pruning, weight norm), a weight of its own."""
    return (type(m) is torch.nn.Linear and "weight" in m._parameters and not m._forward_pre_hooks
            and ("forward" not in m.__dict__ or id(m) in _INSTALLED))


def _install(modules) -> None:
    with _LOCK:
        for m in modules:
            entry = _INSTALLED.get(id(m))
            if entry is None:
                _INSTALLED[id(m)] = [m, 1]
                m.__dict__["forward"] = functools.partial(_dispatch, m)
            else:
                entry[1] += 1


def _uninstall(modules) -> None:
    with _LOCK:
        for m in modules:
            entry = _INSTALLED[id(m)]
            entry[1] -= 1
            if entry[1] == 0:
                del _INSTALLED[id(m)]
                m.__dict__.pop("forward", None)


def _tied_weight(model) -> Optional[torch.Tensor]:
    """The embedding table an LM head tied to it reads (a bare F.linear on wte.weight), or None."""
    c = getattr(model, "config", None)
    tied = getattr(model, "lm_head", "none") is None and getattr(c, "lm_head", False) and getattr(c, "tie_embeddings", False)
    return model.wte.weight if tied else None


class PackedLinears:
    """`with packed:` runs every nn.Linear of `model` on its packed weight, in this thread, without
    autograd (re-entrant); `packed.tied(x, bias)` is an LM head tied to the embedding on its packed table."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.layers = [(m, m.weight, _stamp(m.weight), pack_weight(m.weight)) for m in model.modules()
                       if _swappable(m) and m.weight.dtype == torch.float32]
        wte = _tied_weight(model)
        self._tied = None if wte is None else (wte, _stamp(wte), pack_weight(wte))

    @property
    def n_packed(self) -> int:
        return len(self.layers) + (self._tied is not None)

    def fresh(self) -> bool:
        """Whether every packed weight is still the module's (and the tied table still the model's),
        unchanged since it was packed."""
        model = self._model()
        if model is None:
            return False
        wte = _tied_weight(model)
        if (wte is None) != (self._tied is None) or (wte is not None and (
                wte is not self._tied[0] or _stamp(wte) != self._tied[1])):
            return False
        return all(m.weight is w and _stamp(w) == s for m, w, s, _ in self.layers)

    def __enter__(self):
        _STATE.active = getattr(_STATE, "active", []) + [self]  # for the tied head: head_linear
        packs = _thread_packs()
        for m, w, _, p in self.layers:
            entry = packs.get(id(m))
            if entry is None:
                packs[id(m)] = [w, p, 1]
            else:  # re-entered: the outer context's copy stays
                entry[2] += 1
        _install([m for m, *_ in self.layers])
        return self

    def __exit__(self, *exc):
        _STATE.active = _STATE.active[:-1]
        packs = _thread_packs()
        for m, *_ in self.layers:
            entry = packs[id(m)]
            entry[2] -= 1
            if entry[2] == 0:
                del packs[id(m)]
        _uninstall([m for m, *_ in self.layers])

    def tied(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The tied head's logits on the packed table, or None when the model has no tied head."""
        return None if self._tied is None else packed_linear(x, self._tied[2], bias)


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN's matmul forward and backward (plain, unpacked weights: they change every
    step): the three GEMMs of a Linear in training, each about twice MKL's rate on this machine."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # only what the backward needs: a frozen weight (LoRA) needs no input kept, a frozen input no weight
        need_x, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
        ctx.save_for_backward(x if need_x else None, weight if need_w else None)
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        return packed_linear(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable  # its backward is not itself differentiable: a double backward errors, never lies
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (M, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = packed_linear(g2, weight.t(), None).reshape(ctx.x_shape)  # g @ W
        if ctx.needs_input_grad[1]:
            gw = packed_linear(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # g^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear with autograd on oneDNN for fp32 CPU tensors (F.linear itself for anything else)."""
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
            or x.shape[-1] == 0 or x.numel() == 0):
        return torch.nn.functional.linear(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


class TrainingLinears:
    """`with TrainingLinears(model):` runs every nn.Linear of `model` through onednn_linear in this thread's
    training forwards (the autograd graph keeps the oneDNN backward after the context)."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if _swappable(m)]

    def __enter__(self):
        _STATE.training = getattr(_STATE, "training", 0) + 1
        _install(self.layers)
        return self

    def __exit__(self, *exc):
        _STATE.training -= 1
        _uninstall(self.layers)


def training_applies(model) -> bool:
    """A training forward (autograd on) of fp32 CPU weights, outside autocast, with oneDNN and the path on."""
    return (torch.is_grad_enabled() and _enabled() and not torch.is_autocast_enabled("cpu")
            and packing_available(model))


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
    if not onednn_available() or any(p.dtype != torch.float32 or p.device.type != "cpu" or p.is_inference()
                                     for p in model.parameters()):
        return None  # inference tensors (made under inference_mode) have no version counter to watch
    packed = _CACHE[model] = PackedLinears(model)
    return packed


def release(model) -> None:
    """Drop the packed copies of `model`'s weights (they are made again on the next inference call)."""
    _CACHE.pop(model, None)


def context(model):
    """The model's oneDNN path for one forward: packed weights without autograd (packed_for), the oneDNN
    autograd Linear with it (TrainingLinears), or a null context where neither applies."""
    packed = packed_for(model)
    if packed is not None:
        return packed
    return TrainingLinears(model) if training_applies(model) else contextlib.nullcontext()


def head_linear(model, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """An LM head tied to the embedding (a bare F.linear on wte.weight) on the same path as the Linears:
    inside the model's forward, the copies it entered (checked fresh there), not a second check."""
    active = [p for p in getattr(_STATE, "active", ()) if p._model() is model]
    packed = active[-1] if active and not torch.is_grad_enabled() else packed_for(model)
    logits = packed.tied(x, bias) if packed is not None else None
    if logits is not None:
        return logits
    if training_applies(model):
        return onednn_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)

