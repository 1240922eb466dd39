"""int8 folders: a model quantized by models/int8.py, saved and read back bit for bit.

The folder is our format with two differences. config.json is an `Int8Config` (config_class
"Int8Config"): the model's own Config under "lm", "quantization": "int8", the scheme ("weight-only" or
"dynamic"; folders written before the weight-only scheme hold the dynamic one's description) and the
names of the quantized Linears. model.safetensors holds, for each of them, `NAME.weight` as int8
(out, in), `NAME.weight_scale` fp32 (out,) (w ~ scale[o] * q[o, i], zero point 0) and `NAME.bias`
fp32; every other tensor (embeddings, norms, fp32 heads) as in an fp32 folder. Reading it rebuilds
the same int8 Linears of the same scheme from the same integers and scales, so the logits are identical.

io.save calls save_int8 for a quantized model; composite.py registers load_int8 in io.CONFIG_LOADERS
(this module does not import io.py, which imports it lazily)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from .files import CONFIG_FILE, WEIGHTS_FILE, LoadReport, load_state_dict_into, read_config, read_safetensors, write_folder

SCALE = ".weight_scale"


def int8_state(model) -> dict:
    """The tensors of a quantized model as safetensors can hold them: int8 weights + fp32 scales for its
    quantized Linears, everything else as model.state_dict() has it."""
    from ..models.int8 import int8_modules, qlinear_parts

    names = int8_modules(model)
    modules = dict(model.named_modules())
    prefixes = tuple(f"{n}." for n in names)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for n in names:
        q, scale, bias = qlinear_parts(modules[n])
        state[f"{n}.weight"], state[f"{n}{SCALE}"] = q, scale
        if bias is not None:
            state[f"{n}.bias"] = bias.detach().float()
    return state


def save_int8(model, path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a quantized TransformerLM as an int8 folder (atomically, like every allformers folder)."""
    from ..models.int8 import Int8Config, int8_modules, scheme_in

    config = Int8Config(lm=model.config, scheme=scheme_in(model), modules=tuple(int8_modules(model)),
                        smoothing=getattr(model, "smoothing", None))
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    return write_folder(path, int8_state(model), config, tokenizer, overwrite=overwrite)


def load_int8(path):
    """Rebuild the quantized model of an int8 folder: the fp32 tensors copied in, each quantized Linear
    made from its stored int8 weight and scales. Its tokenizer is attached by io.load."""
    from ..models import build_model
    from ..errors import QuantizationError
    from ..models.int8 import QUANTIZATION, Int8Config, make_qlinear, scheme_of, targets

    path = Path(path)
    config = read_config(path, Int8Config)
    if config.quantization != QUANTIZATION:
        raise CheckpointError(f"{path / CONFIG_FILE}: quantization {config.quantization!r} is not supported; "
                              f"this version reads {QUANTIZATION!r} folders")
    try:
        scheme = scheme_of(config.scheme)
    except QuantizationError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from None
    state = read_safetensors(path / WEIGHTS_FILE)
    model = build_model(config.lm).eval()
    found = {name: (parent, attr, lin) for parent, attr, name, lin in targets(model)}  # a tied head as 'lm_head'
    wanted = list(config.modules)
    unknown = [n for n in wanted if n not in found]
    absent = [k for n in wanted for k in (f"{n}.weight", f"{n}{SCALE}") if k not in state]
    if unknown or absent:
        raise CheckpointError(f"{path}: the int8 folder does not fit its config (no Linear {unknown[:3]}; missing "
                              f"tensors {absent[:3]}); it was written for another config or is damaged — save it again")
    quantized = {}
    for n in wanted:
        q, scale = state.pop(f"{n}.weight"), state.pop(f"{n}{SCALE}")
        bias = state.pop(f"{n}.bias", None)
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise CheckpointError(f"{path}: {n}.weight must be int8 (out, in) with {n}{SCALE} (out,), got "
                                  f"{q.dtype} {tuple(q.shape)} and {tuple(scale.shape)}")
        quantized[n] = (q, scale, bias)
    # the fp32 rest first, while every module is still a float one: the Linears' own keys are the ones missing
    report = load_state_dict_into(model, state, str(path), strict=False)
    prefixes = tuple(f"{n}." for n in wanted)
    missing = [k for k in report.missing if not k.startswith(prefixes)]
    if missing or report.unexpected:
        raise CheckpointError(f"{path} does not match the model: {len(missing)} missing ({missing[:5]}), "
                              f"{len(report.unexpected)} unexpected ({report.unexpected[:5]})")
    for n, (q, scale, bias) in quantized.items():
        parent, attr, lin = found[n]
        if tuple(q.shape) != (lin.out_features, lin.in_features) or (bias is None) != (lin.bias is None):
            raise CheckpointError(f"{path}: {n}.weight is {tuple(q.shape)} (bias {bias is not None}), the config's "
                                  f"Linear is ({lin.out_features}, {lin.in_features}) (bias {lin.bias is not None})")
        setattr(parent, attr, make_qlinear(q, scale, bias, scheme))
    model.quantization = QUANTIZATION
    model.smoothing = config.smoothing
    model.load_report = LoadReport(source=str(path), loaded=sorted(report.loaded + [
        k for n in wanted for k in (f"{n}.weight", f"{n}{SCALE}", f"{n}.bias") if k != f"{n}.bias" or quantized[n][2] is not None]))
    return model
