"""The engine's matmuls: oneDNN with each weight packed once into its blocked layout.

Why not torch's default (MKL's sgemm) on CPU: a row's result depends on how many rows come
with it (one row takes a GEMV path; the 1-3 rows of a ragged tail another kernel), so a
request's logits would change in the last bits with the batch around it. oneDNN's packed
matmul gives every row the same bits for any number of rows and threads (checked from 1 to
1,000 rows and 1 to 8 threads; tests/test_serve_engine.py checks it where it runs), and it is
faster than MKL for the 4-64 rows of a decode batch. The cost: a packed copy of every Linear
weight (the model's weight memory, once more), made when the engine starts: a served model's
weights must not change afterwards."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def packing_available(model) -> bool:
    p = next(model.parameters())
    return (p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _pack(w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)


def _linear(x, packed, bias):  # needs inference mode: with autograd on, its 1-row path differs
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinears:
    """`with packed:` runs every nn.Linear of `model` on its packed weight (their forward is
    swapped for the duration: no per-op dispatch cost); `packed.head(h)` does the same for an
    LM head tied to the embedding, which is a bare F.linear(x, wte.weight)."""

    def __init__(self, model):
        self.model = model
        self.layers = [(m, _pack(m.weight)) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        tied = getattr(model, "lm_head", None) is None and getattr(getattr(model, "config", None), "tie_embeddings", False)
        self._tied = _TiedHead(model.wte.weight, _pack(model.wte.weight)) if tied else None

    @property
    def n_packed(self) -> int:
        return len(self.layers) + (self._tied is not None)

    def __enter__(self):
        for m, p in self.layers:
            m.__dict__["forward"] = lambda x, p=p, b=m.bias: _linear(x, p, b)
        return self

    def __exit__(self, *exc):
        for m, _ in self.layers:
            m.__dict__.pop("forward", None)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self._tied is None:
            return self.model.head(h)
        with self._tied:  # a handful of ops: the mode's per-op cost does not matter here
            return self.model.head(h)


class _TiedHead(TorchFunctionMode):
    def __init__(self, weight, packed):
        super().__init__()
        self.weight, self.packed = weight, packed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[1] is self.weight:
            return _linear(args[0], self.packed, args[2] if len(args) > 2 else kwargs.get("bias"))
        return func(*args, **kwargs)
