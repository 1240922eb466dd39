"""int4 weights in groups, on PyTorch's own CPU int4 kernel: how a GGUF file's Q4 weights run quantized.

`quantize_int4(model)` replaces a TransformerLM's Linears by `Int4Linear`: the weight is 4-bit with one
scale and one minimum per group of `group_size` inputs in each row (asymmetric, like llama.cpp's Q4_1:
w ~ scale[o, g] * q[o, i] + min[o, g], q in 0..15), packed two to a byte by
`torch._convert_weight_to_int4pack_for_cpu`, and multiplied by `torch._weight_int4pack_mm_for_cpu`
(the kernel torchao and gpt-fast use on the CPU) with bf16 inputs; the output and the bias are fp32.

A Q4_1 GGUF file's weights already lie on such a grid (group 32): re-quantizing the dequantized fp32
values by each group's min and max gives back the file's own integers, so nothing is lost but the
rounding of the scales and minimums to bf16 (the kernel's format; ~0.2% relative RMS on SmolLM2's
weights). `on_grid_only=True` quantizes only those Linears and gives the others (a Q8_0 head, say) to
`rest` ("int8": the weight-only int8 Linear of models/int8.py; "fp32": left as they are).
`checkpoints/gguf.py` does exactly that for `load(path.gguf, quantized=True)`.

The kernel needs out_features to be a multiple of 16 and in_features of the group size: other Linears
go to `rest` too. An int4 model is not saved (no folder format holds it yet): save the fp32 model, or
an int8 one."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..errors import QuantizationError
from .int8 import Int8Linear, check_quantizable, excluded, kernel_rows, quantize_weight, targets

QUANTIZATION = "int4"
GROUP_SIZES = (32, 64, 128, 256)  # what the CPU kernel takes
OUT_MULTIPLE = 16  # the packing wants out_features divisible by this
ZERO_POINT = 8  # the kernel dequantizes (q - 8) * scale + zero


class NoInt4Linear(QuantizationError):
    """quantize_int4 found no Linear to put on int4 (and left the model unchanged)."""


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise QuantizationError(f"group_size={group_size}: the int4 kernel takes {list(GROUP_SIZES)}")


def group_quantize(w: torch.Tensor, group_size: int):
    """fp32 (out, in) -> (q int32 (out, in) in 0..15, scale (out, in/G), minimum (out, in/G)): each group's
    min and max span the 16 levels, w ~ q * scale + minimum."""
    out_f, in_f = w.shape
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)  # (out, groups, G)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every q is 0
    q = torch.round((g - lo[..., None]) / safe[..., None]).clamp(0, 15)
    return q.reshape(out_f, in_f).to(torch.int32), scale, lo


def on_grid(w: torch.Tensor, group_size: int, tol: float = 1e-4) -> bool:
    """Whether `w` already lies on a 4-bit grid per group (a Q4_1 file's dequantized weights do): its
    re-quantization is exact to `tol` of a step."""
    if w.shape[1] % group_size:
        return False
    q, scale, lo = group_quantize(w, group_size)
    back = q.reshape(*scale.shape, group_size).float() * scale[..., None] + lo[..., None]
    err = (back.reshape(w.shape) - w.detach().float()).abs().reshape(*scale.shape, group_size).amax(-1)
    return bool((err <= tol * scale + 1e-7).all())


def fits(lin, group_size: int) -> bool:
    return lin.out_features % OUT_MULTIPLE == 0 and lin.in_features % group_size == 0


class Int4Linear(nn.Module):
    """A Linear with 4-bit grouped weights on the CPU int4 kernel: `packed` (the kernel's layout),
    `scales_and_zeros` bf16 (in/G, out, 2), fp32 `bias`; bf16 inputs, fp32 outputs."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, group_size: int = 32):
        super().__init__()
        check_group_size(group_size)
        self.out_features, self.in_features = weight.shape
        if not fits(self, group_size):
            raise QuantizationError(f"an int4 Linear needs out_features divisible by {OUT_MULTIPLE} and in_features "
                                    f"by the group size {group_size}; this one is {tuple(weight.shape)}")
        self.group_size = group_size
        q, scale, lo = group_quantize(weight, group_size)
        zero = lo + ZERO_POINT * scale  # (q - 8) * scale + zero == q * scale + lo
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous())  # (in/G, out, 2)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = kernel_rows(x, self.in_features)  # (N, in) bf16
        sz = self.scales_and_zeros  # bf16, as the kernel takes them; a model.to(dtype=...) may have cast them
        sz = sz if sz.dtype == torch.bfloat16 else sz.to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, sz).float()  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


def quantize_int4(model, group_size: int = 32, on_grid_only: bool = False, rest: str = "int8",
                  exclude: tuple = ()):
    """Quantize `model` (a fp32 TransformerLM on the CPU) in place: each nn.Linear (a tied head as its own
    copy) that the kernel fits -> Int4Linear; the others -> `rest` ("int8" weight-only, or "fp32").
    on_grid_only: int4 only where the weights already lie on a 4-bit grid (a Q4 GGUF file's), so int4
    adds nothing but bf16 rounding of the scales. Returns the model, in eval mode, with
    `model.quantization == "int4"` and `model.int4_layout` = {"int4": [...], "int8": [...], "fp32": [...]}."""
    if rest not in ("int8", "fp32"):
        raise QuantizationError(f"rest={rest!r}: the Linears int4 leaves go to 'int8' or stay 'fp32'")
    check_group_size(group_size)
    check_quantizable(model)  # (an already quantized model among what it refuses)
    layout = {"int4": [], "int8": [], "fp32": []}
    plan = []  # decided for every Linear before any is replaced: a refusal leaves the model as it was
    for parent, attr, name, lin in targets(model):
        if excluded(name, exclude):
            kind = "fp32"
        elif fits(lin, group_size) and (not on_grid_only or on_grid(lin.weight, group_size)):
            kind = "int4"
        else:
            kind = rest
        layout[kind].append(name)
        plan.append((parent, attr, lin, kind))
    if not layout["int4"]:
        raise NoInt4Linear("no Linear of the model can go to int4 (none fits the kernel"
                                + (", or none lies on a 4-bit grid" if on_grid_only else "") + "); the model is "
                                "unchanged: use allformers.models.int8.quantize_int8")
    with torch.no_grad():
        for parent, attr, lin, kind in plan:
            if kind == "int4":
                setattr(parent, attr, Int4Linear(lin.weight, lin.bias, group_size))
            elif kind == "int8":
                setattr(parent, attr, Int8Linear(*quantize_weight(lin.weight), lin.bias))
    from .packed import release

    release(model)  # the fp32 Linears are gone: so are their packed copies (models/packed.py)
    model.quantization = QUANTIZATION
    model.int4_layout = layout
    return model.eval()


def weight_bytes(model) -> dict:
    """Bytes of the quantized Linears' weights, scales included: {"int4": ..., "int8": ...}."""
    out = {"int4": 0, "int8": 0}
    for m in model.modules():
        if isinstance(m, Int4Linear):
            out["int4"] += m.packed.numel() * m.packed.element_size() + m.scales_and_zeros.numel() * 2
        elif isinstance(m, Int8Linear):
            out["int8"] += m.weight.numel() + m.weight_scale.numel() * 4
    return out
