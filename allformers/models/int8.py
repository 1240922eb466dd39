"""int8 weight quantization of a decoder, on PyTorch's own int8 kernels.

`quantize_int8(model)` replaces every nn.Linear of a TransformerLM (attention, feed-forward, a separate
LM head) by an int8 one: its weight is int8 with one scale per output row (symmetric, zero point 0:
w ~ scale[o] * q[o, i], q in [-127, 127]); the bias and the output stay fp32. That makes the weights
~4x smaller to read per decoded token, which is what batch-1 decode is bound by. Two schemes:

  "weight-only" (the default)  `Int8Linear`: the input is rounded to bf16 and multiplied by the int8
                               weight in `torch._weight_int8pack_mm` (PyTorch's weight-only int8 kernel,
                               the one gpt-fast and torchao use on the CPU); no activation quantization,
                               so no calibration, and each row of the input is computed on its own
  "dynamic"                    `torch.ao.nn.quantized.dynamic.Linear`: each call quantizes its input to
                               uint8 with one scale per call and runs fbgemm's u8 x s8 -> int32 kernel
                               (VNNI); activation outliers need SmoothQuant first (`smooth=True`,
                               models/smoothquant.py) and the MLP down-projections kept fp32

A head tied to the embedding gets its own int8 copy (model.lm_head); `exclude=` keeps chosen Linears fp32.

What stays fp32: the embeddings (a table lookup, no matmul; the fp32 table), the norms, positions, MoE routers (the router reads its weight directly, in fp32
on purpose) and MoE experts (batched weights, not nn.Linear). Refused: Transformer-XL / XLNet and
DeBERTa-style attention (they read their projection weights directly), LoRA-wrapped layers (merge
them first), models that are not on the CPU (the kernels are CPU ones here) and models that are not a
TransformerLM (encoder-decoders, composites).

Saving and loading (config.json "quantization": "int8" and the scheme, int8 weights + scales in
safetensors) live in checkpoints/int8.py; this module only knows the modules."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..config import Config, SavedConfig
from ..errors import QuantizationError

QUANTIZATION = "int8"
WEIGHT_ONLY, DYNAMIC = "weight-only", "dynamic"
SCHEMES = {
    WEIGHT_ONLY: "per-channel symmetric int8 weights, bf16 activations (torch._weight_int8pack_mm)",
    DYNAMIC: "per-channel symmetric int8 weights, dynamic uint8 activations (torch.ao dynamic Linear, fbgemm)",
}
# the kernel needs the input width to be a multiple of this (others crash or return garbage, measured);
# an Int8Linear of another width multiplies by its dequantized weight instead (right, just not fast)
PACK_MULTIPLE = 16
# from this many input rows on (prefill, a perplexity window), dequantizing the weight to bf16 and running
# one bf16 matmul beats the row-oriented int8 kernel (measured: 2x at 512 rows on a 1536x576 Linear)
DEQUANT_ROWS = 256
ALIGN = 64  # bytes: the kernel's operands must start where torch's allocator puts tensors


@dataclass
class Int8Config(SavedConfig):
    """What an int8 folder's config.json holds: the model's own Config, that it is quantized and which
    Linears are (names in model.named_modules()); checkpoints/int8.py writes and reads it."""
    lm: Config = field(default_factory=Config)
    quantization: str = QUANTIZATION
    scheme: str = WEIGHT_ONLY  # a SCHEMES key; folders written before the weight-only scheme hold its description
    modules: tuple = ()
    smoothing: Optional[dict] = None  # SmoothQuant's record (models/smoothquant.py): alpha, calibration, Linears


def scheme_of(saved: str) -> str:
    """A folder's `scheme` -> a SCHEMES key (older folders wrote the dynamic scheme's description)."""
    for key, words in SCHEMES.items():
        if saved in (key, words):
            return key
    raise QuantizationError(f"int8 scheme {saved!r} is not known; this version runs {sorted(SCHEMES)}")


def bf16_exact_scales(amax: torch.Tensor) -> torch.Tensor:
    """Per-row scales amax / 127, rounded *up* to the nearest bf16 value: the weight-only kernel takes
    its scales in bf16, and a scale it can hold exactly costs nothing, where rounding an fp32 scale to
    bf16 would scale the whole row by up to 0.4%. Rounding up keeps every q within [-127, 127]."""
    s = (amax / 127.0).clamp(min=1e-12).float()
    b = s.bfloat16().float()
    up = torch.nextafter(s.bfloat16(), torch.tensor(float("inf"), dtype=torch.bfloat16)).float()
    return torch.where(b >= s, b, up)


def kernel_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) -> (N, width) bf16, contiguous and where torch's allocator puts tensors: what the
    weight-only kernels (int8 here, int4 in models/int4.py) take. A bf16 view at an offset crashes them."""
    x2 = x.reshape(-1, width).to(torch.bfloat16)
    if not x2.is_contiguous() or x2.data_ptr() % ALIGN:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    return x2


class Int8Linear(nn.Module):
    """A Linear with an int8 weight (out, in) and fp32 per-row scales, computed weight-only: the input
    goes to bf16, `torch._weight_int8pack_mm` multiplies it by the int8 weight and scales each column,
    the output comes back fp32 (+ the fp32 bias). Its state dict is what an int8 folder stores:
    `weight` (int8), `weight_scale` (fp32) and `bias`."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        # a copy of its own: the kernel wants memory as torch allocates it (64-byte aligned); the weights of a
        # safetensors file, read at an arbitrary offset, made it crash
        self.register_buffer("weight", q.detach().to(torch.int8).clone(memory_format=torch.contiguous_format))
        self.register_buffer("weight_scale", scale.detach().float().clone())  # its own: a load writes into it
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._refresh()  # and again whenever weight_scale is written in place (a load): forward checks

    def _refresh(self):
        """The kernel's bf16 scales; an fp32 scale bf16 cannot hold is applied after, in fp32, instead."""
        s = self.weight_scale
        self._scale_version = s._version
        self._exact = bool(torch.equal(s.bfloat16().float(), s))
        self._scale_bf16 = s.bfloat16() if self._exact else torch.ones_like(s, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = kernel_rows(x, self.in_features)  # (N, in) bf16
        if self.weight_scale._version != self._scale_version:  # written in place (a load's copy_)
            self._refresh()
        if self.in_features % PACK_MULTIPLE or x2.shape[0] >= DEQUANT_ROWS:
            # q is exact in bf16; the scale applies after, in fp32, to the sums
            y = torch.nn.functional.linear(x2, self.weight.to(torch.bfloat16)).float() * self.weight_scale
        else:
            y = torch._weight_int8pack_mm(x2, self.weight, self._scale_bf16).float()  # (N, out)
            if not self._exact:
                y = y * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _dynamic_class():
    import torch.ao.nn.quantized.dynamic as nnqd

    return nnqd.Linear


def _qlinear_classes() -> tuple:
    return Int8Linear, _dynamic_class()


@contextmanager
def _quiet():
    """torch.ao.quantization says it is deprecated on every call (torchao is its successor, not installed
    here); the dynamic Linear and its fbgemm kernel are what this torch ships, and they run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated.*")
        yield


def is_int8(model) -> bool:
    """Whether `model` holds int8 Linears of either scheme (quantize_int8 or an int8 folder)."""
    cls = _qlinear_classes()
    return isinstance(model, nn.Module) and any(isinstance(m, cls) for m in model.modules())


def int8_modules(model) -> list:
    """The names of the quantized Linears of `model`, in module order."""
    cls = _qlinear_classes()
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def check_quantizable(model, scheme: str = WEIGHT_ONLY) -> None:
    """Refuse, naming the fix, what quantize_int8 cannot do."""
    from .lm import TransformerLM
    from .lora import LoRALinear

    if scheme not in SCHEMES:
        raise QuantizationError(f"scheme={scheme!r}: choose one of {sorted(SCHEMES)}")
    if isinstance(model, nn.Module) and (getattr(model, "quantization", None) or is_int8(model)):
        kind = getattr(model, "quantization", None) or QUANTIZATION
        raise QuantizationError(f"the model is already {kind}-quantized; quantize the fp32 model (or load the "
                                f"quantized one as is)")
    if type(model) is not TransformerLM:
        name = type(model).__name__
        raise QuantizationError(f"int8 quantization takes a decoder (TransformerLM: GPT-2, LLaMA, SmolLM2, OPT ... any "
                                f"decoder of `allformers zoo`), not a {name}; quantize a decoder-only model")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise QuantizationError("the model has LoRA adapters; merge them first (allformers.models.merge_lora(model)), "
                                "then quantize")
    if model.config.attention_class == "DisentangledAttention":
        raise QuantizationError("DeBERTa-style disentangled attention reads its projection weights directly; it cannot "
                                "run on int8 Linears (quantize a decoder instead)")
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise QuantizationError(f"int8 quantization runs on the CPU only (its int8 kernels here are CPU ones, none for "
                                f"{'/'.join(sorted(devices - {'cpu'}))}); move the model first: model.cpu(), "
                                f"or on a GPU keep it in bf16/fp16 (model.to(torch.bfloat16))")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise QuantizationError(f"int8 quantization starts from fp32 weights, the model's are {sorted(map(str, dtypes))}; "
                                f"call model.float() first")
    engines = torch.backends.quantized.supported_engines
    if scheme == DYNAMIC and "fbgemm" not in engines and "x86" not in engines:
        raise QuantizationError(f"this torch build has no x86/fbgemm quantized engine (it has "
                                f"{torch.backends.quantized.supported_engines}); the dynamic scheme needs an x86 CPU build of torch (or use scheme='weight-only')")


def tied_head(model) -> Optional[nn.Linear]:
    """A tied LM head as an nn.Linear sharing the embedding table (no copy), or None: quantize_int8 gives it its
    own int8 copy under model.lm_head (the embedding lookup keeps the fp32 table)."""
    from .lm import TransformerLM

    if type(model) is not TransformerLM:
        return None
    c = model.config
    if not (c.lm_head and c.tie_embeddings and model.lm_head is None):
        return None
    lin = nn.Linear(1, 1, bias=False)
    lin.in_features, lin.out_features = model.wte.weight.shape[1], model.wte.weight.shape[0]
    lin.weight = model.wte.weight
    lin.bias = model.lm_head_bias
    return lin


def targets(model) -> list:
    """(parent, attribute, name, Linear) of every Linear quantize_int8 replaces (a tied head as 'lm_head')."""
    from ..blocks.moe import MoE

    routers = {id(m.router) for m in model.modules() if isinstance(m, MoE)}
    out = []
    for pname, parent in model.named_modules():
        for attr, child in parent.named_children():
            if type(child) is nn.Linear and id(child) not in routers:
                out.append((parent, attr, f"{pname}.{attr}" if pname else attr, child))
    head = tied_head(model)
    if head is not None:
        out.append((model, "lm_head", "lm_head", head))
    return out


def excluded(name: str, exclude) -> bool:
    """Whether a Linear's name is one of `exclude`'s names or ends with one of them (kept fp32)."""
    return any(name == e or name.endswith("." + e) or name.endswith(e) for e in exclude)


def quantize_weight(w: torch.Tensor):
    """fp32 (out, in) -> (int8 (out, in), fp32 scales (out,)): symmetric per output row, q in [-127, 127];
    the scales are bf16 values (bf16_exact_scales), which both kernels use as they are."""
    scale = bf16_exact_scales(w.detach().abs().amax(dim=1))
    q = torch.round(w.detach() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def scheme_in(model) -> str:
    """The scheme of a quantized model's int8 Linears."""
    kinds = {WEIGHT_ONLY if isinstance(m, Int8Linear) else DYNAMIC for m in model.modules()
             if isinstance(m, _qlinear_classes())}
    if len(kinds) != 1:
        raise QuantizationError(f"the model holds {sorted(kinds) or 'no'} int8 Linears; one scheme is expected")
    return kinds.pop()


def make_qlinear(q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], scheme: str = WEIGHT_ONLY):
    """An int8 Linear of `scheme` from int8 weights and per-row scales (bias stays fp32)."""
    if scheme == WEIGHT_ONLY:
        return Int8Linear(q, scale, bias)
    cls = _dynamic_class()
    with _quiet():
        qw = torch._make_per_channel_quantized_tensor(q.to(torch.int8), scale.double(),
                                                     torch.zeros(q.shape[0], dtype=torch.long), 0)
        mod = cls(q.shape[1], q.shape[0], bias_=bias is not None, dtype=torch.qint8)
        mod.set_weight_bias(qw, None if bias is None else bias.detach().float().contiguous())
    return mod


def qlinear_parts(mod):
    """An int8 Linear -> (int8 weight (out, in), fp32 scales (out,), fp32 bias or None)."""
    if isinstance(mod, Int8Linear):
        return mod.weight, mod.weight_scale, mod.bias
    with _quiet():
        w, b = mod._weight_bias()
        return w.int_repr().contiguous(), w.q_per_channel_scales().float().contiguous(), b


def quantize_int8(model, modules: Optional[list] = None, smooth: bool = False, calibration=None,
                  alpha: Optional[float] = None, exclude: tuple = (), scheme: str = WEIGHT_ONLY):
    """Quantize `model` (a fp32 TransformerLM on the CPU) in place: every nn.Linear (and a tied LM head, as
    its own int8 copy) -> int8 weights with per-output-channel scales, computed by `scheme`'s kernel
    ("weight-only": Int8Linear; "dynamic": torch.ao's dynamic quantized Linear). Returns the model, in eval
    mode, with `model.quantization == "int8"`. Generation, the KV cache and the server run on it unchanged.

    smooth (the dynamic scheme only): SmoothQuant first (models/smoothquant.py), calibrated on `calibration` (None: the first State of
    the Union addresses; 'shakespeare'; a text; token ids) with `alpha` (default 0.5).
    exclude: Linear names or name suffixes ('mlp.proj', 'lm_head') kept fp32.
    modules: only these Linear names (checkpoints/int8.py passes a folder's list); default every one."""
    check_quantizable(model, scheme)
    if smooth and scheme != DYNAMIC:
        raise QuantizationError("SmoothQuant flattens the activations for the dynamic scheme's int8 inputs; the "
                                "weight-only scheme keeps them bf16 and needs no smoothing: pass scheme='dynamic' "
                                "with smooth=True, or drop smooth")
    if smooth:
        from . import smoothquant

        smoothquant.smooth(model, calibration=calibration,
                           alpha=smoothquant.DEFAULT_ALPHA if alpha is None else alpha)
    elif calibration is not None or alpha is not None:
        raise QuantizationError("calibration/alpha are SmoothQuant's; pass smooth=True with them")
    found = targets(model)
    if exclude:
        found = [t for t in found if not excluded(t[2], exclude)]
    if modules is not None:
        wanted = set(modules)
        unknown = sorted(wanted - {name for _, _, name, _ in found})
        if unknown:
            raise QuantizationError(f"no nn.Linear named {unknown[:5]} in this model; the int8 folder was made for "
                                    f"another config")
        found = [t for t in found if t[2] in wanted]
    if not found:
        raise QuantizationError("the model has no nn.Linear to quantize")
    with torch.no_grad():
        for parent, attr, _, lin in found:
            q, scale = quantize_weight(lin.weight)
            setattr(parent, attr, make_qlinear(q, scale, lin.bias, scheme))
    from .packed import release

    release(model)  # the fp32 Linears are gone: so are their packed copies (models/packed.py)
    model.quantization = QUANTIZATION
    return model.eval()


def linear_weight_bytes(model) -> dict:
    """Bytes of the Linear weights: {"fp32": ..., "int8": ...} (int8 counts its scales too)."""
    cls = _qlinear_classes()
    out = {"fp32": 0, "int8": 0}
    head = tied_head(model)
    if head is not None:
        out["fp32"] += head.weight.numel() * head.weight.element_size()
    for m in model.modules():
        if type(m) is nn.Linear:
            out["fp32"] += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, cls):
            q, scale, _ = qlinear_parts(m)
            out["int8"] += q.numel() * q.element_size() + scale.numel() * scale.element_size()
    return out
