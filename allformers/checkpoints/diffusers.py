"""diffusers folders, both ways: UNet2DConditionModel <-> UNet, AutoencoderKL <-> AutoencoderKL,
VQModel <-> VQAutoencoder. A diffusers folder is config.json (with "_class_name") plus
diffusion_pytorch_model.safetensors.

Our image models name their parts as diffusers does wherever allformers had no name already, so
one template table covers all three. Each row: our key <- diffusers key(s), where {a} is any module
path, {k} a layer index and {p} weight or bias; several diffusers keys are stacked on dim 0 into one
of ours (q, k, v -> our fused qkv); `swap` marks GEGLU, whose diffusers rows are [value; gate] while
our GLU's are [gate; value]. The first row that matches wins, in both directions."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .files import CONFIG_FILE, contiguous_state, atomic_folder_write, load_state_dict_into, read_safetensors

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.42.1"  # the version the export was checked against (recorded in config.json, as diffusers does)


@dataclass(frozen=True)
class KeyRow:
    ours: str
    theirs: tuple
    swap: bool = False


def _tb(leaf):  # a layer of a spatial transformer
    return f"{{a}}.transformer_blocks.{{k}}.{leaf}.{{p}}"


KEY_TABLE = (
    # spatial transformers (CrossAttn blocks): attn1 = self-attention, attn2 = cross-attention, GEGLU feed-forward
    KeyRow("{a}.blocks.{k}.attn.qkv.{p}", (_tb("attn1.to_q"), _tb("attn1.to_k"), _tb("attn1.to_v"))),
    KeyRow("{a}.blocks.{k}.attn.proj.{p}", (_tb("attn1.to_out.0"),)),
    KeyRow("{a}.blocks.{k}.cross_attn.q.{p}", (_tb("attn2.to_q"),)),
    KeyRow("{a}.blocks.{k}.cross_attn.kv.{p}", (_tb("attn2.to_k"), _tb("attn2.to_v"))),
    KeyRow("{a}.blocks.{k}.cross_attn.proj.{p}", (_tb("attn2.to_out.0"),)),
    KeyRow("{a}.blocks.{k}.norm1.{p}", (_tb("norm1"),)),
    KeyRow("{a}.blocks.{k}.norm_cross.{p}", (_tb("norm2"),)),
    KeyRow("{a}.blocks.{k}.norm2.{p}", (_tb("norm3"),)),
    KeyRow("{a}.blocks.{k}.mlp.fc.{p}", (_tb("ff.net.0.proj"),), swap=True),
    KeyRow("{a}.blocks.{k}.mlp.proj.{p}", (_tb("ff.net.2"),)),
    # self-attention over pixels (AttnDown/UpBlock2D, the autoencoders' middle)
    KeyRow("{a}.attn.qkv.{p}", ("{a}.to_q.{p}", "{a}.to_k.{p}", "{a}.to_v.{p}")),
    KeyRow("{a}.attn.proj.{p}", ("{a}.to_out.0.{p}",)),
    # samplers sit in one-element lists in diffusers
    KeyRow("{a}.downsample.conv.{p}", ("{a}.downsamplers.0.conv.{p}",)),
    KeyRow("{a}.upsample.conv.{p}", ("{a}.upsamplers.0.conv.{p}",)),
    KeyRow("{a}", ("{a}",)),  # everything else: the same name
)
# Older diffusers checkpoints (and the original LDM VAE conversions) name pixel attention differently.
ALIASES = (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))

_PLACEHOLDERS = {"a": r"(?P<a>.+)", "k": r"(?P<k>\d+)", "p": r"(?P<p>weight|bias)"}


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{[akp]\})", template)
    return re.compile("".join(_PLACEHOLDERS[x[1]] if re.fullmatch(r"\{[akp]\}", x) else re.escape(x) for x in parts))


_COMPILED = [(row, _regex(row.ours), [_regex(t) for t in row.theirs]) for row in KEY_TABLE]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_diffusers_state(state: dict) -> dict:
    out = {}
    for key, t in state.items():
        for row, ours, _ in _COMPILED:
            m = ours.fullmatch(key)
            if m is None:
                continue
            names = [x.format(**m.groupdict()) for x in row.theirs]
            t = _swap_halves(t) if row.swap else t
            for name, part in zip(names, t.chunk(len(names), dim=0)):
                out[name] = part.contiguous()
            break
    return out


def from_diffusers_state(state: dict) -> dict:
    state = dict(state)
    for old, new in ALIASES:
        for key in [k for k in state if re.search(rf"\.{old}\.(weight|bias)$", k)]:
            state[re.sub(rf"\.{old}\.(weight|bias)$", rf".{new}.\1", key)] = state.pop(key)
    out, used = {}, set()
    for key in state:
        if key in used:
            continue
        for row, _, theirs in _COMPILED:
            m = next((r.fullmatch(key) for r in theirs if r.fullmatch(key)), None)
            if m is None:
                continue
            names = [x.format(**m.groupdict()) for x in row.theirs]
            absent = [n for n in names if n not in state]
            if absent:
                raise CheckpointError(f"{key} needs {absent} beside it (they are stacked into one tensor); the "
                                      f"checkpoint is incomplete")
            t = torch.cat([state[n] for n in names], dim=0)
            out[row.ours.format(**m.groupdict())] = _swap_halves(t) if row.swap else t
            used.update(names)
            break
    return out


# ---------------------------------------------------------------------- configs: UNet2DConditionModel
DOWN = {"DownBlock2D": "res", "AttnDownBlock2D": "attn", "CrossAttnDownBlock2D": "cross"}
UP = {"UpBlock2D": "res", "AttnUpBlock2D": "attn", "CrossAttnUpBlock2D": "cross"}
MID = {"UNetMidBlock2DCrossAttn": "cross", "UNetMidBlock2D": "res", None: None}
# UNet2DConditionModel options we do not build, with the value that means "off"
UNET_OFF = {"center_input_sample": False, "only_cross_attention": False, "dual_cross_attention": False,
            "addition_embed_type": None, "time_embedding_type": "positional", "time_embedding_act_fn": None,
            "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
            "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
            "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "reverse_transformer_layers_per_block": None,
            "num_attention_heads": None, "mid_block_only_cross_attention": None}
UNET_DEFAULTS = {"sample_size": None, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
                 "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 "mid_block_type": "UNetMidBlock2DCrossAttn", "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "downsample_padding": 1,
                 "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
                 "cross_attention_dim": 1280, "transformer_layers_per_block": 1, "encoder_hid_dim": None,
                 "encoder_hid_dim_type": None, "attention_head_dim": 8, "use_linear_projection": False,
                 "class_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
                 "time_embedding_dim": None, "projection_class_embeddings_input_dim": None}
ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}


def _refuse_options(raw: dict, off: dict, cls: str):
    on = [f"{k}={raw[k]!r}" for k, v in off.items() if k in raw and raw[k] != v and not (v is None and raw[k] is False)]
    if on:
        raise CheckpointError(f"this {cls} uses {', '.join(on)}, which allformers does not build; "
                              f"supported: the switches of UNetConfig / AutoencoderConfig")


def _block_kinds(types, table, what):
    out = []
    for t in types:
        t = t[len("UNetRes"):] if t and t.startswith("UNetRes") else t
        if t not in table:
            raise CheckpointError(f"{what} {t!r} is not one of {sorted(k for k in table if k)}")
        out.append(table[t])
    return tuple(out)


def _levels(value, n, name):
    if isinstance(value, (list, tuple)):
        if len(value) != n or any(isinstance(v, (list, tuple)) for v in value):
            raise CheckpointError(f"{name}={value!r}: give one int per level")
        return tuple(value)
    return (value,) * n


def _one_or_tuple(values: tuple):
    return values[0] if len(set(values)) == 1 else tuple(values)


def unet_config_from_diffusers(raw: dict):
    from ..models.unet import UNetConfig

    _refuse_options(raw, UNET_OFF, "UNet2DConditionModel")
    d = {**UNET_DEFAULTS, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    if d["act_fn"] not in ACT:
        raise CheckpointError(f"act_fn={d['act_fn']!r} is not one of {sorted(ACT)}")
    if d["class_embed_type"] not in (None, "projection"):
        raise CheckpointError(f"class_embed_type={d['class_embed_type']!r}: only None and 'projection' are built")
    if d["encoder_hid_dim_type"] not in (None, "text_proj"):
        raise CheckpointError(f"encoder_hid_dim_type={d['encoder_hid_dim_type']!r}: only 'text_proj' is built")
    if d["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        raise CheckpointError(f"resnet_time_scale_shift={d['resnet_time_scale_shift']!r}: 'default' or 'scale_shift'")
    ch = tuple(d["block_out_channels"])
    L = len(ch)
    down = _block_kinds(d["down_block_types"], DOWN, "down block")
    up = _block_kinds(d["up_block_types"], UP, "up block")
    mid = _block_kinds([d["mid_block_type"]], MID, "mid block")[0]
    cross_dim = d["cross_attention_dim"]
    if isinstance(cross_dim, (list, tuple)):
        if len(set(cross_dim)) != 1:
            raise CheckpointError(f"cross_attention_dim={cross_dim}: one width for every level is supported")
        cross_dim = cross_dim[0]
    uses_cross = "cross" in down + up + (mid,)
    heads = _heads_from_diffusers(_levels(d["attention_head_dim"], L, "attention_head_dim"), ch, down, up, mid)
    return UNetConfig(
        in_channels=d["in_channels"], out_channels=d["out_channels"], sample_size=d["sample_size"] or 32,
        block_channels=ch, down_blocks=down, up_blocks=up, mid_block=mid,
        layers_per_block=_one_or_tuple(_levels(d["layers_per_block"], L, "layers_per_block")),
        attention_heads=_one_or_tuple(heads),
        transformer_layers=_one_or_tuple(_levels(d["transformer_layers_per_block"], L, "transformer_layers_per_block")),
        cross_attention_dim=cross_dim if uses_cross else None, encoder_hid_dim=d["encoder_hid_dim"],
        linear_projection=d["use_linear_projection"], norm_groups=d["norm_num_groups"], norm_eps=d["norm_eps"],
        activation=ACT[d["act_fn"]], dropout=d["dropout"], time_embed_dim=d["time_embedding_dim"],
        flip_sin_to_cos=d["flip_sin_to_cos"], freq_shift=d["freq_shift"],
        time_scale_shift=d["resnet_time_scale_shift"] == "scale_shift", downsample_padding=d["downsample_padding"],
        mid_scale_factor=float(d["mid_block_scale_factor"]), num_classes=d["num_class_embeds"],
        class_embed_dim=d["projection_class_embeddings_input_dim"] if d["class_embed_type"] == "projection" else None)


# diffusers' attention_head_dim is the head COUNT of cross-attention blocks but the head SIZE of pixel
# self-attention blocks, and up blocks read it reversed for the first and unreversed for the second.
def _heads_from_diffusers(adim, ch, down, up, mid):
    L = len(ch)
    heads = [None] * L

    def put(level, value, where):
        if value is None or value <= 0:
            raise CheckpointError(f"attention_head_dim={adim!r} gives no head count for {where}")
        if heads[level] not in (None, value):
            raise CheckpointError(f"attention_head_dim={adim!r} gives level {level} {heads[level]} heads in one block "
                                  f"and {value} in {where}; allformers uses one head count per level")
        heads[level] = value

    def size(level, head_dim, where):
        if not head_dim or ch[level] % head_dim:
            raise CheckpointError(f"{where}: {ch[level]} channels do not split into heads of {head_dim}")
        return ch[level] // head_dim

    for i, kind in enumerate(down):
        if kind == "cross":
            put(i, adim[i], f"down block {i}")
        elif kind == "attn":
            put(i, size(i, adim[i], f"down block {i}"), f"down block {i}")
    for i, kind in enumerate(up):
        level = L - 1 - i
        if kind == "cross":
            put(level, adim[level], f"up block {i}")
        elif kind == "attn":
            put(level, size(level, adim[i], f"up block {i}"), f"up block {i}")
    if mid == "cross":
        put(L - 1, adim[L - 1], "the mid block")
    return tuple(h if h is not None else 1 for h in heads)


def _heads_to_diffusers(c) -> list:
    L, ch = c.levels, c.block_channels
    heads = [c.at("attention_heads", i) for i in range(L)]
    adim = [None] * L

    def need(i, value, where):
        if adim[i] not in (None, value):
            raise CheckpointError(
                f"the U-Net's attention heads {heads} cannot be written as diffusers' attention_head_dim: {where} "
                f"needs entry {i} = {value} but another block needs {adim[i]} (diffusers reads it as a head count in "
                f"cross-attention blocks and as a head size in self-attention ones); use equal head sizes or "
                f"only 'cross' levels")
        adim[i] = value

    for i, kind in enumerate(c.down_blocks):
        if kind == "cross":
            need(i, heads[i], f"down level {i}")
        elif kind == "attn":
            need(i, ch[i] // heads[i], f"down level {i}")
    for i, kind in enumerate(c.up_blocks):
        level = L - 1 - i
        if kind == "cross":
            need(level, heads[level], f"up block {i}")
        elif kind == "attn":
            need(i, ch[level] // heads[level], f"up block {i}")
    if c.mid_block == "cross":
        need(L - 1, heads[L - 1], "the mid block")
    return [a if a is not None else heads[i] for i, a in enumerate(adim)]


def unet_config_to_diffusers(c) -> dict:
    if c.mid_block == "attn":
        raise CheckpointError("UNet2DConditionModel has no self-attention-only mid block: use mid_block 'cross', "
                              "'res' or None to export")
    names = lambda kinds, table: [next(k for k, v in table.items() if v == kind) for kind in kinds]  # noqa: E731
    L = c.levels
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": c.sample_size, "in_channels": c.in_channels, "out_channels": c.out_channels,
        "center_input_sample": False, "flip_sin_to_cos": c.flip_sin_to_cos, "freq_shift": c.freq_shift,
        "down_block_types": names(c.down_blocks, DOWN), "up_block_types": names(c.up_blocks, UP),
        "mid_block_type": next(k for k, v in MID.items() if v == c.mid_block),
        "only_cross_attention": False, "block_out_channels": list(c.block_channels),
        "layers_per_block": _list_or_int([c.at("layers_per_block", i) for i in range(L)]),
        "downsample_padding": c.downsample_padding, "mid_block_scale_factor": c.mid_scale_factor,
        "dropout": c.dropout, "act_fn": c.activation, "norm_num_groups": c.norm_groups, "norm_eps": c.norm_eps,
        "cross_attention_dim": c.cross_attention_dim if c.cross_attention_dim is not None else 1280,
        "transformer_layers_per_block": _list_or_int([c.at("transformer_layers", i) for i in range(L)]),
        "encoder_hid_dim": c.encoder_hid_dim, "encoder_hid_dim_type": "text_proj" if c.encoder_hid_dim else None,
        "attention_head_dim": _list_or_int(_heads_to_diffusers(c)), "use_linear_projection": c.linear_projection,
        "class_embed_type": "projection" if c.class_embed_dim is not None else None,
        "num_class_embeds": c.num_classes, "projection_class_embeddings_input_dim": c.class_embed_dim,
        "resnet_time_scale_shift": "scale_shift" if c.time_scale_shift else "default",
        "time_embedding_dim": c.time_embed_dim, "upcast_attention": False,
    }


def _list_or_int(values: list):
    return values[0] if len(set(values)) == 1 else list(values)


# ---------------------------------------------------------------------- configs: AutoencoderKL / VQModel
AE_OFF = {"norm_type": "group", "latents_mean": None, "latents_std": None, "lookup_from_codebook": False}
AE_DEFAULTS = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
               "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1,
               "act_fn": "silu", "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
               "shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True,
               "mid_block_add_attention": True, "num_vq_embeddings": 256, "vq_embed_dim": None}


def autoencoder_config_from_diffusers(raw: dict):
    from ..models.autoencoders import AutoencoderConfig

    cls = raw["_class_name"]
    _refuse_options(raw, AE_OFF, cls)
    d = {**AE_DEFAULTS, "latent_channels": 4 if cls == "AutoencoderKL" else 3,
         **{k: v for k, v in raw.items() if not k.startswith("_")}}
    n = len(d["block_out_channels"])
    if tuple(d["down_block_types"]) != ("DownEncoderBlock2D",) * n or tuple(d["up_block_types"]) != ("UpDecoderBlock2D",) * n:
        raise CheckpointError(f"{cls} blocks {d['down_block_types']} / {d['up_block_types']}: only DownEncoderBlock2D "
                              f"and UpDecoderBlock2D are built")
    if d["act_fn"] not in ACT:
        raise CheckpointError(f"act_fn={d['act_fn']!r} is not one of {sorted(ACT)}")
    common = dict(in_channels=d["in_channels"], out_channels=d["out_channels"], block_channels=tuple(d["block_out_channels"]),
                  layers_per_block=d["layers_per_block"], latent_channels=d["latent_channels"],
                  norm_groups=d["norm_num_groups"], activation=ACT[d["act_fn"]], mid_attention=d["mid_block_add_attention"],
                  sample_size=d["sample_size"] if isinstance(d["sample_size"], int) else d["sample_size"][0],
                  scaling_factor=d["scaling_factor"])
    if cls == "AutoencoderKL":
        return AutoencoderConfig(kind="kl", shift_factor=d["shift_factor"], quant_conv=d["use_quant_conv"],
                                 post_quant_conv=d["use_post_quant_conv"], **common)
    return AutoencoderConfig(kind="vq", num_codes=d["num_vq_embeddings"], code_dim=d["vq_embed_dim"], **common)


def autoencoder_config_to_diffusers(c) -> dict:
    if c.kind not in ("kl", "vq"):
        raise CheckpointError(f"a {c.kind!r} autoencoder has no diffusers class; only 'kl' (AutoencoderKL) and 'vq' "
                              f"(VQModel) export")
    n = len(c.block_channels)
    d = {"_class_name": "AutoencoderKL" if c.kind == "kl" else "VQModel", "_diffusers_version": DIFFUSERS_VERSION,
         "in_channels": c.in_channels, "out_channels": c.out_channels,
         "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
         "block_out_channels": list(c.block_channels), "layers_per_block": c.layers_per_block, "act_fn": c.activation,
         "latent_channels": c.latent_channels, "norm_num_groups": c.norm_groups, "sample_size": c.sample_size,
         "scaling_factor": c.scaling_factor, "mid_block_add_attention": c.mid_attention}
    if c.kind == "kl":
        d.update(shift_factor=c.shift_factor, use_quant_conv=c.quant_conv, use_post_quant_conv=c.post_quant_conv,
                 force_upcast=True)
    else:
        d.update(num_vq_embeddings=c.num_codes, vq_embed_dim=c.code_dim, norm_type="group", force_upcast=False)
    return d


# ---------------------------------------------------------------------- folders
def _config_and_model(raw: dict):
    cls = raw.get("_class_name")
    if cls == "UNet2DConditionModel":
        from ..models.unet import UNet

        return UNet(unet_config_from_diffusers(raw))
    if cls in ("AutoencoderKL", "VQModel"):
        from ..models.autoencoders import build_autoencoder

        return build_autoencoder(autoencoder_config_from_diffusers(raw))
    raise CheckpointError(f"diffusers class {cls!r} is not supported; allformers loads UNet2DConditionModel, "
                          f"AutoencoderKL and VQModel folders")


def _read_weights(path: Path) -> dict:
    if (path / DIFFUSERS_WEIGHTS).exists():
        return read_safetensors(path / DIFFUSERS_WEIGHTS)
    if (path / "diffusion_pytorch_model.bin").exists():
        return torch.load(path / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{path} has no {DIFFUSERS_WEIGHTS} (sharded or fp16-variant folders are not supported: "
                          f"re-save with save_pretrained(safe_serialization=True))")


def load_diffusers(path):
    """A diffusers folder -> (our model, LoadReport)."""
    path = Path(path)
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} is not readable JSON: {e}") from None
    model = _config_and_model(raw)
    report = load_state_dict_into(model, from_diffusers_state(_read_weights(path)), str(path))
    return model.eval(), report


def save_diffusers(model, path) -> Path:
    """Write `model` (UNet, AutoencoderKL or VQAutoencoder) as a folder diffusers' from_pretrained reads."""
    from safetensors.torch import save_file

    c = getattr(model, "config", None)
    kind = type(c).__name__
    if kind == "UNetConfig":
        cfg = unet_config_to_diffusers(c)
    elif kind == "AutoencoderConfig":
        cfg = autoencoder_config_to_diffusers(c)
    else:
        raise CheckpointError(f"{type(model).__name__} has no diffusers format; U-Nets and the 'kl' / 'vq' "
                              f"autoencoders do")
    state = to_diffusers_state(contiguous_state(model.state_dict()))

    def write(tmp: Path):
        save_file(state, str(tmp / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))

    atomic_folder_write(Path(path), write)
    return Path(path)
