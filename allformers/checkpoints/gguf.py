"""GGUF files (llama.cpp's format) in.

The path is: metadata -> Config; every tensor dequantized to float32 by the `gguf` package;
GGUF names -> Hugging Face LLaMA names (the table below); then hf.py's own LLaMA rows take
them to our keys, so there is one LLaMA map in the code base, not two. With quantized=True the
Linears then run on int4 / int8 kernels (run_quantized) instead of fp32."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..errors import CheckpointError
from ..tokenization.gguf import metadata, tokenizer_from_gguf
from .hf import FAMILIES, hf_to_ours
from .files import load_state_dict_into

SUPPORTED = ("llama",)

# GGUF tensor name -> Hugging Face LLaMA name ("{}" is the layer index).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    **{f"blk.{{}}.attn_{g}.{p}": f"model.layers.{{}}.self_attn.{h}_proj.{p}"
       for g, h in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for p in ("weight", "bias")},
    **{f"blk.{{}}.ffn_{x}.weight": f"model.layers.{{}}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")},
}


def open_gguf(path):
    """A `gguf.GGUFReader`, or a CheckpointError that says what is wrong with the file."""
    import gguf

    path = Path(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, TypeError) as e:
        # The reader memory-maps the file; a bad magic, a cut-off header or missing tensor
        # bytes all surface as numpy errors deep in its parsing.
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or of "
            f"another format — download it again, or pass a Hugging Face folder or an allformers folder") from None


def config_from_gguf(reader, path) -> Config:
    arch = metadata(reader, "general.architecture")
    if arch not in SUPPORTED:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported yet; supported: {list(SUPPORTED)}")

    def need(key):
        value = metadata(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path} lacks the GGUF metadata key {arch}.{key}; the file is incomplete — "
                                  f"re-convert it with llama.cpp's convert_hf_to_gguf.py")
        return value

    if metadata(reader, f"{arch}.rope.scaling.type", "none") not in ("none", "linear") or \
            metadata(reader, f"{arch}.rope.scaling.factor", 1.0) != 1.0 or _tensor(reader, "rope_freqs.weight") is not None:
        raise CheckpointError(f"{path} uses RoPE scaling (long-context LLaMA 3.x / YaRN), which allformers "
                              f"does not implement yet; pick a model without rope scaling")
    n_embd, n_head = need("embedding_length"), need("attention.head_count")
    head_dim = metadata(reader, f"{arch}.attention.key_length", n_embd // n_head)
    if metadata(reader, f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{path}: {arch}.rope.dimension_count differs from the head size {head_dim}; "
                              f"partial rotary LLaMA files are not supported yet")
    embd = _tensor(reader, "token_embd.weight")  # shape in GGUF order: (n_embd, vocab)
    if embd is None:
        raise CheckpointError(f"{path} has no token_embd.weight tensor; it is not a complete LLaMA GGUF file")
    return Config(
        name=metadata(reader, "general.name") or Path(path).stem, family="decoder",
        description=f"imported from GGUF {Path(path).name}",
        vocab_size=int(embd.shape[1]), block_size=need("context_length"),
        n_layer=need("block_count"), n_head=n_head, n_kv_head=metadata(reader, f"{arch}.attention.head_count_kv", n_head),
        n_embd=n_embd, head_dim=head_dim, intermediate_size=need("feed_forward_length"),
        position="rotary", rope_base=metadata(reader, f"{arch}.rope.freq_base", 10000.0),
        norm_class="RMSNorm", norm_eps=need("attention.layer_norm_rms_epsilon"), mlp_class="GLU", activation="silu",
        attn_bias=_tensor(reader, "blk.0.attn_q.bias") is not None,
        attn_out_bias=_tensor(reader, "blk.0.attn_output.bias") is not None, mlp_bias=False,
        tie_embeddings=_tensor(reader, "output.weight") is None)


def _tensor(reader, name):
    return next((t for t in reader.tensors if t.name == name), None)


def dequantize(tensor, path) -> torch.Tensor:
    """One GGUF tensor as float32 in torch's order (GGUF lists dims fastest-first, the reverse)."""
    from gguf.quants import dequantize as gguf_dequantize

    try:
        # np.asarray drops the np.memmap subclass, whose per-slice bookkeeping triples the time.
        values = gguf_dequantize(np.asarray(tensor.data), tensor.tensor_type)  # (..., cols) in numpy order
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the "
                              f"gguf package cannot dequantize; upgrade it (pip install -U gguf) or pick "
                              f"another quantization of the model") from None
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter reorders each head's q/k rows from HF's (half, pair) rotary layout to
    interleaved pairs: w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2). This is the inverse."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_to_hf(gguf_state: dict, config: Config):
    """Returns (HF LLaMA state dict, GGUF names with no HF counterpart)."""
    rename = {g.format(i): h.format(i) for g, h in GGUF_TO_HF.items()
              for i in (range(config.n_layer) if "{}" in g else [0])}
    hf, unknown = {}, []
    for name, t in gguf_state.items():
        if name not in rename:
            unknown.append(name)
            continue
        if ".attn_q." in name or ".attn_k." in name:
            t = unpermute_rope(t, config.n_head if ".attn_q." in name else config.n_kv_head)
        hf[rename[name]] = t
    return hf, unknown


def run_quantized(model):
    """The GGUF file's quantized weights on quantized kernels, in place (load(path, quantized=True)): each
    Linear whose dequantized weights lie on a 4-bit grid per 32 (Q4_1's) -> int4 (models/int4.py: the
    file's own integers, scales and minimums rounded to bf16); every other Linear (a Q8_0 head, Q4_0,
    F16) -> weight-only int8 (models/int8.py). Returns the layout {"int4": [...], "int8": [...]}."""
    from ..models.int4 import NoInt4Linear, quantize_int4
    from ..models.int8 import int8_modules, quantize_int8

    try:
        quantize_int4(model, group_size=32, on_grid_only=True, rest="int8")
    except NoInt4Linear:
        quantize_int8(model)  # no Linear on a Q4_1 grid in the file: int8 for all
        model.int4_layout = {"int4": [], "int8": int8_modules(model), "fp32": []}
    return model.int4_layout


def load_gguf(path, quantized: bool = False):
    from ..models import TransformerLM

    path = Path(path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    state = {t.name: dequantize(t, path) for t in reader.tensors}
    hf_state, unknown = gguf_to_hf(state, config)
    ours, leftover = hf_to_ours(hf_state, config, FAMILIES["llama"])
    model = TransformerLM(config)
    report = load_state_dict_into(model, ours, str(path), strict=False)
    report.unexpected = sorted(set(report.unexpected) | set(leftover) | set(unknown))
    if report.missing or report.unexpected:
        raise CheckpointError(f"{path} does not match a LLaMA model built from its own metadata: {report}")
    model.tokenizer = tokenizer_from_gguf(reader) if metadata(reader, "tokenizer.ggml.tokens") else None
    if quantized:
        run_quantized(model.eval())
    return model, report
