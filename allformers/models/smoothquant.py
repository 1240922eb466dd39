"""SmoothQuant (Xiao et al. 2022) for the int8 path: move activation outliers into the weights, exactly.

int8.py's dynamic Linear quantizes its input with one scale per call, so a few huge input channels
(SmolLM2 has them after every norm and before every down-projection) leave the rest of the channels a
handful of levels. For each input channel j of a Linear, s_j = max|X_j|^alpha / max|W[:, j]|^(1-alpha)
(maxima from a calibration pass); the Linear's columns are multiplied by s and the op that produces X
is divided by s, so the fp32 function is unchanged (up to rounding) and X/s is flatter to quantize.

Where X/s is folded (only exact folds):
  attention qkv (fused) and MLP fc (gate;up / fc)  -> the norm before them (weight and bias); one s per
                                                      norm, shared by every Linear that reads it
  GLU down-projection, silu(g) * u / s             -> the up rows of fc (weight and bias)
  attention output projection                      -> the value rows of qkv, when s is equal within each
                                                      kv group (GQA: the max over the group's query heads
                                                      is taken); attention is linear in v
  the LM head                                      -> the final norm; a tied head gets its own (smoothed)
                                                      copy of the table, the embedding lookup is unchanged
Left unsmoothed (exact, just not helped): a GELU/ReLU MLP's down-projection (a nonlinearity sits before
it), MoE experts. Refused (QuantizationError): post-norm blocks (the norm sits after the residual add),
shared layers, attention classes other than the standard one."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..errors import QuantizationError

DEFAULT_ALPHA = 0.65  # measured on SmolLM2 (docs/quantization.md): 0.5 +49%, 0.65 +1.1%, 0.8 +3.0% with mlp.proj fp32
DEFAULT_CALIBRATION = "sotu-first"  # the first State of the Union addresses; bench_quant holds out the last ones
DEFAULT_TOKENS = 4096


def _data_root():
    """$ALLFORMERS_DATA, else the first ../shared/data from the cwd or the repo (as training/data.py finds it;
    not imported from there: models sits below training in the layer table)."""
    import os
    from pathlib import Path

    env = os.environ.get("ALLFORMERS_DATA")
    bases = [Path(env)] if env else [(b / ".." / "shared" / "data").resolve()
                                     for b in (Path.cwd(), Path(__file__).resolve().parents[2])]
    for b in bases:
        if b.is_dir():
            return b
    raise QuantizationError("no data folder for the built-in calibration text (../shared/data or $ALLFORMERS_DATA); "
                            "pass calibration text or token ids instead")


def calibration_text(name: str = DEFAULT_CALIBRATION) -> str:
    """Built-in calibration text, never the held-out evaluation text: 'sotu-first' (the first 20 State of the
    Union addresses, 1790-1809, from sotu/sotu.txt: addresses are blank-line separated; bench_quant.py evaluates
    on the last ones) or 'shakespeare' (tinyshakespeare/input.txt)."""
    rel = {"sotu-first": "sotu/sotu.txt", "shakespeare": "tinyshakespeare/input.txt"}.get(name)
    if rel is None:
        raise QuantizationError(f"unknown built-in calibration {name!r}; use 'sotu-first', 'shakespeare', a text or "
                                f"token ids")
    path = _data_root() / rel
    if not path.is_file():
        raise QuantizationError(f"calibration {name!r}: {path} is not there; pass calibration text instead")
    text = path.read_text(encoding="utf-8")
    if name == "sotu-first":
        text = "\n\n".join([a.strip() for a in text.split("\n\n") if a.strip()][:20])
    return text


def _blocks(model):
    from ..blocks.attention import Attention
    from ..blocks.block import Block

    if model.config.share_layers != "none":
        raise QuantizationError("SmoothQuant folds scales into each layer's norm; this model shares layers "
                                "(share_layers != 'none'), so one fold would apply twice — quantize with smooth=False")
    out = []
    for i, b in enumerate(model.blocks):
        if type(b) is not Block or type(b.attn) is not Attention or not isinstance(getattr(b.attn, "qkv", None), nn.Linear):
            raise QuantizationError(f"SmoothQuant: block {i} is not a standard block with fused-qkv Attention "
                                    f"({type(b).__name__}/{type(b.attn).__name__}); quantize with smooth=False")
        if b.placement != "pre" and not b.parallel:
            raise QuantizationError(f"SmoothQuant: block {i} is post-norm (the norm follows the residual add, so no "
                                    f"op before its Linears can absorb a scale); quantize with smooth=False")
        if b.cross_attn is not None:
            raise QuantizationError("SmoothQuant: cross-attention blocks are not supported; quantize with smooth=False")
        out.append(b)
    return out


def _head_norm(model):
    """The norm whose output the LM head reads, or None (no head, or nothing foldable before it)."""
    if not model.config.lm_head:
        return None
    if model.head_transform is not None:
        return model.head_transform[2]
    return model.norm


def _norm_ok(norm) -> bool:
    return isinstance(norm, (nn.LayerNorm, nn.RMSNorm)) and norm.weight is not None


def _glu_mlp(mlp) -> bool:
    from ..blocks.feedforward import GLU

    return type(mlp) is GLU


def _mlp_ok(mlp) -> bool:
    from ..blocks.feedforward import GLU, MLP

    return type(mlp) in (GLU, MLP) and isinstance(mlp.fc, nn.Linear)


def _tokens(model, calibration, tokens: int):
    if isinstance(calibration, torch.Tensor):
        return calibration.flatten().long()[:tokens]
    tok = getattr(model, "tokenizer", None)
    text = calibration_text(calibration or DEFAULT_CALIBRATION) if calibration is None or calibration in ("sotu-first", "shakespeare") \
        else calibration
    if tok is None:
        raise QuantizationError("SmoothQuant calibration from text needs the model's tokenizer (model.tokenizer); "
                                "pass token ids (a LongTensor) as calibration instead")
    return torch.tensor(tok.encode(text)[:tokens], dtype=torch.long)


@torch.no_grad()
def activation_maxima(model, ids: torch.Tensor, window: int = 512) -> dict:
    """max |X_j| over the calibration tokens of the input of every Linear smoothing touches (and of the LM
    head): {name: (in,) tensor}, name as in model.named_modules() ('lm_head' for the head)."""
    stats, hooks = {}, []

    def keep(name):
        def hook(_mod, args, out=None):
            x = (args[0] if out is None else out).detach().reshape(-1, (args[0] if out is None else out).shape[-1])
            m = x.abs().amax(dim=0).float()
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)
        return hook

    blocks = _blocks(model)
    for i, b in enumerate(blocks):
        for attr in ("qkv", "proj"):
            hooks.append(getattr(b.attn, attr).register_forward_pre_hook(keep(f"blocks.{i}.attn.{attr}")))
        if _mlp_ok(b.mlp):
            for attr in ("fc", "proj"):
                hooks.append(getattr(b.mlp, attr).register_forward_pre_hook(keep(f"blocks.{i}.mlp.{attr}")))
    hn = _head_norm(model)
    if hn is not None:
        hooks.append(hn.register_forward_hook(lambda m, a, o: keep("lm_head")(m, (o,))))
    was = model.training
    model.eval()
    try:
        window = min(window, model.config.block_size)
        for s in range(0, ids.numel(), window):
            chunk = ids[s:s + window]
            if chunk.numel():
                model(chunk[None])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if model.config.head_input_scale is not None and "lm_head" in stats:
        stats["lm_head"] = stats["lm_head"] * abs(model.config.head_input_scale)
    return stats


def smooth_scales(x_max: torch.Tensor, weights: list, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W[:, j]|^(1-alpha) over the Linears reading X (1 where a channel is dead)."""
    w_max = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).float()
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    s = torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))
    return s.clamp(min=1e-5)


def _fold_norm(norm, linears, s):
    norm.weight.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s[None, :])


@torch.no_grad()
def smooth(model, calibration=None, alpha: float = DEFAULT_ALPHA, tokens: int = DEFAULT_TOKENS,
           head: bool = True, maxima: Optional[dict] = None) -> dict:
    """Apply SmoothQuant to a fp32 TransformerLM in place (its fp32 function unchanged up to rounding).

    calibration: None / 'sotu-first' / 'shakespeare' (built-in), a text, or token ids; tokens: at most this many.
    head: also smooth the LM head (a tied head becomes an untied fp32 copy, model.lm_head, first).
    Returns a record: {"alpha", "calibration", "tokens", "smoothed": [Linear names]}."""
    if not 0.0 <= alpha <= 1.0:
        raise QuantizationError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    blocks = _blocks(model)
    if maxima is None:
        ids = _tokens(model, calibration, tokens)
        if ids.numel() < 2:
            raise QuantizationError("SmoothQuant calibration needs at least a few tokens of text")
        maxima = activation_maxima(model, ids)
        n_tok = int(ids.numel())
    else:
        n_tok = None
    done = []
    for i, b in enumerate(blocks):
        pre = f"blocks.{i}"
        attn, mlp = b.attn, b.mlp
        readers = [(b.norm1, [attn.qkv], [f"{pre}.attn.qkv"])]
        if _mlp_ok(mlp):
            if b.norm2 is None:  # parallel residual sharing norm1 (PaLM): one s for qkv and fc
                readers = [(b.norm1, [attn.qkv, mlp.fc], [f"{pre}.attn.qkv", f"{pre}.mlp.fc"])]
            else:
                readers.append((b.norm2, [mlp.fc], [f"{pre}.mlp.fc"]))
        for norm, lins, names in readers:
            if not _norm_ok(norm):
                continue
            x = torch.stack([maxima[n] for n in names]).amax(dim=0)
            _fold_norm(norm, lins, smooth_scales(x, [l.weight for l in lins], alpha))
            done += names
        # attention output projection <- value rows of qkv (GQA: one s per kv group, the max over its heads)
        H, KV, D = attn.n_head, attn.n_kv_head, attn.head_dim
        s = smooth_scales(maxima[f"{pre}.attn.proj"], [attn.proj.weight], alpha)
        s_kv = s.view(KV, H // KV, D).amax(dim=1)  # query head h reads kv head h // (H // KV)
        s_full = s_kv[:, None, :].expand(KV, H // KV, D).reshape(-1)
        v0 = H * D + KV * D
        attn.qkv.weight[v0:].div_(s_kv.reshape(-1)[:, None])
        if attn.qkv.bias is not None:
            attn.qkv.bias[v0:].div_(s_kv.reshape(-1))
        attn.proj.weight.mul_(s_full[None, :])
        done.append(f"{pre}.attn.proj")
        # GLU down-projection <- up rows of fc
        if _glu_mlp(mlp):
            hid = mlp.hidden
            s = smooth_scales(maxima[f"{pre}.mlp.proj"], [mlp.proj.weight], alpha)
            mlp.fc.weight[hid:].div_(s[:, None])
            if mlp.fc.bias is not None:
                mlp.fc.bias[hid:].div_(s)
            mlp.proj.weight.mul_(s[None, :])
            done.append(f"{pre}.mlp.proj")
    hn = _head_norm(model)
    if head and hn is not None and _norm_ok(hn) and "lm_head" in maxima:
        if model.lm_head is None:  # tied: the head gets its own copy; the embedding table stays as it is
            c = model.config
            lin = nn.Linear(model.wte.weight.shape[1], c.vocab_size, bias=model.lm_head_bias is not None)
            lin.weight.copy_(model.wte.weight)
            if model.lm_head_bias is not None:
                lin.bias.copy_(model.lm_head_bias)  # model.lm_head_bias stays (unused while lm_head is set)
            model.lm_head = lin
            model.untied_head = True
        _fold_norm(hn, [model.lm_head], smooth_scales(maxima["lm_head"], [model.lm_head.weight], alpha))
        done.append("lm_head")
    record = {"alpha": float(alpha), "calibration": calibration if isinstance(calibration, str) and
              calibration in ("sotu-first", "shakespeare") else ("sotu-first" if calibration is None else "custom"),
              "tokens": n_tok, "smoothed": done}
    model.smoothing = record
    return record
